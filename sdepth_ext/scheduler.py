"""Scheduler and Plan: one host-side draw of every block's gates per training step.

The compiled sampler (csrc/, ``sdepth_ext._C``) does the drawing and compaction; this module is its
Python face and also holds a pure-Python fallback that draws the *identical* stream (the exact
definition is in csrc/scheduler.h), so a machine without the compiled part trains the same run, only
slower (the fallback is the reference the C++ path is tested against).

A :class:`Plan` keeps the per-block bookkeeping (``active``, counts) as Python lists, because every
block reads it on the host before deciding what to launch, and all row indices of the step in one packed
int64 tensor, so that :meth:`Plan.to` moves the whole step to the GPU with one copy.
"""

from __future__ import annotations

import math
import warnings

import torch

from .rules import check_survival

__all__ = ["Scheduler", "Plan", "has_compiled_scheduler"]

MODES = ("batch", "row")
_MASK64 = (1 << 64) - 1
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
            "sdepth_ext._C (the compiled scheduler) is not available: "
            f"{_C_IMPORT_ERROR}. Build it with `pip install --no-build-isolation -e .` "
            "(or `make build`) from the repository root.")


def _warn_fallback_once() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "sdepth_ext._C is not built; using the pure-Python gate scheduler (same plans, slower: "
            "milliseconds per step in row mode). Build the extension with "
            "`pip install --no-build-isolation -e .` from the repository root.",
            RuntimeWarning, stacklevel=3)


class _PythonGateSampler:
    """Pure-Python twin of ``_C.GateSampler``: the same SplitMix64 stream, the same plans."""

    def __init__(self, survival: list[float], row_mode: bool, state: int):
        # p * 2^32 is exact in binary floating point; ceil makes p = 0 and p = 1 exact.
        self._thresholds = [math.ceil(math.ldexp(p, 32)) for p in survival]
        self.row_mode = row_mode
        self.state = state & _MASK64

    @property
    def num_blocks(self) -> int:
        return len(self._thresholds)

    def _uniforms(self, n: int) -> list[int]:
        out: list[int] = []
        state = self.state
        for _ in range((n + 1) // 2):
            state = (state + _GAMMA) & _MASK64
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
            z ^= z >> 31
            out.append(z & 0xFFFFFFFF)
            out.append(z >> 32)
        self.state = state
        return out

    def sample(self, batch_size: int, pin_memory: bool = False):
        L = len(self._thresholds)
        counts: list[int] = []
        active: list[int] = []
        offsets: list[int] = []
        indices: list[int] = []
        if not self.row_mode:
            u = self._uniforms(L)
            for l, t in enumerate(self._thresholds):
                keep = u[l] < t
                counts.append(batch_size if keep else 0)
                offsets.append(0)
                if keep:
                    active.append(l)
            offsets.append(0)
        else:
            u = self._uniforms(L * batch_size)
            for l, t in enumerate(self._thresholds):
                base = l * batch_size
                offsets.append(len(indices))
                survivors = [i for i in range(batch_size) if u[base + i] < t]
                counts.append(len(survivors))
                if survivors:
                    active.append(l)
                if len(survivors) < batch_size:
                    indices.extend(survivors)
            offsets.append(len(indices))
        tensor = torch.tensor(indices, dtype=torch.int64)
        if pin_memory:
            tensor = tensor.pin_memory()
        return active, counts, offsets, tensor


class Plan:
    """The gates of every residual block for one training step.

    Attributes:
        mode: ``"batch"`` or ``"row"``.
        batch_size: the batch size the plan was drawn for.
        active: 0-based indices of blocks with at least one survivor, ascending.
        counts: ``counts[l]``, the number of surviving samples of block ``l``.
    """

    __slots__ = ("mode", "batch_size", "active", "counts", "_offsets", "_indices", "_empty")

    def __init__(self, mode: str, batch_size: int, active: list[int], counts: list[int],
                 offsets: list[int], indices: torch.Tensor):
        self.mode = mode
        self.batch_size = batch_size
        self.active = active
        self.counts = counts
        self._offsets = offsets
        self._indices = indices
        self._empty: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.counts)

    @property
    def indices(self) -> torch.Tensor:
        """All stored row indices of the step, packed block after block (one buffer, one copy)."""
        return self._indices

    @property
    def device(self) -> torch.device:
        return self._indices.device

    def _check_block(self, l: int) -> None:
        if not 0 <= l < len(self.counts):
            raise IndexError(f"block index l must be in [0, {len(self.counts)}), got {l}")

    def survives(self, l: int) -> bool:
        """True when block ``l`` runs for at least one sample."""
        self._check_block(l)
        return self.counts[l] > 0

    def rows(self, l: int) -> torch.Tensor | None:
        """Sorted int64 indices of block ``l``'s surviving samples, on the plan's device.

        ``None`` when every sample survives (the residual runs on the whole batch, no gather); an
        empty tensor when none does.
        """
        self._check_block(l)
        count = self.counts[l]
        if count == self.batch_size:
            return None
        if count == 0:
            if self._empty is None:
                self._empty = self._indices.new_empty(0)
            return self._empty
        start = self._offsets[l]
        return self._indices[start:start + count]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Plan:
        """This plan with its row indices on ``device``: one (asynchronous, from pinned memory) copy."""
        device = torch.device(device)
        indices = self._indices
        if indices.device == device:
            return self
        to_gpu = non_blocking and device.type == "cuda" and indices.device.type == "cpu"
        if to_gpu and not indices.is_pinned():
            # The Scheduler's own plans are pinned; sharded (DDP) and rounded (row_multiple) plans are built
            # in pageable memory, from which CUDA may make the "asynchronous" copy wait for the stream.
            indices = indices.pin_memory()
        return Plan(self.mode, self.batch_size, self.active, self.counts, self._offsets,
                    indices.to(device, non_blocking=non_blocking))

    def __repr__(self) -> str:
        return (f"Plan(mode={self.mode!r}, batch_size={self.batch_size}, "
                f"active={len(self.active)}/{len(self.counts)} blocks, "
                f"rows_stored={self._indices.numel()}, device={self.device})")


