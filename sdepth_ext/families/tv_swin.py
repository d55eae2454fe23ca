"""torchvision's Swin Transformer blocks, ``SwinTransformerBlock`` (v1) and ``SwinTransformerBlockV2``.

The forwards reproduced (torchvision ``SwinTransformerBlock.forward``, ``...V2.forward``), on [B, H, W, C]::

    x = x + stochastic_depth(attn(norm1(x)))      # V2: norm1(attn(x))
    x = x + stochastic_depth(mlp(norm2(x)))       # V2: norm2(mlp(x))

Two units per block, attention then MLP, each gated on its own: the gates replace the block's one
``stochastic_depth`` module, which the original applies to both residuals. Nothing follows the adds. Window
attention, LayerNorm and the MLP work per sample (windows never span samples), so row mode on the survivors
alone is exact. Defaults: the model's own ``stochastic_depth.p`` (for both units) and mode, "inverted"
scaling.
"""

from __future__ import annotations

from torchvision.models.swin_transformer import SwinTransformerBlock, SwinTransformerBlockV2

from ._torchvision_sd import TorchvisionAdapter
from .base import last_linear, scale_affine
from .registry import register_adapter


@register_adapter(SwinTransformerBlock, SwinTransformerBlockV2)
class TorchvisionSwin(TorchvisionAdapter):
    family = "torchvision Swin"

    @staticmethod
    def num_units(block):
        return 2

    @staticmethod
    def residual(block, unit, x):
        v2 = isinstance(block, SwinTransformerBlockV2)
        if unit == 0:
            return block.norm1(block.attn(x)) if v2 else block.attn(block.norm1(x))
        return block.norm2(block.mlp(x)) if v2 else block.mlp(block.norm2(x))

    @staticmethod
    def branch(block, unit):
        return ("norm1", "attn") if unit == 0 else ("norm2", "mlp")

    @staticmethod
    def fold_scale(block, unit, scale):
        if isinstance(block, SwinTransformerBlockV2):  # post-norm: the norm is the branch's last layer
            scale_affine(block.norm1 if unit == 0 else block.norm2, scale)
        else:
            scale_affine(block.attn.proj if unit == 0 else last_linear(block.mlp), scale)
