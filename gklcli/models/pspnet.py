"""PSPNet with a dilated deep-stem ResNet, laid out as APD's (`dvlab-research/APD`, model/pspnet.py) for TABLE XXIII.

The module names are APD's (`layer0` … `layer4`, `ppm.features.i`, `ppm.merge`, `cls`, `aux`), so APD's
released weights — the PSPNet-R101 teacher `pspnet101_fc_ade20k.pth`, its distilled students — load
strictly once DataParallel's `module.` prefix is gone. What APD's code fixes and gkl keeps:

* the stem is three 3×3 convolutions (64, 64, 128 channels; "deep base"), then a 3×3 max-pool — the
  CSAIL ImageNet ResNets (`resnet18-imagenet.pth`, …) APD initialises from;
* output stride 8: layer3 and layer4 run at stride 1 with dilation 2 and 4 on the block's stride
  convolution (`conv2` of a bottleneck, torchvision's placement); in a BasicBlock only `conv1` is dilated,
  `conv2` keeps dilation 1 — APD's `key_conv = 'conv1'` for ResNet-18, kept as it is what was trained;
* the pyramid pooling module over bins 1, 2, 3, 6 with 1×1 reductions to C/4, bilinear upsampling with
  `align_corners=True`, a 3×3 merge to 512 channels with Dropout2d(0.1), a 1×1 classifier `cls`;
* an auxiliary head on layer3 (3×3 → 256, Dropout2d(0.1), 1×1), weighted 0.4 in training.

In training mode `forward` returns the 1/8-resolution logits, the auxiliary logits, the 512-channel
features APD distils (the PPM output) and those features through the student's APD adapter when the model
has one (`adapter_dim` > 0: APD's `StuTransConv`, trained with the student at the head's lr). In eval mode
it returns logits upsampled to the input size. Images come in [0, 1]; ImageNet normalisation is inside.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from gklcli.models.registry import IMAGENET_STATS, ModelSpec, normalize_input, register, register_input_norm

BINS = (1, 2, 3, 6)
ADE20K_CLASSES = 150
# the ImageNet initialisation APD's resnet.py reads from ./initmodel (CSAIL's deep-stem ResNets)
CSAIL_URL = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/{name}-imagenet.pth"
# CSAIL/APD stem names → this model's `layer0` indices (conv, bn, relu, conv, bn, relu, conv, bn, relu, maxpool)
STEM_KEYS = {"conv1": "layer0.0", "bn1": "layer0.1", "conv2": "layer0.3", "bn2": "layer0.4", "conv3": "layer0.6", "bn3": "layer0.7"}


class SegOutput(NamedTuple):
    """A training forward: everything at the feature resolution (1/8 of the input)."""

    logits: Tensor
    aux: Optional[Tensor]  # None when not asked for (a teacher)
    features: Tensor  # the PPM output APD's prototype terms compare
    adapted: Optional[Tensor]  # `features` through the student's adapter (None without one)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _layer(block: type, inplanes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    """torchvision's `_make_layer` (a 1×1 strided downsample where the shape changes)."""
    down = None
    out = planes * block.expansion
    if stride != 1 or inplanes != out:
        down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, stride, down)] + [block(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out


def _dilate(layer: nn.Sequential, dilation: int, key_conv: str) -> None:
    """APD's output-stride-8 surgery: the block's stride convolution at stride 1 and `dilation`."""
    for name, m in layer.named_modules():
        if name.endswith(key_conv) and isinstance(m, nn.Conv2d):
            m.dilation, m.padding, m.stride = (dilation, dilation), (dilation, dilation), (1, 1)
        elif name.endswith("downsample.0"):
            m.stride = (1, 1)


class PPM(nn.Module):
    """Pyramid pooling: the input beside its pooled-and-upsampled reductions, merged by a 3×3 conv."""

    def __init__(self, in_dim: int, bins: Sequence[int], merge_dim: int):
        super().__init__()
        reduction = in_dim // len(bins)
        self.features = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(in_dim, reduction, 1)) for b in bins
        )
        self.merge = nn.Sequential(*conv_bn_relu(in_dim + reduction * len(bins), merge_dim, 3), nn.Dropout2d(0.1))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        parts = [x] + [F.interpolate(f(x), size, mode="bilinear", align_corners=True) for f in self.features]
        return self.merge(torch.cat(parts, 1))


