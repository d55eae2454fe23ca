"""Scheduler: one host-side draw of every unit's gates per training step.

The compiled sampler (csrc/, ``sdepth_ext._C``) does the drawing and compaction; this module is its Python
face and also holds a NumPy fallback that computes the *identical* gates (the gate function is
:mod:`sdepth_ext.gates`, the exact definition csrc/scheduler.h), so a machine without the compiled part trains
the same run, only slower (the fallback is the reference the C++ path is tested against).

The gates are counter-based: every uniform is a pure function of (seed, step, unit, sample), so a scheduler's
whole state is its seed and the number of steps drawn. A draw claims its step atomically (several threads may
share a scheduler), batch sizes may change from step to step, and DDP ranks with unequal batches stay in
lockstep, since no step's size moves another step's gates. Each draw is a :class:`~sdepth_ext.plan.Plan`.
"""

from __future__ import annotations

import hashlib
import numbers
import operator
import threading
import warnings

import numpy as np
import torch

from .gates import GAMMA, MASK32, MASK64, U64, check_shard, mix64_np, step_key, subset_count, thresholds
from .plan import Plan, pack_rows
from .rules import check_probability, check_survival

__all__ = ["Scheduler", "has_compiled_scheduler", "check_u64", "MODES"]

# batch: one gate per unit and step; row: one Bernoulli gate per unit and sample; subset: each unit keeps a
# fixed count of the samples, max(int(N * p_l), 1), drawn uniformly (csrc/scheduler.h).
MODES = ("batch", "row", "subset")

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
# The NumPy sampler (the gate function: sdepth_ext.gates)
# --------------------------------------------------------------------------------------------------------
class _PythonGateSampler:
    """NumPy twin of ``_C.GateSampler``: the same gate function, the same packed plans."""

    def __init__(self, survival: list[float], mode: str, seed: int, step: int = 0):
        self._thresholds = thresholds(survival)
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
        check_shard(batch_size, rank, world_size)
        with self._lock:  # claim the step: concurrent callers get distinct ones
            step = self._step
            self._step = (step + 1) & MASK64
        active, counts, offsets, buffer = self.draw(step, batch_size, rank, world_size)
        return active, counts, offsets, buffer.pin_memory() if pin_memory else buffer, step

    def uniforms(self, step: int, samples: np.ndarray) -> np.ndarray:
        """``[units, len(samples)]`` uint64 array: the 32-bit uniforms of the given global samples."""
        units = np.arange(1, self.num_units + 1, dtype=np.uint64)
        gamma = np.uint64(GAMMA)
        unit_keys = mix64_np(np.uint64(step_key(self.seed, step)) + units * gamma)
        words = mix64_np(unit_keys[:, None] + (samples[None, :] // np.uint64(2) + np.uint64(1)) * gamma)
        odd = samples[None, :] % np.uint64(2) == 1
        return np.where(odd, words >> np.uint64(32), words & np.uint64(MASK32))

    def draw(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        check_shard(batch_size, rank, world_size)
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



def _seed_from_torch() -> int:
    """A 64-bit seed from the state of torch's default CPU generator, which it leaves where it was.

    The first 8 bytes (little-endian) of BLAKE2b over ``torch.random.get_rng_state()``: nothing is drawn, so
    converting a model does not shift a seeded pipeline's later draws (data order, augmentation, dropout),
    and ``torch.manual_seed`` still reproduces the seed. Two schedulers made with no draw between them get
    the same seed. Reads the CPU generator whatever the default device (also ``with torch.device("meta")``).
    """
    state = torch.random.get_rng_state()
    return int.from_bytes(hashlib.blake2b(state.numpy().tobytes(), digest_size=8).digest(), "little")


def check_u64(value, name: str) -> int:
    """``value`` as an int in [0, 2^64) (Python or NumPy integers), else TypeError/ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(value).__name__}")
    value = operator.index(value)
    if not 0 <= value < U64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value}")
    return value


class Scheduler:
    """Draws one :class:`Plan` per training step for a network of ``len(survival)`` residual units.

    Args:
        survival: ``p_l`` for each unit, e.g. :func:`sdepth_ext.linear_decay` (each in [0, 1]).
        mode: ``"batch"`` (one gate per unit and step, the paper's choice), ``"row"`` (one gate per
            unit and sample) or ``"subset"`` (each unit keeps exactly ``max(int(N * p_l), 1)`` of the N
            samples, drawn uniformly: static shapes, as DINOv2/DINOv3 train their ViTs).
        seed: an int in [0, 2^64) for a reproducible stream; ``None`` derives one from the state of torch's
            default generator without advancing it (so ``torch.manual_seed`` reproduces the run, and the
            generator's later draws are what they would be without the scheduler).
        backend: ``None`` (compiled if built, else NumPy), ``"cpp"`` or ``"python"``.

    ``sample`` is safe to call from several threads: each call claims its own step.

    ``drop_scale`` (:meth:`set_drop_scale`, in [0, 1], default 1) scales every unit's drop probability:
    the gates are drawn with ``p_l(s) = 1 - s (1 - p_l)`` (:attr:`scaled_survival`), so ``s = 0`` trains
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
        self.scaled_survival = list(survival)
        self._sampler = self._make_sampler(seed, 0)

    def _make_sampler(self, seed: int, step: int):
        if self.backend == "cpp":
            return _C.GateSampler(self.scaled_survival, self.mode, seed, step)
        return _PythonGateSampler(self.scaled_survival, self.mode, seed, step)

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
        self.scaled_survival = [p if scale == 1.0 else 1.0 - scale * (1.0 - p) for p in self.survival]

    # copy.deepcopy(model) and pickling (EMA copies, spawn-based workers) must not choke on the compiled
    # sampler object: it is rebuilt from the survival list, the seed and the step. No device or pinning
    # setting is part of the state: a scheduler pickled on a GPU machine samples on a CPU-only one.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sampler"] = (self.seed, self.step)
        return state

    def __setstate__(self, state: dict) -> None:
        seed, step = state.pop("_sampler")
        if "effective_survival" in state:  # its name up to sdepth_ext 0.2.0 (old pickles)
            state["scaled_survival"] = state.pop("effective_survival")
        self.__dict__.update(state)
        if self.backend == "cpp" and _C is None:
            self.backend = "python"
        self._sampler = self._make_sampler(seed, step)

    @property
    def num_units(self) -> int:
        """Number of units (residual additions) the scheduler draws gates for."""
        return len(self.survival)

    num_blocks = num_units  # the name up to sdepth_ext 0.2.0 (a ResNet block is one unit)

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
