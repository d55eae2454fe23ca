"""Hugging Face Dinov2 / Dinov2WithRegisters: shared-suite fixtures, call arguments, attentions."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="transformers >= 5.0 is not installed (pip install sdepth_ext[hf])")

from transformers import (  # noqa: E402
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
)
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer  # noqa: E402
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (  # noqa: E402
    Dinov2WithRegistersLayer,
)

import sdepth_ext as sd  # noqa: E402
from benchmarks.models import HFLogits  # noqa: E402
from sdepth_ext.state import get_state  # noqa: E402

from .common import NOT_TRACEABLE, FamilyCase, cached_maker, gated_add, image_input  # noqa: E402

CONFIG = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
              mlp_ratio=2, drop_path_rate=0.3, layerscale_value=0.5, num_labels=5,
              attn_implementation="eager")


def dinov2_reference(block, x, attention_mask=None, *, units, **kwargs):
    (rows_attn, scale_attn), (rows_mlp, scale_mlp) = units

    def attention(t, rows):
        mask = attention_mask
        if rows is not None and mask is not None and mask.shape[0] == x.shape[0]:
            mask = mask[torch.tensor(rows, dtype=torch.int64)]
        return block.layer_scale1(block.attention(block.norm1(t), attention_mask=mask, **kwargs)[0])

    x = gated_add(x, x, lambda t: attention(t, rows_attn), rows_attn, scale_attn)
    return gated_add(x, x, lambda t: block.layer_scale2(block.mlp(block.norm2(t))), rows_mlp, scale_mlp)


def small_dinov2(registers: bool = False, **overrides):
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=2, **{**CONFIG, **overrides})
        return HFLogits(Dinov2WithRegistersForImageClassification(config))
    return HFLogits(Dinov2ForImageClassification(Dinov2Config(**{**CONFIG, **overrides})))


CASES = [
    FamilyCase("hf_dinov2", cached_maker(small_dinov2), image_input(32), dinov2_reference, (Dinov2Layer,),
               own_rates=True, exact_row_mode=True, drop_slots=("drop_path",), extra=NOT_TRACEABLE),
    FamilyCase("hf_dinov2_registers", cached_maker(lambda: small_dinov2(registers=True)), image_input(32),
               dinov2_reference, (Dinov2WithRegistersLayer,), own_rates=True, exact_row_mode=True,
               drop_slots=("drop_path",), extra=NOT_TRACEABLE),
]


def tokens(batch=4, seed=0):
    return torch.randn(batch, 17, 32, generator=torch.Generator().manual_seed(seed))


def test_two_units_per_layer_at_the_configs_rate():
    model = sd.convert(small_dinov2(drop_path_rate=0.2), seed=0)
    assert sd.survival_probs(model) == [0.8] * 6
    state = get_state(model)
    assert (state.mode, state.scaling) == ("row", "inverted")


def per_sample_mask(batch, seed):
    """An additive [B, 1, N, N] mask hiding a different random set of keys for each sample."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.rand(batch, 1, 1, 17, generator=g) < 0.3
    hidden[..., 0] = False
    return torch.zeros(batch, 1, 17, 17).masked_fill(hidden, -1e4)


