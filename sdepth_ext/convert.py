"""convert(): real stochastic depth swapped into a model in place; revert, survival_probs, lesion.

Design, in short:

* Discovery by registry (:mod:`sdepth_ext.families`): the model's modules are walked from the root, each
  module's class is looked up along its MRO, an optional ``filter_fn(module, fqn)`` may leave a block
  unconverted, and nothing inside a converted block is visited. Everything is validated before anything is
  mutated. A block's residual additions are its *units*, numbered in forward order (registration order,
  checked against the order the first forward runs them; see :class:`~sdepth_ext.units.UnitsState`).
* Each block's ``__class__`` becomes a subclass of its own class (:mod:`sdepth_ext.units`): no new
  parameters, buffers or submodules, so object identity, weights and ``state_dict`` keys are the original
  model's.
* The root holds one :class:`~sdepth_ext.units.UnitsState` (a plain attribute, not a submodule) with the
  Scheduler (which holds ``p_l``), the scaling and the current Plan. A forward pre-hook on the root draws one
  Plan per training-mode call, before any unit runs, and moves it to the input's device with one copy.
* Survival rates: a family without stochastic depth of its own (torchvision's ResNets) gets the paper's
  defaults; a model that carries its own stochastic-depth modules (torchvision ``StochasticDepth``) keeps
  their rates, their mode and their "inverted" scaling unless told otherwise. Either way the model's modules
  stay in place (their keys, their repr) but no longer run in a converted unit: ours replaces them. ``revert``
  gives them back their job.
* The scheduler's state (seed, step, survival, mode) travels in the state_dict's *metadata*
  (``state_dict._metadata[prefix]["sdepth_scheduler"]``, where PyTorch keeps module versions), not under a
  key. So both directions load with ``strict=True`` and identical keys: a plain model ignores the metadata,
  a converted model restores its scheduler from it when present and keeps its own stream when absent. The
  metadata survives ``torch.save``/``torch.load`` (also ``weights_only=True``) but not a conversion of the
  state_dict to a plain ``dict`` or to safetensors; pass such checkpoints the scheduler state separately
  (``sd.get_scheduler(model).state_dict()`` / ``.load_state_dict()``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .families import UnitAdapter, adapter_for, registered_adapters
from .rules import check_probability, linear_decay, uniform
from .scheduler import MODES, Scheduler, check_u64
from .units import SCALINGS, UnitsState, gated_class, in_backward, is_gated

__all__ = ["convert", "revert", "survival_probs", "set_drop_scale", "lesion", "get_state", "get_scheduler",
           "units_of", "root_of", "put_plan_draw_first",
           "RULES", "SCALINGS", "MODES"]

RULES = ("linear", "uniform")
METADATA_KEY = "sdepth_scheduler"
_ROOT_ATTR = "_sdepth_controller"
SCRIPT_HOOK = "__prepare_scriptable__"


# ------------------------------------------------------------------------------------------------------------
# Discovery
# ------------------------------------------------------------------------------------------------------------
def _find_blocks(model: nn.Module, filter_fn) -> list[tuple[str, nn.Module, type[UnitAdapter]]]:
    """``(fqn, block, adapter)`` of every block with an adapter, registration order; not inside each other.

    A stochastic-depth module (torchvision's StochasticDepth, timm's DropPath) outside every known block is
    the sign of a residual block sdepth_ext has no adapter for: refused naming that block's class (unless
    ``filter_fn`` left it out).
    """
    found: list[tuple[str, nn.Module, type[UnitAdapter]]] = []
    drop_types = _drop_module_types()

    def visit(module: nn.Module, fqn: str, parent: nn.Module | None) -> None:
        adapter = adapter_for(module)
        if adapter is not None:
            if filter_fn is None or filter_fn(module, fqn):
                if adapter.num_units(module) > 0:
                    found.append((fqn, module, adapter))
            return  # never descend into a block (gated or not: an unguarded MBConv holds no units either)
        if isinstance(module, drop_types) and parent is not None and (
                filter_fn is None or filter_fn(parent, fqn.rpartition(".")[0])):
            raise TypeError(f"model: {type(parent).__qualname__} ({type(parent).__module__}) holds "
                            f"{type(module).__name__} but sdepth_ext has no adapter for it (supported "
                            f"blocks: {_supported_names()}); leave it out with filter_fn")
        for name, child in module.named_children():
            visit(child, f"{fqn}.{name}" if fqn else name, module)

    visit(model, "", None)
    return found


def _drop_module_types() -> tuple[type, ...]:
    types = []
    try:
        from torchvision.ops import StochasticDepth
        types.append(StochasticDepth)
    except ImportError:  # pragma: no cover - torchvision is a requirement of the torchvision families
        pass
    try:
        from timm.layers import DropPath
        types.append(DropPath)
    except ImportError:
        pass
    return tuple(types)


def _check_block(block: nn.Module, adapter: type[UnitAdapter]) -> None:
    """A subclass that overrides ``forward`` computes something the adapter cannot know: refused."""
    if is_gated(block):
        raise ValueError(f"model: {type(block).__name__} is already converted as part of another module; "
                         "sdepth_ext.revert() that module first")
    registered = next(c for c in type(block).__mro__ if c in adapter.block_types)
    if type(block).forward is not registered.forward:
        raise TypeError(
            f"model: {type(block).__qualname__} subclasses {registered.__qualname__} but overrides forward; "
            f"sdepth_ext can only convert blocks that compute {registered.__name__}'s own forward")


def units_of(model: nn.Module) -> list[tuple[nn.Module, int, type[UnitAdapter]]]:
    """``(block, unit, adapter)`` of every residual unit of ``model`` (converted or not), in unit order."""
    if _is_converted_root(model):
        return [(block, u, block._sd_adapter) for block, u in get_state(model).units]
    return [(block, u, adapter) for _, block, adapter in _find_blocks(model, None)
            for u in range(adapter.num_units(block))]


# ------------------------------------------------------------------------------------------------------------
# State lookup
# ------------------------------------------------------------------------------------------------------------
def get_state(model: nn.Module) -> UnitsState:
    """The shared state of a converted model (scheduler, scaling, the current ``plan``).

    ``model`` is the root given to :func:`convert`, or a wrapper of it: DDP (``.module``) or ``torch.compile``
    (``._orig_mod``). Raises ``TypeError`` for a non-module, ``ValueError`` if it was not converted.
    """
    return root_of(model).__dict__[_ROOT_ATTR]


def root_of(model: nn.Module) -> nn.Module:
    """The module :func:`convert` was called on: ``model``, or the module its DDP / torch.compile wrapper
    holds. Errors as :func:`get_state`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    root = model
    while _ROOT_ATTR not in root.__dict__:
        inner = getattr(root, "module", None) or getattr(root, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(f"model: {type(model).__name__} is not converted by sdepth_ext.convert "
                             "(pass the module convert() was called on, or its DDP / torch.compile wrapper)")
        root = inner
    return root


def get_scheduler(model: nn.Module) -> Scheduler:
    """The :class:`~sdepth_ext.Scheduler` of a converted model (or of its DDP / torch.compile wrapper).

    Its ``state_dict()`` is what ``model.state_dict()`` carries in its metadata; save it beside checkpoints
    that lose that metadata (a plain ``dict`` copy, safetensors).
    """
    return get_state(model).scheduler


def _is_converted_root(model: nn.Module) -> bool:
    return model.__dict__.get(_ROOT_ATTR) is not None


# ------------------------------------------------------------------------------------------------------------
# Hooks (module-level functions that look the state up on the module: they stay right after deepcopy)
# ------------------------------------------------------------------------------------------------------------
def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _draw_plan_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state = module.__dict__.get(_ROOT_ATTR)
    if state is None or not module.training:
        return None
    x = _first_tensor(args, kwargs)
    if x is None or x.dim() == 0:
        raise RuntimeError("stochastic depth: the converted model's forward needs a tensor argument whose "
                           "dimension 0 is the batch, to draw the step's plan")
    if isinstance(x, torch.fx.Proxy):
        return None  # symbolic tracing: the units become leaves, which draw their plans when the graph runs
    if in_backward() and state.plan is not None and state.plan.batch_size == int(x.shape[0]):
        # The whole root runs inside torch.utils.checkpoint and is being recomputed during backward: the
        # recomputation must see the step's plan, not draw a new one (gradients would be wrong).
        return None
    if id(type(module)) != state.fsdp_seen:  # first training call, or FSDP2 applied since (a new class)
        from .fsdp import detect
        detect(module, state)
    # Under FSDP2 this hook runs before FSDP's root pre-forward, which moves the input to its device.
    device = x.device if state.fsdp is None else state.fsdp.device
    state.sample(int(x.shape[0]), device)
    state.input_meta = (tuple(x.shape[1:]), x.dtype, device)
    return None


def _first_forward_post_hook(module: nn.Module, args: tuple, output) -> None:
    state = module.__dict__.get(_ROOT_ATTR)
    if state is not None and state.call_order is not None:
        state.finish_first_forward()


def _save_scheduler_state_hook(module: nn.Module, state_dict: dict, prefix: str,
                               local_metadata: dict) -> None:
    state = module.__dict__.get(_ROOT_ATTR)
    if state is not None:
        local_metadata[METADATA_KEY] = state.scheduler.state_dict()


def _load_scheduler_state_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                               strict: bool, missing_keys: list, unexpected_keys: list,
                               error_msgs: list) -> None:
    state = module.__dict__.get(_ROOT_ATTR)
    saved = local_metadata.get(METADATA_KEY) if isinstance(local_metadata, dict) else None
    if state is None or saved is None:
        return  # a plain checkpoint: keep this model's own gate stream
    try:
        state.scheduler.load_state_dict(saved)
    except (ValueError, TypeError) as err:
        # Weights still load: e.g. fine-tuning a checkpoint at another p_last is legitimate.
        warnings.warn(f"sdepth_ext: scheduler state in the checkpoint not restored ({err}); "
                      "the model keeps its own gate stream", UserWarning, stacklevel=2)


