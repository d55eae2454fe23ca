"""Hugging Face transformers' own stochastic depth (each vision model's ``<Model>DropPath``), as the HF
adapters read it.

Every HF vision model with a ``drop_path_rate`` defines its own copy of one module:
``<Model>DropPath(drop_prob)`` multiplies the residual by a per-sample Bernoulli mask and divides by the keep
probability ("row" mode, "inverted" scaling); a layer whose rate is 0 holds ``nn.Identity`` instead. All of
them are registered as drop modules, so discovery refuses an HF block without an adapter by name rather than
leave it masking.

:class:`HFAdapter` is the base of the HF adapters. HF layers take more than their input: transformers 5.x
passes masks, output flags and ``**kwargs`` down to every layer, and the branches need them. An HF adapter
takes them (:attr:`~sdepth_ext.families.UnitAdapter.takes_arguments`), passes arguments without a batch
dimension to its branches as they are, and in row and subset mode gathers the ones it names in
``batched_arguments`` to the survivors' rows (another tensor whose dim 0 is the batch size is refused, naming
it).
"""

from __future__ import annotations

import importlib

from torch import nn

from .base import Defaults, UnitAdapter
from .registry import register_drop_module

# transformers.models.<module>: <Model>DropPath, for the vision models with a drop_path_rate.
_DROP_PATHS = {
    "dinov2.modeling_dinov2": "Dinov2DropPath",
    "dinov2_with_registers.modeling_dinov2_with_registers": "Dinov2WithRegistersDropPath",
    "convnext.modeling_convnext": "ConvNextDropPath",
    "convnextv2.modeling_convnextv2": "ConvNextV2DropPath",
    "swin.modeling_swin": "SwinDropPath",
    "swinv2.modeling_swinv2": "Swinv2DropPath",
    "beit.modeling_beit": "BeitDropPath",
    "data2vec.modeling_data2vec_vision": "Data2VecVisionDropPath",
    "segformer.modeling_segformer": "SegformerDropPath",
    "pvt_v2.modeling_pvt_v2": "PvtV2DropPath",
    "focalnet.modeling_focalnet": "FocalNetDropPath",
    "hiera.modeling_hiera": "HieraDropPath",
    "vitdet.modeling_vitdet": "VitDetDropPath",
}


def _drop_path_types() -> tuple[type, ...]:
    found = []
    for module, name in _DROP_PATHS.items():
        try:
            found.append(getattr(importlib.import_module(f"transformers.models.{module}"), name))
        except (ImportError, AttributeError):  # a transformers release without that model
            continue
    if not found:
        raise ImportError("transformers has none of the vision models sdepth_ext knows")
    return tuple(found)


DROP_PATHS = _drop_path_types()
register_drop_module(*DROP_PATHS)


class HFAdapter(UnitAdapter):
    """An adapter of a Hugging Face layer whose units share, or each have, a ``<Model>DropPath`` slot."""

    defaults = Defaults(None, None, "row", "inverted")  # the model's own rates; DropPath is per sample
    drop_slots: tuple[str, ...] = ("drop_path",)  # per unit (one name for all units: a shared module)
    takes_arguments = True
    batched_arguments = ("attention_mask",)

    @classmethod
    def drop_slot(cls, unit: int) -> str:
        return cls.drop_slots[min(unit, len(cls.drop_slots) - 1)]

    @classmethod
    def own_drop(cls, block, unit):
        """``(p, "row")`` of the unit's DropPath; ``nn.Identity`` (HF's rate 0) is ``(0.0, "row")``."""
        module = getattr(block, cls.drop_slot(unit))
        if isinstance(module, DROP_PATHS):
            return float(module.drop_prob), "row"
        return (0.0, "row") if isinstance(module, nn.Identity) else None

    @classmethod
    def own_scaling(cls, block, unit):
        return "inverted" if isinstance(getattr(block, cls.drop_slot(unit)), DROP_PATHS) else None
