"""How much of a network's compute stochastic depth can skip: the ideal time ratio of a training step.

A dropped unit skips its residual branch (convolutions, normalisation, attention, MLP) forward and backward;
projection shortcuts, the stem and the classifier always run. Matrix products and convolutions hold nearly
all the FLOPs of these networks, and on these machines a step's time tracks the FLOP fraction that runs
within a few points, so the expected fraction of multiply-accumulates that runs is the ideal train-step time
ratio. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` per module, which includes grouped
convolutions at their real cost and attention's matrix products; a unit's share is the sum over the modules
of its branch (:meth:`~sdepth_ext.families.UnitAdapter.branch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .convert import units_of

__all__ = ["unit_macs", "compute_fraction", "expected_compute_fraction"]


@torch.no_grad()
def unit_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[list[float], float]:
    """Multiply-accumulates of each unit's residual branch, and of the whole model, for one input.

    One eval-mode forward (every unit runs in eval mode, converted or not) under ``FlopCounterMode``;
    MACs = FLOPs / 2. A unit's projection shortcut is not part of its branch.
    """
    units = units_of(model)
    if not units:
        raise ValueError(f"model: {type(model).__name__} has no residual units")
    names = {id(m): n for n, m in model.named_modules()}
    was_training = model.training
    counter = FlopCounterMode(display=False, depth=None)
    try:
        model.eval()
        with counter:
            model(example_input)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def flops_of(module: nn.Module) -> float:
        name = names[id(module)]
        per_op = counts.get(f"{root}.{name}" if name else root, {})
        return float(sum(per_op.values()))

    per_unit = [sum(flops_of(m) for m in adapter.branch_modules(block, u)) / 2 for block, u, adapter in units]
    total = float(sum(counts.get("Global", {}).values())) / 2
    return per_unit, total


def compute_fraction(per_unit: Sequence[float], total: float, survival: Sequence[float]) -> float:
    """``1 - sum_l (1 - p_l) * macs_l / total``: the expected share of the MACs that runs per step."""
    if len(survival) != len(per_unit):
        raise ValueError(f"survival has {len(survival)} probabilities, the model has {len(per_unit)} units")
    return 1.0 - sum((1.0 - p) * m for p, m in zip(survival, per_unit)) / total


def expected_compute_fraction(model: nn.Module, example_input: torch.Tensor,
                              survival: Sequence[float]) -> float:
    """The ideal train-step time ratio of ``model`` at survival probabilities ``survival``."""
    per_unit, total = unit_macs(model, example_input)
    return compute_fraction(per_unit, total, survival)
