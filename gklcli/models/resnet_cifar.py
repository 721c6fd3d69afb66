"""CIFAR ResNets with a 3×3 stem and no max-pool (the kuangliu layout).

* `resnet-18`: keys `conv1, bn1, layer1.0…, linear` of AutoAttack's example model and RobustBench's
  `ResNet18`; raw [0,1] input.
* `preact-resnet-18`: the PreAct ResNet-18 of robust-overfitting/AWP (final BN+ReLU, shortcut on the
  pre-activated input) = RobustBench `PreActResNet(PreActBlock, [2,2,2,2], bn_before_fc=True,
  out_shortcut=True)`; raw [0,1] input.
* `resnet50-cifar`: mdistiller's CIFAR-100 `ResNet50` teacher (same layout, bottleneck blocks),
  normalising inside with mdistiller's CIFAR-100 statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gklcli.models.registry import MDISTILLER_CIFAR100_STATS, ModelSpec, Stats, normalize_input, register
from gklcli.models.registry import register_input_norm


def _projection(in_planes: int, out_planes: int, stride: int, bn: bool) -> nn.Sequential:
    """1×1 shortcut; an empty Sequential (identity, no keys) when the shape is unchanged."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    layers: list[nn.Module] = [nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(out_planes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride, bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _projection(in_planes, planes * 4, stride, bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = _projection(in_planes, planes, stride, bn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        shortcut = self.shortcut(act) if len(self.shortcut) else x
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + shortcut


class CifarResNet(nn.Module):
    """Four stages of 64/128/256/512 planes; `preact` adds the final BN+ReLU (named `bn`)."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int, stats: Stats | None = None):
        super().__init__()
        register_input_norm(self, stats)
        self.preact = block is PreActBlock
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        if not self.preact:
            self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, planes, (1 if i == 0 else 2) if j == 0 else 1))
                in_planes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        if self.preact:
            self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(normalize_input(self, x))
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


register(
    ModelSpec(
        name="resnet-18",
        family="at",
        builder=lambda num_classes: CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes),
        default_num_classes=10,
        input_norm="raw [0,1]",
        robustbench="ResNet18() (also AutoAttack's example model)",
        description="CIFAR ResNet-18 (kuangliu layout)",
    )
)
register(
    ModelSpec(
        name="preact-resnet-18",
        family="at",
        builder=lambda num_classes: CifarResNet(PreActBlock, [2, 2, 2, 2], num_classes),
        default_num_classes=10,
        input_norm="raw [0,1]",
        robustbench="PreActResNet(PreActBlock, [2,2,2,2], bn_before_fc=True, out_shortcut=True)",
        description="PreAct ResNet-18 of robust-overfitting/AWP",
    )
)
register(
    ModelSpec(
        name="resnet50-cifar",
        family="kd-cifar",
        builder=lambda num_classes, stats=MDISTILLER_CIFAR100_STATS: CifarResNet(Bottleneck, [3, 4, 6, 3], num_classes, stats),
        default_num_classes=100,
        input_norm="in-model: CIFAR-100 (mdistiller)",
        description="mdistiller CIFAR ResNet50 (teacher of Table XVIII)",
    )
)
