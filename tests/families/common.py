"""What every family's test file provides, and the references the shared suite (test_suite.py) uses.

A :class:`FamilyCase` holds a model maker (a small, CPU-sized instance with non-trivial normalisation
parameters), an input maker and ``reference_block(block, x, units)``: the block's forward written again by
hand, with each unit's gate given explicitly -- ``units[u] = (rows, scale)``, ``rows`` None for "every sample
survives", a list of surviving sample indices otherwise (``[]``: dropped). The branches call the block's own
submodules (torchvision's layers are not what is under test); the gating, the gather, the scatter and the
add are written here, independently of sdepth_ext's adapters and units.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sdepth_ext.state import get_state, is_gated


@dataclass
class FamilyCase:
    name: str
    make: Callable[[], nn.Module]
    input: Callable[[int, int], torch.Tensor]  # (batch, seed) -> input
    reference_block: Callable  # (block, x, units) -> output
    block_types: tuple[type, ...]  # the block classes this case's model exercises
    own_rates: bool  # the model carries its own stochastic-depth modules
    exact_row_mode: bool  # per-sample normalisation: row mode equals the masked original
    drop_slots: tuple[str, ...] = ()  # the blocks' attributes holding their own drop modules, in call order
    batch: int = 4
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def randomize_norms(model: nn.Module, seed: int = 1234) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so scale or statistics errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(torch.empty_like(m.bias).uniform_(-0.2, 0.2, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.empty_like(m.running_mean).uniform_(-0.1, 0.1, generator=g))
                m.running_var.copy_(torch.empty_like(m.running_var).uniform_(0.5, 2.0, generator=g))
    return model


def cached_maker(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A deepcopy of one instance per maker: the same weights every call, built once."""
    cache: list[nn.Module] = []

    def fresh() -> nn.Module:
        if not cache:
            torch.manual_seed(1234)
            cache.append(randomize_norms(make()))
        return copy.deepcopy(cache[0])

    return fresh


def image_input(size: int) -> Callable[[int, int], torch.Tensor]:
    def make(batch: int, seed: int) -> torch.Tensor:
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return make


def gated_add(shortcut: torch.Tensor, x: torch.Tensor, branch: Callable, rows, scale: float) -> torch.Tensor:
    """``shortcut + scale * branch(x)`` for the samples in ``rows`` (None: all), ``shortcut`` elsewhere."""
    if rows is None:
        return shortcut + scale * branch(x)
    if len(rows) == 0:
        return shortcut
    index = torch.tensor(rows, dtype=torch.int64)
    return shortcut.index_add(0, index, scale * branch(x.index_select(0, index)))


def gated_blocks(converted: nn.Module) -> list[str]:
    """Names of the converted blocks, in unit order."""
    names = {id(m): n for n, m in converted.named_modules()}
    return [names[id(block)] for block in get_state(converted).blocks]


def unit_gates(converted: nn.Module, plan) -> list[tuple]:
    """Per unit: (rows or None, train scale) of the plan, as the converted model reads them."""
    state = get_state(converted)
    gates = []
    for l in range(len(state.units)):
        rows = plan.rows(l)
        gates.append((None if rows is None else rows.cpu().tolist(),
                      state.train_scale(l, plan.counts[l], plan.batch_size)))
    return gates


def reference_forward(case: FamilyCase, converted: nn.Module, plain: nn.Module, x: torch.Tensor,
                      gates: list[tuple]) -> torch.Tensor:
    """``plain`` (an unconverted copy) with each converted block's forward replaced by the case's reference,
    given the per-unit gates ``[(rows, scale), ...]`` in unit order."""
    state = get_state(converted)
    modules = dict(plain.named_modules())
    blocks = []
    for name, block in zip(gated_blocks(converted), state.blocks):
        first, count = block._sd_index, block._sd_num_units
        target = modules[name]
        target.forward = functools.partial(case.reference_block, target, units=gates[first:first + count])
        blocks.append(target)
    try:
        return plain(x)
    finally:
        for target in blocks:
            del target.forward


class _Masker(nn.Module):
    """Stands in for a block's own drop modules: multiplies by the block's unit masks, in call order."""

    def __init__(self, masks: list[torch.Tensor]):
        super().__init__()
        self.pending = list(masks)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.pending.pop(0).view(-1, *([1] * (t.dim() - 1))).to(t.dtype)


def masked_original(case: FamilyCase, converted: nn.Module, plain: nn.Module, x: torch.Tensor,
                    masks: list[torch.Tensor]) -> torch.Tensor:
    """The original model's own forward, each block's drop modules (``case.drop_slots``) multiplying by its
    units' masks: what row mode must equal for per-sample-normalised families."""
    from sdepth_ext.state import get_state

    modules = dict(plain.named_modules())
    swapped, maskers = [], []
    for name, block in zip(gated_blocks(converted), get_state(converted).blocks):
        target = modules[name]
        first, count = block._sd_index, block._sd_num_units
        masker = _Masker(masks[first:first + count])
        maskers.append(masker)
        for slot in case.drop_slots:
            swapped.append((target, slot, getattr(target, slot)))
            target.__dict__[slot] = masker  # shadows the submodule for this forward only
    try:
        out = plain(x)
    finally:
        for target, slot, _ in swapped:
            target.__dict__.pop(slot, None)
    assert not any(m.pending for m in maskers), "masks left: the model ran fewer drop modules than units"
    return out


def masks_of(gates: list[tuple], batch: int) -> list[torch.Tensor]:
    out = []
    for rows, scale in gates:
        mask = torch.zeros(batch)
        mask[list(range(batch)) if rows is None else rows] = scale
        out.append(mask)
    return out


def branch_modules(converted: nn.Module) -> list[list[nn.Module]]:
    """Per unit: the modules of its branch (what a dropped unit must not run)."""
    state = get_state(converted)
    return [block._sd_adapter.branch_modules(block, u) for block, u in state.units]


def assert_tree_close(got, want, exact: bool, msg: str = ""):
    if exact:
        assert torch.equal(got, want), f"{msg}: max diff {(got - want).abs().max().item()}"
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=msg)


__all__ = ["FamilyCase", "cached_maker", "image_input", "gated_add", "reference_forward", "unit_gates",
           "masked_original", "masks_of", "branch_modules", "gated_blocks", "is_gated", "assert_tree_close"]


# FamilyCase.extra of models that torch.fx and TorchScript cannot take even unconverted (transformers 5.x's:
# data-dependent control flow, source-less functions); test_interop skips those tests for them.
NOT_TRACEABLE = {"fx_and_script": False}


class _Keep(nn.Module):
    def __init__(self):
        super().__init__()
        self.kept = []

    def forward(self, residual):
        self.kept.append(residual)
        return residual * 0


def own_residual(block, t, unit, args, kwargs):
    """Unit ``unit``'s residual on ``t``, by a Hugging Face layer's own forward (its ``drop_path`` swapped for
    a module that keeps the residual and returns zeros): with the units before it zeroed, each
    unit's input is ``t``."""
    keep = _Keep()
    block.__dict__["drop_path"] = keep
    try:
        type(block).forward(block, t, *args, **kwargs)
    finally:
        del block.__dict__["drop_path"]
    return keep.kept[unit]


__all__ += ["NOT_TRACEABLE", "own_residual"]
