"""Plan: the gates of every unit for one training step, laid out for the host and for one copy to a GPU.

A :class:`Plan` keeps the per-unit bookkeeping (``active``, counts) as Python lists, because every unit reads
it on the host before deciding what to launch, and the row indices of the step *and* their inverse maps
(what the fused epilogue reads) in one packed int64 tensor (:func:`pack_rows`, the layout of
csrc/scheduler.h), so that :meth:`Plan.to` moves the whole step to the GPU with one copy and no index kernel
runs on the device.

The plan transforms: :func:`shard_plan` (a rank's slice of a global plan) and :func:`round_plan_rows`
(survivor counts rounded up for compiled code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .gates import GAMMA, mix64

__all__ = ["Plan", "pack_rows", "shard_plan", "round_plan_rows"]


def pack_rows(batch_size: int, survivors: Sequence) -> tuple[list[int], list[int], list[int], torch.Tensor]:
    """``(active, counts, offsets, buffer)`` of a plan from each unit's sorted surviving sample indices.

    The one place that lays out a plan's packed buffer (csrc/scheduler.h): for each unit with ``0 < K < N``
    survivors its K indices, then its inverse map ``slot`` (N int32, two to an int64 word, padding -1).
    """
    n = batch_size
    slot_words = (n + 1) // 2
    counts = [len(s) for s in survivors]
    active = [l for l, c in enumerate(counts) if c > 0]
    partial = [l for l, c in enumerate(counts) if 0 < c < n]
    offsets, total = [], 0
    for c in counts:
        offsets.append(total)
        if 0 < c < n:
            total += c + slot_words
    offsets.append(total)
    buffer = np.empty(total, dtype=np.int64)
    for l in partial:
        rows = np.asarray(survivors[l], dtype=np.int64)
        start, k = offsets[l], counts[l]
        buffer[start:start + k] = rows
        slot = buffer[start + k:start + k + slot_words].view(np.int32)
        slot[:] = -1
        slot[rows] = np.arange(k, dtype=np.int32)
    return active, counts, offsets, torch.from_numpy(buffer)


# --------------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------------
class Plan:
    """The gates of every residual unit for one training step.

    Attributes:
        mode: ``"batch"``, ``"row"`` or ``"subset"``.
        batch_size: the batch size the plan was drawn for.
        active: 0-based indices of units with at least one survivor, ascending.
        counts: ``counts[l]``, the number of surviving samples of unit ``l``.
        step: the scheduler step it was drawn at (None for plans built by hand or transformed).
        gates: None, or (for a model compiled whole, batch and row mode) the gates as a bool tensor on the
            plan's device: ``[num_units]`` in batch mode, ``[num_units, batch_size]`` in row mode. Compiled
            code reads them as graph inputs, so the graph does not depend on the drop pattern.
    """

    __slots__ = ("mode", "batch_size", "active", "counts", "step", "gates", "_offsets", "_buffer", "_views")

    def __init__(self, mode: str, batch_size: int, active: list[int], counts: list[int],
                 offsets: list[int], buffer: torch.Tensor, step: int | None = None):
        self.mode = mode
        self.batch_size = batch_size
        self.active = active
        self.counts = counts
        self.step = step
        self.gates: torch.Tensor | None = None
        self._offsets = offsets
        self._buffer = buffer
        self._views: dict = {}

    # Pickling (torch.save of a model, deepcopy) keeps the plan, not its cached views: int32 views of the
    # int64 buffer would make torch.save refuse ("view the same data as different types").
    def __getstate__(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__ if name != "_views"}

    def __setstate__(self, state: dict) -> None:
        self.gates = None  # plans pickled before the attribute existed
        for name, value in state.items():
            setattr(self, name, value)
        self._views = {}

    @classmethod
    def from_survivors(cls, mode: str, batch_size: int, survivors: Sequence, step: int | None = None) -> Plan:
        """A plan from each unit's sorted surviving sample indices (batch mode: none or all of them)."""
        return cls(mode, batch_size, *pack_rows(batch_size, survivors), step=step)

    @property
    def num_units(self) -> int:
        """Number of units (residual additions) the plan gates."""
        return len(self.counts)

    num_blocks = num_units  # the name up to sdepth_ext 0.2.0 (a ResNet block is one unit)

    @property
    def buffer(self) -> torch.Tensor:
        """All row indices and slot maps of the step, packed unit after unit (one buffer, one copy)."""
        return self._buffer

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    def _check_unit(self, l: int) -> None:
        if not 0 <= l < len(self.counts):
            raise IndexError(f"unit index l must be in [0, {len(self.counts)}), got {l}")

    def survives(self, l: int) -> bool:
        """True when unit ``l`` runs for at least one sample."""
        self._check_unit(l)
        return self.counts[l] > 0

    def survivors(self, l: int) -> list[int]:
        """Unit ``l``'s surviving sample indices as a host list (reads the buffer: a sync on a GPU plan)."""
        rows = self.rows(l)
        return list(range(self.batch_size)) if rows is None else rows.tolist()

    def rows(self, l: int) -> torch.Tensor | None:
        """Sorted int64 indices of unit ``l``'s surviving samples, on the plan's device.

        ``None`` when every sample survives (the residual runs on the whole batch, no gather); an
        empty tensor when none does.
        """
        return self._row_views(l)[0]

    def slot(self, l: int) -> torch.Tensor | None:
        """Unit ``l``'s inverse map: int32 ``slot[n] = k`` if sample n is the k-th survivor, else -1.

        ``None`` when every sample survives; all -1 when none does. What the fused epilogue reads.
        """
        return self._row_views(l)[1]

    def _row_views(self, l: int) -> tuple:
        compiling = torch.compiler.is_compiling()
        views = None if compiling else self._views.get(l)
        if views is None:
            self._check_unit(l)
            count, n = self.counts[l], self.batch_size
            if count == n:
                views = (None, None)
            elif count == 0:
                views = (self._buffer.new_empty(0),
                         torch.full((n,), -1, dtype=torch.int32, device=self._buffer.device))
            else:
                start = self._offsets[l]
                views = (self._buffer[start:start + count],
                         self._buffer[start + count:start + count + (n + 1) // 2].view(torch.int32)[:n])
            if not compiling:  # compiled code reads the buffer itself: no cache of views the graph made
                self._views[l] = views
        return views

    def with_gates(self) -> Plan:
        """Set :attr:`gates` from the counts (batch mode) or the rows (row and subset mode) of this host plan
        (:meth:`to` carries them to the device); returns self."""
        n = self.batch_size
        if self.mode == "batch":
            gates = torch.tensor([c > 0 for c in self.counts], dtype=torch.bool)
        else:
            gates = torch.zeros(len(self.counts), n, dtype=torch.bool)
            for l, c in enumerate(self.counts):
                if c == n:
                    gates[l] = True
                elif c > 0:
                    gates[l, self.rows(l)] = True
        self.gates = gates
        return self

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Plan:
        """This plan with its buffer on ``device``: one copy (asynchronous from pinned memory to a GPU).

        Pinning is decided here, from the target: a copy to CUDA pins the host buffer first unless the
        scheduler already allocated it pinned (it does when told the plan is going to a GPU).
        """
        device = torch.device(device)
        buffer = self._buffer
        if buffer.device == device:
            return self
        if non_blocking and device.type == "cuda" and buffer.device.type == "cpu" and not buffer.is_pinned():
            # From pageable memory CUDA may make the "asynchronous" copy wait for the stream.
            buffer = buffer.pin_memory()
        moved = Plan(self.mode, self.batch_size, self.active, self.counts, self._offsets,
                     buffer.to(device, non_blocking=non_blocking), step=self.step)
        if self.gates is not None:
            moved.gates = self.gates.to(device, non_blocking=non_blocking)
        return moved

    def __repr__(self) -> str:
        return (f"Plan(mode={self.mode!r}, batch_size={self.batch_size}, step={self.step}, "
                f"active={len(self.active)}/{len(self.counts)} units, "
                f"words_stored={self._buffer.numel()}, device={self.device})")


def shard_plan(plan: Plan, rank: int, world_size: int) -> Plan:
    """Rank ``rank``'s slice of a row-mode ``plan`` drawn for the global batch of ``world_size`` ranks.

    Ranks are interleaved (csrc/scheduler.h): local sample ``i`` of rank ``r`` is global sample
    ``i * world_size + r``, so this equals what the rank draws itself with ``Scheduler.sample(N, rank=r,
    world_size=W)`` at the same step when ``plan.batch_size == W * N``. Batch-mode plans need no sharding
    (their gates do not depend on the batch) and are rejected with ValueError.
    """
    if plan.mode != "row":
        raise ValueError(f"plan: shard_plan needs a row-mode plan, got mode={plan.mode!r}")
    if plan.batch_size % world_size != 0:
        raise ValueError(f"world_size: {world_size} does not divide the plan's batch of {plan.batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    n = plan.batch_size // world_size
    survivors = []
    for l in range(plan.num_units):
        rows = np.asarray(plan.survivors(l), dtype=np.int64)
        mine = rows[rows % world_size == rank]
        survivors.append(mine // world_size)
    return Plan.from_survivors("row", n, survivors, step=plan.step)


def round_plan_rows(plan: Plan, multiple: int, salt: int) -> Plan:
    """``plan`` with each survivor count K (0 < K < N) raised to ``min(N, k * ceil(K / k))`` (k = multiple).

    The extra rows are dropped samples promoted to survivors: they get their residual like any survivor.
    Which dropped samples: the first ones in cyclic index order from a per-unit offset derived from ``salt``
    (the same on every rank, different each step), so no sample index is favoured over many steps. Units with
    K = 0 stay dropped. Hence the effective survival rate of unit l is ``E[min(N, k ceil(K/k))] / N`` with
    ``K ~ Binomial(N, p_l)`` (:func:`sdepth_ext.effective_survival`).
    """
    if plan.mode != "row" or multiple <= 1:
        return plan
    n = plan.batch_size
    survivors = []
    for l, count in enumerate(plan.counts):
        rows = np.asarray(plan.survivors(l), dtype=np.int64)
        target = min(n, multiple * math.ceil(count / multiple))
        if 0 < count < target:
            dropped = np.setdiff1d(np.arange(n), rows)
            start = mix64(salt + (l + 1) * GAMMA) % dropped.size  # a well-spread offset per unit and step
            promoted = np.roll(dropped, -start)[:target - count]
            rows = np.sort(np.concatenate([rows, promoted]))
        survivors.append(rows)
    return Plan.from_survivors("row", n, survivors, step=plan.step)


# --------------------------------------------------------------------------------------------------------
# Scheduler
