"""torchvision's ResNet blocks, ``BasicBlock`` and ``Bottleneck`` (resnet18..152, wide_resnet, resnext).

The forward reproduced (torchvision ``BasicBlock.forward``)::

    out = bn2(conv2(relu(bn1(conv1(x)))))          # Bottleneck: three conv-bn, relu between
    out = relu(out + (x if downsample is None else downsample(x)))

One unit per block; the gate sits on ``out`` before the add, and ReLU follows the add (fused into the
epilogue). A dropped block is ``relu(downsample(x))``, or ``x`` itself for an identity shortcut: every block
input of a ResNet is a ReLU output (stem ReLU/max-pool, or the previous block's epilogue), so ``relu(x) ==
x`` and no kernel runs. A hand-made model that feeds a block negative values would see ``x``, not
``relu(x)``, from a dropped identity block (documented in docs/semantics.md). torchvision ResNets carry no
stochastic depth of their own: the paper's defaults apply (p_last 0.5, linear decay, batch mode, "paper"
scaling).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .base import ACTIVATION_RELU, Defaults, UnitAdapter, scale_affine
from .registry import register_adapter


@register_adapter(BasicBlock, Bottleneck)
class TorchvisionResNet(UnitAdapter):
    family = "torchvision ResNet"
    defaults = Defaults(0.5, "linear", "batch", "paper")

    @staticmethod
    def residual(block, unit, x):
        out = block.relu(block.bn1(block.conv1(x)))
        if isinstance(block, Bottleneck):
            out = block.relu(block.bn2(block.conv2(out)))
            return block.bn3(block.conv3(out))
        return block.bn2(block.conv2(out))

    @staticmethod
    def shortcut(block, unit, x):
        return x if block.downsample is None else block.downsample(x)

    @staticmethod
    def has_projection(block, unit):
        return block.downsample is not None

    @staticmethod
    def activation(block):
        return ACTIVATION_RELU

    @staticmethod
    def branch(block, unit):
        if isinstance(block, Bottleneck):
            return ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
        return ("conv1", "bn1", "conv2", "bn2")

    @staticmethod
    def dropped(block, unit, x):
        if block.downsample is None:
            return x  # relu(x) == x: the input is a ReLU output (module docstring)
        return torch.relu(block.downsample(x))

    @staticmethod
    def fold_scale(block, unit, scale):
        scale_affine(block.bn3 if isinstance(block, Bottleneck) else block.bn2, scale)

    @staticmethod
    def removed(block):
        return nn.Identity() if block.downsample is None else nn.Sequential(block.downsample, nn.ReLU())
