"""Hugging Face Dinov2 and Dinov2WithRegisters layers, ``Dinov2Layer`` / ``Dinov2WithRegistersLayer``.

The forward reproduced (transformers ``Dinov2Layer.forward``), on tokens [B, N, C]::

    x = x + drop_path(layer_scale1(attention(norm1(x), attention_mask, **kwargs)[0]))
    x = x + drop_path(layer_scale2(mlp(norm2(x))))

Two units per layer, attention then MLP, their layer scales inside the residual; one ``drop_path`` module
(``Dinov2DropPath``, ``nn.Identity`` at rate 0) serves both, so both units get the layer's rate. Nothing
follows the adds. The layer's arguments (``attention_mask``, ``**kwargs``: output flags, attention settings)
go to the attention; in row and subset mode a per-sample ``attention_mask`` (dim 0 the batch) is gathered to
the survivors. LayerNorm, attention and the MLP work per sample, so row mode is exact. Defaults: the model's
``drop_path_rate`` (every layer the same), row mode, "inverted" scaling.

Attention weights (``output_attentions=True``) are recorded by transformers' hooks on the attention module as
it runs: in training a dropped attention unit records nothing and one kept on K of N samples records the K
survivors' weights (rows in the order of ``Plan.rows``); in eval every layer records its [N, ...] weights,
as the unconverted model does.
"""

from __future__ import annotations

import torch
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer

from ._hf_sd import HFAdapter
from .registry import register_adapter


@register_adapter(Dinov2Layer, Dinov2WithRegistersLayer)
class HFDinov2(HFAdapter):
    family = "Hugging Face Dinov2"

    @staticmethod
    def num_units(block):
        return 2

    @staticmethod
    def residual(block, unit, x, attention_mask=None, **kwargs):
        if unit == 0:
            attended, _ = block.attention(block.norm1(x), attention_mask=attention_mask, **kwargs)
            return block.layer_scale1(attended)
        return block.layer_scale2(block.mlp(block.norm2(x)))

    @staticmethod
    def branch(block, unit):
        return ("norm1", "attention", "layer_scale1") if unit == 0 else ("norm2", "mlp", "layer_scale2")

    @staticmethod
    def fold_scale(block, unit, scale):
        with torch.no_grad():
            (block.layer_scale1 if unit == 0 else block.layer_scale2).lambda1.mul_(scale)
