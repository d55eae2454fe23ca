"""How much of a network's compute stochastic depth can skip: the ideal time ratio of a training step.

A dropped block skips its residual branch (convolutions, BN, ReLU) forward and backward; its projection
shortcut, the stem and the classifier always run. Convolutions and linear layers hold nearly all the FLOPs
of a ResNet, and on these machines a step's time tracks the FLOP fraction that runs within a few points,
so the expected fraction of multiply-accumulates that runs is the ideal train-step time ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .convert import find_residual_blocks

__all__ = ["residual_macs", "compute_fraction", "expected_compute_fraction"]


@torch.no_grad()
def residual_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[list[float], float]:
    """Multiply-accumulates of each block's residual branch, and of the whole model, for one input.

    Counts ``Conv2d`` and ``Linear`` layers with forward hooks during one eval-mode forward (every block
    runs in eval mode, converted or not). A block's downsample is not part of its residual branch.
    """
    blocks = find_residual_blocks(model)
    if not blocks:
        raise ValueError("model: no torchvision BasicBlock/Bottleneck residual blocks found")
    owner: dict[nn.Module, int] = {}
    for index, block in enumerate(blocks):
        downsample = getattr(block, "downsample", None)
        skip = set(downsample.modules()) if downsample is not None else set()
        for module in block.modules():
            if module not in skip:
                owner.setdefault(module, index)
    per_block = [0.0] * len(blocks)
    total = [0.0]

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs = float(output.numel()) * k
        else:
            macs = float(output.numel()) * module.in_features
        total[0] += macs
        if module in owner:
            per_block[owner[module]] += macs

    counted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(count) for m in counted]
    was_training = model.training
    try:
        model.eval()
        model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return per_block, total[0]


def compute_fraction(per_block: Sequence[float], total: float, survival: Sequence[float]) -> float:
    """``1 - sum_l (1 - p_l) * macs_l / total``: the expected share of the MACs that runs per step."""
    if len(survival) != len(per_block):
        raise ValueError(f"survival has {len(survival)} probabilities, the model has {len(per_block)} blocks")
    return 1.0 - sum((1.0 - p) * m for p, m in zip(survival, per_block)) / total


def expected_compute_fraction(model: nn.Module, example_input: torch.Tensor,
                              survival: Sequence[float]) -> float:
    """The ideal train-step time ratio of ``model`` at survival probabilities ``survival``."""
    per_block, total = residual_macs(model, example_input)
    return compute_fraction(per_block, total, survival)
