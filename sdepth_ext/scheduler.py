"""Scheduler and Plan: one host-side draw of every unit's gates per training step.

The compiled sampler (csrc/, ``sdepth_ext._C``) does the drawing and compaction; this module is its Python
face and also holds a NumPy fallback that computes the *identical* gates (the exact definition is in
csrc/scheduler.h), so a machine without the compiled part trains the same run, only slower (the fallback is
the reference the C++ path is tested against).

The gates are counter-based: every uniform is a pure function of (seed, step, unit, sample), so a scheduler's
whole state is its seed and the number of steps drawn. A draw claims its step atomically (several threads may
share a scheduler), batch sizes may change from step to step, and DDP ranks with unequal batches stay in
lockstep, since no step's size moves another step's gates.

A :class:`Plan` keeps the per-unit bookkeeping (``active``, counts) as Python lists, because every unit reads
it on the host before deciding what to launch, and the row indices of the step *and* their inverse maps
(what the fused epilogue reads) in one packed int64 tensor, so that :meth:`Plan.to` moves the whole step to
the GPU with one copy and no index kernel runs on the device.

The plan transforms live here too: :func:`shard_plan` (a rank's slice of a global plan) and
:func:`round_plan_rows` (survivor counts rounded up for compiled code).
"""

from __future__ import annotations

import math
import numbers
import operator
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .rules import check_probability, check_survival

__all__ = ["Scheduler", "Plan", "has_compiled_scheduler", "shard_plan", "round_plan_rows", "subset_count",
           "MODES"]

# batch: one gate per unit and step; row: one Bernoulli gate per unit and sample; subset: each unit keeps a
# fixed count of the samples, max(int(N * p_l), 1), drawn uniformly (csrc/scheduler.h).
MODES = ("batch", "row", "subset")
_U64 = 1 << 64
_MASK64 = _U64 - 1
_MASK32 = 0xFFFFFFFF
_GAMMA = 0x9E3779B97F4A7C15

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as _err:  # pragma: no cover - exercised by the SDEPTH_SKIP_BUILD install
    _C = None
    _C_IMPORT_ERROR: ImportError | None = _err
else:
    _C_IMPORT_ERROR = None

_warned_fallback = False


def has_compiled_scheduler() -> bool:
    """True when the C++ scheduler (``sdepth_ext._C``) is built and importable."""
    return _C is not None


def _assert_has_compiled_scheduler() -> None:
    if _C is None:
        raise RuntimeError(
            "backend='cpp': sdepth_ext._C, the compiled scheduler, is not built or does not load "
            f"({_C_IMPORT_ERROR}). Build it with `pip install --no-build-isolation -e .` (or `make build`) "
            "from the repository root, or use backend=None / 'python' for the NumPy fallback (same plans, "
            "slower).")


def _warn_fallback_once() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "sdepth_ext._C is not built; using the NumPy gate scheduler (same plans, slower). Build the "
            "extension with `pip install --no-build-isolation -e .` from the repository root.",
            RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------------
# The gate function (csrc/scheduler.h), in Python integers and in NumPy
# --------------------------------------------------------------------------------------------------------
def mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea, Flood 2014) on a Python int, modulo 2^64."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2^64, as the C++ does (NumPy warns on overflow for scalars only).
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def step_key(seed: int, step: int) -> int:
    """The key of a step: ``mix64(seed + (step + 1) * G)``; units and samples hang off it."""
    return mix64(seed + (step + 1) * _GAMMA)


def _thresholds(survival: Sequence[float]) -> np.ndarray:
    # p * 2^32 is exact in binary floating point; ceil makes p = 0 and p = 1 exact.
    return np.array([math.ceil(math.ldexp(p, 32)) for p in survival], dtype=np.uint64)


