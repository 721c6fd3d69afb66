"""Pre-activation WideResNet of TRADES/AWP (ReLU), used for AT (WRN-34-10 …) and the KD zoo (WRN-40-2 …).

State-dict keys (`conv1`, `block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc`)
match RobustBench's `WideResNet(sub_block1=False)` and mdistiller's `wrn_*`, so checkpoints of both
load `strict=True`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gklcli.models.registry import MDISTILLER_CIFAR100_STATS, ModelSpec, Stats, normalize_input, register
from gklcli.models.registry import register_input_norm


class _Block(nn.Module):
    """BN-ReLU-conv ×2. When the width changes, the shortcut convolves the *activated* input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = None if in_planes == out_planes else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class _Group(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *(_Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate) for i in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width for 32×32 inputs; `stats` adds in-model normalisation (None: raw [0,1])."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0, stats: Stats | None = None):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        register_input_norm(self, stats)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = _Group(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = _Group(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = _Group(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He-normal (fan-out) convolutions, unit BN, zero classifier bias, as TRADES initialises."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(normalize_input(self, x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def _at(depth: int, width: int) -> None:
    name = f"wrn-{depth}-{width}"
    register(
        ModelSpec(
            name=name,
            family="at",
            builder=lambda num_classes, **kw: WideResNet(depth, width, num_classes, **kw),
            default_num_classes=10,
            input_norm="raw [0,1]",
            robustbench=f"WideResNet(depth={depth}, widen_factor={width}, sub_block1=False)",
            description=f"TRADES/AWP pre-activation WideResNet-{depth}-{width}, ReLU",
        )
    )


def _kd(depth: int, width: int) -> None:
    register(
        ModelSpec(
            name=f"wrn-{depth}-{width}",
            family="kd-cifar",
            builder=lambda num_classes, stats=MDISTILLER_CIFAR100_STATS, **kw: WideResNet(depth, width, num_classes, stats=stats, **kw),
            default_num_classes=100,
            input_norm="in-model: CIFAR-100 (mdistiller)",
            description=f"mdistiller wrn_{depth}_{width}",
        )
    )


for _d, _w in ((34, 10), (34, 20), (28, 10)):
    _at(_d, _w)
for _d, _w in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _kd(_d, _w)
