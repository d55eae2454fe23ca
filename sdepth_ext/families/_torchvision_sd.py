"""torchvision's own stochastic depth (``torchvision.ops.StochasticDepth``), as the adapters read it."""

from __future__ import annotations

from torchvision.ops import StochasticDepth

from .base import Defaults
from .registry import register_drop_module

register_drop_module(StochasticDepth)

# torchvision's recipes: the rates the model was built with, its mode ("row" in every torchvision model),
# and the scaling StochasticDepth applies (kept residuals divided by the survival rate).
OWN_DEFAULTS = Defaults(None, None, None, "inverted")


def own_drop(module) -> tuple[float, str] | None:
    """``(p, mode)`` of a ``StochasticDepth`` module (p is its drop probability)."""
    if isinstance(module, StochasticDepth):
        return float(module.p), module.mode
    return None
