"""convert(): real stochastic depth swapped into a model in place; revert, survival_probs, lesion, setters.

The public face of conversion, above every other layer (docs/architecture.md):

* Discovery by registry (:mod:`sdepth_ext.discovery` over :mod:`sdepth_ext.families`): blocks found along
  their class's MRO, an optional ``filter_fn(module, fqn)`` may leave a block unconverted, nothing inside a
  converted block is visited. Everything is validated before anything is mutated. A block's residual
  additions are its *units*, numbered in forward order (registration order, checked against the order the
  first forward runs them: :func:`sdepth_ext.state.renumber_in_call_order`).
* Each block's ``__class__`` becomes a subclass of its own class (:mod:`sdepth_ext.units`): no new
  parameters, buffers or submodules, so object identity, weights and ``state_dict`` keys are the original
  model's.
* The root holds one :class:`~sdepth_ext.state.SdepthState` (a plain attribute, not a submodule) with the
  Scheduler (which holds ``p_l``), the scaling and the current Plan, and the hooks that draw one Plan per
  training-mode call and carry the scheduler's state in the state_dict's metadata (:mod:`sdepth_ext.state`:
  both directions load with ``strict=True``; a plain ``dict`` or safetensors copy loses the metadata, so
  pass such checkpoints the scheduler state separately: ``sd.get_scheduler(model).state_dict()``).
* Survival rates: a family without stochastic depth of its own (torchvision's ResNets) gets the paper's
  defaults; a model that carries its own stochastic-depth modules (torchvision ``StochasticDepth``) keeps
  their rates, their mode and their "inverted" scaling unless told otherwise. Either way the model's modules
  stay in place (their keys, their repr) but no longer run in a converted unit: ours replaces them. ``revert``
  gives them back their job.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch.distributed as dist
from torch import nn

from .batchnorm import refuse_sync_batchnorm
from .discovery import check_block, find_blocks, supported_names
from .flags import restored_train_flags
from .fsdp import fsdp_module_types
from .plain import install_script_hooks, scriptable_copy
from .rules import check_probability, linear_decay, uniform
from .scheduler import MODES, Scheduler, check_u64
from .state import (
    SCALINGS,
    SdepthState,
    check_drop,
    draw_plan_pre_hook,
    forward_post_hook,
    get_state,
    install_hooks,
    is_converted_root,
    load_scheduler_state_hook,
    save_scheduler_state_hook,
    uninstall,
    units_of,
)
from .units import gated_class

__all__ = ["convert", "revert", "survival_probs", "set_drop_scale", "lesion", "get_scheduler", "RULES"]

RULES = ("linear", "uniform")


def get_scheduler(model: nn.Module) -> Scheduler:
    """The :class:`~sdepth_ext.Scheduler` of a converted model (or of its DDP / torch.compile wrapper).

    Its ``state_dict()`` is what ``model.state_dict()`` carries in its metadata; save it beside checkpoints
    that lose that metadata (a plain ``dict`` copy, safetensors).
    """
    return get_state(model).scheduler


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

    if is_converted_root(model):
        revert(model)
    blocks = find_blocks(model, filter_fn)
    if not blocks:
        raise ValueError(f"model: {type(model).__name__} has no residual units sdepth_ext can convert "
                         f"(supported blocks: {supported_names()})")
    families = {}
    for _, block, adapter in blocks:  # validate everything before mutating anything
        check_block(block, adapter)
        families.setdefault(adapter.family, type(block).__name__)
    if len(families) > 1:
        mixed = ", ".join(f"{family} ({name})" for family, name in families.items())
        raise ValueError(f"model: mixes block families ({mixed}); convert each part on its own, or leave "
                         "some out with filter_fn")
    survival, mode, scaling, from_model = _settings(blocks, p_last, rule, mode, scaling)
    if mode == "row" and dist.is_available() and dist.is_initialized():
        refuse_sync_batchnorm((f"{fqn} ({type(block).__name__})", adapter.branch_modules(block, u))
                              for fqn, block, adapter in blocks for u in range(adapter.num_units(block)))

    units = [(block, u) for _, block, adapter in blocks for u in range(adapter.num_units(block))]
    state = SdepthState(units, Scheduler(survival, mode=mode, seed=seed), scaling, from_model)
    index = 0
    for _, block, adapter in blocks:
        block.__class__ = gated_class(type(block), adapter)
        block._sd_index = index
        block._sd_num_units = adapter.num_units(block)
        block._sd_state = state
        index += block._sd_num_units
    install_hooks(model, state)
    state.script_hooked = install_script_hooks(model, [fqn for fqn, _, _ in blocks])
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` in place: original block classes and forward, hooks removed; returns ``model``.

    Weights and state_dict keys are unchanged (they never changed); the model's own stochastic-depth modules
    run again. Raises ``ValueError`` if ``model`` is not a converted root, or is sharded with FSDP2 (which
    swapped the same classes: revert before sharding).
    """
    state = get_state(model)
    if dist.is_available() and dist.is_initialized():  # FSDP2 shards only with a process group
        types = fsdp_module_types()
        sharded = types and any(isinstance(m, types) for m in (model, *state.blocks))
    else:
        sharded = False
    if sharded:
        raise ValueError("model: it is sharded with FSDP2 (fully_shard), whose module classes wrap the "
                         "converted ones; revert a model before sharding it, not after")
    uninstall(model)
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
    converted_here = not is_converted_root(model)
    if converted_here:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not find_blocks(model, None):
            raise ValueError(f"model: {type(model).__name__} has no residual units to lesion")
    state = get_state(model) if not converted_here else None
    num_units = len(state.units) if state is not None else len(units_of(model))
    drop_list = check_drop(drop, num_units)
    with restored_train_flags(model):
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
            if converted_here and is_converted_root(model):
                revert(model)


# Names that sdepth_ext <= 0.2.0 pickled (torch.save(model): the root's hooks and script hooks), now living
# elsewhere.
_LEGACY_NAMES = {"_draw_plan_pre_hook": draw_plan_pre_hook,
                 "_first_forward_post_hook": forward_post_hook,
                 "_save_scheduler_state_hook": save_scheduler_state_hook,
                 "_load_scheduler_state_hook": load_scheduler_state_hook, "_scriptable_copy": scriptable_copy}


def __getattr__(name: str):
    try:
        return _LEGACY_NAMES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
