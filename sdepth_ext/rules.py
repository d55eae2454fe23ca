"""Survival rules over depth, and drop schedules over training time.

Over depth: the probability p_l that residual unit l (1-based, in forward order) runs. The paper's linear
decay keeps early units, which extract low-level features every later unit relies on, almost always, and
drops late units most often. At p_last = 0.5 the expected number of active units is sum_l p_l = (3L - 1) / 4,
which is where the ~25% training-time saving comes from.

Over time: a drop schedule maps the training step t to a scale s(t) in [0, 1] of every unit's drop
probability, ``p_l(s) = 1 - s (1 - p_l)`` (:func:`sdepth_ext.set_drop_scale`). Three are in use:
Composer's drop warm-up (ramp the drop rate up over T steps), DeepSpeed's Progressive Layer Dropping
(keep probability theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar, i.e. s(t) = 1 - exp(-gamma t) with
theta_bar the configured survival), and "late" stochastic depth (Liu et al. 2023: no drops before step T).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["linear_decay", "uniform", "check_probability", "check_survival", "drop_schedule",
           "DROP_SCHEDULES"]

DROP_SCHEDULES = ("constant", "warmup", "pld", "late")


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


class _Schedule:
    """A drop schedule ``schedule(step) -> s``: its kind and parameters only (picklable, readable)."""

    def __init__(self, kind: str, **params):
        self.kind, self.params = kind, params

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        t, p = int(step), self.params
        if self.kind == "constant":
            return p["scale"]
        if self.kind == "warmup":
            return min(1.0, t / p["steps"])
        if self.kind == "pld":
            return -math.expm1(-p["gamma"] * t)  # 1 - exp(-gamma t), without cancellation for small t
        return 0.0 if t < p["start"] else 1.0

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"drop_schedule({self.kind!r}{args})"


def _check_steps(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"drop_schedule: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def drop_schedule(kind: str, **kw) -> _Schedule:
    """A drop schedule ``step -> s`` in [0, 1] for :func:`sdepth_ext.set_drop_scale`.

    * ``"constant"``, ``scale=1.0``: always ``scale``;
    * ``"warmup"``, ``steps=T``: ``min(1, t / T)`` (Composer's drop warm-up);
    * ``"pld"``, ``gamma``: ``1 - exp(-gamma t)`` (Progressive Layer Dropping; theta_bar: the configured p_l);
    * ``"late"``, ``start=T``: 0 before step T, 1 from T on.

    Unknown kinds or arguments raise ``ValueError`` naming them.

    >>> schedule = drop_schedule("warmup", steps=2000)
    >>> schedule(500)
    0.25
    """
    expected = {"constant": {"scale"}, "warmup": {"steps"}, "pld": {"gamma"}, "late": {"start"}}
    if kind not in expected:
        raise ValueError(f"kind must be one of {DROP_SCHEDULES}, got {kind!r}")
    unknown = set(kw) - expected[kind]
    missing = expected[kind] - set(kw) - ({"scale"} if kind == "constant" else set())
    if unknown or missing:
        raise ValueError(f"drop_schedule({kind!r}) takes {sorted(expected[kind])}; "
                         f"unknown {sorted(unknown)}, missing {sorted(missing)}")
    if kind == "constant":
        return _Schedule(kind, scale=check_probability(kw.get("scale", 1.0), "scale"))
    if kind == "warmup":
        return _Schedule(kind, steps=_check_steps(kw["steps"], "steps", 1))
    if kind == "pld":
        gamma = kw["gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not (
                math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"drop_schedule: gamma must be a finite number > 0, got {gamma!r}")
        return _Schedule(kind, gamma=float(gamma))
    return _Schedule(kind, start=_check_steps(kw["start"], "start", 0))
