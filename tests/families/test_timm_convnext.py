"""timm ConvNeXt (ConvNeXtBlock): fixtures for the shared suite, and family specifics."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install sdepth_ext[timm])")

from timm.models.convnext import ConvNeXt, ConvNeXtBlock  # noqa: E402

import sdepth_ext as sd  # noqa: E402

from .common import FamilyCase, cached_maker, gated_add, image_input  # noqa: E402


def timm_convnext_reference(block, x, units):
    (rows, scale), = units

    def branch(t):
        t = block.conv_dw(t)
        t = block.mlp(block.norm(t)) if block.use_conv_mlp else \
            block.mlp(block.norm(t.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return t if block.gamma is None else t * block.gamma.reshape(1, -1, 1, 1)

    return gated_add(block.shortcut(x), x, branch, rows, scale)


def small_convnext(conv_mlp: bool = False):
    # layer scale 0.5 rather than timm's 1e-6 default: the residuals must matter for the comparisons
    return ConvNeXt(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), drop_path_rate=0.3, num_classes=5,
                    ls_init_value=0.5, conv_mlp=conv_mlp)


CASES = [
    FamilyCase("timm_convnext", cached_maker(small_convnext), image_input(32), timm_convnext_reference,
               (ConvNeXtBlock,), own_rates=True, exact_row_mode=True, drop_slots=("drop_path",)),
    FamilyCase("timm_convnext_conv_mlp", cached_maker(lambda: small_convnext(conv_mlp=True)), image_input(32),
               timm_convnext_reference, (ConvNeXtBlock,), own_rates=True, exact_row_mode=True,
               drop_slots=("drop_path",)),
]


def test_timm_convnext_converts_with_its_own_rates():
    model = timm.create_model("convnext_atto", drop_path_rate=0.3, num_classes=5)
    own = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in model.modules()
           if isinstance(b, ConvNeXtBlock)]
    sd.convert(model, seed=0)
    assert sd.survival_probs(model) == [1.0 - p for p in own]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
