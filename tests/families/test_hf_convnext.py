"""Hugging Face ConvNext / ConvNextV2 (ConvNextLayer, ConvNextV2Layer): shared-suite fixtures, specifics."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="transformers >= 5.0 is not installed (pip install sdepth_ext[hf])")

from transformers import (  # noqa: E402
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
)
from transformers.models.convnext.modeling_convnext import ConvNextLayer  # noqa: E402
from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2Layer  # noqa: E402

import sdepth_ext as sd  # noqa: E402
from benchmarks.models import HFLogits  # noqa: E402
from sdepth_ext.state import get_state  # noqa: E402

from .common import NOT_TRACEABLE, FamilyCase, cached_maker, gated_add, image_input  # noqa: E402

CONFIG = dict(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, drop_path_rate=0.5, num_labels=5,
              image_size=32)


def convnext_reference(block, x, *, units):
    ((rows, scale),) = units

    def branch(t):
        t = block.act(block.pwconv1(block.layernorm(block.dwconv(t).permute(0, 2, 3, 1))))
        if isinstance(block, ConvNextV2Layer):
            t = block.grn(t)
        t = block.pwconv2(t)
        if getattr(block, "layer_scale_parameter", None) is not None:
            t = t * block.layer_scale_parameter
        return t.permute(0, 3, 1, 2)

    return gated_add(x, x, branch, rows, scale)


def small_convnext(v2: bool = False, **overrides):
    if v2:
        model = ConvNextV2ForImageClassification(ConvNextV2Config(**{**CONFIG, **overrides}))
        with torch.no_grad():  # GRN starts as the identity (zero weight and bias): make it matter
            for m in model.modules():
                if type(m).__name__ == "ConvNextV2GRN":
                    m.weight.uniform_(-1.0, 1.0)
                    m.bias.uniform_(-0.2, 0.2)
        return HFLogits(model)
    config = ConvNextConfig(**{"layer_scale_init_value": 0.5, **CONFIG, **overrides})
    return HFLogits(ConvNextForImageClassification(config))


CASES = [
    FamilyCase("hf_convnext", cached_maker(small_convnext), image_input(32), convnext_reference,
               (ConvNextLayer,), own_rates=True, exact_row_mode=True, drop_slots=("drop_path",),
               extra=NOT_TRACEABLE),
    FamilyCase("hf_convnextv2", cached_maker(lambda: small_convnext(v2=True)), image_input(32),
               convnext_reference, (ConvNextV2Layer,), own_rates=True, exact_row_mode=True,
               drop_slots=("drop_path",), extra=NOT_TRACEABLE),
]


@pytest.mark.parametrize("v2", [False, True])
def test_one_unit_per_layer_at_the_models_linear_rates(v2):
    model = small_convnext(v2)
    layers = [m for m in model.modules() if isinstance(m, (ConvNextLayer, ConvNextV2Layer))]
    own = [getattr(m.drop_path, "drop_prob", 0.0) for m in layers]
    assert own == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])  # HF's linspace over the 4 layers
    sd.convert(model, seed=0)
    assert sd.survival_probs(model) == [1.0 - p for p in own]
    assert (get_state(model).mode, get_state(model).scaling) == ("row", "inverted")


def test_convnext_without_layer_scale():
    model = small_convnext(layer_scale_init_value=0.0)
    plain = small_convnext(layer_scale_init_value=0.0)
    plain.load_state_dict(model.state_dict())
    sd.convert(model, seed=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))
    layer = next(m for m in model.modules() if isinstance(m, ConvNextLayer))
    assert "layer_scale_parameter" not in type(layer)._sd_adapter.branch(layer, 0)


def test_unsupported_hf_blocks_are_refused_by_name():
    from transformers import SegformerConfig, SegformerForImageClassification

    model = SegformerForImageClassification(SegformerConfig(num_encoder_blocks=2, depths=[1, 1],
                                                            hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                                                            sr_ratios=[2, 1], drop_path_rate=0.2))
    with pytest.raises(TypeError, match="SegformerLayer.*SegformerDropPath.*no adapter"):
        sd.convert(model)


def test_torch_export_in_eval_is_the_plain_model():
    plain = small_convnext(v2=True).eval()
    converted = sd.convert(small_convnext(v2=True), seed=0).eval()
    converted.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(converted, (x,), strict=False).module()
    assert torch.equal(exported(x), plain(x))
