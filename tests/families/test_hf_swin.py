"""Hugging Face Swin / Swinv2 (SwinLayer, Swinv2Layer): shared-suite fixtures and specifics.

The reference computes each branch with the layer's own forward (its drop path replaced by a module that keeps
the residual it is given and returns zeros), and writes the gating, gather, scatter and adds by hand.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="transformers >= 5.0 is not installed (pip install sdepth_ext[hf])")

from transformers import (  # noqa: E402
    SwinConfig,
    SwinForImageClassification,
    Swinv2Config,
    Swinv2ForImageClassification,
)
from transformers.models.swin.modeling_swin import SwinLayer  # noqa: E402
from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer  # noqa: E402

import sdepth_ext as sd  # noqa: E402
from benchmarks.models import HFLogits  # noqa: E402
from sdepth_ext.state import get_state  # noqa: E402

from .common import NOT_TRACEABLE, FamilyCase, cached_maker, gated_add, image_input, own_residual  # noqa: E402

CONFIG = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4,
              drop_path_rate=0.5, num_labels=5, attn_implementation="eager")


def swin_reference(block, x, *args, units, **kwargs):
    if isinstance(block, Swinv2Layer):
        (rows_attn, scale_attn), (rows_mlp, scale_mlp) = units
        x = gated_add(x, x, lambda t: own_residual(block, t, 0, args, kwargs), rows_attn, scale_attn)
        x = gated_add(x, x, lambda t: own_residual(block, t, 1, args, kwargs), rows_mlp, scale_mlp)
        return (x,)
    ((rows, scale),) = units
    x = gated_add(x, x, lambda t: own_residual(block, t, 0, args, kwargs), rows, scale)
    return x + block.dropout(block.mlp(block.layernorm_after(x))), None


def small_swin(v2: bool = False, **overrides):
    if v2:
        return HFLogits(Swinv2ForImageClassification(Swinv2Config(**{**CONFIG, **overrides})))
    return HFLogits(SwinForImageClassification(SwinConfig(**{**CONFIG, **overrides})))


CASES = [
    FamilyCase("hf_swin", cached_maker(small_swin), image_input(32), swin_reference, (SwinLayer,),
               own_rates=True, exact_row_mode=True, drop_slots=("drop_path",), extra=NOT_TRACEABLE),
    FamilyCase("hf_swinv2", cached_maker(lambda: small_swin(v2=True)), image_input(32), swin_reference,
               (Swinv2Layer,), own_rates=True, exact_row_mode=True, drop_slots=("drop_path",),
               extra=NOT_TRACEABLE),
]


def test_swin_v1_gates_only_the_attention_unit_and_v2_both():
    v1, v2 = small_swin(), small_swin(v2=True)
    own_v1 = [getattr(m.drop_path, "drop_prob", 0.0) for m in v1.modules() if isinstance(m, SwinLayer)]
    own_v2 = [getattr(m.drop_path, "drop_prob", 0.0) for m in v2.modules() if isinstance(m, Swinv2Layer)]
    sd.convert(v1, seed=0), sd.convert(v2, seed=0)
    assert sd.survival_probs(v1) == pytest.approx([1.0 - p for p in own_v1]) and len(own_v1) == 4
    assert sd.survival_probs(v2) == pytest.approx([1.0 - p for p in own_v2 for _ in range(2)])
    layer = next(m for m in v1.modules() if isinstance(m, SwinLayer))
    assert "mlp" not in [n for u in range(layer._sd_num_units) for n in layer._sd_adapter.branch(layer, u)]


def test_swin_mlp_runs_when_the_attention_unit_is_dropped():
    model = sd.convert(small_swin(), p_last=0.0, rule="uniform", mode="batch", seed=0).train()
    calls = []
    for m in model.modules():
        if isinstance(m, SwinLayer):
            m.mlp.register_forward_hook(lambda *_: calls.append(1))
            m.attention.register_forward_hook(lambda *_: calls.append(0))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == [1, 1, 1, 1]  # every attention unit dropped, every (ungated) MLP ran


def test_attention_weights_of_the_units_that_ran():
    """Documented (hf_swin's docstring): a layer returns its attention unit's weights when it ran (the
    survivors' windows in row mode), None when it was dropped."""
    model = sd.convert(small_swin(), p_last=0.5, rule="uniform", mode="row", seed=0).train()
    layer = model.model.swin.encoder.layers[0].blocks[0]
    seen = set()
    for _ in range(100):
        out, weights = layer(torch.randn(4, 64, 16), (8, 8), output_attentions=True)
        count = get_state(model).host_plan.counts[layer._sd_index]
        seen.add(min(count, 1) + (count == 4))  # 0 dropped, 1 some samples, 2 all
        if count == 0:
            assert weights is None
        else:
            assert weights.shape == (count * 4, 2, 16, 16)  # 4 windows per sample
        assert out.shape == (4, 64, 16)
        if seen == {0, 1, 2}:
            break
    assert seen == {0, 1, 2}
    assert "_hf_attention_weights" not in vars(layer)


def test_prune_refuses_to_remove_a_whole_swin_layer():
    model = sd.convert(small_swin(), seed=0)
    with pytest.raises(ValueError, match="SwinLayer.*no plain form"):
        sd.prune(model, [0])