def _seed_from_torch() -> int:
    """A 64-bit seed from torch's default generator, so ``torch.manual_seed`` reproduces a run."""
    halves = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
    return (halves[0] << 32) | halves[1]


class Scheduler:
    """Draws one :class:`Plan` per training step for a network of ``len(survival)`` residual blocks.

    Args:
        survival: ``p_l`` for each block, e.g. :func:`sdepth_ext.linear_decay` (each in [0, 1]).
        mode: ``"batch"`` (one gate per block and step, the paper's choice) or ``"row"`` (one gate per
            block and sample).
        seed: an int for a reproducible stream; ``None`` takes a seed from torch's default generator
            (so ``torch.manual_seed`` reproduces the run).
        backend: ``None`` (compiled if built, else Python), ``"cpp"`` or ``"python"``.
    """

    def __init__(self, survival, mode: str = "batch", seed: int | None = None, backend: str | None = None):
        self.survival = check_survival(survival)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if backend not in (None, "cpp", "python"):
            raise ValueError(f"backend must be None, 'cpp' or 'python', got {backend!r}")
        self.mode = mode
        self.seed = (_seed_from_torch() if seed is None else seed) & ((1 << 64) - 1)
        if backend == "cpp" or (backend is None and _C is not None):
            _assert_has_compiled_scheduler()
            self._sampler = _C.GateSampler(self.survival, mode == "row", self.seed)
            self.backend = "cpp"
        else:
            if backend is None:
                _warn_fallback_once()
            self._sampler = _PythonGateSampler(self.survival, mode == "row", self.seed)
            self.backend = "python"
        # Pinned host memory makes Plan.to(cuda, non_blocking=True) truly asynchronous.
        self._pin_memory = torch.cuda.is_available()

    # copy.deepcopy(model) and pickling (EMA copies, spawn-based workers) must not choke on the compiled
    # sampler object: rebuild it from the survival list and the one-word RNG state.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sampler"] = self.get_rng_state()
        return state

    def __setstate__(self, state: dict) -> None:
        rng_state = state.pop("_sampler")
        self.__dict__.update(state)
        row_mode = self.mode == "row"
        if self.backend == "cpp" and _C is not None:
            self._sampler = _C.GateSampler(self.survival, row_mode, rng_state)
        else:
            self.backend = "python"
            self._sampler = _PythonGateSampler(self.survival, row_mode, rng_state)

    @property
    def num_blocks(self) -> int:
        return len(self.survival)

    def sample(self, batch_size: int) -> Plan:
        """Draw the gates of every block for one step of ``batch_size`` samples."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int >= 1, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        active, counts, offsets, indices = self._sampler.sample(batch_size, self._pin_memory)
        return Plan(self.mode, batch_size, active, counts, offsets, indices)

    # -- checkpointing -------------------------------------------------------------------------------
    def get_rng_state(self) -> int:
        """The whole RNG state: one unsigned 64-bit integer."""
        return int(self._sampler.state)

    def set_rng_state(self, state: int) -> None:
        if isinstance(state, bool) or not isinstance(state, int) or not 0 <= state <= _MASK64:
            raise ValueError(f"state must be an unsigned 64-bit int, got {state!r}")
        self._sampler.state = state

    def state_dict(self) -> dict:
        """Everything needed to resume: a resumed scheduler draws exactly the plans this one would."""
        return {"version": 1, "mode": self.mode, "survival": list(self.survival), "seed": self.seed,
                "rng_state": self.get_rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "rng_state" not in state_dict:
            raise ValueError("state_dict must be a dict from Scheduler.state_dict() (missing 'rng_state')")
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(f"state_dict was saved for mode={state_dict['mode']!r}, "
                             f"this scheduler has mode={self.mode!r}")
        saved = state_dict.get("survival")
        if saved is not None and [float(p) for p in saved] != self.survival:
            raise ValueError("state_dict was saved for different survival probabilities "
                             f"({len(saved)} blocks); this scheduler has {self.num_blocks} blocks "
                             "with other p_l")
        self.set_rng_state(int(state_dict["rng_state"]))
        self.seed = int(state_dict.get("seed", self.seed))

    def __repr__(self) -> str:
        return (f"Scheduler(num_blocks={self.num_blocks}, mode={self.mode!r}, seed={self.seed}, "
                f"backend={self.backend!r})")
