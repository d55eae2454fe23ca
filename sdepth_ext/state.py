"""The state of a converted model: one object per model, its lookups, the root's hooks and the plan draw.

:func:`sdepth_ext.convert` gives the root one :class:`SdepthState`, kept under the attribute
``_sdepth_state`` (a plain attribute, not a submodule: no ``state_dict`` keys) and found by :func:`get_state`
(class, attribute and getter share the name). Every converted block holds a reference to it and the index
of its first unit. The state holds the :class:`~sdepth_ext.scheduler.Scheduler` (which holds ``p_l``), the
scaling, the step's :class:`~sdepth_ext.plan.Plan`, and the options the helpers set (module docstring of
:mod:`sdepth_ext.units`).

A forward pre-hook on the root draws one plan per training-mode call (:meth:`SdepthState.sample`), before
any unit runs, and moves it to the input's device with one copy. Units only read it (:meth:`plan_for`); a
unit that finds the plan already used by itself draws the next one (a forward that did not start at the
root). Recomputation inside backward (activation checkpointing) reuses the plan it ran with.

The scheduler's state (seed, step, survival, mode, drop scale) travels in the state_dict's *metadata*
(``state_dict._metadata[prefix]["sdepth_scheduler"]``, where PyTorch keeps module versions), not under a
key, so both directions load with ``strict=True`` and identical keys.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .discovery import find_blocks, is_gated
from .families import UnitAdapter
from .gates import mix64
from .grads import DEFAULT_DROPPED_GRADS, ParameterSlots, PendingZeroGrads
from .plan import Plan, round_plan_rows
from .scheduler import Scheduler

__all__ = ["SdepthState", "WorkTally", "SCALINGS", "get_state", "root_of", "is_converted_root", "units_of",
           "is_gated", "adapter_of", "unit_range", "block_state", "in_backward", "install_hooks",
           "put_plan_draw_first", "uninstall", "revert_block", "check_drop", "register_sharding_detector",
           "record_call", "renumber_in_call_order", "SCRIPT_HOOK", "METADATA_KEY"]

# "paper": train act(id + f), evaluate act(id + p f); "inverted": train act(id + f / p), evaluate the plain
# network; "none": neither (timm's DropPath with scale_by_keep=False): train act(id + f), evaluate plain.
SCALINGS = ("paper", "inverted", "none")

ROOT_ATTR = "_sdepth_state"
_LEGACY_ROOT_ATTR = "_sdepth_controller"  # the attribute's name up to sdepth_ext 0.2.0 (old pickles)
METADATA_KEY = "sdepth_scheduler"
SCRIPT_HOOK = "__prepare_scriptable__"  # TorchScript's protocol: convert installs it, uninstall removes it
# What convert sets on a converted block's instance, and uninstall removes again.
BLOCK_ATTRS = ("_sd_index", "_sd_num_units", "_sd_state", "_sd_regions")

# Bound once (both exist on torch >= 2.4): every unit's forward asks, and a module attribute lookup per call
# adds up over the 50-100 units of a network on a host-bound step.
_current_graph_task_id = torch._C._current_graph_task_id


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    return _current_graph_task_id() != -1


class SdepthState:
    """What all converted blocks of one model share: the scheduler, mode, scaling and the current plan.

    ``units[l] = (block, u)``: unit ``l`` (forward order) is unit ``u`` of ``block``. ``p_l`` lives in the
    scheduler (:attr:`survival`); blocks hold only their first unit's index.
    """

    def __init__(self, units: list[tuple[nn.Module, int]], scheduler: Scheduler, scaling: str,
                 rates_from_model: bool):
        self.units = units
        self.scheduler = scheduler
        self.scaling = scaling
        self.rates_from_model = rates_from_model  # the survival list came from the model's own modules
        self.plan: Plan | None = None
        self.host_plan: Plan | None = None
        self.consumed = bytearray(len(units))  # which units already ran on the current plan
        self.hook_handles: list = []
        self.script_hooked: list[nn.Module] = []  # modules whose torch.jit.script compiles a plain copy
        self.cleanups: list[Callable[[], None]] = []  # run by revert (compiled regions register theirs)
        self.lesioned: frozenset = frozenset()
        self.call_order: list[nn.Module] | None = []  # blocks in call order during the first forward
        # Options (sdepth_ext.units' docstring); the defaults reproduce the plain converted model.
        self.dropped_grads = DEFAULT_DROPPED_GRADS  # "zero" | "none"
        self.every_param = False  # DDP: every parameter's gradient must reach autograd's hooks each step
        self.shard: tuple[int, int] | None = None  # (rank, world_size), row and subset mode only
        self.fsdp = None  # sdepth_ext.fsdp.FsdpGates under FSDP2
        self.fsdp_seen: int | None = None  # id of the root's class when a sharding engine was last looked for
        self.row_multiple = 1
        self.checkpoint: dict | None = None  # kwargs of torch.utils.checkpoint.checkpoint, or None
        self.compile_kwargs: dict | None = None  # compile_blocks' torch.compile kwargs (copies recompile)
        self.tally = WorkTally(len(units))  # what ran, for sdepth_ext.compute_stats
        self.input_meta: tuple | None = None  # (shape without the batch, dtype, device) of the last step
        self.macs_cache: dict = {}
        # Set by the units when Dynamo traces them (the model is compiled whole): from then on each plan
        # carries its gates as a tensor (Plan.gates), a graph input in batch and row mode.
        self.gate_tensors = False
        self._init_transient()

    def _init_transient(self) -> None:
        """What a state rebuilds rather than pickles or copies: caches and the current step's bookkeeping."""
        self.zero_pending = PendingZeroGrads()  # dropped units' parameters awaiting their zero gradients
        self.unit_parameters = ParameterSlots(self._branch_parameter_slots, len(self.units))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in _TRANSIENT:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("gate_tensors", False)  # pickles of before whole-model compile
        self._init_transient()  # also what a pickle of before these fields lacks

    @property
    def mode(self) -> str:
        return self.scheduler.mode

    @property
    def survival(self) -> list[float]:
        return self.scheduler.survival

    @property
    def scaled_survival(self) -> list[float]:
        """``p_l(s)``: the rates the gates are drawn with under the scheduler's drop scale ``s``."""
        return self.scheduler.scaled_survival

    @property
    def blocks(self) -> list[nn.Module]:
        """The converted blocks in unit order (a two-unit block appears once)."""
        seen: dict[int, nn.Module] = {}
        for block, _ in self.units:
            seen.setdefault(id(block), block)
        return list(seen.values())

    # -- the plan of a step ----------------------------------------------------------------------------------
    def sample(self, batch_size: int, device: torch.device) -> Plan:
        """Draw the plan of one step and move it to ``device`` (one copy of the packed buffer).

        The buffer is allocated pinned only when it is going to a GPU (decided here, per draw: nothing about
        pinning is stored, so a model pickled on a GPU machine trains on a CPU-only one).
        """
        pin = device.type == "cuda"
        if self.shard is not None and self.mode != "batch":
            rank, world_size = self.shard  # this rank's samples of the global batch
            host_plan = self.scheduler.sample(batch_size, rank=rank, world_size=world_size, pin_memory=pin)
        else:
            # Batch mode's gate does not depend on the batch size: every rank draws the same gates.
            host_plan = self.scheduler.sample(batch_size, pin_memory=pin)
        if self.row_multiple > 1 and self.mode == "row":
            # The salt is derived from the seed and step: deterministic (resumes exactly), the same on every
            # rank, but different each step, so the promoted samples rotate.
            salt = mix64(self.scheduler.seed ^ mix64(host_plan.step))
            host_plan = round_plan_rows(host_plan, self.row_multiple, salt)
        if getattr(self, "gate_tensors", False) and self.mode != "subset":
            host_plan.with_gates()
        self.host_plan = host_plan
        self.plan = host_plan.to(device)
        self.consumed = bytearray(len(self.units))
        self.tally.add(host_plan)
        if self.fsdp is not None:
            self.fsdp.on_plan(host_plan)
        return self.plan

    def plan_for(self, l: int, x: torch.Tensor, claim: bool = True) -> Plan:
        """The plan unit ``l`` runs on: the step's, or a fresh one if this unit already used it.

        ``claim=False`` only looks (FSDP2's hooks decide on the plan the unit's forward will then claim).
        While Dynamo traces the model (compiled whole) it is the step's plan, drawn by the root's pre-hook
        outside the graph: no autograd query, no bookkeeping, nothing the graph would have to guard on.
        """
        if self.plan is not None and torch.compiler.is_compiling():
            return self.plan
        if in_backward() and self.plan is not None:
            return self.plan  # recomputation (checkpointing) reruns the forward it belongs to
        if self.plan is None or self.consumed[l]:
            # A training forward that did not start at the root (whose pre-hook draws the step's plan): a
            # sub-model of the root's children, a feature extractor, a block called alone.
            self.sample(int(x.shape[0]), x.device)
        if claim:
            self.consumed[l] = 1
        return self.plan

    def reset_tally(self) -> None:
        self.tally = WorkTally(len(self.units))

    # -- scaling -------------------------------------------------------------------------------------------
    def train_scale(self, l: int, count: int | None = None, batch_size: int | None = None) -> float:
        """Unit ``l``'s residual factor in training; subset mode needs its ``count`` of ``batch_size``."""
        if self.scaling != "inverted":
            return 1.0
        if self.mode == "subset":
            return batch_size / count  # exactly K of the N samples kept: an unbiased residual
        p = self.scaled_survival[l]  # the rate the gate was drawn with: an unbiased residual
        # p_l = 0 means the unit never survives a training step, so its scale is never used.
        return 1.0 / p if p > 0.0 else 0.0

    def eval_scale(self, l: int) -> float:
        return self.scaled_survival[l] if self.scaling == "paper" else 1.0

    def _branch_parameter_slots(self, l: int) -> Iterable[tuple[nn.Module, str]]:
        """``(module, name)`` of unit ``l``'s branch parameters (:attr:`unit_parameters` reads them)."""
        block, u = self.units[l]
        for name, _ in adapter_of(block).branch_parameters(block, u):
            path, _, leaf = name.rpartition(".")
            yield (block.get_submodule(path) if path else block), leaf

    def defer_zero_grads(self, l: int) -> None:
        """Unit ``l`` was dropped under the "zero" policy: its parameters join the step's zero-grad node."""
        self.zero_pending.params.extend(self.unit_parameters(l))

    def __repr__(self) -> str:
        return (f"SdepthState(units={len(self.units)}, mode={self.mode!r}, scaling={self.scaling!r}, "
                f"scheduler={self.scheduler!r})")


