"""timm's own stochastic depth (``timm.layers.DropPath``), as the timm adapters read it.

timm builds a ``DropPath(drop_prob, scale_by_keep)`` per block when its rate is above 0, and ``nn.Identity``
(ViT, ConvNeXt) or ``None`` (ResNet) otherwise. ``drop_path`` is per sample ("row" mode); ``scale_by_keep``
divides kept residuals by the keep probability ("inverted") or not ("none").
"""

from __future__ import annotations

from timm.layers import DropPath

from .base import Defaults
from .registry import register_drop_module

register_drop_module(DropPath)

OWN_DEFAULTS = Defaults(None, None, "row", None)  # rates and scaling from each DropPath


def own_drop(module) -> tuple[float, str]:
    """``(p, "row")`` of a timm drop-path slot: a DropPath, or nn.Identity / None (rate 0)."""
    return (float(module.drop_prob), "row") if isinstance(module, DropPath) else (0.0, "row")


def own_scaling(module) -> str | None:
    if isinstance(module, DropPath):
        return "inverted" if module.scale_by_keep else "none"
    return None