@pytest.mark.parametrize("mode", ["row", "subset", "batch"])
def test_a_per_sample_attention_mask_is_gathered_to_the_survivors(mode):
    plain = small_dinov2()
    converted = sd.convert(small_dinov2(), p_last=0.5, rule="uniform", mode=mode, seed=5).train()
    converted.load_state_dict(plain.state_dict())
    layer, ref_layer = converted.model.dinov2.encoder.layer[1], plain.model.dinov2.encoder.layer[1]
    x, mask = tokens(4, 1).requires_grad_(), per_sample_mask(4, 2)
    for _ in range(8):  # steps until one unit of the layer runs on some samples only (or, batch, one drops)
        out = layer(x, mask, output_attentions=False)
        plan = get_state(converted).host_plan
        first, state = layer._sd_index, get_state(converted)
        gates = [(None if plan.rows(l) is None else plan.rows(l).tolist(),
                  state.train_scale(l, plan.counts[l], plan.batch_size)) for l in (first, first + 1)]
        if any(rows is not None and 0 < len(rows) < 4 for rows, _ in gates) or (
                mode == "batch" and any(rows == [] for rows, _ in gates)):
            break
    else:
        pytest.fail("no step kept a unit on some samples")
    expected = dinov2_reference(ref_layer, x, mask, units=gates, output_attentions=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the mask matters: without it the result differs
    assert not torch.allclose(expected, dinov2_reference(ref_layer, x, None, units=gates), atol=1e-4)


def test_an_unknown_argument_with_a_batch_dimension_is_refused_in_subset_mode():
    converted = sd.convert(small_dinov2(), p_last=0.5, rule="uniform", mode="subset", seed=0).train()
    layer = converted.model.dinov2.encoder.layer[0]
    with pytest.raises(ValueError, match="position_data.*batch"):
        layer(tokens(4), None, position_data=torch.zeros(4, 17))
    # without a batch dimension it passes to the branch as it is (the attention ignores what it does not use)
    layer(tokens(4), None, position_data=torch.zeros(1, 17))
    with pytest.raises(ValueError, match="attention_mask: dim 0 is 3"):
        layer(tokens(4), torch.zeros(3, 1, 17, 17))


def test_a_converted_layer_takes_every_argument_transformers_passes():
    converted = sd.convert(small_dinov2(), seed=0).train()
    x = torch.randn(4, 3, 32, 32)
    out = converted.model(pixel_values=x, labels=torch.tensor([0, 1, 2, 3]), output_hidden_states=True,
                          output_attentions=True, num_items_in_batch=torch.tensor(4))
    out.loss.backward()
    assert len(out.hidden_states) == 4


def test_attentions_in_training_come_from_the_units_that_ran():
    """Documented (hf_dinov2's docstring, docs/api.md): a dropped attention unit records no attention
    weights; one kept on K samples records the survivors' [K, heads, N, N] weights; eval records them all."""
    converted = sd.convert(small_dinov2(), p_last=0.5, rule="uniform", mode="row", seed=1).train()
    for step in range(20):
        out = converted.model(pixel_values=torch.randn(4, 3, 32, 32), output_attentions=True)
        plan = get_state(converted).host_plan
        counts = [plan.counts[l] for l in range(0, 6, 2)]  # the attention units
        assert [a.shape[0] for a in out.attentions] == [c for c in counts if c > 0], step
        if 0 in counts and any(0 < c < 4 for c in counts):
            break
    else:
        pytest.fail("no step dropped one attention unit and kept another on some samples")
    converted.eval()
    with torch.no_grad():
        out = converted.model(pixel_values=torch.randn(4, 3, 32, 32), output_attentions=True)
    assert [a.shape for a in out.attentions] == [(4, 2, 17, 17)] * 3


def test_hf_gradient_checkpointing_gives_the_eager_gradients():
    model = sd.convert(small_dinov2(), p_last=0.5, rule="uniform", mode="row", seed=3).train()
    twin = sd.convert(small_dinov2(), p_last=0.5, rule="uniform", mode="row", seed=3).train()
    twin.load_state_dict(model.state_dict())
    model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.dinov2.encoder.layer)
    x = torch.randn(4, 3, 32, 32)
    for m in (model, twin):
        m(x).square().sum().backward()
    assert get_state(model).host_plan.counts == get_state(twin).host_plan.counts
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_save_pretrained_keeps_the_plain_keys(tmp_path):
    model = sd.convert(small_dinov2(), seed=0).model
    model.save_pretrained(tmp_path)
    loaded = Dinov2ForImageClassification.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    sd.convert(loaded, seed=0)  # converted again after loading
    assert len(sd.survival_probs(loaded)) == 6


def test_torch_export_in_eval_is_the_plain_model():
    plain = small_dinov2().eval()
    converted = sd.convert(small_dinov2(), seed=0).eval()
    converted.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(converted, (x,), strict=False).module()
    assert torch.equal(exported(x), plain(x))
