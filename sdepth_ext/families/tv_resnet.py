"""torchvision's ResNet blocks, ``BasicBlock`` and ``Bottleneck`` (resnet18..152, wide_resnet, resnext).

The forward reproduced (torchvision ``BasicBlock.forward``)::

    out = bn2(conv2(relu(bn1(conv1(x)))))          # Bottleneck: three conv-bn, relu between
    out = relu(out + (x if downsample is None else downsample(x)))

One unit per block; the gate sits on ``out`` before the add, and ReLU follows the add (fused into the
epilogue). A dropped block is ``relu(downsample(x))``, or ``x`` itself for an identity shortcut (every block
input of a ResNet is a ReLU output: :class:`~sdepth_ext.families.base.ResNetAdapter`). torchvision ResNets
carry no stochastic depth of their own: the paper's defaults apply (p_last 0.5, linear decay, batch mode,
"paper" scaling).
"""

from __future__ import annotations

from torchvision.models.resnet import BasicBlock, Bottleneck

from .base import ACTIVATION_RELU, Defaults, ResNetAdapter, scale_affine
from .registry import register_adapter


@register_adapter(BasicBlock, Bottleneck)
class TorchvisionResNet(ResNetAdapter):
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
    def activation(block):
        return ACTIVATION_RELU

    @staticmethod
    def branch(block, unit):
        if isinstance(block, Bottleneck):
            return ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
        return ("conv1", "bn1", "conv2", "bn2")

    @staticmethod
    def fold_scale(block, unit, scale):
        scale_affine(block.bn3 if isinstance(block, Bottleneck) else block.bn2, scale)
