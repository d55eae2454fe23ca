"""torchvision's ConvNeXt block, ``CNBlock`` (convnext_tiny/small/base/large).

The forward reproduced (torchvision ``CNBlock.forward``)::

    result = layer_scale * block(x)     # depthwise 7x7 conv, permute, LayerNorm, MLP, permute
    result = stochastic_depth(result)   # the model's own gate: mask-multiply, "row" mode
    out = result + x

One unit; the gate replaces ``stochastic_depth`` on the layer-scaled residual; nothing follows the add. The
branch normalises per sample (LayerNorm), so row mode on the survivors alone is exact. Defaults: each unit
keeps the model's own ``stochastic_depth.p`` and mode, with "inverted" scaling (as torchvision trains).
"""

from __future__ import annotations

import torch
from torchvision.models.convnext import CNBlock

from ._torchvision_sd import TorchvisionAdapter
from .registry import register_adapter


@register_adapter(CNBlock)
class TorchvisionConvNeXt(TorchvisionAdapter):
    family = "torchvision ConvNeXt"

    @staticmethod
    def residual(block, unit, x):
        return block.layer_scale * block.block(x)

    @staticmethod
    def branch(block, unit):
        return ("block", "layer_scale")

    @staticmethod
    def fold_scale(block, unit, scale):
        with torch.no_grad():
            block.layer_scale.mul_(scale)