_TRANSIENT = ("zero_pending", "unit_parameters")


class WorkTally:
    """Samples each unit ran on, for the last step and in all, and the samples seen (compute_stats)."""

    def __init__(self, num_units: int):
        self.last = [0] * num_units
        self.total = [0] * num_units
        self.last_batch = 0
        self.samples = 0
        self.steps = 0

    def add(self, plan: Plan) -> None:
        self.last = list(plan.counts)
        self.total = [t + c for t, c in zip(self.total, plan.counts)]
        self.last_batch = plan.batch_size
        self.samples += plan.batch_size
        self.steps += 1


# ------------------------------------------------------------------------------------------------------------
# Lookups
# ------------------------------------------------------------------------------------------------------------
def _state_in(module: nn.Module) -> SdepthState | None:
    """The state a converted root holds (renamed from its pre-0.3 attribute on first sight), else None."""
    attrs = module.__dict__
    state = attrs.get(ROOT_ATTR)
    if state is None and _LEGACY_ROOT_ATTR in attrs:
        state = attrs[ROOT_ATTR] = attrs.pop(_LEGACY_ROOT_ATTR)
    return state


def get_state(model: nn.Module) -> SdepthState:
    """The shared state of a converted model (scheduler, scaling, the current ``plan``).

    ``model`` is the root given to :func:`~sdepth_ext.convert`, or a wrapper of it: DDP (``.module``) or
    ``torch.compile`` (``._orig_mod``). Raises ``TypeError`` for a non-module, ``ValueError`` if it was not
    converted.
    """
    return _state_in(root_of(model))


