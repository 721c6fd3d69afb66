"""VGG-BN of the CIFAR KD zoo (vgg8 … vgg19), mdistiller layout: five conv blocks, a linear head.

Keys `block{0..4}.{conv,bn index}` and `classifier`; each block ends with BN (its ReLU is applied
outside), and on 32×32 inputs there is no pooling between block3 and block4 (mdistiller pools there
only for 64×64 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gklcli.models.registry import MDISTILLER_CIFAR100_STATS, ModelSpec, Stats, normalize_input, register
from gklcli.models.registry import register_input_norm

_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int, stats: Stats | None = MDISTILLER_CIFAR100_STATS):
        super().__init__()
        register_input_norm(self, stats)
        in_channels = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"block{i}", _block(widths, in_channels))
            in_channels = widths[-1]
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        out = normalize_input(self, x)
        for i in range(4):
            out = F.relu(getattr(self, f"block{i}")(out))
            if i < 3 or size == 64:
                out = F.max_pool2d(out, 2)
        out = F.relu(self.block4(out))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


for _name, _cfg in _CFG.items():
    register(
        ModelSpec(
            name=_name,
            family="kd-cifar",
            builder=lambda num_classes, c=_cfg, **kw: VGG(c, num_classes, **kw),
            default_num_classes=100,
            input_norm="in-model: CIFAR-100 (mdistiller)",
            description=f"mdistiller {_name}_bn",
        )
    )
