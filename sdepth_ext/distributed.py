"""Stochastic depth under ``torch.nn.parallel.DistributedDataParallel``, and the gradient of dropped blocks.

How ranks agree on the plan of a step
    Every rank owns a Scheduler. Its gates are a pure function of (seed, step, unit, sample)
    (csrc/scheduler.h), and each training-mode forward draws one step on every rank (DDP runs ranks in
    lockstep). :func:`sync_scheduler` (called by :func:`ddp_ready`) broadcasts the seed and step of rank
    ``src`` once, so a ``seed=None`` conversion (a per-rank seed from torch's generator) is fine too. Then

    * batch mode: one gate per unit and step, whatever the batch size: all ranks draw the same gates;
    * row mode: rank r's sample i is sample ``i * world_size + r`` of the global batch, and each rank draws
      only its own samples' gates. Gates of different ranks' samples are independent, and with equal per-rank
      batches the run equals a single-process run over the interleaved global batch (up to BatchNorm, whose
      statistics stay per rank, as with any DDP model without SyncBatchNorm). The stream never depends on a
      batch size: ranks with unequal batches (a last partial batch, an uneven sampler) stay in lockstep.

Why dropped blocks need help
    DDP with the default ``find_unused_parameters=False`` expects a gradient for every parameter each step
    and fails at the *next* forward when a block was dropped. The default dropped-gradient policy ``"zero"``
    gives a dropped block's residual parameters exact zero gradients through a no-op autograd node (no
    activation work, one zero fill per unit in backward; its BatchNorm layers do not run, so running
    statistics and ``num_batches_tracked`` are untouched). :func:`ddp_ready` keeps that policy and makes the
    node hand a gradient to every parameter, also to those whose ``.grad`` already exists, so DDP's hooks see
    each one. ``find_unused_parameters=True`` also works but traverses the autograd graph every step (see
    ``benchmarks/bench_ddp.py``).

FSDP2 (``torch.distributed.fsdp.fully_shard``) has its own helper, :func:`sdepth_ext.fully_shard`
(:mod:`sdepth_ext.fsdp`); ``sync_scheduler``, ``set_dropped_grads``, ``clear_dropped_grads`` and
``dropped_blocks`` serve both.

SyncBatchNorm in row mode is refused: a unit with no survivor on one rank and some on another would skip
the collective on the first rank only (a hang, or mismatched collectives).

Optimizer semantics (the same in single-process, DDP and FSDP2 runs)
    ``"zero"`` (default): a dropped block's residual parameters get a zero gradient, so weight decay and
    momentum apply to them every step -- what the paper's reference code (gradients zeroed every step, SGD
    over all parameters), timm's ``DropPath`` and torchvision's ``StochasticDepth`` (a zero gate) do.
    ``"none"`` (``set_dropped_grads(model, "none")``): no gradient (``grad is None`` after
    ``zero_grad(set_to_none=True)``): optimizers skip them, no weight decay and no momentum step that
    iteration. Under DDP, which needs every gradient, :func:`ddp_ready` switches to ``"zero"``;
    :func:`clear_dropped_grads`, called after ``backward()``, then gives the "none" semantics by setting those
    gradients back to ``None`` (for units dropped on every rank: always in batch mode; in row mode the units
    without a survivor in the global batch, which the ranks agree on through one small all-reduce of their
    survivor counts, whatever their batch sizes).
"""

from __future__ import annotations

import struct
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .batchnorm import refuse_sync_batchnorm
from .grads import DROPPED_GRADS
from .state import adapter_of, get_state

__all__ = ["ddp_ready", "sync_scheduler", "set_dropped_grads", "clear_dropped_grads", "dropped_blocks",
           "check_no_sync_batchnorm", "set_shard"]

_U64 = 1 << 64


def set_dropped_grads(model: nn.Module, policy: str) -> nn.Module:
    """What a dropped block's residual parameters get: ``"zero"`` (a zero gradient, default) or ``"none"``.

    ``"zero"`` matches the paper's code and models with their own stochastic depth: weight decay and
    momentum apply to dropped blocks too. ``"none"`` freezes them for the step (the optimizer skips them).
    """
    if not isinstance(policy, str) or policy not in DROPPED_GRADS:
        raise ValueError(f"policy must be one of {DROPPED_GRADS}, got {policy!r}")
    get_state(model).dropped_grads = policy
    return model


