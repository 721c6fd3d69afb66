"""USB's ViT-small for 32×32 images (`vit_small_patch2_32`), the backbone of TABLE XXII, on timm's class.

* ``vit-small-patch2-32`` (alias ``vit_small_patch2_32``): timm's `VisionTransformer` with patch 2, image
  32 (16×16 patches + a class token), width 384, depth 12, 6 heads, MLP ratio 4, qkv bias, LayerNorm
  eps 1e-6, class-token pooling; stochastic depth `model.drop_path` (USB: 0.2). Its state dict has the
  152 keys and shapes of USB's model (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.i.*`,
  `norm.*`, `head.*`), so USB's checkpoint loads into it directly.
* Initial weights as USB's (which runs no custom init): PyTorch's default `Linear`/`Conv2d` init, zero
  class token and position embedding. Only the head keeps them when a pretrained file is loaded.
* It takes [0, 1] images and normalises inside with USB's CIFAR-100 statistics (mean (129.3, 124.1,
  112.4)/255, std (68.2, 65.4, 70.4)/255), non-persistent buffers as every gkl model.
* ``gkl-tiny-vit``: the same class at test scale (8×8 images, width 32, depth 2, 2 heads) for the tests
  and `gkl reproduce table22 --smoke`; other image sizes resample its position embedding (timm's
  ``dynamic_img_size``).

`load_usb_pretrained` reads a pretrained file as USB's `load_checkpoint` does: the ``model`` entry, a
leading ``module.`` stripped, keys starting with ``fc``, ``classifier``, ``mlp`` or ``head`` skipped (the
classifier stays freshly initialised), ``pos_embed`` resized bicubically to this model's grid when it
differs, a non-strict load whose missing and unexpected keys are reported.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gklcli.errors import GKLError
from gklcli.models.registry import ModelSpec, Stats, normalize_input, register, register_input_norm

# USB's cifar100 normalisation (semilearn/datasets/cv_datasets/cifar.py)
USB_CIFAR100_STATS: Stats = ((129.3 / 255, 124.1 / 255, 112.4 / 255), (68.2 / 255, 65.4 / 255, 70.4 / 255))
SKIPPED_PREFIXES = ("fc", "classifier", "mlp", "head")  # USB's load_checkpoint never loads these
PRETRAINED_URL = ("https://github.com/microsoft/Semi-supervised-learning/releases/download/v.0.0.0/"
                  "vit_small_patch2_32_mlp_im_1k_32.pth")


@functools.lru_cache(maxsize=None)
def usb_vit_class() -> type:
    """timm's `VisionTransformer` with USB's initial weights and the input normalisation inside (built on
    first use: importing timm takes a second or two, which `gkl --help` and the registry should not pay)."""
    from timm.models.vision_transformer import VisionTransformer

    class UsbViT(VisionTransformer):
        def __init__(self, num_classes: int, drop_path_rate: float, *, img_size: int, embed_dim: int, depth: int,
                     num_heads: int, dynamic_img_size: bool = False) -> None:
            super().__init__(img_size=img_size, patch_size=2, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=4.0, qkv_bias=True, num_classes=num_classes, drop_path_rate=drop_path_rate,
                             dynamic_img_size=dynamic_img_size)
            register_input_norm(self, USB_CIFAR100_STATS)
            usb_init(self)

        def forward(self, x: Tensor) -> Tensor:
            return super().forward(normalize_input(self, x))

    return UsbViT


def _build(num_classes: int, drop_path_rate: float, **shape: Any) -> nn.Module:
    if torch.empty(()).device.type == "meta":  # parameter / FLOP counts: timm calls .item() while it builds
        with torch.device("cpu"):
            return usb_vit_class()(num_classes, drop_path_rate, **shape).to("meta")
    return usb_vit_class()(num_classes, drop_path_rate, **shape)


def usb_init(model: nn.Module) -> None:
    """USB's ViT runs no weight init of its own: PyTorch's defaults for Linear and Conv2d, zero tokens."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.reset_parameters()
    with torch.no_grad():
        model.cls_token.zero_()
        model.pos_embed.zero_()


