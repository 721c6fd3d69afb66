"""The baselines' distillation formulas beside GKL: DKD, JSD, DIST, and CLIP's similarity logits and
contrastive loss. `gklcli.losses` binds them into its registry (and re-exports them)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gklcli.logits import promote as _promote


def dkd_loss(logits_student: Tensor, logits_teacher: Tensor, targets: Tensor, *, alpha: float = 1.0, beta: float = 8.0,
             temperature: float = 4.0) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022), the DKD baseline of the paper's tables.

    α·TCKD + β·NCKD, both ×T² and averaged over the batch: TCKD is the KL between the binary
    distributions [p_y, 1 − p_y] of teacher and student; NCKD the KL between their distributions over
    the non-target classes, renormalised (computed by masking the target logit, as mdistiller does).
    """
    s, t = _promote(logits_student, logits_teacher)
    s, t = s / temperature, t / temperature
    gt = F.one_hot(targets, s.shape[1]).bool()
    log_ps, log_pt = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    ps_y, pt_y = log_ps.exp()[gt], log_pt.exp()[gt]
    student_bin = torch.stack([ps_y, (1 - ps_y).clamp_min(1e-12)], dim=1).log()
    teacher_bin = torch.stack([pt_y, (1 - pt_y).clamp_min(1e-12)], dim=1)
    tckd = F.kl_div(student_bin, teacher_bin, reduction="batchmean")
    nckd = F.kl_div(F.log_softmax(s - 1000.0 * gt, dim=1), F.softmax(t - 1000.0 * gt, dim=1), reduction="batchmean")
    return temperature ** 2 * (alpha * tckd + beta * nckd)


def jsd(logits_student: Tensor, logits_teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean Jensen-Shannon divergence between softmax(t/T) and softmax(s/T) (Eq. 15)."""
    s, t = _promote(logits_student, logits_teacher)
    log_p = F.log_softmax(t / temperature, dim=1)
    log_q = F.log_softmax(s / temperature, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-row Pearson correlation (each row centred on its mean), as DIST computes it."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(logits_student: Tensor, logits_teacher: Tensor, *, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022), the TABLE XIX baseline: relations instead of exact probabilities.

    With y = softmax(z/τ): β·τ²·(1 − mean_i ρ(y_s[i,:], y_t[i,:])) (inter-class: each sample's scores over
    the classes) + γ·τ²·(1 − mean_j ρ(y_s[:,j], y_t[:,j])) (intra-class: each class's scores over the
    batch), ρ the Pearson correlation — the process's batch, not gathered, as DIST's code."""
    s, t = _promote(logits_student, logits_teacher)
    ys, yt = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    inter = 1 - _pearson_rows(ys, yt).mean()
    intra = 1 - _pearson_rows(ys.T, yt.T).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


def clip_logits(image: Tensor, text: Tensor, image_all: Tensor, text_all: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """CLIP's similarity logits of this process's pairs against the global batch (OpenCLIP's local loss):
    image→text `scale·image·text_allᵀ` and text→image `scale·text·image_allᵀ`, rows = local pairs."""
    return scale * image @ text_all.T, scale * text @ image_all.T


def clip_contrastive(per_image: Tensor, per_text: Tensor, labels: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE: the mean of the image→text and text→image cross-entropies."""
    return (F.cross_entropy(per_image.float(), labels) + F.cross_entropy(per_text.float(), labels)) / 2
