"""torchvision EfficientNet (MBConv, FusedMBConv): fixtures for the shared suite, and family specifics."""

from __future__ import annotations

from torchvision.models.efficientnet import EfficientNet, FusedMBConv, FusedMBConvConfig, MBConv, MBConvConfig

import sdepth_ext as sd
from sdepth_ext.state import get_state

from .common import FamilyCase, cached_maker, gated_add, image_input


def mbconv_reference(block, x, units):
    (rows, scale), = units
    return gated_add(x, x, block.block, rows, scale)


def small_efficientnet():
    # stage 1: two residual MBConvs; stage 2: a strided one (no residual: not a unit), then a residual one;
    # stage 3: FusedMBConvs (EfficientNetV2's), again the first changes width
    setting = [MBConvConfig(1, 3, 1, 16, 16, 2), MBConvConfig(4, 3, 2, 16, 24, 2),
               FusedMBConvConfig(4, 3, 1, 24, 32, 2)]
    return EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.5, num_classes=5)


CASES = [FamilyCase("efficientnet", cached_maker(small_efficientnet), image_input(32), mbconv_reference,
                    (MBConv, FusedMBConv), own_rates=True, exact_row_mode=False)]


def test_only_guarded_residuals_are_units():
    model = small_efficientnet()
    blocks = [m for m in model.modules() if isinstance(m, (MBConv, FusedMBConv))]
    residual = [b for b in blocks if b.use_res_connect]
    assert 0 < len(residual) < len(blocks)
    sd.convert(model, seed=0)
    assert len(sd.survival_probs(model)) == len(residual)
    assert sd.survival_probs(model) == [1.0 - b.stochastic_depth.p for b in residual]
    assert all(type(b) in (MBConv, FusedMBConv) for b in blocks if not b.use_res_connect)  # left as they are


def test_efficientnet_b0_and_v2_s_convert():
    import torch
    import torchvision

    for make in (torchvision.models.efficientnet_b0, torchvision.models.efficientnet_v2_s):
        model = sd.convert(make(), seed=0)
        assert 0 < len(sd.survival_probs(model)) and get_state(model).mode == "row"
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
