"""The gate function of csrc/scheduler.h in Python integers and NumPy, which both samplers follow.

Every uniform is a pure function of (seed, step, unit, sample): SplitMix64's output function (:func:`mix64`)
over keys that hang off the step's key (:func:`step_key`). A gate survives iff its 32-bit uniform is below
``ceil(p * 2^32)`` (:func:`thresholds`: exact for p = 0 and 1); subset mode keeps :func:`subset_count`
samples. :mod:`sdepth_ext.scheduler` draws with these (its NumPy sampler) or with the compiled twin, and
:func:`sdepth_ext.plan.round_plan_rows` spreads its promoted samples with :func:`mix64`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["GAMMA", "MASK32", "MASK64", "U64", "check_shard", "mix64", "mix64_np", "step_key", "subset_count",
           "thresholds"]

U64 = 1 << 64
MASK64 = U64 - 1
MASK32 = 0xFFFFFFFF
GAMMA = 0x9E3779B97F4A7C15


def mix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea, Flood 2014) on a Python int, modulo 2^64."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix64_np(z: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2^64, as the C++ does (NumPy warns on overflow for scalars only).
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def step_key(seed: int, step: int) -> int:
    """The key of a step: ``mix64(seed + (step + 1) * G)``; units and samples hang off it."""
    return mix64(seed + (step + 1) * GAMMA)


def thresholds(survival: Sequence[float]) -> np.ndarray:
    # p * 2^32 is exact in binary floating point; ceil makes p = 0 and p = 1 exact.
    return np.array([math.ceil(math.ldexp(p, 32)) for p in survival], dtype=np.uint64)



def subset_count(batch_size: int, p: float) -> int:
    """Subset mode's kept samples of a unit at survival ``p``: ``min(N, max(int(N * p), 1))``.

    ``N * p`` is a double product truncated toward zero, as in csrc/scheduler.h: the two backends agree.
    """
    return min(batch_size, max(int(batch_size * p), 1))


def check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank} of "
                         f"{world_size}")

