"""MobileNets of the KD tables.

* `mobilenetv2`: mdistiller's CIFAR `mobile_half` (MobileNetV2, expansion 6, width 0.5); keys
  `conv1, blocks.S.N.conv.{0,1,3,4,6,7}, conv2, classifier.0`.
* `mobilenetv1`: the ImageNet MobileNet(-V1) student of the DKD/ReviewKD code the paper reuses;
  keys `model.{0..13}`, `fc`. ImageNet normalisation inside the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gklcli.models.registry import IMAGENET_STATS, MDISTILLER_CIFAR100_STATS, ModelSpec, Stats, normalize_input
from gklcli.models.registry import register, register_input_norm


def _conv_bn(inp: int, oup: int, kernel: int, stride: int, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(oup)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class _InvertedResidual(nn.Module):
    """Pointwise expand (always present, even at ratio 1, as in mdistiller), depthwise, linear project."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.residual = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            *_conv_bn(inp, hidden, 1, 1),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            *_conv_bn(hidden, oup, 1, 1, relu=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 with expansion `t` and width multiplier `width`."""

    SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]

    def __init__(self, num_classes: int, t: int = 6, width: float = 0.5, stats: Stats | None = MDISTILLER_CIFAR100_STATS):
        super().__init__()
        register_input_norm(self, stats)
        channels = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn(3, channels, 3, 2))
        self.blocks = nn.ModuleList()
        for expand, c, n, s in self.SETTING:
            out = int(c * width)
            layers = []
            for i in range(n):
                layers.append(_InvertedResidual(channels, out, s if i == 0 else 1, expand or t))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn(channels, last, 1, 1))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(normalize_input(self, x))
        for block in self.blocks:
            out = block(out)
        out = self.conv2(out)
        # mdistiller: AvgPool2d(input_size // 16, ceil_mode=True) = a global average on CIFAR inputs.
        return self.classifier(out.mean(dim=(2, 3)))


class MobileNetV1(nn.Module):
    """ImageNet MobileNet-V1 (width 1.0): a standard conv then 13 depthwise-separable blocks."""

    PLAN = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + [(512, 512, 1)] * 5 + [
        (512, 1024, 2),
        (1024, 1024, 1),
    ]

    def __init__(self, num_classes: int, stats: Stats | None = IMAGENET_STATS):
        super().__init__()
        register_input_norm(self, stats)
        layers = [nn.Sequential(*_conv_bn(3, 32, 3, 2))]
        for inp, oup, stride in self.PLAN:
            layers.append(nn.Sequential(*_conv_bn(inp, inp, 3, stride, groups=inp), *_conv_bn(inp, oup, 1, 1)))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(normalize_input(self, x))
        return self.fc(out.mean(dim=(2, 3)))


register(
    ModelSpec(
        name="mobilenetv2",
        family="kd-cifar",
        builder=lambda num_classes, **kw: MobileNetV2(num_classes, **kw),
        default_num_classes=100,
        input_norm="in-model: CIFAR-100 (mdistiller)",
        aliases=("MobileNetV2", "mobile_half"),
        description="mdistiller mobile_half (MobileNetV2 ×0.5)",
    )
)
register(
    ModelSpec(
        name="mobilenetv1",
        family="imagenet",
        builder=lambda num_classes, **kw: MobileNetV1(num_classes, **kw),
        default_num_classes=1000,
        input_norm="in-model: ImageNet",
        aliases=("MobileNetV1",),
        description="MobileNet-V1, the paper's ImageNet 'MobileNet' student",
    )
)
