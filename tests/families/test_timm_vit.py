"""timm ViT (vision_transformer.Block): fixtures for the shared suite, and family specifics."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install sdepth_ext[timm])")

from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402

import sdepth_ext as sd  # noqa: E402
from sdepth_ext.state import get_state  # noqa: E402

from .common import FamilyCase, cached_maker, gated_add, image_input  # noqa: E402


def timm_vit_reference(block, x, units):
    (rows_attn, scale_attn), (rows_mlp, scale_mlp) = units
    x = gated_add(x, x, lambda t: block.ls1(block.attn(block.norm1(t))), rows_attn, scale_attn)
    return gated_add(x, x, lambda t: block.ls2(block.mlp(block.norm2(t))), rows_mlp, scale_mlp)


def small_vit():
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                             drop_path_rate=0.3, init_values=0.5)


CASES = [FamilyCase("timm_vit", cached_maker(small_vit), image_input(32), timm_vit_reference, (Block,),
                    own_rates=True, exact_row_mode=True, drop_slots=("drop_path1", "drop_path2"))]


def test_vit_has_two_units_per_block_with_timms_rates():
    model = small_vit()
    own = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in model.blocks
           for _ in range(2)]
    sd.convert(model, seed=0)
    assert sd.survival_probs(model) == [1.0 - p for p in own] and len(own) == 6
    state = get_state(model)
    assert (state.mode, state.scaling) == ("row", "inverted")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_small_patch16_224"])
def test_vit_and_deit_convert(name):
    model = sd.convert(timm.create_model(name, img_size=32, drop_path_rate=0.1, num_classes=5), seed=0)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_extra_block_arguments_are_refused_in_training():
    model = sd.convert(small_vit(), seed=0).train()
    tokens = torch.randn(2, 17, 32)
    with pytest.raises(TypeError, match="only its input.*attn_mask"):
        model.blocks[0](tokens, attn_mask=torch.zeros(17, 17))
    model.eval()
    model.blocks[0](tokens)  # the plain call is fine


def test_other_vit_blocks_are_refused_naming_the_class():
    from timm.models.vision_transformer import ResPostBlock

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                              drop_path_rate=0.3, block_fn=ResPostBlock)
    with pytest.raises(TypeError, match="ResPostBlock.*not supported"):
        sd.convert(model)
