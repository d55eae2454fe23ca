"""Stochastic depth under FSDP2 (``torch.distributed.fsdp.fully_shard``): dropped units skip communication.

FSDP2 all-gathers a module's parameters in a forward pre-hook and reduce-scatters their gradients after its
backward. A converted block whose units are all dropped is still *called* (its parent's forward calls every
block), so without help its hooks would gather parameters nothing uses. Needs torch >= 2.7 (FSDP2 with CPU
process groups needs CPU stream events; older versions raise here).

What a converted model does under FSDP2 (installed by :func:`fully_shard`, or by the first training forward
after ``fully_shard`` was applied by hand):

* **The same plan on every rank.** The scheduler's state (seed, step, drop scale) is broadcast once from the
  first rank, along every dimension of the meshes the parameters lie on (:func:`sdepth_ext.sync_scheduler`);
  in row and subset mode each rank draws its own samples' gates, as samples ``i * world_size + rank`` of
  the global batch, where ``rank`` and ``world_size`` are the data-parallel ones: the flattened coordinate
  on the data-parallel mesh (HSDP: both of its dimensions), the mesh FSDP2 was given (:func:`fully_shard`'s
  ``mesh``, also by hand). With tensor parallelism a parameter's own mesh has the tensor-parallel
  dimensions too, whose peers see the same samples: they draw the same rows.
* **Batch mode: a block dropped on every rank skips its communication.** When the block's own FSDP group
  holds nothing but its units' branch parameters (the helper shards projection shortcuts and other parts on
  their own), FSDP's forward hooks of that block are bypassed for the step: no all-gather in forward, no
  backward hooks, so no all-gather and no reduce-scatter in backward. An explicit forward or backward
  prefetch (``set_modules_to_forward_prefetch`` / ``..._backward_prefetch``) skips such blocks too. With
  ``dropped_grads="zero"`` the block's sharded parameters get a zero gradient locally (no collective).
  Groups inside a unit's branch (the helper shards each unit of a Swin/ViT/MaxViT block on its own) need
  nothing: a dropped unit does not call them.
* **Row mode: every rank takes part in every unit's collectives.** Whether a unit has survivors differs
  from rank to rank, so a unit without a survivor on this rank runs its branch on an empty sub-batch: its
  all-gathers happen and its parameters get exact zero gradients for the reduce-scatter (no hang, cf.
  pytorch#152964 / #158719, programs that are not SPMD). Units dropped on every rank then hold zero
  gradients; :func:`sdepth_ext.clear_dropped_grads` (a collective) restores "no gradient" as under DDP.
* **Subset mode** keeps at least one sample of every unit on every rank: every unit runs everywhere.

:func:`count_collectives` counts the c10d collectives dispatched in its scope (tests and
``benchmarks/bench_fsdp.py`` compare them with the units that ran).
"""

from __future__ import annotations

import collections
import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .distributed import check_no_sync_batchnorm, set_shard, sync_scheduler
from .grads import is_plain_tensor
from .state import adapter_of, get_state, put_plan_draw_first, register_sharding_detector, root_of, unit_range

__all__ = ["fully_shard", "count_collectives", "CollectiveCount", "MIN_TORCH"]

MIN_TORCH = (2, 7)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _require_fsdp2() -> None:
    if _torch_version() < MIN_TORCH:
        raise RuntimeError(f"sdepth_ext's FSDP2 support needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
                           f"(torch.distributed.fsdp.fully_shard with CPU stream events), got torch "
                           f"{torch.__version__}")


def fsdp_module_types() -> tuple[type, ...]:
    """FSDP2's module class, where this torch has one (also the pre-2.6 location, to refuse it clearly)."""
    types = []
    for path in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            module = __import__(path, fromlist=["FSDPModule"])
        except ImportError:
            continue
        cls = getattr(module, "FSDPModule", None)
        if cls is not None and cls not in types:
            types.append(cls)
    return tuple(types)


