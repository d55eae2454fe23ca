"""The registries of :mod:`sdepth_ext.families`: block classes to their adapters, block classes known to be
unsupported, and the stochastic-depth module types that discovery recognises.

Each family module registers its adapter with ``@register_adapter(BlockClass, ...)``; each ecosystem module
(:mod:`~sdepth_ext.families._torchvision_sd`, :mod:`~sdepth_ext.families._timm_sd`) registers its own
stochastic-depth module with :func:`register_drop_module`. The lookups (:func:`adapter_for`,
:func:`registered_adapters`, :func:`drop_module_types`) first import every family module once; a module whose
optional library (torchvision, timm) is missing is skipped; the Hugging Face modules load once
``transformers`` is imported (a model built from it implies that), so converting other models never pays its
import.
"""

from __future__ import annotations

import importlib
import sys

from torch import nn

from .base import UnitAdapter

__all__ = ["register_adapter", "register_unsupported", "register_drop_module", "adapter_for",
           "registered_adapters", "drop_module_types"]

_ADAPTERS: dict[type, type[UnitAdapter]] = {}
_UNSUPPORTED: dict[type, str] = {}
_DROP_MODULES: list[type] = []
# The ecosystem modules first (their stochastic-depth modules), then the family modules.
_MODULES = ("_torchvision_sd", "tv_resnet", "tv_convnext", "tv_mbconv", "tv_swin", "tv_maxvit", "_timm_sd",
            "timm_resnet", "timm_convnext", "timm_vit")
# Ecosystems whose library is slow to import (transformers: seconds) load once the user has imported it
# (a model built from it implies that), checked at each lookup: library -> its modules, ecosystem first.
_MODULES_ONCE_IMPORTED = {"transformers": ("_hf_sd", "hf_dinov2", "hf_convnext", "hf_swin",
                                          "hf_beit")}
_loaded = False


def register_adapter(*block_types: type):
    """Class decorator: ``adapter`` serves ``block_types`` (and their subclasses). Duplicates are refused."""
    def register(adapter: type[UnitAdapter]) -> type[UnitAdapter]:
        for block_type in block_types:
            if block_type in _ADAPTERS:
                raise ValueError(f"block_types: {block_type.__qualname__} already has an adapter "
                                 f"({_ADAPTERS[block_type].__name__})")
        adapter.block_types = tuple(block_types)
        for block_type in block_types:
            _ADAPTERS[block_type] = adapter
        return adapter
    return register


def register_unsupported(block_type: type, why: str) -> None:
    """A known residual block class that sdepth_ext cannot convert, and why (for a clear error)."""
    _UNSUPPORTED[block_type] = why


def register_drop_module(*types: type) -> None:
    """Stochastic-depth module types (``torchvision.ops.StochasticDepth``, ``timm.layers.DropPath``): a model
    that holds one in a block without an adapter is refused by ``convert`` (the block would silently keep
    its own stochastic depth). A type registered again is kept once."""
    for module_type in types:
        if module_type not in _DROP_MODULES:
            _DROP_MODULES.append(module_type)


def _import_families(names) -> None:
    for name in names:
        try:
            importlib.import_module(f".{name}", __package__)
        except ImportError:  # the optional library of that family is not installed
            continue


def _load_families() -> None:
    """Import every family module once; one whose library is missing (torchvision, timm) is skipped, and
    those of :data:`_MODULES_ONCE_IMPORTED` wait until their library is imported."""
    global _loaded
    if not _loaded:
        _loaded = True
        _import_families(_MODULES)
    for library in [lib for lib in _MODULES_ONCE_IMPORTED if lib in sys.modules]:
        _import_families(_MODULES_ONCE_IMPORTED.pop(library))


def adapter_for(module: nn.Module) -> type[UnitAdapter] | None:
    """The adapter of ``module``'s class (along its MRO), or None. Raises TypeError for unsupported blocks."""
    _load_families()
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
        if cls in _UNSUPPORTED:
            raise TypeError(f"model: {type(module).__qualname__} is not supported by sdepth_ext.convert: "
                            f"{_UNSUPPORTED[cls]}")
    return None


def registered_adapters() -> dict[type, type[UnitAdapter]]:
    """Every registered block class and its adapter (the test suite checks each has fixtures)."""
    _load_families()
    return dict(_ADAPTERS)


def drop_module_types() -> tuple[type, ...]:
    """Every registered stochastic-depth module type, in registration order (for ``isinstance``)."""
    _load_families()
    return tuple(_DROP_MODULES)
