"""Survival rules: the probability p_l that residual block l (1-based, in forward order) runs.

The paper's linear decay keeps early blocks, which extract low-level features every later block relies
on, almost always, and drops late blocks most often. At p_last = 0.5 the expected number of active blocks
is sum_l p_l = (3L - 1) / 4, which is where the ~25% training-time saving comes from.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["linear_decay", "uniform", "check_probability", "check_survival"]


def check_probability(value: float, name: str) -> float:
    """Return ``value`` as a float if it is a real number in [0, 1], else raise naming ``name``."""
    # numbers.Real covers Python and NumPy floats and ints (np.float32, np.int64, ...); bools are not numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value).__name__ == "bool_":
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_num_blocks(num_blocks: int) -> int:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, numbers.Integral):
        raise TypeError(f"num_blocks must be an int >= 1, got {type(num_blocks).__name__}")
    num_blocks = int(num_blocks)
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return num_blocks


def check_survival(survival) -> list[float]:
    """Validate a sequence of per-block survival probabilities; returns it as a list of floats."""
    try:
        values = list(survival)
    except TypeError:
        raise TypeError(
            f"survival must be a sequence of floats in [0, 1], got {type(survival).__name__}") from None
    if not values:
        raise ValueError("survival must hold at least one probability (one per residual block), got []")
    return [check_probability(p, f"survival[{i}]") for i, p in enumerate(values)]


def linear_decay(num_blocks: int, p_last: float = 0.5) -> list[float]:
    """``p_l = 1 - (l / L) * (1 - p_last)`` for l = 1..L (Huang et al. 2016, eq. 4).

    >>> linear_decay(4, 0.5)
    [0.875, 0.75, 0.625, 0.5]
    """
    L = _check_num_blocks(num_blocks)
    p_last = check_probability(p_last, "p_last")
    # Written from the last block up, so p_L is exactly p_last (1 - 1 * 0.8 would give 0.19999999999999996).
    return [p_last + ((L - l) / L) * (1.0 - p_last) for l in range(1, L + 1)]


def uniform(num_blocks: int, p: float = 0.5) -> list[float]:
    """The same survival probability ``p`` for every block."""
    L = _check_num_blocks(num_blocks)
    p = check_probability(p, "p")
    return [p] * L


def expected_depth(survival) -> float:
    """Expected number of active blocks, ``sum p_l``."""
    return math.fsum(check_survival(survival))
