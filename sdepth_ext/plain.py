"""A converted model's plain eval forward: the one loop over a block's units, and what is built from it.

In eval every unit runs (or, lesioned, returns ``act(shortcut(x))``), its residual scaled by ``p_l`` under
"paper" scaling. :func:`eval_units` is that loop; what adds a unit's residual is the caller's:

* the units' eager eval forward (:mod:`sdepth_ext.units`) adds with the fused epilogue;
* torch.fx tracing of a block in eval (:func:`symbolic_forward`) and the blocks of a pruned model
  (:func:`partial_block`) add with plain torch ops (:func:`add_residual`), so the graph scripts and exports;
* :func:`scriptable_copy` is what ``torch.jit.script`` compiles for a converted model or a part of one,
  :func:`pruned_copy` the plain model :func:`sdepth_ext.prune` returns.

How a removed unit becomes plain torch: a block whose units are all removed is replaced by the adapter's
plain form of ``act(shortcut(x))`` (``nn.Identity`` for an identity unit, its projection -- followed by a
ReLU for ResNets -- otherwise). A block with some units removed (a Swin or ViT block without its attention,
say) becomes a ``torch.fx.GraphModule`` that calls the block's remaining submodules: generated torch code,
the same parameter names, no Python of ours at run time.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Container

import torch
import torch.fx
from torch import nn

from .kernels import ACTIVATION_RELU
from .state import (
    SCRIPT_HOOK,
    adapter_of,
    block_state,
    get_state,
    is_converted_root,
    is_gated,
    revert_block,
    uninstall,
    unit_range,
    units_of,
)

__all__ = ["eval_units", "add_residual", "kept_units", "symbolic_forward", "partial_block", "pruned_copy",
           "scriptable_copy", "install_script_hooks"]


def eval_units(block: nn.Module, adapter, x, kept: Container[int], scales: dict[int, float],
               add: Callable) -> torch.Tensor:
    """``block``'s forward in eval: units in ``kept`` add their residual (``add(block, u, x, scale)``, the
    scale from ``scales``, default 1), the others are removed (``act(shortcut(x))``)."""
    x = adapter.enter(block, x)
    for u in range(adapter.num_units(block)):
        if u in kept:
            x = add(block, u, x, scales.get(u, 1.0))
        else:
            x = adapter.dropped(block, u, x)
    return adapter.exit(block, x)


def add_residual(adapter, block: nn.Module, u: int, x, scale: float, cast: bool = False):
    """``act(shortcut(x) + scale * residual(x))`` in plain torch ops (traceable, scriptable). ``cast``: the
    shortcut is cast to the residual's dtype first, as the fused epilogue does under autocast."""
    residual = adapter.residual(block, u, x)
    if scale != 1.0:
        residual = scale * residual
    shortcut = adapter.shortcut(block, u, x)
    out = (shortcut.to(residual.dtype) if cast else shortcut) + residual
    act = adapter.activation(block)
    if act is None:
        return out
    return torch.relu(out) if act == ACTIVATION_RELU else act(out)


def kept_units(block: nn.Module) -> tuple[list[int], dict[int, float]]:
    """A converted block's units that run in eval (not lesioned), and their eval scales."""
    state, units = block_state(block), unit_range(block)
    kept = [u for u, l in enumerate(units) if l not in state.lesioned]
    return kept, {u: state.eval_scale(units[u]) for u in kept}


# ------------------------------------------------------------------------------------------------------------
# torch.fx
# ------------------------------------------------------------------------------------------------------------
def symbolic_forward(block: nn.Module, x: torch.fx.Proxy, args: tuple, kwargs: dict):
    """A converted block under a torch.fx tracer (any: ``symbolic_trace``, torchvision's and timm's).

    Training: the block becomes a leaf (a ``call_module`` node), so the traced graph calls the block, which
    draws the gates of each step as it runs; inlining it would freeze one step's gates into the graph.
    Evaluation: traced through, as the plain ops of the eval forward (the original block's own forward for
    "inverted"/"none" scaling, ``act(shortcut + p_l * residual)`` with lesioned units as their shortcut for
    "paper"), so the graph equals ``sd.prune(model, lesioned)`` and scripts. Extra arguments whose values the
    trace cannot know (timm's ViT passes its traced ``attn_mask`` on): with "paper" scaling the block's own
    forward is traced, its drop modules standing for the ``p_l`` scales, where the adapter names them
    (:meth:`~sdepth_ext.families.UnitAdapter.drop_module`); otherwise, and with lesioned units, the block
    stays a leaf and checks them when the graph runs.
    """
    state, adapter = block_state(block), adapter_of(block)
    kept, scales = kept_units(block)
    lesioned = len(kept) < len(unit_range(block))
    plain = state.scaling != "paper" and not lesioned
    extra = any(a is not None and a is not False for a in (*args, *kwargs.values()))
    if not block.training and extra and state.scaling == "paper" and not lesioned:
        slots = [adapter.drop_module(block, u) for u in range(adapter.num_units(block))]
        if all(slots):  # the block's own forward, its drop modules standing for the p_l scales
            return _trace_with_eval_scales(block, x, args, kwargs, slots, scales)
    if block.training or (extra and not plain):
        tracer = x.tracer
        return tracer.create_proxy("call_module", tracer.path_of_module(block), (x, *args), kwargs)
    if plain:
        return type(block)._sd_base.forward(block, x, *args, **kwargs)
    # The eager eval path's arithmetic (the fused epilogue): p * residual, then one add, after the same cast
    # of an autocast shortcut to the residual's dtype.
    return eval_units(block, adapter, x, kept, scales, functools.partial(add_residual, adapter, cast=True))


