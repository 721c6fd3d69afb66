"""ShuffleNets of the CIFAR KD zoo (mdistiller `ShuffleV1`, `ShuffleV2`), 1×1 stem, no max-pool."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gklcli.models.registry import MDISTILLER_CIFAR100_STATS, ModelSpec, Stats, normalize_input, register
from gklcli.models.registry import register_input_norm


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g·c, H, W] → interleave the g groups channel-wise."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _V1Bottleneck(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        mid = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3, stats: Stats | None = MDISTILLER_CIFAR100_STATS):
        super().__init__()
        register_input_norm(self, stats)
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for s, (planes, n) in enumerate(zip(out_planes, num_blocks)):
            blocks = []
            for i in range(n):
                # The first block of a stage concatenates its pooled input, so it produces the rest.
                blocks.append(_V1Bottleneck(in_planes, planes - (in_planes if i == 0 else 0), 2 if i == 0 else 1, groups))
                in_planes = planes
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(out_planes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(normalize_input(self, x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _V2Basic(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class _V2Down(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), stats: Stats | None = MDISTILLER_CIFAR100_STATS):
        super().__init__()
        register_input_norm(self, stats)
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for s, (channels, n) in enumerate(zip(out_channels[:3], num_blocks)):
            self.add_module(f"layer{s + 1}", nn.Sequential(_V2Down(in_channels, channels), *(_V2Basic(channels) for _ in range(n))))
            in_channels = channels
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(normalize_input(self, x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


register(
    ModelSpec(
        name="shufflenetv1",
        family="kd-cifar",
        builder=lambda num_classes, **kw: ShuffleNetV1(num_classes, **kw),
        default_num_classes=100,
        input_norm="in-model: CIFAR-100 (mdistiller)",
        aliases=("ShuffleV1",),
        description="mdistiller ShuffleV1 (groups 3)",
    )
)
register(
    ModelSpec(
        name="shufflenetv2",
        family="kd-cifar",
        builder=lambda num_classes, **kw: ShuffleNetV2(num_classes, **kw),
        default_num_classes=100,
        input_norm="in-model: CIFAR-100 (mdistiller)",
        aliases=("ShuffleV2",),
        description="mdistiller ShuffleV2 (net size 1)",
    )
)
