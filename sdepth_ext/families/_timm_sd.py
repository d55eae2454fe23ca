"""timm's own stochastic depth (``timm.layers.DropPath``), as the timm adapters read it.

timm builds a ``DropPath(drop_prob, scale_by_keep)`` per unit when its rate is above 0, and ``nn.Identity``
(ViT, ConvNeXt) or ``None`` (ResNet) otherwise. ``drop_path`` is per sample ("row" mode); ``scale_by_keep``
divides kept residuals by the keep probability ("inverted") or not ("none"). :class:`TimmAdapter` is the base
of the timm adapters: it reads the rates and the scaling from each unit's drop-path slot.
"""

from __future__ import annotations

from timm.layers import DropPath

from .base import Defaults, UnitAdapter
from .registry import register_drop_module

register_drop_module(DropPath)


class TimmAdapter(UnitAdapter):
    """An adapter of a timm block with a drop-path slot per unit (named in :attr:`drop_slots`)."""

    defaults = Defaults(None, None, "row", None)  # rates and scaling from each DropPath
    drop_slots: tuple[str, ...] = ("drop_path",)  # per unit: the block's attribute holding its DropPath

    @classmethod
    def own_drop(cls, block, unit):
        """``(p, "row")`` of the unit's drop-path slot: a DropPath, or nn.Identity / None (rate 0)."""
        module = getattr(block, cls.drop_slots[unit])
        return (float(module.drop_prob), "row") if isinstance(module, DropPath) else (0.0, "row")

    @classmethod
    def own_scaling(cls, block, unit):
        module = getattr(block, cls.drop_slots[unit])
        if isinstance(module, DropPath):
            return "inverted" if module.scale_by_keep else "none"
        return None
