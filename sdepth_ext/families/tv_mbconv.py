"""torchvision's EfficientNet blocks, ``MBConv`` and ``FusedMBConv`` (efficientnet_b0..b7, efficientnet_v2_*).

The forward reproduced (torchvision ``MBConv.forward``)::

    result = block(x)                   # expand, depthwise, squeeze-excitation, project (BatchNorm)
    if use_res_connect:                 # stride 1 and as many channels out as in
        result = stochastic_depth(result)
        result += x
    return result

A block is one unit when ``use_res_connect`` holds, and not a unit at all otherwise (its residual is not
guarded by a gate; it stays as it is). The gate replaces ``stochastic_depth`` on ``block(x)``; nothing
follows the add. The branch holds BatchNorm layers, so in row mode their statistics are those of the
surviving samples, as in ResNet row mode. Defaults: the model's own ``stochastic_depth.p`` and mode per
unit, "inverted" scaling.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.efficientnet import FusedMBConv, MBConv

from ._torchvision_sd import TorchvisionAdapter
from .base import scale_affine
from .registry import register_adapter


@register_adapter(MBConv, FusedMBConv)
class TorchvisionMBConv(TorchvisionAdapter):
    family = "torchvision EfficientNet"

    @staticmethod
    def num_units(block):
        return 1 if block.use_res_connect else 0

    @staticmethod
    def branch(block, unit):
        return ("block",)

    @classmethod
    def fold_scale(cls, block, unit, scale):
        # The projection (MBConv, FusedMBConv) is a conv + BatchNorm without activation; FusedMBConv with
        # expand ratio 1 ends in its activation instead, which no scale can be folded through.
        last = block.block[-1]
        if len(last) != 2 or not isinstance(last[1], nn.BatchNorm2d):
            return super().fold_scale(block, unit, scale)
        scale_affine(last[1], scale)