class PSPNet(nn.Module):
    """APD's PSPNet (see the module docstring); `adapter_dim` > 0 adds the student's APD adapter."""

    def __init__(self, block: type, depths: Sequence[int], *, num_classes: int, stem: Sequence[int] = (64, 64, 128),
                 width: int = 64, merge_dim: int = 512, aux_dim: int = 256, adapter_dim: int = 0):
        super().__init__()
        register_input_norm(self, IMAGENET_STATS)
        s1, s2, s3 = stem
        self.layer0 = nn.Sequential(*conv_bn_relu(3, s1, 3, 2), *conv_bn_relu(s1, s2, 3), *conv_bn_relu(s2, s3, 3),
                                    nn.MaxPool2d(3, 2, 1))
        inplanes = s3
        layers = []
        for i, (depth, stride) in enumerate(zip(depths, (1, 2, 2, 2))):
            layer, inplanes = _layer(block, inplanes, width * 2 ** i, depth, stride)
            layers.append(layer)
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        key_conv = "conv1" if block is BasicBlock else "conv2"
        _dilate(self.layer3, 2, key_conv)
        _dilate(self.layer4, 4, key_conv)
        feature_dim = inplanes
        self.ppm = PPM(feature_dim, BINS, merge_dim)
        self.cls = nn.Sequential(nn.Conv2d(merge_dim, num_classes, 1))
        self.aux = nn.Sequential(*conv_bn_relu(feature_dim // 2, aux_dim, 3), nn.Dropout2d(0.1), nn.Conv2d(aux_dim, num_classes, 1))
        self.kd_adapter = (nn.Sequential(nn.Conv2d(merge_dim, adapter_dim, 1), nn.ReLU(inplace=True),
                                         nn.Conv2d(adapter_dim, merge_dim, 1)) if adapter_dim else None)
        self.num_classes, self.merge_dim = num_classes, merge_dim

    # the head's parameters train at `optim.head_lr_scale` × lr (APD: 10×), the backbone's at lr
    head_modules = ("ppm", "cls", "aux", "kd_adapter")

    def parts(self, x: Tensor, aux: bool = True) -> SegOutput:
        """Everything at 1/8 resolution, in either mode (a frozen teacher calls this in eval mode)."""
        x = self.layer2(self.layer1(self.layer0(normalize_input(self, x))))
        mid = self.layer3(x)
        features = self.ppm(self.layer4(mid))
        adapted = self.kd_adapter(features) if self.kd_adapter is not None and self.training else None
        return SegOutput(self.cls(features), self.aux(mid) if aux else None, features, adapted)

    def forward(self, x: Tensor) -> SegOutput | Tensor:
        if self.training:
            return self.parts(x)
        return F.interpolate(self.parts(x, aux=False).logits, x.shape[2:], mode="bilinear", align_corners=True)


def _builder(block: type, depths: Sequence[int], **fixed: int):
    def build(num_classes: int = ADE20K_CLASSES, adapter_dim: int = 0) -> PSPNet:
        return PSPNet(block, depths, num_classes=num_classes, adapter_dim=adapter_dim, **fixed)

    return build


ARCHS = {
    "pspnet-r18": ("resnet18", _builder(BasicBlock, (2, 2, 2, 2))),
    "pspnet-r50": ("resnet50", _builder(Bottleneck, (3, 4, 6, 3))),
    "pspnet-r101": ("resnet101", _builder(Bottleneck, (3, 4, 23, 3))),
}
for _name, (_backbone, _build) in ARCHS.items():
    register(ModelSpec(_name, "segmentation", _build, ADE20K_CLASSES, "ImageNet mean/std (inside)",
                       description=f"APD's PSPNet on a dilated deep-stem {_backbone} (output stride 8; TABLE XXIII)"))
register(ModelSpec("pspnet-tiny", "segmentation",
                   _builder(BasicBlock, (1, 1, 1, 1), stem=(8, 8, 16), width=8, merge_dim=32, aux_dim=16), ADE20K_CLASSES,
                   "ImageNet mean/std (inside)", description="the PSPNet-R18 layout at test scale (widths /8; tests, smoke runs)"))


def backbone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An ImageNet ResNet state dict (CSAIL/APD deep-stem names, `module.` stripped) in this model's names;
    the classifier (`fc`) is dropped."""
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "fc":
            continue
        out[f"{STEM_KEYS[head]}.{rest}" if head in STEM_KEYS else key] = value
    return out