def put_plan_draw_first(model: nn.Module) -> None:
    """Re-register the plan draw in front of the root's other forward pre-hooks (FSDP2's registers itself in
    front when the root is sharded, and may prefetch blocks the plan is about to drop)."""
    state = get_state(model)
    state.hook_handles[0].remove()
    state.hook_handles[0] = model.register_forward_pre_hook(_draw_plan_pre_hook, with_kwargs=True,
                                                            prepend=True)


def _install_hooks(model: nn.Module) -> list:
    # The plan draw stays the first handle (put_plan_draw_first replaces it).
    handles = [model.register_forward_pre_hook(_draw_plan_pre_hook, with_kwargs=True),
               model.register_forward_hook(_first_forward_post_hook)]
    # Public names where they exist (torch >= 2.5); the private ones (same signatures) on torch 2.4.
    if hasattr(model, "register_state_dict_post_hook"):
        handles.append(model.register_state_dict_post_hook(_save_scheduler_state_hook))
    else:  # pragma: no cover - torch 2.4
        handles.append(model._register_state_dict_hook(_save_scheduler_state_hook))
    if hasattr(model, "register_load_state_dict_pre_hook"):
        handles.append(model.register_load_state_dict_pre_hook(_load_scheduler_state_hook))
    else:  # pragma: no cover - torch 2.4
        handles.append(model._register_load_state_dict_pre_hook(_load_scheduler_state_hook, with_module=True))
    return handles


