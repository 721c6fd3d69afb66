"""APD's distillation terms for semantic segmentation (Tian et al., TPAMI 2022; `dvlab-research/APD`,
tool/train.py), written from its paper and code, and the pixel-wise KL they start from, replaceable by GKL.

* **Pixel KL** (APD's `CriterionKD`): the student's and the teacher's 1/8-resolution logits upsampled
  (bilinear, `align_corners=True`) to the label size, then `KLDivLoss()(log_softmax(s/T), softmax(t/T))·T²`.
  That `KLDivLoss` has PyTorch's default reduction 'mean', a mean over every *element* B·C·H·W — the class
  dimension included, so the term is the per-pixel KL divided by C (= 150 on ADE20K) and APD's weight 10
  acts as 10/150 per pixel. gkl computes it as the registry's `kd` (kind "seg") on the pixels, T²·KL per
  pixel averaged, and `seg.kd_reduction: elements` divides by C (APD's official behaviour); `pixels` is the
  per-pixel mean. Every pixel counts, ignored ones too, as in APD.
* **GKL in place of that KL** (TABLE XXIII "APD with GKL loss"): pixels are the samples (B·H·W rows of C
  logits, `pixels`) and the registry's GKL (kind "seg") runs on them — its memory-efficient wMSE
  (Algorithm 2: O(pixels·C), never pixels×C×C). Class-wise weights (the paper's GI) come from the prior of
  the teacher's per-class mean prediction over the labelled pixels of the previous epoch (uniform during the
  first; the mean is taken over the teacher's own 1/8-resolution output pixels, the mask downsampled by nearest);
  an ignored pixel has no class, so it takes the row of the teacher's predicted class. The same
  `seg.kd_reduction` divides the result by C, so that only the loss changes, not the weight that APD tuned.
* **Prototype terms** (APD's `CriterionKmeansInterWhole`, on the 512-channel PPM features through 1×1
  adapters): per class present in the batch (mask downsampled by nearest to the feature size), the mean
  of its L2-normalised pixel features is a prototype, normalised again. Each pixel's cosine similarity to
  every prototype, ×`kmeans_temp`, is a distribution over the prototypes; the student's (student pixels
  vs. student prototypes) learns the teacher's by KL (`prototype_kl`, mean over every element, weight
  `pred_kmeans_weight`), and each student prototype is pulled to the teacher's of its class,
  ½(1 − cos) averaged (`prototype_align`, weight `proto_align_weight`). The teacher's adapter is trained,
  by its own Adam, to segment with its prototypes: the similarity map summed into class channels (0 for
  classes absent from the batch, as APD), upsampled to the label size, cross-entropy against the mask
  (`teacher_prototype_ce`). The teacher's features never receive gradient.

APD loops over the classes present with `nonzero`; here one one-hot matrix computes every prototype at once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gklcli.seg_data import IGNORE


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """APD's bilinear upsampling of 1/8-resolution maps to the label size (`align_corners=True`)."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size, mode="bilinear", align_corners=True)


def pixels(maps: Tensor) -> Tensor:
    """B×C×H×W → (B·H·W)×C: every pixel a sample of C logits."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def reduce_classes(value: Tensor, num_classes: int, reduction: str) -> Tensor:
    """APD's element mean (`elements`: ÷C on top of the pixel mean) or the pixel mean itself."""
    return value / num_classes if reduction == "elements" else value


def pixel_distillation(term: Any, student: Tensor, teacher: Tensor, labels: Tensor, reduction: str) -> Tensor:
    """The pixel term of a registry loss (`LossTerm`, kind "seg") on 1/8-resolution logits: both upsampled to
    the labels, every pixel a sample, ÷C for APD's element mean."""
    size = tuple(labels.shape[1:])
    s_px, t_px = pixels(upsample(student, size)), pixels(upsample(teacher, size))
    y_px = labels.reshape(-1)
    targets = weight_targets(y_px, t_px) if term.entry.needs_targets else None
    return reduce_classes(term(s_px, t_px, targets).total, student.shape[1], reduction)


def weight_targets(labels: Tensor, teacher: Tensor) -> Tensor:
    """The class whose prior row weights each pixel: its label, or the teacher's prediction where ignored."""
    return torch.where(labels == IGNORE, teacher.argmax(1), labels)


def nearest_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """The mask at the feature size by nearest interpolation (APD: `F.interpolate(..., mode='nearest')`)."""
    return F.interpolate(labels[:, None].float(), size, mode="nearest")[:, 0].long()


class Prototypes(NamedTuple):
    student_kl: Tensor  # KL of pixel→prototype similarities, student vs. teacher (student gradient)
    align: Tensor  # ½(1 − cos) between the student's and the teacher's prototypes (student gradient)
    teacher_ce: Tensor  # the teacher adapter's segmentation by its prototypes (teacher-adapter gradient)
    classes: int  # prototypes in the batch (0: the terms are 0)


def class_means(features: Tensor, onehot: Tensor, normalize: bool) -> Tensor:
    """K×D: the mean of each class's pixel features (features N×D, onehot N×K), L2-normalised when `normalize`
    (APD: under kmeans_norm only)."""
    counts = onehot.sum(0).clamp_min(1.0)
    means = (onehot.T @ features) / counts[:, None]
    return F.normalize(means, dim=1) if normalize else means


def prototype_terms(student: Tensor, teacher: Tensor, labels: Tensor, *, num_classes: int, temperature: float,
                    normalize: bool = True) -> Prototypes:
    """APD's three prototype terms (module docstring). `student`/`teacher`: B×D×h×w adapted features (the
    teacher's already through its adapter, its input detached); `labels`: B×H×W at the label size."""
    b, d, h, w = student.shape
    small = nearest_labels(labels, (h, w)).reshape(-1)
    present = torch.unique(small[small != IGNORE])
    if present.numel() == 0:
        zero = student.sum() * 0.0
        return Prototypes(zero, zero, teacher.sum() * 0.0, 0)
    if normalize:
        student, teacher = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    s_px, t_px = pixels(student), pixels(teacher)
    onehot = (small[:, None] == present[None, :]).to(s_px.dtype)  # N×K, ignored pixels in no class
    s_proto, t_proto = class_means(s_px, onehot, normalize), class_means(t_px, onehot, normalize)
    s_sim = torch.einsum("bdhw,kd->bkhw", student, s_proto) * temperature
    t_sim = torch.einsum("bdhw,kd->bkhw", teacher, t_proto) * temperature
    # the student's similarity distribution learns the teacher's: KLDivLoss() mean over b·K·h·w elements
    log_s = F.log_softmax(s_sim, dim=1)
    p_t = F.softmax(t_sim.detach(), dim=1)
    student_kl = (torch.xlogy(p_t, p_t) - p_t * log_s).mean()
    align = 0.5 * (1.0 - (s_proto * t_proto.detach()).sum(1)).mean()
    # the teacher adapter: similarities placed in their classes' channels (absent classes 0), label size, CE
    class_maps = t_sim.new_zeros(b, num_classes, h, w).index_copy(1, present, t_sim)
    teacher_ce = F.cross_entropy(upsample(class_maps, tuple(labels.shape[1:])), labels, ignore_index=IGNORE)
    return Prototypes(student_kl, align, teacher_ce, int(present.numel()))
