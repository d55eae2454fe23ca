import pytest
import torch
import torchvision

import sdepth_ext as sd
from sdepth_ext.convert import cifar_resnet
from sdepth_ext.flops import expected_compute_fraction, residual_macs


def test_resnet50_macs_match_the_published_count():
    # torchvision documents ResNet-50 at 4.09 GFLOPS (multiply-accumulates) for a 224x224 image.
    _, total = residual_macs(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
    assert total / 1e9 == pytest.approx(4.09, abs=0.01)


def test_cifar_resnet110_macs_and_ideal_ratio():
    model = cifar_resnet(110)
    x = torch.randn(1, 3, 32, 32)
    per_block, total = residual_macs(model, x)
    assert len(per_block) == 54
    assert total / 1e6 == pytest.approx(253, abs=1)  # ResNet-110's well-known ~253M MACs
    # the 18 blocks of a stage cost the same, except that each stage's first block has a stride
    assert per_block[1] == per_block[17] == per_block[19] * 1 == per_block[37]
    assert expected_compute_fraction(model, x, [1.0] * 54) == 1.0
    # the residual branches are >99% of the MACs, so the ideal ratio is close to sum(p_l) / L
    ideal = expected_compute_fraction(model, x, sd.linear_decay(54, 0.5))
    assert ideal == pytest.approx(sum(sd.linear_decay(54, 0.5)) / 54, abs=0.005)


def test_fraction_checks_length():
    with pytest.raises(ValueError, match="survival"):
        expected_compute_fraction(cifar_resnet(8), torch.randn(1, 3, 32, 32), [0.5])


def test_no_blocks_is_an_error():
    with pytest.raises(ValueError, match="model"):
        residual_macs(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)), torch.randn(1, 3, 8, 8))