def root_of(model: nn.Module) -> nn.Module:
    """The module :func:`~sdepth_ext.convert` was called on: ``model``, or the module its DDP /
    torch.compile wrapper holds. Errors as :func:`get_state`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    root = model
    while _state_in(root) is None:
        inner = getattr(root, "module", None) or getattr(root, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(f"model: {type(model).__name__} is not converted by sdepth_ext.convert "
                             "(pass the module convert() was called on, or its DDP / torch.compile wrapper)")
        root = inner
    return root


def is_converted_root(model: nn.Module) -> bool:
    return isinstance(model, nn.Module) and _state_in(model) is not None


def adapter_of(block: nn.Module) -> type[UnitAdapter]:
    """The family adapter a converted block runs with."""
    return type(block)._sd_adapter


def unit_range(block: nn.Module) -> range:
    """The model-wide indices (forward order) of a converted block's units."""
    first = block._sd_index
    return range(first, first + block._sd_num_units)


def block_state(block: nn.Module) -> SdepthState:
    """The state of the model a converted block belongs to."""
    return block._sd_state


def units_of(model: nn.Module) -> list[tuple[nn.Module, int, type[UnitAdapter]]]:
    """``(block, unit, adapter)`` of every residual unit of ``model`` (converted or not), in unit order."""
    if is_converted_root(model):
        return [(block, u, adapter_of(block)) for block, u in get_state(model).units]
    return [(block, u, adapter) for _, block, adapter in find_blocks(model, None)
            for u in range(adapter.num_units(block))]


