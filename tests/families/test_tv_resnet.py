"""torchvision ResNet blocks (BasicBlock, Bottleneck): fixtures for the shared suite, and family specifics.

The detailed ResNet tests (every torchvision architecture, the single-survivor BatchNorm case, the paper's
defaults against a purely functional reference) are in tests/test_convert.py.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import sdepth_ext as sd
from sdepth_ext.state import get_state

from .common import FamilyCase, cached_maker, gated_add, image_input


def resnet_reference(block, x, units):
    """relu(shortcut + scale * f(x)) with f run on the survivors only; relu(shortcut) for dropped samples."""
    (rows, scale), = units

    def branch(t):
        out = block.relu(block.bn1(block.conv1(t)))
        if isinstance(block, Bottleneck):
            out = block.relu(block.bn2(block.conv2(out)))
            return block.bn3(block.conv3(out))
        return block.bn2(block.conv2(out))

    shortcut = x if block.downsample is None else block.downsample(x)
    return torch.relu(gated_add(shortcut, x, branch, rows, scale))


def custom_model(first_block=BasicBlock):
    """A user model built from torchvision blocks: ``first_block`` (BasicBlock or a subclass of it), a
    strided projection BasicBlock, a Bottleneck."""
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        first_block(8, 8), BasicBlock(8, 16, stride=2, downsample=down), Bottleneck(16, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


CASES = [
    FamilyCase("cifar_resnet20", cached_maker(lambda: sd.cifar_resnet(20, num_classes=5)), image_input(16),
               resnet_reference, (BasicBlock,), own_rates=False, exact_row_mode=False),
    FamilyCase("resnet_custom", cached_maker(custom_model), image_input(16), resnet_reference,
               (BasicBlock, Bottleneck), own_rates=False, exact_row_mode=False),
]


def test_resnet_defaults_are_the_papers():
    model = sd.convert(sd.cifar_resnet(20), seed=0)
    assert sd.survival_probs(model) == sd.linear_decay(9, 0.5)
    state = get_state(model)
    assert (state.mode, state.scaling) == ("batch", "paper")


def test_a_dropped_projection_unit_is_relu_of_its_projection():
    """Forced, not left to a seed: survival 0 for every unit, so the projection blocks are dropped too."""
    model = CASES[1].make()
    sd.convert(model, p_last=0.0, rule="uniform", seed=0).train()
    x = CASES[1].input(4, 0)
    out = model[4](torch.relu(model[3](model[2](model[1](model[0](x))))))
    expected = torch.relu(model[4].downsample(model[3](model[2](model[1](model[0](x))))))
    torch.testing.assert_close(out, expected)