# ------------------------------------------------------------------------------------------------------------
# The helper
# ------------------------------------------------------------------------------------------------------------
def fully_shard(model: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """Shard a converted model with FSDP2, one group per unit, then the root; returns ``model``.

    ``fully_shard_kwargs`` (``mesh``, ``reshard_after_forward``, ``mp_policy``, ``offload_policy``, ...) go to
    every ``torch.distributed.fsdp.fully_shard`` call. Call it on every rank, after :func:`sdepth_ext.convert`
    and before building the optimizer; it is a collective (it broadcasts the scheduler state).

    Groups: a block with one unit is one group holding that unit's branch; its other parameterised parts (a
    projection shortcut, which runs also when the unit is dropped) are groups of their own. A block with
    several units (Swin, ViT, MaxViT attention) gets one group per unit, its branch modules together. Then
    the root. Modules already sharded by hand are kept as they are, so calling it after sharding blocks by
    hand (torchtitan's loop) only finishes the job. See the module docstring for what skipping saves.
    """
    state = get_state(model)
    _require_fsdp2()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sdepth_ext.fully_shard needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import fully_shard as shard

    root = root_of(model)

    def shard_unsharded(modules: list[nn.Module]) -> None:
        # Modules sharded by hand, or holding a part sharded by hand, stay as they are.
        if modules and not any(isinstance(m, FSDPModule) or _has_sharded(m) for m in modules):
            shard(modules if len(modules) > 1 else modules[0], **fully_shard_kwargs)

    for block in state.blocks:
        adapter = adapter_of(block)
        units = range(adapter.num_units(block))
        branches = [adapter.branch_modules(block, u) for u in units]
        in_branch = {id(m) for branch in branches for m in branch}
        for child in block.children():  # parts that run whenever the block runs: groups of their own
            if id(child) not in in_branch and _has_parameters(child):
                shard_unsharded([child])
        if len(units) > 1:
            for branch in branches:
                shard_unsharded([m for m in branch if _has_parameters(m)])
        if not isinstance(block, FSDPModule) and any(not _is_sharded(p) for p in block.parameters()):
            shard(block, **fully_shard_kwargs)  # what is left: the unit's branch (or branch parameters)
    if not isinstance(root, FSDPModule):
        shard(root, **fully_shard_kwargs)
    install(root, state, _explicit_dp_mesh(fully_shard_kwargs))
    return model


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_sharded(p: torch.Tensor) -> bool:
    return not is_plain_tensor(p)  # FSDP2's sharded parameters are DTensors


def _has_sharded(module: nn.Module) -> bool:
    return any(_is_sharded(p) for p in module.parameters())


# ------------------------------------------------------------------------------------------------------------
# Detection and installation
# ------------------------------------------------------------------------------------------------------------
def detect(root: nn.Module, state) -> None:
    """Called by the root's plan draw when its class changed: install the gates if FSDP2 now shards it."""
    if state.fsdp is not None or not (dist.is_available() and dist.is_initialized()):
        return  # FSDP2 needs a process group: without one, nothing to look for (nor to import)
    types = fsdp_module_types()
    if types and any(isinstance(m, types) for m in root.modules()):
        _require_fsdp2()
        install(root, state)


def install(root: nn.Module, state, dp_mesh=None) -> None:
    """Make the converted ``root`` (sharded with FSDP2) skip dropped units' collectives; a collective.

    ``dp_mesh``: the data-parallel mesh, as :func:`fully_shard` was given it; ``None``: the one FSDP2 was
    given (:func:`_recorded_dp_mesh`).
    """
    check_no_sync_batchnorm(state)
    if dp_mesh is None:
        dp_mesh = _recorded_dp_mesh(root)
    rank, world_size = _mesh_rank(dp_mesh)
    for group in _sync_groups(root, dp_mesh):  # each dimension in turn, from its first rank
        sync_scheduler(root, src=dist.get_global_rank(group, 0), process_group=group)
    set_shard(state, rank, world_size)
    if state.fsdp is not None:
        state.fsdp.remove()
    gates = FsdpGates(state, root, _mesh_device(dp_mesh))
    state.fsdp = gates
    state.fsdp_seen = id(type(root))
    state.cleanups.append(gates.remove)
    # Our plan draw must precede FSDP's root pre-forward: that one may prefetch blocks the plan drops.
    put_plan_draw_first(root)


def _explicit_dp_mesh(fully_shard_kwargs: dict):
    """The data-parallel mesh :func:`fully_shard`'s arguments name: FSDP2's ``mesh`` (1-D: FSDP; 2-D: HSDP),
    or, where ``dp_mesh_dims`` (newer torch) makes ``mesh`` the whole SPMD mesh, its replicate and shard
    dimensions. ``None`` without a mesh."""
    mesh, dims = fully_shard_kwargs.get("mesh"), fully_shard_kwargs.get("dp_mesh_dims")
    if mesh is None or dims is None:
        return mesh
    names = [name for field in (dims.replicate, dims.shard) if field is not None
             for name in ((field,) if isinstance(field, str) else field)]
    return mesh[tuple(names)]


def _recorded_dp_mesh(root: nn.Module):
    """The data-parallel mesh FSDP2 was given for ``root``'s first parameter group (``fully_shard(mesh=...)``,
    also by hand), from its record of it (the group's ``mesh_info``). Not the mesh of a sharded parameter:
    with tensor parallelism that one has the tensor-parallel dimensions too. Where this torch keeps no such
    record, the first parameter's mesh (right without tensor parallelism); ``None`` without one."""
    types = fsdp_module_types()
    for module in root.modules():
        if not isinstance(module, types):
            continue
        fsdp_state = module._get_fsdp_state()
        groups = getattr(fsdp_state, "_fsdp_param_groups", None)  # torch >= 2.12: one per mesh
        if groups is None:
            group = getattr(fsdp_state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            mesh = getattr(getattr(group, "mesh_info", None), "mesh", None)
            if mesh is not None:
                return mesh
    return next((p.device_mesh for p in root.parameters() if getattr(p, "device_mesh", None) is not None),
                None)


def _sync_groups(root: nn.Module, dp_mesh) -> list:
    """One process group per dimension of the data-parallel mesh and of every mesh a parameter lies on (a
    tensor-parallel one too): broadcasting along each in turn gives every rank that holds a part of the
    model, tensor-parallel peers included, the stream of the first."""
    meshes = [dp_mesh, *(getattr(p, "device_mesh", None) for p in root.parameters())]
    groups: list = []
    for mesh in meshes:
        for d in range(0 if mesh is None else mesh.ndim):
            group = mesh.get_group(d)
            if not any(group is g for g in groups):
                groups.append(group)
    return groups or [dist.group.WORLD]


def _mesh_rank(mesh) -> tuple[int, int]:
    """(this rank's index among the data-parallel ranks, their number): the flattened mesh coordinate."""
    if mesh is None:
        return dist.get_rank(), dist.get_world_size()
    coordinate = mesh.get_coordinate()
    rank = 0
    for index, size in zip(coordinate, mesh.mesh.shape):
        rank = rank * size + index
    return rank, mesh.size()


def _mesh_device(mesh) -> torch.device:
    device_type = "cpu" if mesh is None else mesh.device_type
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_type)


class FsdpGates:
    """Per step, which sharded blocks skip their FSDP hooks; the hooks and prefetch lists that ask.

    ``bypassable``: for every converted block that is an FSDP module whose own group holds only branch
    parameters, its FSDP state and the units whose parameters that group holds. A block is bypassed in a
    step iff the plan is a batch-mode plan that drops all those units (every rank draws the same).
    """

    def __init__(self, state, root: nn.Module, device: torch.device):
        self.state = state
        self.device = device
        self.bypassable: list[tuple[object, tuple[int, ...]]] = []
        self.skipped: frozenset = frozenset()  # FSDP states bypassed under the current plan
        self._bypassing: set[int] = set()  # blocks whose current call bypasses FSDP (pre-hook to post-hook)
        self._restore: list = []
        types = fsdp_module_types()
        for block in state.blocks:
            if isinstance(block, types):
                units = _group_units(block, types)
                if units:
                    self._wrap_block(block, units)
        for module in root.modules():
            if isinstance(module, types):
                self._filter_prefetch(module._get_fsdp_state())

    # -- each plan ----------------------------------------------------------------------------------------
    def on_plan(self, plan) -> None:
        if plan.mode != "batch":
            self.skipped = frozenset()
            return
        counts = plan.counts
        self.skipped = frozenset(fsdp_state for fsdp_state, units in self.bypassable
                                 if not any(counts[l] for l in units))

    def _bypasses(self, block: nn.Module, fsdp_state, args: tuple) -> bool:
        """Whether this call of ``block`` skips FSDP: decided on the plan its forward will run on."""
        if not block.training or not args or not isinstance(args[0], torch.Tensor):
            return False
        # A forward that did not start at the root would draw a fresh plan in the block: draw it here, so
        # that this decision and the forward see the same one.
        self.state.plan_for(unit_range(block)[0], args[0], claim=False)
        return fsdp_state in self.skipped

    # -- installation ---------------------------------------------------------------------------------------
    def _wrap_block(self, block: nn.Module, units: tuple[int, ...]) -> None:
        fsdp_state = block._get_fsdp_state()
        pre_handle = getattr(fsdp_state, "_pre_forward_hook_handle", None)
        post_handle = getattr(fsdp_state, "_post_forward_hook_handle", None)
        if pre_handle is None or post_handle is None or pre_handle is post_handle:
            return  # a grouped state (fully_shard([...])) or another FSDP layout: FSDP's hooks run as usual
        fsdp_pre = block._forward_pre_hooks.get(pre_handle.id)
        fsdp_post = block._forward_hooks.get(post_handle.id)
        if getattr(fsdp_pre, "__self__", None) is not fsdp_state or getattr(fsdp_post, "__self__", None) \
                is not fsdp_state:
            return
        policy = fsdp_state._mp_policy
        block._forward_pre_hooks[pre_handle.id] = functools.partial(
            _gated_pre_forward, self, fsdp_state, fsdp_pre, policy)
        block._forward_hooks[post_handle.id] = functools.partial(
            _gated_post_forward, self, fsdp_post, policy)
        self.bypassable.append((fsdp_state, units))
        self._restore.append(functools.partial(_restore_hooks, block, pre_handle.id, fsdp_pre, post_handle.id,
                                               fsdp_post))

    def _filter_prefetch(self, fsdp_state) -> None:
        if isinstance(fsdp_state, _PrefetchFilter):
            fsdp_state.__dict__["_sd_gates"] = self
            return
        cls = type(fsdp_state)
        forward = fsdp_state.__dict__.pop("_states_to_forward_prefetch", [])
        backward = fsdp_state.__dict__.pop("_states_to_backward_prefetch", [])
        fsdp_state.__class__ = _filtered_class(cls)
        fsdp_state.__dict__.update(_sd_gates=self, _sd_forward_prefetch=forward,
                                   _sd_backward_prefetch=backward)
        self._restore.append(functools.partial(_restore_state_class, fsdp_state, cls))

    def remove(self) -> None:
        """Undo the installation (``sdepth_ext.revert``): FSDP's own hooks and classes again."""
        for restore in reversed(self._restore):
            restore()
        self._restore = []
        self.bypassable = []
        self.skipped = frozenset()
        if self.state.fsdp is self:
            self.state.fsdp = None


def _group_units(block: nn.Module, types: tuple[type, ...]) -> tuple[int, ...]:
    """Units whose branch parameters the block's own FSDP group holds; () if it holds anything else.

    The block's own group holds its parameters outside FSDP submodules (those are groups of their own).
    """
    nested = [name for name, m in block.named_modules() if name and isinstance(m, types)]
    own = {name for name, _ in block.named_parameters()
           if not any(name.startswith(prefix + ".") for prefix in nested)}
    units = []
    adapter = adapter_of(block)
    branch_names = set()
    for u, l in enumerate(unit_range(block)):
        names = {name for name, _ in adapter.branch_parameters(block, u)}
        branch_names |= names
        if names & own:
            units.append(l)
    if not own or own - branch_names:
        return ()  # nothing to save, or parameters that run whatever the gates (a projection shortcut)
    return tuple(units)


def _gated_pre_forward(gates: FsdpGates, fsdp_state, fsdp_pre, policy, module, args, kwargs):
    if gates._bypasses(module, fsdp_state, args):
        gates._bypassing.add(id(module))
        if policy.cast_forward_inputs and policy.param_dtype is not None:
            return _cast(args, policy.param_dtype), _cast(kwargs, policy.param_dtype)
        return None
    gates._bypassing.discard(id(module))
    return fsdp_pre(module, args, kwargs)


def _gated_post_forward(gates: FsdpGates, fsdp_post, policy, module, args, output):
    if id(module) in gates._bypassing:
        gates._bypassing.discard(id(module))
        return _cast(output, policy.output_dtype) if policy.output_dtype is not None else None
    return fsdp_post(module, args, output)


def _cast(value, dtype: torch.dtype):
    """Floating-point tensors in ``value`` cast to ``dtype``, as FSDP's mixed precision casts a module's
    inputs and outputs (a bypassed block's must look like a gathered one's)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _restore_hooks(block, pre_id, fsdp_pre, post_id, fsdp_post) -> None:
    if pre_id in block._forward_pre_hooks:
        block._forward_pre_hooks[pre_id] = fsdp_pre
    if post_id in block._forward_hooks:
        block._forward_hooks[post_id] = fsdp_post


# ------------------------------------------------------------------------------------------------------------
# Prefetch lists that leave out the blocks the plan bypasses
# ------------------------------------------------------------------------------------------------------------
class _PrefetchFilter:
    """Mixed in front of an FSDP state's class: its explicit prefetch lists, less the bypassed blocks.

    FSDP reads ``_states_to_forward_prefetch`` in a module's pre-forward and ``_states_to_backward_prefetch``
    in its pre-backward, and ``set_modules_to_*_prefetch`` assigns them; the properties keep what was assigned
    and hand FSDP the targets the current plan runs.
    """

    @property
    def _states_to_forward_prefetch(self):
        return _without_skipped(self.__dict__["_sd_forward_prefetch"], self.__dict__["_sd_gates"])

    @_states_to_forward_prefetch.setter
    def _states_to_forward_prefetch(self, states):
        self.__dict__["_sd_forward_prefetch"] = states

    @property
    def _states_to_backward_prefetch(self):
        return _without_skipped(self.__dict__["_sd_backward_prefetch"], self.__dict__["_sd_gates"])

    @_states_to_backward_prefetch.setter
    def _states_to_backward_prefetch(self, states):
        self.__dict__["_sd_backward_prefetch"] = states


def _without_skipped(states: list, gates: FsdpGates) -> list:
    skipped = gates.skipped
    if not skipped or not states:
        return states
    return [s for s in states if s not in skipped]


_FILTERED_CLASSES: dict[type, type] = {}


def _filtered_class(cls: type) -> type:
    filtered = _FILTERED_CLASSES.get(cls)
    if filtered is None:
        filtered = type(f"PrefetchFiltered{cls.__name__}", (_PrefetchFilter, cls), {})
        _FILTERED_CLASSES[cls] = filtered
    return filtered


def _restore_state_class(fsdp_state, cls: type) -> None:
    forward = fsdp_state.__dict__.pop("_sd_forward_prefetch", [])
    backward = fsdp_state.__dict__.pop("_sd_backward_prefetch", [])
    fsdp_state.__dict__.pop("_sd_gates", None)
    fsdp_state.__class__ = cls
    fsdp_state._states_to_forward_prefetch = forward
    fsdp_state._states_to_backward_prefetch = backward


# ------------------------------------------------------------------------------------------------------------
# Counting collectives
# ------------------------------------------------------------------------------------------------------------
class CollectiveCount(TorchDispatchMode):
    """Counts the c10d collectives dispatched inside it, by kind (``all_gather``, ``reduce_scatter``, ...).

    ``calls`` lists ``(kind, elements of the first tensor argument)`` in dispatch order: two ranks of an SPMD
    program list the same. While it is active, Dynamo runs ``torch.compile``d code eagerly. A dispatch mode
    and nothing else: ``torch.distributed.tensor.debug.CommDebugMode`` also tracks modules with hooks, which
    fails on torchvision ResNets (their in-place ReLU meets its hooks).
    """

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            kind = _collective_kind(func.__name__)
            self.counts[kind] += 1
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is None and args and isinstance(args[0], (list, tuple)) and args[0]:
                first = args[0][0] if isinstance(args[0][0], torch.Tensor) else None
            self.calls.append((kind, -1 if first is None else first.numel()))
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _collective_kind(name: str) -> str:
    name = name.split(".")[0].strip("_")
    for kind in ("all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce", "broadcast"):
        if name.startswith(kind) or kind in name:
            return kind.replace("allgather", "all_gather").replace("allreduce", "all_reduce")
    return name


@contextlib.contextmanager
def count_collectives():
    """``with count_collectives() as c: ...``; then ``c.counts`` (a Counter by kind) and ``c.total``."""
    with CollectiveCount() as counter:
        yield counter


register_sharding_detector(detect)  # the root's plan draw asks, when a root's class changes (state.py)
