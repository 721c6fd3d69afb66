"""torchvision's ImageNet ResNets with ImageNet normalisation inside the model.

Subclassing keeps torchvision's state-dict keys unchanged, so torchvision's released weight files
(a local `.pth`, loaded by the distillation command) load `strict=True`.
"""

from __future__ import annotations

import torch
from torchvision.models import resnet as tv_resnet

from gklcli.models.registry import IMAGENET_STATS, ModelSpec, Stats, normalize_input, register, register_input_norm


class ImageNetResNet(tv_resnet.ResNet):
    def __init__(self, block: type, layers: list[int], num_classes: int, stats: Stats | None = IMAGENET_STATS):
        super().__init__(block, layers, num_classes=num_classes)
        register_input_norm(self, stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(normalize_input(self, x))


for _name, _block, _layers in (
    ("resnet18", tv_resnet.BasicBlock, [2, 2, 2, 2]),
    ("resnet34", tv_resnet.BasicBlock, [3, 4, 6, 3]),
    ("resnet50", tv_resnet.Bottleneck, [3, 4, 6, 3]),
):
    register(
        ModelSpec(
            name=_name,
            family="imagenet",
            builder=lambda num_classes, b=_block, layers=_layers, **kw: ImageNetResNet(b, layers, num_classes, **kw),
            default_num_classes=1000,
            input_norm="in-model: ImageNet",
            description=f"torchvision {_name}",
        )
    )
