"""The paper's CIFAR ResNet, built from torchvision ``BasicBlock`` s: ``cifar_resnet(depth)``."""

# No ``from __future__ import annotations`` here: torch.fx copies a forward's annotations into the code it
# generates, and a string annotation ("torch.Tensor") there is a type TorchScript cannot resolve, so a traced
# CifarResNet would not script.
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

__all__ = ["CifarResNet", "cifar_resnet"]


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n+2) from torchvision ``BasicBlock``: the network of the paper.

    Stem 3x3 conv (16) + BN + ReLU; three stages of n blocks with 16/32/64 channels (stages 2 and 3 start with
    stride 2 and a 1x1-conv + BN projection shortcut); global average pool; linear classifier.
    """

    def __init__(self, depth: int = 110, num_classes: int = 10):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be an int of the form 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), "
                             f"got {depth!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._make_stage(16, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(32, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(64, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        # torchvision's ResNet initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers.extend(BasicBlock(planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int = 110, num_classes: int = 10) -> CifarResNet:
    """The paper's CIFAR ResNet: ``(depth - 2) / 6`` torchvision BasicBlocks per stage (depth 110: 54 blocks).

    ``depth`` must be 6n+2 with n >= 1 (else ``ValueError``). Kaiming-normal (fan_out) conv init, BN weight 1
    and bias 0, as in torchvision's ResNets.
    """
    return CifarResNet(depth=depth, num_classes=num_classes)

