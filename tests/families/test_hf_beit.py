"""Hugging Face BEiT / Data2VecVision (BeitLayer, Data2VecVisionLayer): shared-suite fixtures, specifics.

The reference takes each branch from the layer's own forward (``common.own_residual``) and writes the gating,
gather, scatter and adds by hand.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="transformers >= 5.0 is not installed (pip install sdepth_ext[hf])")

from transformers import (  # noqa: E402
    BeitConfig,
    BeitForImageClassification,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
)
from transformers.models.beit.modeling_beit import BeitLayer  # noqa: E402
from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionLayer  # noqa: E402

import sdepth_ext as sd  # noqa: E402
from benchmarks.models import HFLogits  # noqa: E402
from sdepth_ext.state import get_state  # noqa: E402

from .common import NOT_TRACEABLE, FamilyCase, cached_maker, gated_add, image_input, own_residual  # noqa: E402

CONFIG = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
              intermediate_size=64, drop_path_rate=0.4, layer_scale_init_value=0.5, num_labels=5)


def beit_reference(block, x, *args, units, **kwargs):
    (rows_attn, scale_attn), (rows_mlp, scale_mlp) = units
    x = gated_add(x, x, lambda t: own_residual(block, t, 0, args, kwargs), rows_attn, scale_attn)
    x = gated_add(x, x, lambda t: own_residual(block, t, 1, args, kwargs), rows_mlp, scale_mlp)
    return (x,) if isinstance(block, Data2VecVisionLayer) else x


def randomize_position_bias(model):
    """The relative position bias tables start at zero: make them matter."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def small_beit(data2vec: bool = False, **overrides):
    if data2vec:  # the shared bias, passed to every layer as its relative_position_bias argument
        config = Data2VecVisionConfig(**{"use_shared_relative_position_bias": True, **CONFIG, **overrides})
        return HFLogits(randomize_position_bias(Data2VecVisionForImageClassification(config)))
    config = BeitConfig(**{"use_relative_position_bias": True, **CONFIG, **overrides})  # a bias per layer
    return HFLogits(randomize_position_bias(BeitForImageClassification(config)))


CASES = [
    FamilyCase("hf_beit", cached_maker(small_beit), image_input(32), beit_reference, (BeitLayer,),
               own_rates=True, exact_row_mode=True, drop_slots=("drop_path",), extra=NOT_TRACEABLE),
    FamilyCase("hf_data2vec_vision", cached_maker(lambda: small_beit(data2vec=True)), image_input(32),
               beit_reference, (Data2VecVisionLayer,), own_rates=True, exact_row_mode=True,
               drop_slots=("drop_path",), extra=NOT_TRACEABLE),
]


@pytest.mark.parametrize("data2vec", [False, True])
def test_two_units_per_layer_at_the_models_rates(data2vec):
    model = small_beit(data2vec)
    layers = [m for m in model.modules() if isinstance(m, (BeitLayer, Data2VecVisionLayer))]
    own = [getattr(m.drop_path, "drop_prob", 0.0) for m in layers for _ in range(2)]
    assert own == pytest.approx([0.0, 0.0, 0.2, 0.2, 0.4, 0.4])
    sd.convert(model, seed=0)
    assert sd.survival_probs(model) == pytest.approx([1.0 - p for p in own])


def test_beits_own_position_bias_is_part_of_the_attention_unit():
    model = sd.convert(small_beit(), p_last=0.0, rule="uniform", mode="batch", seed=0).train()
    layer = model.model.beit.layers[0]
    assert "relative_position_bias" in layer._sd_adapter.branch(layer, 0)
    calls = []
    layer.relative_position_bias.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert not calls  # every unit dropped: the bias was not computed
    assert not layer.relative_position_bias.relative_position_bias_table.grad.any()  # "zero" dropped grads


def test_shared_bias_with_as_many_heads_as_samples_passes_in_row_mode():
    """Data2VecVision's shared bias is [heads, N, N]: no batch dimension, even where heads == batch size."""
    model = sd.convert(small_beit(data2vec=True), p_last=0.5, rule="uniform", mode="subset", seed=0).train()
    out = model(torch.randn(2, 3, 32, 32))  # 2 heads, 2 samples; subset mode keeps 1 of 2 in every unit
    assert out.shape == (2, 5)
    assert all(c == 1 for c in get_state(model).host_plan.counts)


def test_data2vec_attention_weights_in_training():
    model = sd.convert(small_beit(data2vec=True, attn_implementation="eager"), p_last=0.5, rule="uniform",
                       mode="batch", seed=2).train()
    for _ in range(30):
        out = model.model(pixel_values=torch.randn(2, 3, 32, 32), output_attentions=True)
        counts = get_state(model).host_plan.counts[0::2]
        assert [a is None for a in out.attentions] == [c == 0 for c in counts]
        if 0 in counts and any(counts):
            break
    else:
        pytest.fail("no step dropped one attention unit and kept another")
