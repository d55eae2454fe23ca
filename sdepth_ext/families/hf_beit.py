"""Hugging Face BEiT and Data2VecVision layers, ``BeitLayer`` / ``Data2VecVisionLayer``, on tokens [B, N, C].

The forwards reproduced (transformers ``BeitLayer.forward``, ``Data2VecVisionLayer.forward``)::

    x = x + drop_path(lambda_1 * attention(layernorm_before(x), bias)[0])        # BEiT: dropout before λ1
    x = x + drop_path(lambda_2 * mlp(layernorm_after(x)))         # Data2VecVision: output(intermediate(.))

Two units per layer, attention then MLP, with their layer scales λ1/λ2 (absent when the config's
``layer_scale_init_value`` is 0) inside the residual; one ``drop_path`` module serves both. Nothing follows
the adds. The relative position bias: BEiT adds its layer's own (``relative_position_bias``, computed from
``resolution`` inside the attention unit, so a dropped unit does not compute it) to the ``attention_mask``
argument (which carries the model's shared bias, [1, heads, N, N], or a per-sample mask: gathered to the
survivors in row and subset mode); Data2VecVision takes the shared bias as ``relative_position_bias``
([heads, N, N], no batch dimension, passed as it is) and keeps a layer's own bias inside its attention.
Row mode is exact (LayerNorm and attention per sample). BEiT layers return the tensor; Data2VecVision layers
return a tuple, in training ``(x, attention weights)``, the weights None unless the attention unit ran with
``output_attentions`` (the survivors' rows in row mode). Defaults: the model's per-layer ``drop_path_rate``
schedule, row mode, "inverted" scaling.
"""

from __future__ import annotations

import torch
from transformers.models.beit.modeling_beit import BeitLayer
from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionLayer

from ._hf_sd import HFAdapter
from .registry import register_adapter

_WEIGHTS = "_hf_attention_weights"  # Data2VecVision: the attention unit's weights, from residual to exit


def _scaled(layer_scale, t):
    return t if layer_scale is None or isinstance(layer_scale, float) else layer_scale * t


@register_adapter(BeitLayer, Data2VecVisionLayer)
class HFBeit(HFAdapter):
    family = "Hugging Face BEiT"
    unbatched_arguments = ("relative_position_bias",)

    @staticmethod
    def num_units(block):
        return 2

    @classmethod
    def residual(cls, block, unit, x, **call):
        if isinstance(block, Data2VecVisionLayer):
            return cls._residual_data2vec(block, unit, x, **call)
        return cls._residual_beit(block, unit, x, **call)

    @staticmethod
    def _residual_beit(block, unit, x, attention_mask=None, interpolate_pos_encoding=False, resolution=None,
                       **kwargs):
        if unit == 1:
            return _scaled(block.lambda_2, block.dropout(block.mlp(block.layernorm_after(x))))
        if block.relative_position_bias is not None:
            height, width = resolution
            window_size = (height // block.patch_size, width // block.patch_size)
            bias = block.relative_position_bias(window_size, interpolate_pos_encoding, dim_size=x.shape[1])
            attention_mask = bias + attention_mask if attention_mask is not None else bias
        attended, _ = block.attention(block.layernorm_before(x), attention_mask=attention_mask, **kwargs)
        return _scaled(block.lambda_1, block.dropout(attended))

    @staticmethod
    def _residual_data2vec(block, unit, x, output_attentions=False, relative_position_bias=None,
                           interpolate_pos_encoding=False, resolution=None):
        if unit == 1:
            return _scaled(block.lambda_2, block.output(block.intermediate(block.layernorm_after(x))))
        outputs = block.attention(block.layernorm_before(x), output_attentions=output_attentions,
                                  relative_position_bias=relative_position_bias,
                                  interpolate_pos_encoding=interpolate_pos_encoding, resolution=resolution)
        block.__dict__[_WEIGHTS] = outputs[1] if len(outputs) > 1 else None
        return _scaled(block.lambda_1, outputs[0])

    @staticmethod
    def exit(block, x):
        if isinstance(block, Data2VecVisionLayer):
            return x, block.__dict__.pop(_WEIGHTS, None)
        return x

    @staticmethod
    def branch(block, unit):
        if unit == 1:
            mlp = ("intermediate", "output") if isinstance(block, Data2VecVisionLayer) else ("mlp",)
            return ("layernorm_after", *mlp, "lambda_2")
        own_bias = getattr(block, "relative_position_bias", None) is not None
        bias = ("relative_position_bias",) if own_bias else ()
        return (*bias, "layernorm_before", "attention", "lambda_1")

    @classmethod
    def fold_scale(cls, block, unit, scale):
        layer_scale = block.lambda_1 if unit == 0 else block.lambda_2
        if not isinstance(layer_scale, torch.nn.Parameter):
            super().fold_scale(block, unit, scale)
        with torch.no_grad():
            layer_scale.mul_(scale)

    @classmethod
    def removed(cls, block):
        if isinstance(block, Data2VecVisionLayer):  # it returns a tuple: no plain module for a removed layer
            raise ValueError(f"{type(block).__name__}: {cls.family} has no plain form of a removed layer")
        return super().removed(block)