# ------------------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------------------
def _check_choice(value, name: str, allowed: tuple) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed} (or None for the model's default), got {value!r}")
    return value


def _settings(blocks, p_last, rule, mode, scaling) -> tuple[list[float], str, str, bool]:
    """(survival per unit, mode, scaling, rates_from_model) from the arguments and the family's defaults."""
    adapter = blocks[0][2]
    defaults = adapter.defaults
    units = [(block, u, a) for _, block, a in blocks for u in range(a.num_units(block))]
    own = [a.own_drop(block, u) for block, u, a in units]
    from_model = p_last is None and rule is None and defaults.rule is None
    if from_model:
        if any(o is None for o in own):
            raise ValueError(f"model: its {adapter.family} blocks carry no stochastic-depth rate of their "
                             "own; pass p_last= (and rule=)")
        survival = [1.0 - p for p, _ in own]
        if all(p == 1.0 for p in survival):
            warnings.warn(f"sdepth_ext.convert: the model's own drop rates are all 0 ({adapter.family}, e.g. "
                          "timm without drop_path_rate): nothing will be dropped; pass p_last= to set rates",
                          UserWarning, stacklevel=3)
    else:
        if p_last is None:
            p_last = defaults.p_last
            if p_last is None:
                raise ValueError(f"p_last: rule={rule!r} replaces the model's own rates and needs p_last "
                                 "(the last unit's survival probability, in [0, 1])")
        p_last = check_probability(p_last, "p_last")
        rule = _check_choice(rule if rule is not None else (defaults.rule or "linear"), "rule", RULES)
        survival = (linear_decay if rule == "linear" else uniform)(len(units), p_last)
    if mode is None:
        mode = defaults.mode
        if mode is None:
            modes = {m for _, m in (o for o in own if o is not None)}
            if len(modes) != 1:
                raise ValueError(f"mode: the model's own stochastic-depth modules use modes {sorted(modes)}; "
                                 f"pass mode= one of {MODES}")
            mode = modes.pop()
    _check_choice(mode, "mode", MODES)
    if scaling is None:
        scaling = defaults.scaling
        if scaling is None:  # the model's own modules say (timm: DropPath's scale_by_keep)
            own_scalings = {a.own_scaling(block, u) for block, u, a in units} - {None}
            if len(own_scalings) > 1:
                raise ValueError(f"scaling: the model's own stochastic-depth modules scale differently "
                                 f"({sorted(own_scalings)}); pass scaling= one of {SCALINGS}")
            scaling = own_scalings.pop() if own_scalings else "inverted"
    _check_choice(scaling, "scaling", SCALINGS)
    return survival, mode, scaling, from_model


def _supported_names() -> str:
    """``BasicBlock (torchvision.models.resnet), ...``: block classes by name, with their module."""
    return ", ".join(sorted({f"{cls.__name__} ({cls.__module__})" for cls in registered_adapters()}))


# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------
def convert(model: nn.Module, p_last: float | None = None, rule: str | None = None, mode: str | None = None,
            scaling: str | None = None, seed: int | None = None, *,
            filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Turn every residual unit of ``model`` into a stochastic-depth unit, in place; returns ``model``.

    Args:
        model: a model built from supported blocks: torchvision ResNets (``BasicBlock``/``Bottleneck``),
            ConvNeXt (``CNBlock``), EfficientNet / EfficientNetV2 (``MBConv``/``FusedMBConv``), Swin v1/v2
            and MaxViT, :func:`sdepth_ext.cifar_resnet`, or any module built from those blocks. Subclasses
            that override ``forward`` and models mixing families are rejected naming the class.
        p_last: survival probability of the last unit, in [0, 1]. None: the family's default (0.5 for
            ResNets; for models with their own stochastic depth, their rates).
        rule: ``"linear"`` (``p_l = 1 - l/L (1 - p_last)`` over the L units, the paper's) or ``"uniform"``
            (``p_l = p_last``). None: linear, or the model's own rates when ``p_last`` is None too.
        mode: ``"batch"`` (one gate per unit and step; a dropped unit runs no residual at all), ``"row"``
            (one gate per unit and sample; the residual runs on the surviving samples only, so BatchNorm
            statistics are those of the survivors) or ``"subset"`` (each unit keeps exactly
            ``max(int(N * p_l), 1)`` of its N samples, drawn uniformly: the same shapes every step; "inverted"
            scaling multiplies by ``N / kept``). None: batch for ResNets, the model's own mode otherwise.
        scaling: ``"paper"`` (train with ``act(id + f)``, evaluate ``act(id + p_l f)``), ``"inverted"``
            (train with ``act(id + f / p_l)``, evaluate the plain network, bit-identical to the original) or
            ``"none"`` (train ``act(id + f)``, evaluate the plain network: timm's ``scale_by_keep=False``).
            None: paper for ResNets, the model's own for models with their own stochastic depth.
        seed: int in [0, 2^64) for a reproducible gate stream; ``None`` takes one from torch's generator.
        filter_fn: optional ``filter_fn(module, fqn) -> bool``; blocks for which it is False stay as they are.

    Converting a converted model re-converts it: the old settings and scheduler state are replaced (as if
    :func:`revert` ran first). One plan is drawn per training-mode call of ``model`` (the root); state_dict
    keys stay the original model's, and the scheduler state rides in the state_dict metadata (see the module
    docstring), so checkpoints load both ways with ``strict=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if seed is not None:
        seed = check_u64(seed, "seed")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    for value, name in ((rule, "rule"), (mode, "mode"), (scaling, "scaling")):
        if value is not None:
            _check_choice(value, name, {"rule": RULES, "mode": MODES, "scaling": SCALINGS}[name])
    if p_last is not None:
        check_probability(p_last, "p_last")

    if _is_converted_root(model):
        revert(model)
    blocks = _find_blocks(model, filter_fn)
    if not blocks:
        raise ValueError(f"model: {type(model).__name__} has no residual units sdepth_ext can convert "
                         f"(supported blocks: {_supported_names()})")
    families = {}
    for _, block, adapter in blocks:  # validate everything before mutating anything
        _check_block(block, adapter)
        families.setdefault(adapter.family, type(block).__name__)
    if len(families) > 1:
        mixed = ", ".join(f"{family} ({name})" for family, name in families.items())
        raise ValueError(f"model: mixes block families ({mixed}); convert each part on its own, or leave "
                         "some out with filter_fn")
    survival, mode, scaling, from_model = _settings(blocks, p_last, rule, mode, scaling)
    if mode == "row" and dist.is_available() and dist.is_initialized():
        _refuse_sync_batchnorm(blocks)

    units = [(block, u) for _, block, adapter in blocks for u in range(adapter.num_units(block))]
    state = UnitsState(units, Scheduler(survival, mode=mode, seed=seed), scaling, from_model)
    index = 0
    for _, block, adapter in blocks:
        block.__class__ = gated_class(type(block), adapter)
        block._sd_index = index
        block._sd_num_units = adapter.num_units(block)
        block._sd_state = state
        index += block._sd_num_units
    model.__dict__[_ROOT_ATTR] = state
    state.hook_handles = _install_hooks(model)
    state.script_hooked = _install_script_hooks(model, [fqn for fqn, _, _ in blocks])
    return model


def _install_script_hooks(model: nn.Module, block_names: list[str]) -> list[nn.Module]:
    """``torch.jit.script`` of the root or of any module above a converted block compiles a plain copy.

    TorchScript's ``__prepare_scriptable__`` protocol writes what a child returns into its parent's
    ``_modules``: were only the blocks to answer (with their plain copies), scripting the model would swap
    the user's converted blocks for plain ones. So every module above a block answers first, with a plain
    copy of itself (an instance attribute: the model's own classes stay untouched), and TorchScript then
    walks that copy. The blocks' own answer (:meth:`GatedUnits.__prepare_scriptable__`) serves modules that
    only borrow them, such as a torch.fx graph whose leaves they are. Returns the modules hooked.
    """
    names = {""}
    for name in block_names:  # every module above the block
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    hooked = [model.get_submodule(name) for name in sorted(names)]
    hooked = [m for m in hooked if not is_gated(m)]  # a block converted as the root answers for itself
    for module in hooked:
        module.__dict__[SCRIPT_HOOK] = functools.partial(_scriptable_copy, module)
    return hooked


def _scriptable_copy(module: nn.Module) -> nn.Module:
    from .deploy import scriptable_copy  # deploy imports this module

    return scriptable_copy(module)


def revert_block(block: nn.Module) -> None:
    """The block's original class back, and every attribute the library set on it (``_sd_*``) removed."""
    block.__class__ = type(block)._sd_base
    for attr in [a for a in block.__dict__ if a.startswith("_sd_")]:
        del block.__dict__[attr]


def _refuse_sync_batchnorm(blocks) -> None:
    for fqn, block, adapter in blocks:
        for u in range(adapter.num_units(block)):
            for branch in adapter.branch_modules(block, u):
                if any(isinstance(m, nn.SyncBatchNorm) for m in branch.modules()):
                    raise ValueError(
                        f"model: {fqn} ({type(block).__name__}) has SyncBatchNorm in a residual branch, "
                        "which row mode cannot run under DDP: a unit with no survivor on one rank and some "
                        "on another would skip the collective on the first rank only (a hang). Use "
                        "mode='batch', or plain BatchNorm per rank")


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: original block classes and forward, hooks removed; returns ``model``.

    Weights and state_dict keys are unchanged (they never changed); the model's own stochastic-depth modules
    run again. Raises ``ValueError`` if ``model`` is not a converted root, or is sharded with FSDP2 (which
    swapped the same classes: revert before sharding).
    """
    state = get_state(model)
    if dist.is_available() and dist.is_initialized():  # FSDP2 shards only with a process group
        from .fsdp import fsdp_module_types

        types = fsdp_module_types()
        sharded = types and any(isinstance(m, types) for m in (model, *state.blocks))
    else:
        sharded = False
    if sharded:
        raise ValueError("model: it is sharded with FSDP2 (fully_shard), whose module classes wrap the "
                         "converted ones; revert a model before sharding it, not after")
    for cleanup in reversed(state.cleanups):  # what helpers attached (compiled regions, ...)
        cleanup()
    for block in state.blocks:
        revert_block(block)
    for handle in state.hook_handles:
        handle.remove()
    for module in state.script_hooked:
        module.__dict__.pop(SCRIPT_HOOK, None)
    del model.__dict__[_ROOT_ATTR]
    return model


def survival_probs(model: nn.Module) -> list[float]:
    """``[p_1, ..., p_L]`` of a converted model: one per unit (residual addition), forward order."""
    return list(get_state(model).survival)


def set_drop_scale(model: nn.Module, s: float) -> nn.Module:
    """Scale every unit's drop probability by ``s`` in [0, 1]: ``p_l(s) = 1 - s (1 - p_l)``. Returns model.

    ``s = 0`` trains the full network, ``s = 1`` the configured rates (:func:`survival_probs`). The scale is
    part of the scheduler's state (saved in the state_dict metadata, restored exactly on resume, broadcast by
    :func:`sdepth_ext.sync_scheduler`); "inverted" and "paper" scaling use the rates in force. Call it with a
    :func:`sdepth_ext.drop_schedule`'s value before each training step, with the same step on every rank.
    """
    get_state(model).scheduler.set_drop_scale(s)
    return model


def _check_drop(drop, num_units: int) -> list[int]:
    try:
        drop_list = list(drop)
    except TypeError:
        raise TypeError(f"drop must be an iterable of unit indices, got {type(drop).__name__}") from None
    for index in drop_list:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_units:
            raise ValueError(f"drop must hold distinct int unit indices in [0, {num_units}), got {index!r}")
    if len(set(drop_list)) != len(drop_list):
        raise ValueError(f"drop must hold distinct int unit indices in [0, {num_units}), got duplicates in "
                         f"{drop_list}")
    return drop_list


@contextlib.contextmanager
def lesion(model: nn.Module, drop: Iterable[int]) -> Iterator[nn.Module]:
    """Evaluate ``model`` with the residual units in ``drop`` (0-based, forward order) removed.

    Inside the context the model is in eval mode and each removed unit returns ``act(shortcut(x))``
    (``relu(x)`` or ``relu(downsample(x))`` for ResNets); the other units run as usual (a converted model's
    eval forward). Works on converted and plain models (a plain one is converted for the duration, with
    inverted scaling, and reverted on exit). On exit -- also when the body raises -- every module's train/eval
    flag is restored.

    >>> with sd.lesion(model, drop=[3, 7]):
    ...     logits = model(images)
    """
    converted_here = not _is_converted_root(model)
    if converted_here:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not _find_blocks(model, None):
            raise ValueError(f"model: {type(model).__name__} has no residual units to lesion")
    state = get_state(model) if not converted_here else None
    num_units = len(state.units) if state is not None else len(units_of(model))
    drop_list = _check_drop(drop, num_units)
    training_flags = [(m, m.training) for m in model.modules()]
    try:
        if converted_here:
            convert(model, p_last=1.0, rule="uniform", mode="batch", scaling="inverted", seed=0)
            state = get_state(model)
        previous, state.lesioned = state.lesioned, frozenset(drop_list)
        model.eval()
        try:
            yield model
        finally:
            state.lesioned = previous
    finally:
        if converted_here and _is_converted_root(model):
            revert(model)
        for module, flag in training_flags:
            module.training = flag
