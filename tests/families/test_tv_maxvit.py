"""torchvision MaxViT (its MBConv and PartitionAttentionLayer): shared-suite fixtures, specifics."""

from __future__ import annotations

from torchvision.models.maxvit import MaxVit, MBConv, PartitionAttentionLayer

import sdepth_ext as sd

from .common import FamilyCase, cached_maker, gated_add, image_input


def maxvit_reference(block, x, units):
    if isinstance(block, MBConv):
        (rows, scale), = units
        return gated_add(block.proj(x), x, block.layers, rows, scale)
    (rows_attn, scale_attn), (rows_mlp, scale_mlp) = units
    gh, gw = block.grid_size[0] // block.p, block.grid_size[1] // block.p
    x = block.partition_swap(block.partition_op(x, block.p))
    x = gated_add(x, x, block.attn_layer, rows_attn, scale_attn)
    x = gated_add(x, x, block.mlp_layer, rows_mlp, scale_mlp)
    return block.departition_op(block.departition_swap(x), block.p, gh, gw)


def small_maxvit():
    return MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                  block_layers=[2, 1], head_dim=8, stochastic_depth_prob=0.5, num_classes=5)


CASES = [FamilyCase("maxvit", cached_maker(small_maxvit), image_input(32), maxvit_reference,
                    (MBConv, PartitionAttentionLayer), own_rates=True, exact_row_mode=False)]


def test_maxvit_units():
    model = small_maxvit()
    layers = [m for m in model.modules() if isinstance(m, (MBConv, PartitionAttentionLayer))]
    sd.convert(model, seed=0)
    expected = sum(1 if isinstance(m, MBConv) else 2 for m in layers)
    assert len(sd.survival_probs(model)) == expected
