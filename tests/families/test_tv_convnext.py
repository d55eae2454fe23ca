"""torchvision ConvNeXt (CNBlock): fixtures for the shared suite, and family specifics."""

from __future__ import annotations

import torch
from torchvision.models.convnext import CNBlock, CNBlockConfig, ConvNeXt

import sdepth_ext as sd
from sdepth_ext.state import get_state

from .common import FamilyCase, cached_maker, gated_add, image_input


def convnext_reference(block, x, units):
    (rows, scale), = units
    return gated_add(x, x, lambda t: block.layer_scale * block.block(t), rows, scale)


def small_convnext():
    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.5,
                    layer_scale=0.5, num_classes=5)


CASES = [FamilyCase("convnext", cached_maker(small_convnext), image_input(32), convnext_reference, (CNBlock,),
                    own_rates=True, exact_row_mode=True, drop_slots=("stochastic_depth",))]


def test_convnext_defaults_are_the_models_own():
    model = small_convnext()
    own = [1.0 - m.stochastic_depth.p for m in model.modules() if isinstance(m, CNBlock)]
    sd.convert(model, seed=0)
    state = get_state(model)
    assert sd.survival_probs(model) == own and own[0] == 1.0 and own[-1] == 0.5
    assert (state.mode, state.scaling) == ("row", "inverted")
    sd.convert(model, p_last=0.2, seed=0)  # p_last replaces the rates: linear decay over the units
    assert sd.survival_probs(model) == sd.linear_decay(4, 0.2)
    assert get_state(model).mode == "row"  # mode and scaling still the model's


def test_convnext_tiny_converts_with_torchvisions_default_rates():
    import torchvision

    model = torchvision.models.convnext_tiny()
    own = [1.0 - m.stochastic_depth.p for m in model.modules() if isinstance(m, CNBlock)]
    sd.convert(model, seed=0)
    assert len(sd.survival_probs(model)) == 18 and sd.survival_probs(model) == own
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
