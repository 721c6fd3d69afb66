"""Segmentation evaluation: APD's single-scale sliding-window inference and mIoU from a confusion matrix.

APD's `tool/test.py` (its ADE20K config: `base_size 512`, `test_h/w 473`, `scales [1.0]`), per image: resize
so the long side is 512 (bilinear), pad to at least 473×473 with the mean colour, slide a 473×473 window
with stride ⌈473·2/3⌉ = 316 (the last window flush with the border), average the softmax of each window
and of its horizontal flip, crop the padding away, resize the class scores bilinearly to the original
size, arg-max. TABLE XXIII's numbers are single-scale (`scales: [1.0]`); multi-scale testing
(`seg.eval_scales`, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]) averages the scores over scales as APD's
test.py does when given them. `seg.eval_mode: whole` runs the resized image in one forward instead.

mIoU: the confusion matrix of every labelled pixel (ignore excluded) summed over the validation set (and
over the DDP ranks), IoU_c = TP / (TP + FP + FN) per class, averaged over the classes that occur in the
labels or the predictions (a class absent from both has no IoU; on ADE20K's 2,000 validation images all
150 occur, so this is APD's mean over 150). Pixel accuracy and mean class accuracy come with it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gklcli.distributed import all_reduce_sum, sum_over_ranks
from gklcli.seg_data import IGNORE, MEAN_RGB


def confusion(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """C×C counts (row: label, column: prediction) of the labelled pixels."""
    keep = labels != IGNORE
    index = labels[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: Tensor) -> dict[str, float]:
    """mIoU, pixel accuracy and mean class accuracy (%) of a confusion matrix."""
    m = matrix.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    seen = union > 0
    labelled = m.sum(1)
    iou = tp[seen] / union[seen]
    return {"miou": 100.0 * float(iou.mean()) if seen.any() else 0.0,
            "pixel_acc": 100.0 * float(tp.sum() / labelled.sum()) if labelled.sum() > 0 else 0.0,
            "mean_acc": 100.0 * float((tp[labelled > 0] / labelled[labelled > 0]).mean()) if (labelled > 0).any() else 0.0,
            "classes": float(int(seen.sum()))}


def _resize_long(image: Tensor, long_side: int) -> Tensor:
    """APD: the long side to `long_side`, the other rounded in proportion (bilinear)."""
    h, w = image.shape[-2:]
    if h > w:
        size = (long_side, round(long_side / h * w))
    else:
        size = (round(long_side / w * h), long_side)
    return F.interpolate(image, size, mode="bilinear", align_corners=False)


def _flip_softmax(model: nn.Module, x: Tensor, flip: bool) -> Tensor:
    """Softmax scores of a window (the mean with its mirror image's when `flip`)."""
    batch = torch.cat([x, x.flip(-1)]) if flip else x
    out = F.softmax(model(batch).float(), dim=1)
    return (out[:1] + out[1:].flip(-1)) / 2 if flip else out


def sliding_scores(model: nn.Module, image: Tensor, crop: int, stride_rate: float, flip: bool) -> Tensor:
    """1×C×H×W class scores of APD's `scale_process` for a 1×3×H×W image (see the module docstring)."""
    _, _, h, w = image.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    mean = torch.tensor(MEAN_RGB, device=image.device).view(1, 3, 1, 1)
    padded = F.pad(image - mean, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)) + mean
    H, W = padded.shape[-2:]
    stride = math.ceil(crop * stride_rate)
    total = count = None
    for i in range(math.ceil((H - crop) / stride) + 1):
        for j in range(math.ceil((W - crop) / stride) + 1):
            bottom, right = min(i * stride + crop, H), min(j * stride + crop, W)
            top, left = bottom - crop, right - crop
            window = _flip_softmax(model, padded[:, :, top:bottom, left:right], flip)
            if total is None:
                total = window.new_zeros(1, window.shape[1], H, W)
                count = window.new_zeros(1, 1, H, W)
            total[:, :, top:bottom, left:right] += window
            count[:, :, top:bottom, left:right] += 1
    scores_ = total / count
    return scores_[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


def predict(model: nn.Module, image: Tensor, cfg: Any) -> Tensor:
    """H×W class indices for a 1×3×H×W image in [0, 1] under `seg.eval_*` (sliding or whole, scales, flip)."""
    h, w = image.shape[-2:]
    total = None
    for scale in cfg.eval_scales:
        resized = _resize_long(image, round(scale * cfg.base_size))
        if cfg.eval_mode == "sliding":
            part = sliding_scores(model, resized, cfg.crop_size, cfg.stride_rate, cfg.eval_flip)
        else:
            part = _flip_softmax(model, resized, cfg.eval_flip)
        part = F.interpolate(part, (h, w), mode="bilinear", align_corners=False)
        total = part if total is None else total + part
    return total[0].argmax(0)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], cfg: Any, num_classes: int,
                          device: torch.device, autocast: Callable[[], Any]) -> dict[str, float]:
    """mIoU etc. of `model` (eval mode) over (image, mask) pairs, the confusion matrix summed over ranks."""
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    images = 0
    for image, mask in batches:
        with autocast():
            pred = predict(model, image.to(device), cfg)
        matrix += confusion(pred, mask[0].to(device), num_classes)
        images += 1
    counted = all_reduce_sum([float(images)], device)[0]
    return scores(sum_over_ranks(matrix)) | {"images": counted}
