"""torchvision's ImageNet ResNets with ImageNet normalisation inside the model.

Subclassing keeps torchvision's state-dict keys unchanged, so torchvision's released weight files
(a local `.pth`, loaded by the distillation command) load `strict=True`.
"""

from __future__ import annotations

import torch
from torchvision.models import resnet as tv_resnet

from gklcli.models.registry import IMAGENET_STATS, ModelSpec, Stats, normalize_input, register, register_input_norm


class ImageNetResNet(tv_resnet.ResNet):
    def __init__(self, block: type, layers: list[int], num_classes: int, stats: Stats | None = IMAGENET_STATS, **resnet_kw: int):
        super().__init__(block, layers, num_classes=num_classes, **resnet_kw)
        register_input_norm(self, stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(normalize_input(self, x))


# ResNeXt-101 32x4d is the ImageNet-LT teacher of the paper (PaCo's checkpoints); torchvision has
# the architecture (groups=32, width_per_group=4) but ships no weights for it.
for _name, _block, _layers, _kw, _desc in (
    ("resnet18", tv_resnet.BasicBlock, [2, 2, 2, 2], {}, "torchvision resnet18"),
    ("resnet34", tv_resnet.BasicBlock, [3, 4, 6, 3], {}, "torchvision resnet34"),
    ("resnet50", tv_resnet.Bottleneck, [3, 4, 6, 3], {}, "torchvision resnet50"),
    ("resnet101", tv_resnet.Bottleneck, [3, 4, 23, 3], {}, "torchvision resnet101 (ImageNet-LT baseline)"),
    ("resnext50-32x4d", tv_resnet.Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}, "torchvision resnext50_32x4d"),
    ("resnext101-32x4d", tv_resnet.Bottleneck, [3, 4, 23, 3], {"groups": 32, "width_per_group": 4},
     "ResNeXt-101 32x4d (torchvision ResNet class; the ImageNet-LT teacher)"),
):
    register(
        ModelSpec(
            name=_name,
            family="imagenet",
            builder=lambda num_classes, b=_block, layers=_layers, rk=_kw, **kw: ImageNetResNet(b, layers, num_classes, **rk, **kw),
            default_num_classes=1000,
            input_norm="in-model: ImageNet",
            description=_desc,
        )
    )
