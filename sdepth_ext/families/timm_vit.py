"""timm's Vision Transformer block, ``timm.models.vision_transformer.Block`` (vit_*, deit_*).

The forward reproduced (timm ``Block.forward``), on tokens [B, N, C]::

    x = x + drop_path1(ls1(attn(norm1(x))))
    x = x + drop_path2(ls2(mlp(norm2(x))))

Two units per block, attention then MLP, with their layer scales (``ls1``, ``ls2``) inside the residual. The
gates replace ``drop_path1`` / ``drop_path2``; nothing follows the adds. LayerNorm and attention work per
sample, so row mode runs the two branches on the surviving samples only, exactly, with a Bernoulli gate
per sample (not a fixed count of them) and no device sync. Calls with an attention mask are not converted
(the mask would need the same gather): they raise, naming the argument; a torch.fx trace that passes the
mask on (timm's ViT forwards its ``attn_mask`` argument) traces the eval forward through ``Block.forward``
with ``drop_path1``/``drop_path2`` standing for the ``p_l`` scale. Defaults: timm's drop_path_rate
schedule, row mode, DropPath's scale_by_keep. ViT variants built from other block classes (ResPostBlock,
ParallelScalingBlock, ...) are refused naming the class.
"""

from __future__ import annotations

import torch
from timm.models import vision_transformer as vit

from ._timm_sd import TimmAdapter
from .base import scale_affine
from .registry import register_adapter, register_unsupported


@register_adapter(vit.Block)
class TimmViT(TimmAdapter):
    family = "timm ViT"
    drop_slots = ("drop_path1", "drop_path2")

    @staticmethod
    def num_units(block):
        return 2

    @staticmethod
    def branch(block, unit):
        return ("norm1", "attn", "ls1") if unit == 0 else ("norm2", "mlp", "ls2")

    @classmethod
    def drop_module(cls, block, unit):
        return cls.drop_slots[unit]

    @staticmethod
    def fold_scale(block, unit, scale):
        layer_scale = block.ls1 if unit == 0 else block.ls2
        if hasattr(layer_scale, "gamma"):
            with torch.no_grad():
                layer_scale.gamma.mul_(scale)
        else:
            scale_affine(block.attn.proj if unit == 0 else block.mlp.fc2, scale)


for _name in ("ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock"):
    _cls = getattr(vit, _name, None)
    if _cls is not None:
        register_unsupported(_cls, "its residual layout (post-norm or parallel branches) has no adapter; "
                                   "vit_*/deit_* models built from timm's Block are supported")
