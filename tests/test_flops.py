"""FLOP accounting of residual units: every ideal ratio in the benchmarks depends on it."""

import pytest
import torch
import torchvision

import sdepth_ext as sd
from sdepth_ext.flops import expected_compute_fraction, unit_macs


def test_resnet50_macs_match_the_published_count():
    # torchvision documents ResNet-50 at 4.09 GFLOPS (multiply-accumulates) for a 224x224 image.
    _, total = unit_macs(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
    assert total / 1e9 == pytest.approx(4.09, abs=0.01)


def test_grouped_convolutions_count_at_their_real_cost():
    # torchvision documents resnext50_32x4d at 4.23 GFLOPS (MACs); ignoring `groups` would count ~2.4x more.
    _, total = unit_macs(torchvision.models.resnext50_32x4d(), torch.randn(1, 3, 224, 224))
    assert total / 1e9 == pytest.approx(4.23, abs=0.01)


def test_attention_matmuls_are_counted():
    # torchvision documents swin_t at 4.49 GFLOPS (MACs); the windowed attention's bmm are part of the units
    model = torchvision.models.swin_t()
    per_unit, total = unit_macs(model, torch.randn(1, 3, 224, 224))
    assert total / 1e9 == pytest.approx(4.49, abs=0.01)
    assert len(per_unit) == 24 and all(m > 0 for m in per_unit)


def test_only_residual_branches_are_skippable():
    """cifar_resnet(20): all MACs minus the units' = stem + classifier + the two 1x1 projection convolutions,
    exactly (counting a projection as skippable would break this)."""
    per_unit, total = unit_macs(sd.cifar_resnet(20), torch.randn(1, 3, 32, 32))
    stem = 32 * 32 * 16 * (3 * 3 * 3)
    classifier = 64 * 10
    projections = 16 * 16 * 32 * 16 + 8 * 8 * 64 * 32  # layer2: 16 -> 32 at 16x16, layer3: 32 -> 64 at 8x8
    assert total - sum(per_unit) == stem + classifier + projections


def test_cifar_resnet110_macs_and_ideal_ratio():
    model = sd.cifar_resnet(110)
    x = torch.randn(1, 3, 32, 32)
    per_unit, total = unit_macs(model, x)
    assert len(per_unit) == 54
    assert total / 1e6 == pytest.approx(253, abs=1)  # ResNet-110's well-known ~253M MACs
    # the 18 blocks of a stage cost the same, except that each stage's first block has a stride
    assert per_unit[1] == per_unit[17] == per_unit[19] == per_unit[37]
    assert expected_compute_fraction(model, x, [1.0] * 54) == 1.0
    # the residual branches are >99% of the MACs, so the ideal ratio is close to sum(p_l) / L
    ideal = expected_compute_fraction(model, x, sd.linear_decay(54, 0.5))
    assert ideal == pytest.approx(sum(sd.linear_decay(54, 0.5)) / 54, abs=0.005)


def test_converted_and_plain_models_count_the_same():
    x = torch.randn(1, 3, 32, 32)
    plain = unit_macs(sd.cifar_resnet(20), x)
    assert unit_macs(sd.convert(sd.cifar_resnet(20), seed=0), x) == plain


def test_fraction_checks_length():
    with pytest.raises(ValueError, match="survival"):
        expected_compute_fraction(sd.cifar_resnet(8), torch.randn(1, 3, 32, 32), [0.5])


def test_no_units_is_an_error():
    with pytest.raises(ValueError, match="model"):
        unit_macs(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)), torch.randn(1, 3, 8, 8))
