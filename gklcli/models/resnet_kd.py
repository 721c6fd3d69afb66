"""The CIFAR ResNets of the KD zoo (resnet8 … resnet110, resnet8x4, resnet32x4), mdistiller layout.

Three stages, 6n+2 layers; keys `conv1, bn1, layerS.N.{conv1,bn1,conv2,bn2,downsample.0/1}, fc`, so
mdistiller's released teachers (`{"model": state_dict}`) load `strict=True`. Normalisation inside the
model uses mdistiller's CIFAR-100 statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gklcli.models.registry import MDISTILLER_CIFAR100_STATS, ModelSpec, Stats, normalize_input, register
from gklcli.models.registry import register_input_norm


class _Block(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class KDResNet(nn.Module):
    """ResNet-depth with stage widths `filters` = [stem, s1, s2, s3]."""

    def __init__(self, depth: int, filters: list[int], num_classes: int, stats: Stats | None = MDISTILLER_CIFAR100_STATS):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        register_input_norm(self, stats)
        self.conv1 = nn.Conv2d(3, filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        in_planes = filters[0]
        for i, planes in enumerate(filters[1:]):
            stride = 1 if i == 0 else 2
            blocks = [_Block(in_planes if j == 0 else planes, planes, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_planes = planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(normalize_input(self, x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


_SMALL = [16, 16, 32, 64]
_X4 = [32, 64, 128, 256]
for _name, _depth, _filters in (
    ("resnet8", 8, _SMALL),
    ("resnet14", 14, _SMALL),
    ("resnet20", 20, _SMALL),
    ("resnet32", 32, _SMALL),
    ("resnet44", 44, _SMALL),
    ("resnet56", 56, _SMALL),
    ("resnet110", 110, _SMALL),
    ("resnet8x4", 8, _X4),
    ("resnet32x4", 32, _X4),
):
    register(
        ModelSpec(
            name=_name,
            family="kd-cifar",
            builder=lambda num_classes, d=_depth, f=_filters, **kw: KDResNet(d, f, num_classes, **kw),
            default_num_classes=100,
            input_norm="in-model: CIFAR-100 (mdistiller)",
            description=f"mdistiller {_name}",
        )
    )
