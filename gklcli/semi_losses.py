"""The consistency losses of semi-supervised learning (the registry's kind "semi", TABLE XXII), per sample.

The teacher side is FixMatch's weak-view logits (Mean-Teacher's EMA-teacher logits), the student side the
strong view's (the student's second weak view). Every term is computed per unlabelled sample, multiplied by
the confidence mask and averaged over *all* B unlabelled samples, masked ones included (USB's
`consistency_loss`: ``(loss * mask).mean()``). `gklcli.losses` binds them into its registry (`ce`, `sce`,
`mse`, `gkl` of kind "semi"); the registry computes return ``(wmse, ce)`` pairs of batch values.

* ``ce``: −log softmax(s)[argmax t], hard pseudo-labels (USB FixMatch's ``hard_label: True``).
* ``sce``: −Σ_c softmax(t)_c log softmax(s)_c, soft pseudo-labels; = KL(softmax(t) ‖ softmax(s)) − H(softmax(t)).
* ``mse``: mean over the C classes of (softmax(s) − softmax(t))² (USB's 'mse', Mean-Teacher).
* ``gkl``: α/4·Σ_jk w_jk (Δt_jk − Δs_jk)² / Σ_jk w_jk − β·softmax(t)ᵀ log softmax(s) with sample-wise weights
  w_jk = v_j v_k, v = softmax(t / T2)^γ (no class is known for an unlabelled image). The masked batch sum of
  the wMSE is divided by the batch's Σ_b Σ_jk w_bjk (Eq. 13's normalisation, as every GKL of gkl), which is B
  at γ = 1 (each Σ_jk w_jk = (Σ_j v_j)² = 1): the term is then the DKL fork's
  `dkl_loss` (0.25·Σ_jk p_jk (Δn − Δa)², unnormalised) exactly. The soft CE's target is detached; the wMSE
  term sends gradient to the student and, when the teacher logits carry gradient (FixMatch's weak view of
  the same forward), to the teacher as well — through its logit differences *and* its weights, as the
  fork computes it (its `p_n` is not detached). O(B·C): Σ_jk v_j v_k (d_j − d_k)² = 2·W·Σ_j v_j (d_j − d̄)²
  with d = t − s, W = Σ_j v_j and d̄ = Σ_j v_j d_j / W (centred before squaring, exact in fp32).

Targets (pseudo-labels) never receive gradient except through GKL's wMSE term as described. fp16/bf16
logits are computed in fp32.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gklcli.logits import promote


def masked_mean(per_sample: Tensor, mask: Optional[Tensor]) -> Tensor:
    """USB's masked mean: Σ_b mask_b·ℓ_b / B (a masked sample still counts in B); the plain mean without a mask."""
    return (per_sample if mask is None else per_sample * mask.to(per_sample.dtype)).mean()


def hard_ce(student: Tensor, teacher: Tensor) -> Tensor:
    s, t = promote(student, teacher)
    return F.cross_entropy(s, t.detach().argmax(dim=1), reduction="none")


def soft_ce(student: Tensor, teacher: Tensor) -> Tensor:
    s, t = promote(student, teacher)
    return -(F.softmax(t.detach(), dim=1) * F.log_softmax(s, dim=1)).sum(dim=1)


def mse(student: Tensor, teacher: Tensor) -> Tensor:
    s, t = promote(student, teacher)
    return (F.softmax(s, dim=1) - F.softmax(t.detach(), dim=1)).square().mean(dim=1)


def gkl_parts(student: Tensor, teacher: Tensor, *, alpha: float, beta: float, gamma: float = 1.0,
              weight_temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample α/4·Σ_jk w_jk (Δt − Δs)², its Σ_jk w_jk = W², and β·soft CE of the GKL consistency."""
    s, t = promote(student, teacher)
    v = F.softmax(t if weight_temperature == 1.0 else t / weight_temperature, dim=1)
    v = v if gamma == 1.0 else v.pow(gamma)
    w_sum = v.sum(dim=1)
    d = t - s
    c = d - torch.linalg.vecdot(v, d).div(w_sum).unsqueeze(1)
    wmse = (alpha / 4.0 * 2.0) * w_sum * torch.linalg.vecdot(v, c.square())
    # the soft CE's target softmax(t), detached: the weights themselves when T2 = γ = 1 (one softmax less)
    target = v.detach() if weight_temperature == 1.0 and gamma == 1.0 else F.softmax(t.detach(), dim=1)
    return wmse, w_sum.detach().square(), -beta * (target * F.log_softmax(s, dim=1)).sum(dim=1)


def consistency(per_sample: Any) -> Any:
    """A registry compute of kind "semi" from a per-sample loss without a wMSE part: (0, masked mean)."""
    def compute(s: Tensor, t: Tensor, mask: Optional[Tensor], prior: Optional[Tensor], c: Any) -> tuple[Tensor, Tensor]:
        value = masked_mean(per_sample(s, t), mask)
        return value.new_zeros(()), value
    return compute


def gkl_consistency(s: Tensor, t: Tensor, mask: Optional[Tensor], prior: Optional[Tensor], c: Any) -> tuple[Tensor, Tensor]:
    """The registry compute of GKL for kind "semi": the wMSE's masked batch sum over the batch's Σw (Eq. 13's
    normalisation, `normalization: weights`; = USB's masked mean over B at γ = 1, where every Σw is 1) and
    the soft CE's masked mean."""
    wmse, weight_sums, ce = gkl_parts(s, t, alpha=c.alpha, beta=c.beta, gamma=c.gamma, weight_temperature=c.weight_temperature)
    kept = wmse if mask is None else wmse * mask.to(wmse.dtype)
    return kept.sum() / weight_sums.sum(), masked_mean(ce, mask)
