"""The lesion study of Veit, Wilber, Belongie 2016 on a trained run: test error with blocks deleted.

Each single residual block deleted in turn, then ``k`` random blocks at once (k = 1..L/2, ``draws``
draws each), using :func:`sdepth_ext.lesion`, which removes blocks for evaluation only. The models here are
:func:`sdepth_ext.cifar_resnet` s, built from torchvision ``BasicBlock`` s: one residual unit per block, in
registration order, and a downsampling block is one with a projection shortcut (``downsample``).
"""

from __future__ import annotations

import random

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from .. import lesion
from ..data import Dataset
from .loop import evaluate

__all__ = ["lesion_study"]


def lesion_study(model: torch.nn.Module, data: Dataset, draws: int, seed: int) -> dict:
    """Test error with each single block deleted, and with k random blocks deleted (k = 1..L/2).

    Returns ``{"base_error", "single": [error per block], "random_k": {k: [error per draw]},
    "downsampling": [0-based indices of the blocks with a projection shortcut]}``.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws (--lesion-draws) must be an integer >= 1, got {draws!r}")
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    num_blocks = len(blocks)
    downsampling = [l for l, b in enumerate(blocks) if b.downsample is not None]
    _, base_error = evaluate(model, data.test_x, data.test_y)
    single = []
    for l in range(num_blocks):
        with lesion(model, drop=[l]):
            single.append(evaluate(model, data.test_x, data.test_y)[1])
    rng = random.Random(seed)
    by_k = {}
    for k in range(1, num_blocks // 2 + 1):
        errors = []
        for _ in range(draws):
            with lesion(model, drop=sorted(rng.sample(range(num_blocks), k))):
                errors.append(evaluate(model, data.test_x, data.test_y)[1])
        by_k[k] = errors
    return {"base_error": base_error, "single": single, "random_k": by_k, "downsampling": downsampling}
