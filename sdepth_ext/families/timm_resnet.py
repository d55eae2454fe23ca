"""timm's ResNet blocks, ``timm.models.resnet.BasicBlock`` / ``Bottleneck`` (resnet*, resnet*d, seresnet*,
resnext*, wide_resnet*: SE / attention / anti-aliasing layers sit inside the branch).

The forward reproduced (timm ``Bottleneck.forward``; BasicBlock has two convolutions)::

    x = bn3(conv3(aa(act2(drop_block(bn2(conv2(act1(bn1(conv1(x)))))))))
    x = se(x)                     # attention / squeeze-excitation, when present
    x = drop_path(x)              # the model's own gate: DropPath, or None at drop_path_rate 0
    out = act3(x + (downsample(shortcut) or shortcut))

One unit per block; the gate replaces ``drop_path``; the block's last activation module follows the add
(fused into the epilogue when it is a ReLU). The branch is a chain of the block's modules, which the adapter
names in forward order. A dropped unit is ``act(downsample(x))``, or ``x`` itself for an identity shortcut
when the activation is a ReLU (the block input is a ReLU output, as in torchvision's ResNets:
:class:`~sdepth_ext.families.base.ResNetAdapter`); any other activation is applied to the shortcut as the
original would. Defaults: timm's per-block ``drop_path_rate`` schedule (a block without DropPath never
drops), row mode, and DropPath's ``scale_by_keep`` ("inverted", or "none" when False).
"""

from __future__ import annotations

from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from ._timm_sd import TimmAdapter
from .base import ACTIVATION_RELU, ResNetAdapter, scale_affine
from .registry import register_adapter


@register_adapter(BasicBlock, Bottleneck)
class TimmResNet(ResNetAdapter, TimmAdapter):
    family = "timm ResNet"

    @staticmethod
    def activation(block):
        act = block.act3 if isinstance(block, Bottleneck) else block.act2
        return ACTIVATION_RELU if type(act) is nn.ReLU else act

    @staticmethod
    def branch(block, unit):
        if isinstance(block, Bottleneck):
            names = ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3")
        else:
            names = ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2")
        return names + (("se",) if block.se is not None else ())

    @classmethod
    def fold_scale(cls, block, unit, scale):
        if block.se is not None:  # x * gate(x): the gate would see the scaled x
            return super().fold_scale(block, unit, scale)
        scale_affine(block.bn3 if isinstance(block, Bottleneck) else block.bn2, scale)