def check_drop(drop, num_units: int) -> list[int]:
    """``drop`` (unit indices to remove: lesion, prune) as a list; TypeError/ValueError naming it."""
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


# ------------------------------------------------------------------------------------------------------------
# The root's hooks (module-level functions that look the state up on the module: right after deepcopy)
# ------------------------------------------------------------------------------------------------------------
# Called with (root, state) when the root's class changed since the last training call: a sharding engine
# (FSDP2's fully_shard swaps classes) registers its check here (sdepth_ext.fsdp), so that a model sharded by
# hand is found without this module importing the engine.
_SHARDING_DETECTORS: list[Callable[[nn.Module, SdepthState], None]] = []


def register_sharding_detector(detect: Callable[[nn.Module, SdepthState], None]) -> None:
    if detect not in _SHARDING_DETECTORS:
        _SHARDING_DETECTORS.append(detect)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


# The root's hooks never run under Dynamo: torch.compile(model) calls them as frames of their own, which
# torch.compiler.disable runs eagerly (no graph break, fullgraph=True works), so the plan is drawn outside the
# graph. (A model compiled inside a wrapper inlines the root's call: there the hooks are one graph break, at
# the root, outside any of the model's loops.)
@torch.compiler.disable
def draw_plan_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state = _state_in(module)
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
    if id(type(module)) != state.fsdp_seen:  # first training call, or an engine swapped the class since
        state.fsdp_seen = id(type(module))
        for detect in _SHARDING_DETECTORS:
            detect(module, state)
    # Under FSDP2 this hook runs before FSDP's root pre-forward, which moves the input to its device.
    device = x.device if state.fsdp is None else state.fsdp.device
    state.zero_pending.start_root_forward()
    state.sample(int(x.shape[0]), device)
    state.input_meta = (tuple(x.shape[1:]), x.dtype, device)
    return None


@torch.compiler.disable
def forward_post_hook(module: nn.Module, args: tuple, output) -> None:
    state = _state_in(module)
    if state is None:
        return
    renumbered = state.call_order is not None and renumber_in_call_order(state)
    if module.training:
        state.zero_pending.end_root_forward(renumbered)


def save_scheduler_state_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state = _state_in(module)
    if state is not None:
        local_metadata[METADATA_KEY] = state.scheduler.state_dict()


def load_scheduler_state_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
    state = _state_in(module)
    saved = local_metadata.get(METADATA_KEY) if isinstance(local_metadata, dict) else None
    if state is None or saved is None:
        return  # a plain checkpoint: keep this model's own gate stream
    try:
        state.scheduler.load_state_dict(saved)
    except (ValueError, TypeError) as err:
        # Weights still load: e.g. fine-tuning a checkpoint at another p_last is legitimate.
        warnings.warn(f"sdepth_ext: scheduler state in the checkpoint not restored ({err}); "
                      "the model keeps its own gate stream", UserWarning, stacklevel=2)


def install_hooks(model: nn.Module, state: SdepthState) -> None:
    """Give ``model`` (the converted root) its state and hooks: the plan draw (the first handle, which
    :func:`put_plan_draw_first` replaces), the first-forward renumbering, the scheduler-state metadata."""
    model.__dict__[ROOT_ATTR] = state
    handles = [model.register_forward_pre_hook(draw_plan_pre_hook, with_kwargs=True),
               model.register_forward_hook(forward_post_hook)]
    # Public names where they exist (torch >= 2.5); the private ones (same signatures) on torch 2.4.
    if hasattr(model, "register_state_dict_post_hook"):
        handles.append(model.register_state_dict_post_hook(save_scheduler_state_hook))
    else:  # pragma: no cover - torch 2.4
        handles.append(model._register_state_dict_hook(save_scheduler_state_hook))
    if hasattr(model, "register_load_state_dict_pre_hook"):
        handles.append(model.register_load_state_dict_pre_hook(load_scheduler_state_hook))
    else:  # pragma: no cover - torch 2.4
        handles.append(model._register_load_state_dict_pre_hook(load_scheduler_state_hook, with_module=True))
    state.hook_handles = handles