def vit_small_patch2_32(num_classes: int = 100, drop_path: float = 0.0) -> nn.Module:
    return _build(num_classes, drop_path, img_size=32, embed_dim=384, depth=12, num_heads=6)


def tiny_vit(num_classes: int = 10, drop_path: float = 0.0) -> nn.Module:
    return _build(num_classes, drop_path, img_size=8, embed_dim=32, depth=2, num_heads=2, dynamic_img_size=True)


register(ModelSpec("vit-small-patch2-32", "semi", vit_small_patch2_32, 100, "USB CIFAR-100 mean/std (inside)",
                   aliases=("vit_small_patch2_32",),
                   description="USB's ViT-S/2 for 32×32 images (TABLE XXII), timm's VisionTransformer"))
register(ModelSpec("gkl-tiny-vit", "semi", tiny_vit, 10, "USB CIFAR-100 mean/std (inside)",
                   description="the ViT-S/2 class at test scale: 8×8 images, width 32, depth 2 (tests, smoke runs)"))


# ---------------------------------------------------------------------------------------------------
# USB's pretrained file
# ---------------------------------------------------------------------------------------------------


@dataclass
class PretrainedReport:
    path: str
    loaded: int
    skipped: list[str]
    missing: list[str]
    unexpected: list[str]
    resized_pos_embed: bool

    def line(self) -> str:
        text = (f"model.pretrained: {self.path}: {self.loaded} tensors loaded, {len(self.skipped)} skipped "
                f"({', '.join(sorted({k.split('.')[0] for k in self.skipped})) or 'none'}: USB never loads them)")
        if self.resized_pos_embed:
            text += "; pos_embed resized to this grid"
        text += f"; missing: {', '.join(self.missing) or 'none'}; unexpected: {', '.join(self.unexpected) or 'none'}"
        return text


def resize_pos_embed(posemb: Tensor, target: Tensor, prefix_tokens: int = 1) -> Tensor:
    """A (1, prefix + g², D) position embedding on another grid: the prefix kept, the grid resized
    bicubically (align_corners false), as USB's `resize_pos_embed_vit`."""
    if posemb.shape == target.shape:
        return posemb
    prefix, grid = posemb[:, :prefix_tokens], posemb[0, prefix_tokens:]
    old, new = int(math.isqrt(grid.shape[0])), int(math.isqrt(target.shape[1] - prefix_tokens))
    if old * old != grid.shape[0] or new * new != target.shape[1] - prefix_tokens or posemb.shape[2] != target.shape[2]:
        raise GKLError(f"model.pretrained: pos_embed of shape {tuple(posemb.shape)} cannot be resized to {tuple(target.shape)}")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)


def load_usb_pretrained(model: nn.Module, path: str | Path) -> PretrainedReport:
    """Load USB's pretrained file into `model` (see the module text); a wrong file is one GKLError line."""
    from gklcli.checkpoint import load_file

    raw: Any = load_file(path)
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise GKLError(f"model.pretrained: {path}: expected USB's checkpoint (a dict whose 'model' entry is a state dict)")
    own = model.state_dict()
    kept: dict[str, Tensor] = {}
    skipped: list[str] = []
    resized = False
    for key, value in state.items():
        name = key.removeprefix("module.")
        if name.startswith(SKIPPED_PREFIXES):
            skipped.append(name)
            continue
        if name == "pos_embed" and name in own and value.shape != own[name].shape:
            value, resized = resize_pos_embed(value, own[name]), True
        if name in own and value.shape != own[name].shape:
            raise GKLError(f"model.pretrained: {path}: {name} has shape {tuple(value.shape)}, the model "
                           f"{tuple(own[name].shape)}; is it the file of this architecture?")
        kept[name] = value
    result = model.load_state_dict(kept, strict=False)
    loaded = len(kept) - len(result.unexpected_keys)
    if loaded == 0:
        raise GKLError(f"model.pretrained: {path}: none of its {len(state)} tensors matches this model's keys "
                       f"(e.g. {next(iter(state), 'none')!r})")
    return PretrainedReport(str(path), loaded, skipped, list(result.missing_keys), list(result.unexpected_keys), resized)