class _PythonGateSampler:
    """NumPy twin of ``_C.GateSampler``: the same gate function, the same packed plans."""

    def __init__(self, survival: list[float], mode: str, seed: int, step: int = 0):
        self._thresholds = _thresholds(survival)
        self._survival = list(survival)
        self.mode = mode
        self.seed = seed
        self._step = step
        self._lock = threading.Lock()

    @property
    def num_units(self) -> int:
        return len(self._thresholds)

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        with self._lock:
            self._step = value

    def sample(self, batch_size: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        _check_shard(batch_size, rank, world_size)
        with self._lock:  # claim the step: concurrent callers get distinct ones
            step = self._step
            self._step = (step + 1) & _MASK64
        active, counts, offsets, buffer = self.draw(step, batch_size, rank, world_size)
        return active, counts, offsets, buffer.pin_memory() if pin_memory else buffer, step

    def uniforms(self, step: int, samples: np.ndarray) -> np.ndarray:
        """``[units, len(samples)]`` uint64 array: the 32-bit uniforms of the given global samples."""
        units = np.arange(1, self.num_units + 1, dtype=np.uint64)
        gamma = np.uint64(_GAMMA)
        unit_keys = _mix64_np(np.uint64(step_key(self.seed, step)) + units * gamma)
        words = _mix64_np(unit_keys[:, None] + (samples[None, :] // np.uint64(2) + np.uint64(1)) * gamma)
        odd = samples[None, :] % np.uint64(2) == 1
        return np.where(odd, words >> np.uint64(32), words & np.uint64(_MASK32))

    def draw(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        _check_shard(batch_size, rank, world_size)
        n = batch_size
        samples = np.zeros(1, dtype=np.uint64) if self.mode == "batch" else (
            np.arange(n, dtype=np.uint64) * np.uint64(world_size) + np.uint64(rank))
        uniforms = self.uniforms(step, samples)
        if self.mode == "subset":
            # The K smallest keys (u << 32) | i of each unit, in index order (csrc/scheduler.h).
            keys = (uniforms << np.uint64(32)) | np.arange(n, dtype=np.uint64)
            survivors = [np.sort(np.argsort(row)[:subset_count(n, p)])
                         for row, p in zip(keys, self._survival)]
            return pack_rows(n, survivors)
        keep = uniforms < self._thresholds[:, None]
        if self.mode == "batch":
            survivors = [range(n) if k else () for k in keep[:, 0]]
        else:
            survivors = [np.flatnonzero(row) for row in keep]
        return pack_rows(n, survivors)


def subset_count(batch_size: int, p: float) -> int:
    """Subset mode's kept samples of a unit at survival ``p``: ``min(N, max(int(N * p), 1))``.

    ``N * p`` is a double product truncated toward zero, as in csrc/scheduler.h: the two backends agree.
    """
    return min(batch_size, max(int(batch_size * p), 1))


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of "
                         f"{world_size}")


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
    """

    __slots__ = ("mode", "batch_size", "active", "counts", "step", "_offsets", "_buffer", "_views")

    def __init__(self, mode: str, batch_size: int, active: list[int], counts: list[int],
                 offsets: list[int], buffer: torch.Tensor, step: int | None = None):
        self.mode = mode
        self.batch_size = batch_size
        self.active = active
        self.counts = counts
        self.step = step
        self._offsets = offsets
        self._buffer = buffer
        self._views: dict = {}

    # Pickling (torch.save of a model, deepcopy) keeps the plan, not its cached views: int32 views of the
    # int64 buffer would make torch.save refuse ("view the same data as different types").
    def __getstate__(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__ if name != "_views"}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._views = {}

    @classmethod
    def from_survivors(cls, mode: str, batch_size: int, survivors: Sequence, step: int | None = None) -> Plan:
        """A plan from each unit's sorted surviving sample indices (batch mode: none or all of them)."""
        return cls(mode, batch_size, *pack_rows(batch_size, survivors), step=step)

    @property
    def num_blocks(self) -> int:
        """Number of units (kept under its old name: a ResNet block is one unit)."""
        return len(self.counts)

    num_units = num_blocks

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
        views = self._views.get(l)
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
            self._views[l] = views
        return views

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
        return Plan(self.mode, self.batch_size, self.active, self.counts, self._offsets,
                    buffer.to(device, non_blocking=non_blocking), step=self.step)

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
            start = mix64(salt + (l + 1) * _GAMMA) % dropped.size  # a well-spread offset per unit and step
            promoted = np.roll(dropped, -start)[:target - count]
            rows = np.sort(np.concatenate([rows, promoted]))
        survivors.append(rows)
    return Plan.from_survivors("row", n, survivors, step=plan.step)


# --------------------------------------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------------------------------------
def _seed_from_torch() -> int:
    """A 64-bit seed from torch's default CPU generator, so ``torch.manual_seed`` reproduces a run.

    ``(a << 32) | b`` of two draws of ``torch.randint(0, 2**32)``; on the CPU explicitly, so that it also
    works inside ``with torch.device("meta")`` (or any other default device).
    """
    halves = torch.randint(0, 2**32, (2,), dtype=torch.int64, device="cpu").tolist()
    return (halves[0] << 32) | halves[1]


def check_u64(value, name: str) -> int:
    """``value`` as an int in [0, 2^64) (Python or NumPy integers), else TypeError/ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(value).__name__}")
    value = operator.index(value)
    if not 0 <= value < _U64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value}")
    return value


class Scheduler:
    """Draws one :class:`Plan` per training step for a network of ``len(survival)`` residual units.

    Args:
        survival: ``p_l`` for each unit, e.g. :func:`sdepth_ext.linear_decay` (each in [0, 1]).
        mode: ``"batch"`` (one gate per unit and step, the paper's choice), ``"row"`` (one gate per
            unit and sample) or ``"subset"`` (each unit keeps exactly ``max(int(N * p_l), 1)`` of the N
            samples, drawn uniformly: static shapes, as DINOv2/DINOv3 train their ViTs).
        seed: an int in [0, 2^64) for a reproducible stream; ``None`` takes a seed from torch's default
            generator (so ``torch.manual_seed`` reproduces the run).
        backend: ``None`` (compiled if built, else NumPy), ``"cpp"`` or ``"python"``.

    ``sample`` is safe to call from several threads: each call claims its own step.

    ``drop_scale`` (:meth:`set_drop_scale`, in [0, 1], default 1) scales every unit's drop probability:
    the gates are drawn with ``p_l(s) = 1 - s (1 - p_l)`` (:attr:`effective_survival`), so ``s = 0`` trains
    the full network and ``s = 1`` the configured rates. It is part of :meth:`state_dict`.
    """

    def __init__(self, survival, mode: str = "batch", seed: int | None = None, backend: str | None = None):
        survival = check_survival(survival)
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        seed = _seed_from_torch() if seed is None else check_u64(seed, "seed")
        if backend not in (None, "cpp", "python"):
            raise ValueError(f"backend must be None, 'cpp' or 'python', got {backend!r}")
        if backend == "cpp":
            _assert_has_compiled_scheduler()
        elif backend is None and _C is None:
            _warn_fallback_once()
        self.survival = survival
        self.mode = mode
        self.backend = "cpp" if backend == "cpp" or (backend is None and _C is not None) else "python"
        self.drop_scale = 1.0
        self.effective_survival = list(survival)
        self._sampler = self._make_sampler(seed, 0)

    def _make_sampler(self, seed: int, step: int):
        if self.backend == "cpp":
            return _C.GateSampler(self.effective_survival, self.mode, seed, step)
        return _PythonGateSampler(self.effective_survival, self.mode, seed, step)

    def set_drop_scale(self, scale: float) -> None:
        """Draw from now on with ``p_l(s) = 1 - s (1 - p_l)``; ``s`` in [0, 1] (a drop schedule's value).

        The stream itself (seed, step) is untouched: the gates of a step depend on the scale in force when
        it is drawn, so a schedule that is a function of the step resumes exactly.
        """
        scale = check_probability(scale, "scale")
        if scale != self.drop_scale:
            self._set_scale(scale)
            self._sampler = self._make_sampler(self.seed, self.step)

    def _set_scale(self, scale: float) -> None:
        self.drop_scale = scale
        # Written as 1 - s (1 - p) so that s = 1 gives p_l exactly, and s = 0 exactly 1.
        self.effective_survival = [p if scale == 1.0 else 1.0 - scale * (1.0 - p) for p in self.survival]

    # copy.deepcopy(model) and pickling (EMA copies, spawn-based workers) must not choke on the compiled
    # sampler object: it is rebuilt from the survival list, the seed and the step. No device or pinning
    # setting is part of the state: a scheduler pickled on a GPU machine samples on a CPU-only one.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sampler"] = (self.seed, self.step)
        return state

    def __setstate__(self, state: dict) -> None:
        seed, step = state.pop("_sampler")
        self.__dict__.update(state)
        if self.backend == "cpp" and _C is None:
            self.backend = "python"
        self._sampler = self._make_sampler(seed, step)

    @property
    def num_blocks(self) -> int:
        return len(self.survival)

    num_units = num_blocks

    @property
    def seed(self) -> int:
        return int(self._sampler.seed)

    @property
    def step(self) -> int:
        """Steps drawn so far: the next :meth:`sample` draws this one. With ``seed``, the whole state."""
        return int(self._sampler.step)

    @step.setter
    def step(self, value: int) -> None:
        self._sampler.step = check_u64(value, "step")

    def reseed(self, seed: int, step: int = 0) -> None:
        """Continue as the stream ``seed`` from ``step`` (e.g. rank 0's, broadcast under DDP)."""
        self._sampler = self._make_sampler(check_u64(seed, "seed"), check_u64(step, "step"))

    def sample(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
               pin_memory: bool = False) -> Plan:
        """Draw the gates of every unit for the next step of ``batch_size`` samples.

        ``rank``/``world_size``: draw the slice of DDP rank ``rank`` (row and subset mode; its samples are
        global samples ``i * world_size + rank``; subset mode keeps its fixed count of the rank's samples).
        ``pin_memory``: allocate the plan's buffer in pinned host memory (for a plan about to be copied to a
        GPU; :meth:`Plan.to` pins otherwise).
        """
        batch_size = _check_count(batch_size, "batch_size", 1)
        active, counts, offsets, buffer, step = self._sampler.sample(batch_size, rank, world_size, pin_memory)
        return Plan(self.mode, batch_size, active, counts, offsets, buffer, step=step)

    def draw(self, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Plan:
        """The plan of step ``step`` without claiming it (:meth:`sample` is ``draw(self.step, ...)`` + 1)."""
        step = check_u64(step, "step")
        batch_size = _check_count(batch_size, "batch_size", 1)
        active, counts, offsets, buffer = self._sampler.draw(step, batch_size, rank, world_size)
        return Plan(self.mode, batch_size, active, counts, offsets, buffer, step=step)

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume: a resumed scheduler draws exactly the plans this one would."""
        return {"version": 2, "mode": self.mode, "survival": list(self.survival), "seed": self.seed,
                "step": self.step, "drop_scale": self.drop_scale}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s seed and step; validates everything first (on error, no change)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict from Scheduler.state_dict(), got "
                            f"{type(state_dict).__name__}")
        version = state_dict.get("version")
        if version == 1 or ("rng_state" in state_dict and "step" not in state_dict):
            raise ValueError("state_dict was saved by sdepth_ext 0.1 (a sequential gate stream, version 1); "
                             "its stream cannot be continued by the counter-based scheduler")
        missing = [k for k in ("seed", "step") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict must be a dict from Scheduler.state_dict() (missing {missing})")
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(f"state_dict was saved for mode={state_dict['mode']!r}, "
                             f"this scheduler has mode={self.mode!r}")
        saved = state_dict.get("survival")
        if saved is not None and check_survival(saved) != self.survival:
            raise ValueError(f"state_dict was saved for different survival probabilities ({len(saved)} "
                             f"units); this scheduler has {self.num_units} units with other p_l")
        seed = check_u64(state_dict["seed"], "state_dict['seed']")
        step = check_u64(state_dict["step"], "state_dict['step']")
        scale = check_probability(state_dict.get("drop_scale", 1.0), "state_dict['drop_scale']")
        self._set_scale(scale)
        self.reseed(seed, step)

    def __repr__(self) -> str:
        return (f"Scheduler(num_units={self.num_units}, mode={self.mode!r}, seed={self.seed}, "
                f"step={self.step}, drop_scale={self.drop_scale}, backend={self.backend!r})")


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
