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

from .flags import restored_train_flags
from .state import get_state, units_of

__all__ = ["unit_macs", "total_macs", "compute_fraction", "expected_compute_fraction", "compute_stats"]


def _count_eval_forward(model: nn.Module, example_input: torch.Tensor, **counter_kw) -> FlopCounterMode:
    """One eval-mode forward under ``FlopCounterMode``, no gradient; every module's training flag restored."""
    counter = FlopCounterMode(display=False, **counter_kw)
    with restored_train_flags(model), torch.no_grad(), counter:
        model.eval()
        model(example_input)
    return counter


def total_macs(model: nn.Module, example_input: torch.Tensor) -> float:
    """Multiply-accumulates of one eval-mode forward of any model (FLOPs / 2), e.g. a pruned one."""
    return float(_count_eval_forward(model, example_input).get_total_flops()) / 2


def unit_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[list[float], float]:
    """Multiply-accumulates of each unit's residual branch, and of the whole model, for one input.

    One eval-mode forward (every unit runs in eval mode, converted or not) under ``FlopCounterMode``;
    MACs = FLOPs / 2. A unit's projection shortcut is not part of its branch.
    """
    units = units_of(model)
    if not units:
        raise ValueError(f"model: {type(model).__name__} has no residual units")
    names = {id(m): n for n, m in model.named_modules()}
    counts = _count_eval_forward(model, example_input, depth=None).get_flop_counts()
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


def compute_stats(model: nn.Module, example_input: torch.Tensor | None = None, reset: bool = False) -> dict:
    """What share of the residual-branch work actually ran: the last training step, and since conversion (or
    the last ``reset``), next to the expected share.

    Work is counted in FLOPs: unit l's branch MACs times the samples it ran on (sub-batches in row mode,
    promoted samples of ``row_multiple`` included), over what every unit on every sample would cost. The
    ``model_*`` entries are the same over the whole model's MACs (stem, shortcuts and head always run): the
    ideal train-step time ratio. The per-unit MACs are counted once per input shape, on one sample of the
    shape the last training step saw (or of ``example_input``), with an eval-mode forward under no_grad. That
    forward communicates under FSDP2 (it gathers parameters): there, call it on every rank.

    Returns ``{"steps", "last_step", "cumulative", "expected", "model_last_step", "model_cumulative",
    "model_expected"}`` (fractions in [0, 1]). ``reset=True`` starts a new cumulative count after reading.
    """
    state = get_state(model)
    tally = state.tally
    if example_input is None:
        if state.input_meta is None:
            raise ValueError("compute_stats: no training step has run yet; pass example_input= (one batch) "
                             "to count the units' FLOPs")
        shape, dtype, device = state.input_meta
        example_input = torch.zeros((1, *shape), dtype=dtype, device=device)
    key = tuple(example_input.shape[1:])
    cached = state.macs_cache.get(key)
    if cached is None:
        cached = state.macs_cache[key] = unit_macs(model, example_input[:1])
    per_unit, total = cached
    branch = sum(per_unit)

    def ran(counts, samples):
        return sum(m * c for m, c in zip(per_unit, counts)) / samples if samples else float("nan")

    expected = sum(m * p for m, p in zip(per_unit, state.scaled_survival))
    last, cumulative = ran(tally.last, tally.last_batch), ran(tally.total, tally.samples)
    stats = {"steps": tally.steps, "last_step": last / branch, "cumulative": cumulative / branch,
             "expected": expected / branch,
             "model_last_step": 1 - (branch - last) / total,
             "model_cumulative": 1 - (branch - cumulative) / total,
             "model_expected": 1 - (branch - expected) / total}
    if reset:
        state.reset_tally()
    return stats
