"""torch.compile for converted models, region by region: ``compile_blocks``.

Compiling the converted root whole (``torch.compile(model)``) gives one graph per mode, but real skipping
only in subset mode and for transformer units in batch mode (:meth:`sdepth_ext.units.GatedUnits.forward`,
docs/training.md); in row mode and for BatchNorm or convolutional branches in batch mode the compiled graph
multiplies the branch by its gate. Regions skip in every mode.

``compile_blocks`` compiles what costs FLOPs -- each unit's residual branch (convs, norms, attention, MLP)
and its projection shortcut -- and keeps the gate decisions, the row gather and the fused epilogue in eager
Python. The graphs then never depend on the plan: a dropped unit calls no compiled code, a surviving one
calls the same graph whatever the other gates are. Identical blocks share one compiled graph (they run the
same code; parameters are graph inputs), so compile time grows with the number of distinct block shapes,
not with depth. That needs Dynamo to inline nn.Modules (``inline_inbuilt_nn_modules``, the default from
torch 2.5); torch 2.4 specialises each graph on its module instance: one graph per block, still no
recompiles per plan.

Recompiles, per distinct block shape:

* batch mode: one graph for training (plus one for eval): ``f`` always sees the whole batch;
* row and subset mode: the sub-batch size varies (subset mode: from unit to unit). Unless ``dynamic=False``,
  the batch dimension of the region's input is marked dynamic (``torch._dynamo.maybe_mark_dynamic``), so
  one graph serves every sub-batch size >= 2 and one more the size 1 (Dynamo always specialises sizes 0 and
  1): at most 2 training graphs per shape, the first whatever size comes first (without the mark Dynamo
  would compile the first size statically and recompile at the second). With ``dynamic=False`` every
  distinct size is a graph; pass ``row_multiple=k`` to round survivor counts up to multiples of k
  (:func:`set_row_multiple`), leaving ``ceil(N / k)`` sizes.

All regions share one Dynamo cache (torch.compile wraps each ``functools.partial`` in the same function), and
Dynamo caps the graphs per cache (``recompile_limit``, 8 by default; ``cache_size_limit`` before torch 2.7):
``compile_blocks`` raises that limit to cover all shapes and buckets, rather than silently run eager.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn

from .state import adapter_of, block_state, get_state, unit_range

__all__ = ["compile_blocks", "set_row_multiple", "effective_survival"]

# Graphs per distinct block shape: train (dynamic) batch, train size 1, eval, and one spare.
_GRAPHS_PER_SHAPE = 4


def set_row_multiple(model: nn.Module, multiple: int) -> nn.Module:
    """Row mode: round survivor counts K (0 < K < N) up to ``min(N, k * ceil(K / k))``, k = ``multiple``.

    The extra samples are dropped samples promoted to survivors (their residual is added like any
    survivor's), so unit l runs on a fraction ``effective_survival(p_l, N, k) >= p_l`` of the samples
    instead of ``p_l``; units without survivors stay dropped. ``multiple=1`` switches rounding off. Works
    eagerly too; its point is few shapes for compiled code. A batch-mode model (counts are 0 or N already)
    raises ``ValueError``: the setting would do nothing.
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    state = get_state(model)
    if state.mode != "row" and multiple != 1:
        why = ("every unit runs on all samples or none" if state.mode == "batch"
               else "every unit keeps a fixed count of samples, the same shapes every step")
        raise ValueError(f"multiple: row_multiple={multiple} rounds row-mode survivor counts, but the model "
                         f"converts in {state.mode} mode ({why})")
    state.row_multiple = multiple
    return model


def effective_survival(p: float, batch_size: int, multiple: int) -> float:
    """Expected fraction of samples a row-mode block runs on under ``row_multiple=multiple``.

    ``E[min(N, k ceil(K/k))] / N`` with ``K ~ Binomial(N, p)``, ``N = batch_size``, ``k = multiple``
    (``p`` itself for ``multiple=1``). E.g. p = 0.5, N = 128, k = 8: 0.5273 (+0.027).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    n, k, p = batch_size, multiple, float(p)
    total = 0.0
    for K in range(1, n + 1):
        prob = math.comb(n, K) * p**K * (1.0 - p) ** (n - K)
        total += prob * min(n, k * math.ceil(K / k))
    return total / n


def _shape_key(module: nn.Module) -> tuple:
    return tuple((type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False)),
                  getattr(m, "stride", None)) for m in module.modules())


def _maybe_mark_dynamic(x: torch.Tensor) -> None:
    mark = getattr(torch._dynamo, "maybe_mark_dynamic", None)
    if mark is not None:
        mark(x, 0)


def _region(compiled, dynamic_batch: bool):
    """The block's compiled region; row mode marks the (sub-)batch dimension dynamic before each call."""
    if not dynamic_batch:
        return compiled

    def run(x: torch.Tensor) -> torch.Tensor:
        _maybe_mark_dynamic(x)
        return compiled(x)

    return run


def _inlines_nn_modules() -> bool:
    """Whether Dynamo shares one graph among modules of the same code (torch >= 2.5 by default)."""
    with warnings.catch_warnings():  # the flag is deprecated (always on) in newer torch
        warnings.simplefilter("ignore", FutureWarning)
        return bool(getattr(torch._dynamo.config, "inline_inbuilt_nn_modules", True))


def _raise_recompile_limit(needed: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < needed:
        setattr(config, name, needed)


def compile_blocks(model: nn.Module, *, row_multiple: int | None = None, **compile_kwargs) -> nn.Module:
    """Compile each block's residual branch and projection shortcut with ``torch.compile(**compile_kwargs)``.

    Gate decisions, plan draws, row gathers and the epilogue stay eager (module docstring). Returns ``model``
    (not a wrapper: state_dict keys, hooks and DDP wrapping are unchanged). ``row_multiple``: see
    :func:`set_row_multiple`. ``sdepth_ext.revert`` drops the compiled regions. A copy of the compiled
    model (``copy.deepcopy``, ``torch.save``/``torch.load``) compiles regions of its own, with the same
    ``compile_kwargs``, at its first forward. Call on the converted root (or its DDP wrapper).

    >>> sd.compile_blocks(model, backend="inductor", dynamic=False, row_multiple=8)
    """
    state = get_state(model)
    if row_multiple is not None:
        set_row_multiple(model, row_multiple)
    state.compile_kwargs = dict(compile_kwargs)
    _compile_regions(state)
    if not any(getattr(cleanup, "func", None) is _drop_regions for cleanup in state.cleanups):
        state.cleanups.append(functools.partial(_drop_regions, state))
    return model


def _compile_regions(state) -> None:
    """Every block's compiled regions, made with ``state.compile_kwargs`` for the blocks of ``state``."""
    compile_kwargs = state.compile_kwargs
    shapes = set()
    # Subset mode's counts are fixed per unit, but units of one shape (one shared graph) keep different ones.
    dynamic_batch = state.mode != "batch" and compile_kwargs.get("dynamic") is not False
    blocks = state.blocks
    for block in blocks:
        adapter = adapter_of(block)
        regions = _Regions(block)
        for u in range(len(unit_range(block))):
            residual = _region(torch.compile(functools.partial(adapter.residual, block, u), **compile_kwargs),
                               dynamic_batch)
            shortcut = torch.compile(functools.partial(adapter.shortcut, block, u), **compile_kwargs) \
                if adapter.has_projection(block, u) else None
            regions.append((residual, shortcut))
        # An instance attribute stored in __dict__ directly: compiled wrappers are not registered as
        # submodules, so state_dict keys and .modules() stay those of the plain model.
        block.__dict__["_sd_regions"] = regions
        shapes.add(_shape_key(block))
    buckets = _GRAPHS_PER_SHAPE
    if compile_kwargs.get("dynamic") is False and state.mode != "batch":
        buckets = 64  # every sub-batch size is a graph; with row_multiple that is ceil(N / k) sizes
    distinct = len(shapes) if _inlines_nn_modules() else len(blocks)
    _raise_recompile_limit(max(8, buckets * distinct))


class _Regions(list):
    """A block's compiled regions: ``[(residual, shortcut or None)]`` per unit.

    A compiled function is bound to the block it was made for, so a copy of the model (``copy.deepcopy``,
    ``torch.save``) must not carry it: the copy would run, and train, the original's parameters. A copy
    gets a :class:`_RegionsToCompile` instead, which compiles the copy's own regions with the same settings
    (``compile_kwargs``, kept in the model's state) when a unit first asks for them.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def __reduce__(self):
        return _RegionsToCompile, (self.block,)


class _RegionsToCompile:
    """A copied block's compiled regions, compiled (for every block of its model) on first use."""

    __slots__ = ("block",)

    def __init__(self, block: nn.Module):
        self.block = block

    def __getitem__(self, u: int):
        _compile_regions(block_state(self.block))
        return self.block.__dict__["_sd_regions"][u]


def _drop_regions(state) -> None:
    """revert's cleanup: the blocks forget their compiled regions."""
    for block in state.blocks:
        block.__dict__.pop("_sd_regions", None)
