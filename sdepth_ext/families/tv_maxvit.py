"""torchvision's MaxViT blocks: its ``MBConv`` and ``PartitionAttentionLayer`` (maxvit_t).

The forwards reproduced (torchvision ``maxvit.MBConv.forward``, ``PartitionAttentionLayer.forward``)::

    # MBConv: one unit, a projection shortcut (avg-pool + 1x1 conv) where the stride or width changes
    out = proj(x) + stochastic_depth(layers(x))

    # PartitionAttentionLayer: two units in the partitioned layout [B, windows, tokens, C]
    x = partition_swap(partition_op(x, p))
    x = x + stochastic_dropout(attn_layer(x))
    x = x + stochastic_dropout(mlp_layer(x))
    x = departition_op(departition_swap(x), p, gh, gw)

The gates replace ``stochastic_depth`` (MBConv) and ``stochastic_dropout`` (both units of the attention
layer) on the residual just before the add; nothing follows the adds. The partition keeps the batch
dimension outermost, so a unit's survivors are still whole samples; the adapter does the partition before
the first unit and undoes it after the last. MBConv's branch holds BatchNorm (statistics of the survivors in
row mode); attention and MLP normalise per sample (exact in row mode). Defaults: the model's own
stochastic-depth rates and mode, "inverted" scaling.
"""

from __future__ import annotations

from torchvision.models.maxvit import MBConv, PartitionAttentionLayer

from ._torchvision_sd import TorchvisionAdapter
from .base import last_linear, scale_affine
from .registry import register_adapter


@register_adapter(MBConv)
class TorchvisionMaxViTMBConv(TorchvisionAdapter):
    family = "torchvision MaxViT"
    projection = "proj"  # nn.Identity where the stride and width stay

    @staticmethod
    def branch(block, unit):
        return ("layers",)

    @classmethod
    def own_drop(cls, block, unit):
        # p_stochastic_dropout = 0 builds an nn.Identity in place of StochasticDepth: never dropped
        return super().own_drop(block, unit) or (0.0, "row")

    @staticmethod
    def fold_scale(block, unit, scale):
        scale_affine(block.layers.conv_c, scale)


@register_adapter(PartitionAttentionLayer)
class TorchvisionMaxViTAttention(TorchvisionAdapter):
    family = "torchvision MaxViT"
    drop_slot = "stochastic_dropout"

    @staticmethod
    def num_units(block):
        return 2

    @staticmethod
    def enter(block, x):
        return block.partition_swap(block.partition_op(x, block.p))

    @staticmethod
    def exit(block, x):
        gh, gw = block.grid_size[0] // block.p, block.grid_size[1] // block.p
        return block.departition_op(block.departition_swap(x), block.p, gh, gw)

    @staticmethod
    def branch(block, unit):
        return ("attn_layer",) if unit == 0 else ("mlp_layer",)

    @staticmethod
    def fold_scale(block, unit, scale):
        if unit == 0:
            scale_affine(block.attn_layer[1].merge, scale)
        else:
            scale_affine(last_linear(block.mlp_layer), scale)