def put_plan_draw_first(model: nn.Module) -> None:
    """Re-register the plan draw in front of the root's other forward pre-hooks (FSDP2's registers itself in
    front when the root is sharded, and may prefetch blocks the plan is about to drop)."""
    state = get_state(model)
    state.hook_handles[0].remove()
    state.hook_handles[0] = model.register_forward_pre_hook(draw_plan_pre_hook, with_kwargs=True,
                                                            prepend=True)


def uninstall(model: nn.Module) -> None:
    """Undo what convert installed on a converted root: helpers' cleanups, the blocks' original classes and
    attributes, the hooks, the script hooks, the state. (:func:`sdepth_ext.revert` checks first.)"""
    state = get_state(model)
    for cleanup in reversed(state.cleanups):  # what helpers attached (compiled regions, ...)
        cleanup()
    for block in state.blocks:
        revert_block(block)
    for handle in state.hook_handles:
        handle.remove()
    for module in state.script_hooked:
        module.__dict__.pop(SCRIPT_HOOK, None)
    del model.__dict__[ROOT_ATTR]


def revert_block(block: nn.Module) -> None:
    """A converted block's original class back, and what convert set on it removed."""
    block.__class__ = type(block)._sd_base
    for attr in BLOCK_ATTRS:
        block.__dict__.pop(attr, None)


# ------------------------------------------------------------------------------------------------------------
# Numbering in forward order
# ------------------------------------------------------------------------------------------------------------
def record_call(state: SdepthState, block: nn.Module) -> None:
    if state.call_order is not None and not any(block is b for b in state.call_order):
        state.call_order.append(block)


def renumber_in_call_order(state: SdepthState) -> bool:
    """After the root's first forward: renumber the units in the order they ran, if that differs (True)."""
    order, state.call_order = state.call_order, None
    if not order:
        return False
    blocks = state.blocks
    ran = _in_order(order, blocks)
    if all(a is b for a, b in zip(ran, blocks)):
        return False
    old = {(id(block), u): l for l, (block, u) in enumerate(state.units)}
    units = [(block, u) for block in ran for u in range(block._sd_num_units)]
    survival = state.survival
    if state.rates_from_model:  # each unit keeps its own rate
        survival = [survival[old[(id(b), u)]] for b, u in units]
    warnings.warn(
        "sdepth_ext.convert: the model registers its residual blocks in another order than its forward "
        "runs them; units are renumbered in forward order (survival_probs, lesion and prune indices "
        "follow the forward)", UserWarning, stacklevel=3)
    first: dict[int, int] = {}
    for l, (block, _) in enumerate(units):
        first.setdefault(id(block), l)
    for block in ran:
        block._sd_index = first[id(block)]
    state.units = units
    state.unit_parameters = ParameterSlots(state._branch_parameter_slots, len(units))
    scheduler = state.scheduler
    state.scheduler = Scheduler(survival, mode=scheduler.mode, seed=scheduler.seed, backend=scheduler.backend)
    state.scheduler.step = scheduler.step
    state.scheduler.set_drop_scale(scheduler.drop_scale)
    state.reset_tally()
    state.macs_cache = {}
    state.plan = state.host_plan = None
    return True


def _in_order(called: Iterable[nn.Module], blocks: list[nn.Module]) -> list[nn.Module]:
    """``blocks`` in the order they were called; those never called keep their order, after the others."""
    ran = [b for b in called if any(b is c for c in blocks)]
    return ran + [b for b in blocks if not any(b is c for c in ran)]


# Names that models pickled by earlier versions reference (torch.save(model) pickles the root's hooks).
_LEGACY_NAMES = {"first_forward_post_hook": forward_post_hook}  # its name while renumbering was all it did


def __getattr__(name: str):
    try:
        return _LEGACY_NAMES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
