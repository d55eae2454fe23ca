"""timm's ConvNeXt block, ``timm.models.convnext.ConvNeXtBlock`` (convnext_*, ConvNeXt-V2 with GRN).

The forward reproduced (timm ``ConvNeXtBlock.forward``)::

    x = conv_dw(x)
    x = mlp(norm(x))                          # NHWC with a permute around it, or 1x1 convs (conv_mlp)
    x = x * gamma                             # layer scale, when present
    out = drop_path(x) + shortcut(input)      # shortcut: identity, or Downsample where the shape changes

One unit; the gate replaces ``drop_path``; nothing follows the add. Normalisation is per sample (LayerNorm,
GRN), so row mode on the survivors is exact. Defaults: timm's per-block drop_path_rate, row mode,
DropPath's scale_by_keep.
"""

from __future__ import annotations

import torch
from timm.models.convnext import ConvNeXtBlock

from ._timm_sd import TimmAdapter
from .base import scale_affine
from .registry import register_adapter


@register_adapter(ConvNeXtBlock)
class TimmConvNeXt(TimmAdapter):
    family = "timm ConvNeXt"
    projection = "shortcut"  # nn.Identity, or Downsample; absent in older timm

    @staticmethod
    def residual(block, unit, x):
        x = block.conv_dw(x)
        if block.use_conv_mlp:
            x = block.mlp(block.norm(x))
        else:
            x = block.mlp(block.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x if block.gamma is None else x.mul(block.gamma.reshape(1, -1, 1, 1))

    @staticmethod
    def branch(block, unit):
        return ("conv_dw", "norm", "mlp") + (("gamma",) if block.gamma is not None else ())

    @staticmethod
    def fold_scale(block, unit, scale):
        if block.gamma is not None:
            with torch.no_grad():
                block.gamma.mul_(scale)
        else:
            scale_affine(block.mlp.fc2, scale)
