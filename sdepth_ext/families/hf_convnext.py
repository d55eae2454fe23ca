"""Hugging Face ConvNext and ConvNextV2 layers, ``ConvNextLayer`` / ``ConvNextV2Layer``.

The forward reproduced (transformers ``ConvNextLayer.forward``, ``ConvNextV2Layer.forward``), on
[B, C, H, W]::

    t = dwconv(x).permute(0, 2, 3, 1)                   # NHWC
    t = pwconv2(act(pwconv1(layernorm(t))))             # V2: pwconv2(grn(act(pwconv1(layernorm(t)))))
    t = layer_scale_parameter * t                       # ConvNext with layer scale only (γ); V2 has none
    x = x + drop_path(t.permute(0, 3, 1, 2))

One unit per layer; the gate replaces ``drop_path`` (``ConvNextDropPath``, ``nn.Identity`` at rate 0).
Nothing follows the add. LayerNorm and GRN (its norms are over each sample's own spatial positions) work per
sample, so row mode is exact. Defaults: the model's per-layer ``drop_path_rate`` schedule, row mode,
"inverted" scaling.
"""

from __future__ import annotations

import torch
from transformers.models.convnext.modeling_convnext import ConvNextLayer
from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2Layer

from ._hf_sd import HFAdapter
from .base import scale_affine
from .registry import register_adapter


@register_adapter(ConvNextLayer, ConvNextV2Layer)
class HFConvNext(HFAdapter):
    family = "Hugging Face ConvNext"

    @staticmethod
    def residual(block, unit, x):
        t = block.layernorm(block.dwconv(x).permute(0, 2, 3, 1))
        t = block.act(block.pwconv1(t))
        if isinstance(block, ConvNextV2Layer):
            t = block.grn(t)
        t = block.pwconv2(t)
        gamma = getattr(block, "layer_scale_parameter", None)
        if gamma is not None:
            t = gamma * t
        return t.permute(0, 3, 1, 2)

    @staticmethod
    def branch(block, unit):
        if isinstance(block, ConvNextV2Layer):
            return ("dwconv", "layernorm", "pwconv1", "act", "grn", "pwconv2")
        if block.layer_scale_parameter is None:
            return ("dwconv", "layernorm", "pwconv1", "act", "pwconv2")
        return ("dwconv", "layernorm", "pwconv1", "act", "pwconv2", "layer_scale_parameter")

    @staticmethod
    def fold_scale(block, unit, scale):
        gamma = getattr(block, "layer_scale_parameter", None)
        if gamma is None:
            scale_affine(block.pwconv2, scale)
        else:
            with torch.no_grad():
                gamma.mul_(scale)