def _trace_with_eval_scales(block: nn.Module, x, args: tuple, kwargs: dict, slots: list[str],
                            scales: dict[int, float]):
    """Trace the block's own forward (with the extra arguments it takes) in eval, each unit's drop module
    shadowed, for the trace only, by a multiplication by its ``p_l``: "paper" scaling's eval forward.

    A plain function in the instance ``__dict__`` shadows the submodule (a module put in its place would
    have to be known to the tracer's module table); the graph holds the multiplication.
    """
    try:
        for u, name in enumerate(slots):
            block.__dict__[name] = functools.partial(_times, scales[u])
        return type(block)._sd_base.forward(block, x, *args, **kwargs)
    finally:
        for name in slots:
            block.__dict__.pop(name, None)


def _times(p: float, t: torch.Tensor) -> torch.Tensor:
    """``p * t``: what a block's own drop module stands for while torch.fx traces its "paper" eval forward."""
    return t if p == 1.0 else p * t


class _LeafTracer(torch.fx.Tracer):
    """Every submodule of the block is a leaf: the graph is the adds around the block's own modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


# ------------------------------------------------------------------------------------------------------------
# Plain models: pruned copies and what TorchScript compiles
# ------------------------------------------------------------------------------------------------------------
def partial_block(block: nn.Module, adapter, kept: list[int], scales: dict[int, float]) -> nn.Module:
    """A GraphModule computing ``block`` with only the units in ``kept`` (the others: their shortcut), the
    residual of unit ``u`` multiplied by ``scales[u]`` where given (a scale its weights cannot absorb)."""
    add = functools.partial(add_residual, adapter)

    def forward(self, x):
        return eval_units(self, adapter, x, kept, scales, add)

    original = type(block)
    name = f"{getattr(original, '_sd_base', original).__name__}Pruned"  # a converted block: its own class's
    tracing = type(name, (original,), {"forward": forward})
    block.__class__ = tracing  # for the trace only: the GraphModule keeps none of this class
    try:
        graph = _LeafTracer().trace(block)
    finally:
        block.__class__ = original
    return torch.fx.GraphModule(block, graph, class_name=name)


def pruned_copy(model: nn.Module, drop: set[int]) -> nn.Module:
    """A new, plain model equal to ``model`` in eval with the units in ``drop`` removed (``sdepth_ext.prune``
    validates; this builds). A converted model's eval scales are folded in."""
    converted = is_converted_root(model)
    names = {id(m): n for n, m in model.named_modules()}
    # Per block (by name): its adapter, and per unit the eval scale and whether it stays.
    plan: dict[str, dict] = {}
    for l, (block, u, adapter) in enumerate(units_of(model)):
        entry = plan.setdefault(names[id(block)], {"adapter": adapter, "kept": [], "scales": {}})
        if l not in drop:
            entry["kept"].append(u)
            if converted:
                entry["scales"][u] = get_state(model).eval_scale(l)
    pruned = copy.deepcopy(model)
    if converted:
        uninstall(pruned)
    return _make_plain(pruned, plan).eval()


def _make_plain(module: nn.Module, plan: dict[str, dict]) -> nn.Module:
    """Fold each kept unit's eval scale into its weights and replace blocks that lost units, in place.

    ``plan`` maps a block's name in ``module`` to its adapter, kept units and their scales
    (:func:`pruned_copy`). Returns ``module``, or the replacement when ``module`` is itself such a block.
    """
    modules = dict(module.named_modules())
    for name, entry in plan.items():
        block, adapter, kept = modules[name], entry["adapter"], entry["kept"]
        unfolded = {}
        for u, scale in entry["scales"].items():
            if scale != 1.0:
                try:
                    adapter.fold_scale(block, u, scale)
                except ValueError:  # the branch ends in a non-linear layer: the generated forward multiplies
                    unfolded[u] = scale
        if len(kept) == adapter.num_units(block) and not unfolded:
            continue
        replacement = adapter.removed(block) if not kept else partial_block(block, adapter, kept, unfolded)
        if not name:
            return replacement
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else module, attr, replacement)
    return module