def dropped_blocks(model: nn.Module, process_group=None) -> list[int]:
    """Units (0-based) without a survivor in the last step on every rank.

    Batch mode and single-process runs: the plan's dropped units. Row mode under DDP (``ddp_ready`` with a
    process group): the units without a survivor in the *global* batch, from one all-reduce of the ranks'
    survivor counts -- a collective, so call it on every rank. Sharded without a process group (tests,
    simulations): the global plan drawn for ``world_size`` equal batches.
    """
    state = get_state(model)
    plan = state.host_plan
    if plan is None or plan.mode == "subset":
        return []  # subset mode keeps at least one sample of every unit on every rank
    counts = plan.counts
    if state.shard is not None and state.mode == "row":
        rank, world_size = state.shard
        if dist.is_available() and dist.is_initialized():
            local = torch.tensor(counts, dtype=torch.int64, device=_collective_device(process_group))
            dist.all_reduce(local, group=process_group)
            counts = local.tolist()
        else:
            counts = state.scheduler.draw(plan.step, plan.batch_size * world_size).counts
    return [l for l, c in enumerate(counts) if c == 0]


def clear_dropped_grads(model: nn.Module, process_group=None) -> int:
    """Set ``.grad = None`` on the residual parameters of the units dropped in the last step on every rank.

    Call it after ``backward()`` (after DDP's all-reduce) and before ``optimizer.step()`` to get the
    single-process "no gradient" semantics with ``ddp_ready``. Returns how many parameters were cleared.
    Projection shortcuts always run, so their parameters keep their gradients. In row mode under DDP it is a
    collective (:func:`dropped_blocks`): call it on every rank.
    """
    state = get_state(model)
    cleared = 0
    for l in dropped_blocks(model, process_group):
        for p in state.unit_parameters(l):  # the branch only: projection shortcuts always run
            if p.grad is not None:
                p.grad = None
                cleared += 1
    return cleared


def check_no_sync_batchnorm(state) -> None:
    """Row mode with SyncBatchNorm in a unit's branch would hang DDP: refuse it (ValueError naming it)."""
    if state.mode == "row":
        refuse_sync_batchnorm((f"unit {l} ({type(block).__name__})",
                               adapter_of(block).branch_modules(block, u))
                              for l, (block, u) in enumerate(state.units))


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync_scheduler(model: nn.Module, src: int = 0, process_group=None) -> None:
    """Give every rank the scheduler state (seed, step, drop scale) of rank ``src``; a collective.

    Call it after conversion and after loading a checkpoint on only some ranks (``ddp_ready`` calls it once).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sync_scheduler needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    scheduler = get_state(model).scheduler
    # Unsigned 64-bit words travel as int64 bit patterns; the drop scale's float64 as its bits too.
    words = [scheduler.seed, scheduler.step, struct.unpack("<Q", struct.pack("<d", scheduler.drop_scale))[0]]
    signed = [w - _U64 if w >= 1 << 63 else w for w in words]
    buf = torch.tensor(signed, dtype=torch.int64, device=_collective_device(process_group))
    dist.broadcast(buf, src=src, group=process_group)
    seed, step, scale_bits = [int(v) % _U64 for v in buf.cpu().tolist()]
    scheduler.reseed(seed, step)
    scheduler.set_drop_scale(struct.unpack("<d", struct.pack("<Q", scale_bits))[0])


def ddp_ready(model: nn.Module, *, process_group=None, src: int = 0, sync: bool = True) -> nn.Module:
    """Prepare a converted model for ``DistributedDataParallel`` with its default flags; returns ``model``.

    Call on every rank, after :func:`sdepth_ext.convert` and before wrapping in DDP (or on the DDP wrapper).

    * dropped blocks' residual parameters get exact zero gradients (``set_dropped_grads(model, "zero")``, the
      default), and every one of them reaches DDP's hooks, also when its ``.grad`` already exists;
    * with an initialised process group: the scheduler state of rank ``src`` is broadcast (``sync=True``),
      and in row mode each rank draws the global batch's plan and keeps its slice of rows (subset mode: each
      rank keeps its fixed count of its own samples).

    Without a process group only the first point applies (single-process runs with zero-gradient semantics).
    """
    state = get_state(model)
    check_no_sync_batchnorm(state)
    if state.dropped_grads == "none":
        warnings.warn("sdepth_ext.ddp_ready: dropped_grads 'none' switched to 'zero' (DDP with its default "
                      "flags needs a gradient for every parameter); call sd.clear_dropped_grads(model) after "
                      "backward() for the 'none' semantics", UserWarning, stacklevel=2)
    set_dropped_grads(model, "zero")
    state.every_param = True
    if dist.is_available() and dist.is_initialized():
        if sync:
            sync_scheduler(model, src=src, process_group=process_group)
        set_shard(state, dist.get_rank(process_group), dist.get_world_size(process_group))
    return model


def set_shard(state, rank: int, world_size: int) -> None:
    """This rank's slice of each step's samples (row and subset mode; batch mode draws the same gates on
    every rank, whatever the batch): samples ``i * world_size + rank`` of the global batch."""
    state.shard = (rank, world_size) if state.mode != "batch" and world_size > 1 else None
