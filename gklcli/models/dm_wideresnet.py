"""DeepMind-style WideResNet with SiLU (Swish) and in-model normalisation, as used by DM-AT.

Keys (`init_conv`, `layer.G.block.N.{batchnorm_0,conv_0,batchnorm_1,conv_1,shortcut}`, `batchnorm`,
`logits`) match RobustBench's `DMWideResNet(activation_fn=nn.SiLU, mean=..., std=...)`, the class of
the `Cui2023Decoupled_WRN-28-10` entries; mean/std are non-persistent buffers there and here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gklcli.models.registry import CIFAR10_STATS, CIFAR100_STATS, ModelSpec, Stats, normalize_input, register
from gklcli.models.registry import register_input_norm

# DM-AT trains with TensorFlow's BN decay 0.99, i.e. PyTorch momentum 0.01 (not in the state dict).
BN_MOMENTUM = 0.01


class _Block(nn.Module):
    """Pre-activation block with TF-"SAME" padding: (1,1,1,1) at stride 1, (0,1,0,1) at stride 2."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, act: type[nn.Module]):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=BN_MOMENTUM)
        self.act_0 = act()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=BN_MOMENTUM)
        self.act_1 = act()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.shortcut = None if in_planes == out_planes else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        self.pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act_0(self.batchnorm_0(x))
        out = self.conv_0(F.pad(act, self.pad))
        out = self.conv_1(self.act_1(self.batchnorm_1(out)))
        return out + (x if self.shortcut is None else self.shortcut(act))


class _Group(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.block = nn.Sequential(
            *(_Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, act) for i in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """WRN-depth-width, normalising inside with `stats` (CIFAR-10/100 constants of RobustBench)."""

    def __init__(self, depth: int, width: int, num_classes: int, stats: Stats, act: type[nn.Module] = nn.SiLU):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        register_input_norm(self, stats)
        self.init_conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(
            _Group(n, widths[0], widths[1], 1, act),
            _Group(n, widths[1], widths[2], 2, act),
            _Group(n, widths[2], widths[3], 2, act),
        )
        self.batchnorm = nn.BatchNorm2d(widths[3], momentum=BN_MOMENTUM)
        self.act = act()
        self.logits = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(self.init_conv(normalize_input(self, x)))
        out = self.act(self.batchnorm(out))
        return self.logits(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _build(depth: int, width: int):
    def build(num_classes: int, stats: Stats | None = None) -> DMWideResNet:
        # The CIFAR-100 constants for 100 classes, CIFAR-10's otherwise (as the DKL eval code does).
        default = CIFAR100_STATS if num_classes == 100 else CIFAR10_STATS
        return DMWideResNet(depth, width, num_classes, stats or default)

    return build


for _d, _w in ((28, 10), (70, 16)):
    register(
        ModelSpec(
            name=f"wrn-{_d}-{_w}-swish",
            family="at",
            builder=_build(_d, _w),
            default_num_classes=10,
            input_norm="in-model: CIFAR-10/100 (RobustBench)",
            robustbench=f"DMWideResNet(depth={_d}, width={_w}, activation_fn=nn.SiLU, mean, std)",
            description=f"DM-AT WideResNet-{_d}-{_w}, SiLU, BN momentum 0.01",
        )
    )