def scriptable_copy(module: nn.Module) -> nn.Module:
    """What ``torch.jit.script`` compiles for a converted model, or a part of one: its plain eval equivalent.

    A converted unit draws new gates at every training step, which TorchScript cannot express, so a model in
    eval mode scripts as plain torch computing the converted eval forward: the root as
    ``sd.prune(model, lesioned)`` (the original network for "inverted"/"none" scaling; ``p_l`` folded into the
    weights for "paper"), a part of the model (a stage) as the same kind of copy of the part. A block alone
    -- also a block that a torch.fx graph borrows as a leaf, whose graph may call the block's submodules
    directly -- becomes a generated forward over the block's own, unchanged submodules, multiplying by
    ``p_l``. Modules keep the train/eval flags of the originals; the model itself is never changed. A unit in
    training mode raises ``TypeError`` naming what works instead.
    """
    gated = [(name, m) for name, m in module.named_modules() if is_gated(m)]
    training = [name or type(m).__name__ for name, m in gated if m.training]
    if training:
        raise TypeError(
            f"torch.jit.script: {type(module).__name__} holds stochastic-depth units in training mode "
            f"({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}), whose gates change every "
            "step, which TorchScript cannot express. Script the model in eval mode (model.eval(): it "
            "compiles the plain equivalent), train with eager PyTorch or torch.compile, export with "
            "torch.export, or script sd.prune(model, []) / sd.revert(model)")
    if is_converted_root(module):
        plain = pruned_copy(module, get_state(module).lesioned)
    elif is_gated(module):
        kept, scales = kept_units(module)
        unfolded = {u: s for u, s in scales.items() if s != 1.0}
        plain = partial_block(module, adapter_of(module), kept, unfolded)
        # Every member of the block, used by this forward or not: a traced graph that borrows the block may
        # call any of them (its eval graph traces the block's own forward: timm's act2, drop_block, ...).
        members = (*module.named_children(), *module.named_parameters(recurse=False),
                   *module.named_buffers(recurse=False))
        for name, member in members:
            if not hasattr(plain, name):
                if isinstance(member, nn.Module):
                    plain.add_module(name, member)
                elif isinstance(member, nn.Parameter):
                    plain.register_parameter(name, member)
                else:
                    plain.register_buffer(name, member)
    else:
        # A part of a converted model: copied without the state shared by the whole model, which the plain
        # copy does not keep.
        plain = copy.deepcopy(module, {id(block_state(m)): block_state(m) for _, m in gated})
        plan = {}
        for name, block in plain.named_modules():
            if is_gated(block):
                kept, scales = kept_units(block)
                plan[name] = {"adapter": adapter_of(block), "kept": kept, "scales": scales}
                revert_block(block)
        plain = _make_plain(plain, plan)
    flags = {name: m.training for name, m in module.named_modules()}
    for name, m in plain.named_modules():
        m.__dict__.pop(SCRIPT_HOOK, None)
        m.training = flags.get(name, m.training)
    prepare = getattr(type(plain), SCRIPT_HOOK, None)  # the model's own class may have one as well
    return prepare(plain) if prepare is not None else plain


def install_script_hooks(model: nn.Module, block_names: list[str]) -> list[nn.Module]:
    """``torch.jit.script`` of the root or of any module above a converted block compiles a plain copy.

    TorchScript's ``__prepare_scriptable__`` protocol writes what a child returns into its parent's
    ``_modules``: were only the blocks to answer (with their plain copies), scripting the model would swap
    the user's converted blocks for plain ones. So every module above a block answers first, with a plain
    copy of itself (an instance attribute: the model's own classes stay untouched), and TorchScript then
    walks that copy. The blocks' own answer (``GatedUnits.__prepare_scriptable__``) serves modules that only
    borrow them, such as a torch.fx graph whose leaves they are. Returns the modules hooked.
    """
    names = {""}
    for name in block_names:  # every module above the block
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    hooked = [model.get_submodule(name) for name in sorted(names)]
    hooked = [m for m in hooked if not is_gated(m)]  # a block converted as the root answers for itself
    for module in hooked:
        module.__dict__[SCRIPT_HOOK] = functools.partial(scriptable_copy, module)
    return hooked
