"""torchvision Swin v1/v2 (SwinTransformerBlock, SwinTransformerBlockV2): shared-suite fixtures, specifics."""

from __future__ import annotations

import torch
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerBlockV2,
)

import sdepth_ext as sd
from sdepth_ext.state import get_state

from .common import FamilyCase, cached_maker, gated_add, image_input


def swin_reference(block, x, units):
    (rows_attn, scale_attn), (rows_mlp, scale_mlp) = units
    if isinstance(block, SwinTransformerBlockV2):
        x = gated_add(x, x, lambda t: block.norm1(block.attn(t)), rows_attn, scale_attn)
        return gated_add(x, x, lambda t: block.norm2(block.mlp(t)), rows_mlp, scale_mlp)
    x = gated_add(x, x, lambda t: block.attn(block.norm1(t)), rows_attn, scale_attn)
    return gated_add(x, x, lambda t: block.mlp(block.norm2(t)), rows_mlp, scale_mlp)


def small_swin(v2: bool = False):
    kwargs = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], stochastic_depth_prob=0.5, num_classes=5,
                           **kwargs)


CASES = [
    FamilyCase("swin", cached_maker(small_swin), image_input(32), swin_reference, (SwinTransformerBlock,),
               own_rates=True, exact_row_mode=True, drop_slots=("stochastic_depth",)),
    FamilyCase("swin_v2", cached_maker(lambda: small_swin(v2=True)), image_input(32), swin_reference,
               (SwinTransformerBlockV2,), own_rates=True, exact_row_mode=True,
               drop_slots=("stochastic_depth",)),
]


def test_two_units_per_block_in_forward_order():
    model = small_swin()
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    sd.convert(model, seed=0)
    assert len(sd.survival_probs(model)) == 2 * len(blocks)
    own = [1.0 - b.stochastic_depth.p for b in blocks for _ in range(2)]  # one module gates both units
    assert sd.survival_probs(model) == own
    state = get_state(model)
    assert [(b is blocks[l // 2], u) for l, (b, u) in enumerate(state.units)] == [(True, l % 2) for l in
                                                                                 range(len(own))]


def test_swin_t_converts():
    import torchvision

    model = sd.convert(torchvision.models.swin_t(), seed=0)
    assert len(sd.survival_probs(model)) == 24
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
