"""Block families: one small adapter per family says where a residual unit's branch and shortcut are.

:mod:`~sdepth_ext.families.base` defines what an adapter is (:class:`UnitAdapter`), and
:mod:`~sdepth_ext.families.registry` finds the adapter of a block along ``type(block).__mro__``
(:func:`adapter_for`) and knows the stochastic-depth module types of each ecosystem
(:func:`drop_module_types`). Each family has a file of its own (``tv_resnet``, ``timm_vit``, ...) that
registers its adapter with ``@register_adapter(BlockClass, ...)``; what one ecosystem's adapters share (how
its own stochastic-depth module is read) sits in ``_torchvision_sd`` and ``_timm_sd``.
"""

from __future__ import annotations

from .base import ACTIVATION_RELU, Defaults, UnitAdapter, scale_affine
from .registry import (
    adapter_for,
    drop_module_types,
    register_adapter,
    register_drop_module,
    register_unsupported,
    registered_adapters,
)

__all__ = ["UnitAdapter", "register_adapter", "register_unsupported", "adapter_for", "registered_adapters",
           "Defaults", "ACTIVATION_RELU", "scale_affine", "register_drop_module", "drop_module_types"]
