"""torchvision's own stochastic depth (``torchvision.ops.StochasticDepth``), as the adapters read it.

A torchvision block holds one ``StochasticDepth(p, mode)`` module (``stochastic_depth`` in most families),
shared by all the units of the block, and applies it to each residual just before the add.
:class:`TorchvisionAdapter` is the base of the adapters of such blocks: the model's own rates and mode, and
"inverted" scaling (kept residuals divided by the survival rate, as ``StochasticDepth`` does).
"""

from __future__ import annotations

from torchvision.ops import StochasticDepth

from .base import Defaults, UnitAdapter
from .registry import register_drop_module

register_drop_module(StochasticDepth)


class TorchvisionAdapter(UnitAdapter):
    """An adapter of a torchvision block with its own ``StochasticDepth`` (held in :attr:`drop_slot`)."""

    # torchvision's recipes: the rates the model was built with, its mode ("row" in every torchvision model),
    # and the scaling StochasticDepth applies.
    defaults = Defaults(None, None, None, "inverted")
    drop_slot = "stochastic_depth"  # the block's attribute holding its StochasticDepth

    @classmethod
    def own_drop(cls, block, unit):
        """``(p, mode)`` of the block's ``StochasticDepth`` (p is its drop probability); None for another
        module in its place."""
        module = getattr(block, cls.drop_slot)
        if isinstance(module, StochasticDepth):
            return float(module.p), module.mode
        return None
