"""KL, DKL, IKL and GKL losses (Cui et al.), computed in O(B·C) time and memory.

Notation follows the GKL paper. For a pair of logit vectors, the *teacher* side o_m (clean logits in
adversarial training, the frozen teacher in distillation) and the *student* side o_n (adversarial
logits, the student), with Δm_jk = o_m^j − o_m^k and Δn_jk = o_n^j − o_n^k:

    GKL = α/4 · Σ_jk w_jk (Δm_jk − Δn_jk)²  −  β · S(s_m)ᵀ · log s_n          (Eq. 13)
           └──────────── wMSE ───────────┘     └── soft-label cross-entropy ──┘

* α weights the wMSE term, β the soft-label cross-entropy, γ is the power on the weights and
  τ (`ClassPrior.temperature`) the temperature of the class prior.
* The weights are rank one, w_jk = v_j v_k with v = S(s̄_y)^γ (class-wise, row y of the prior) or
  v = S(softmax(o_m / T2))^γ (sample-wise), so Σ_jk v_j v_k (d_j − d_k)² = 2·W·Σ_j v_j (d_j − d̄)²
  with d = o_m − o_n, W = Σ_j v_j and d̄ = Σ_j v_j d_j / W. No B×C×C tensor is ever built.
  (Centring on d̄ before squaring keeps fp32 exact where the expanded form cancels.)

**The official code swaps the names α and β** (jiequancui/DKL, `dkl_loss` returns
``beta * loss_mse + alpha * loss_sce``). Its ``--alpha`` is the paper's β (cross-entropy weight) and
its ``--beta`` is the paper's α (wMSE weight): the official CIFAR-100 script's ``--alpha 4 --beta 20``
is ``alpha=20, beta=4`` here. Its ``--T`` in adversarial training is the prior temperature τ, not the
cross-entropy temperature (which stays 1).

Normalisation of the wMSE term:

* ``"weights"`` (GKL, the official v2 code): the batch sum divided by Σ_b Σ_jk w_bjk = Σ_b W_b².
* ``"batch"`` (IKL, the NeurIPS conference version / official v1 code): the batch sum divided by B.
  With γ = 1 and probability-vector weights both agree, because then W_b = 1.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from gklcli.baseline_losses import clip_contrastive, clip_logits, dist_loss, dkd_loss, jsd  # noqa: F401 (re-exported)
from gklcli.logits import compute_dtype as _compute_dtype, promote as _promote

from gklcli import semi_losses as semi

Normalization = Literal["weights", "batch"]


class GKLTerms(NamedTuple):
    """The two weighted components of a DKL/GKL loss, kept apart for logging."""

    wmse: Tensor
    ce: Tensor

    @property
    def total(self) -> Tensor:
        return self.wmse + self.ce


def kl_div(logits_student: Tensor, logits_teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean KL(softmax(t/T) ‖ softmax(s/T)); gradients reach both inputs.

    No T² factor: distillation methods that want Hinton's scaling multiply it themselves.
    """
    s, t = _promote(logits_student, logits_teacher)
    log_q = F.log_softmax(_scaled(s, temperature), dim=1)
    log_p = F.log_softmax(_scaled(t, temperature), dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def soft_cross_entropy(logits_student: Tensor, logits_teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Batch-mean −S(softmax(t/T))ᵀ log softmax(s/T): the soft-label term; the target is detached."""
    s, t = _promote(logits_student, logits_teacher)
    target = F.softmax(_scaled(t.detach(), temperature), dim=1)
    return F.cross_entropy(_scaled(s, temperature), target)


class _PoweredPriorCache:
    """prior**γ, recomputed only when the prior tensor object, its in-place version, γ or dtype change.

    The class prior changes once per epoch while the loss runs every step; raising the C×C matrix
    once instead of B×C rows each step removes the loss's most expensive elementwise op.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._ref: weakref.ref | None = None
        self._value: Tensor | None = None

    def get(self, prior: Tensor, gamma: float, dtype: torch.dtype) -> Tensor:
        key = (prior._version, gamma, dtype, prior.device)
        if self._ref is None or self._ref() is not prior or self._key != key:
            self._value = prior.detach().to(dtype).pow(gamma)
            self._ref, self._key = weakref.ref(prior), key
        return self._value


_POWERED_PRIOR = _PoweredPriorCache()


def pair_weights(
    logits_teacher: Tensor,
    *,
    gamma: float = 1.0,
    targets: Tensor | None = None,
    class_prior: Tensor | None = None,
    weight_temperature: float = 1.0,
) -> Tensor:
    """The detached B×C vector v whose outer product v vᵀ weights the wMSE term (Eq. 12).

    Class-wise when `class_prior` (C×C, row-normalised) is given: v = prior[targets]^γ.
    Sample-wise otherwise: v = softmax(teacher / weight_temperature)^γ.
    """
    dtype = _compute_dtype(logits_teacher)
    with torch.no_grad():
        if class_prior is None:
            v = F.softmax(_scaled(logits_teacher.detach().to(dtype), weight_temperature), dim=1)
            return v if gamma == 1.0 else v.pow_(gamma)
        if targets is None:
            raise ValueError("class-wise weights need `targets` to index the class prior")
        if class_prior.dim() != 2 or class_prior.shape[0] != class_prior.shape[1]:
            raise ValueError(f"class_prior must be C×C, got {tuple(class_prior.shape)}")
        if class_prior.shape[1] != logits_teacher.shape[1]:
            raise ValueError(
                f"class_prior has {class_prior.shape[1]} classes, the logits have {logits_teacher.shape[1]}"
            )
        prior = class_prior.to(logits_teacher.device)
        powered = prior.to(dtype) if gamma == 1.0 else _POWERED_PRIOR.get(prior, gamma, dtype)
        return torch.index_select(powered, 0, targets.to(prior.device))


def _scaled(x: Tensor, temperature: float) -> Tensor:
    """x / T, skipping the copy when T = 1."""
    return x if temperature == 1.0 else x / temperature


class _PairwiseWMSE(torch.autograd.Function):
    """Per-sample Σ_jk v_j v_k ((t_j − t_k) − (s_j − s_k))², forward and backward in O(B·C).

    Keeps the centred differences c = d − d̄ for backward, where ∂/∂d_j = 4·W·v_j·c_j (the d̄ term
    vanishes because Σ_j v_j c_j = 0): one B×C tensor, no B×C×C. `student_grad=False` is the
    stop-gradient S(Δn) of Theorem 1 (DKL); the weights v never receive gradient.
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor, v: Tensor, student_grad: bool) -> Tensor:
        w_sum = v.sum(dim=1)
        d = t - s
        d_bar = torch.linalg.vecdot(v, d) / w_sum
        c = d.sub_(d_bar.unsqueeze(1))
        vc = v * c
        ctx.save_for_backward(vc, w_sum)
        ctx.student_grad = student_grad
        return 2.0 * w_sum * torch.linalg.vecdot(vc, c)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        vc, w_sum = ctx.saved_tensors
        want_s = ctx.needs_input_grad[0] and ctx.student_grad
        want_t = ctx.needs_input_grad[1]
        if not (want_s or want_t):
            return None, None, None, None
        scale = (4.0 * w_sum * grad_out).unsqueeze(1)
        grad_t = vc * scale if want_t else None
        if not want_s:
            return None, grad_t, None, None
        return (-grad_t if grad_t is not None else vc * -scale), grad_t, None, None


def pairwise_wmse(s: Tensor, t: Tensor, v: Tensor, *, student_grad: bool = True) -> Tensor:
    """Per-sample Σ_jk v_j v_k (Δt_jk − Δs_jk)² (shape B) without materialising B×C×C."""
    return _PairwiseWMSE.apply(s, t, v, student_grad)


def _normalise(per_sample: Tensor, v: Tensor, normalization: Normalization, across_ranks: bool = False) -> Tensor:
    """The wMSE batch sum over Σw (or B). `across_ranks`: the rows are one process's share of a global batch
    whose loss DDP averages, so Σw is the mean over the processes (the averaged gradient is then the global
    batch's, as one process computing all rows would get; the weights carry no gradient)."""
    if normalization == "weights":
        total = v.sum(dim=1).square().sum()
        if across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            total = total.detach().clone()
            torch.distributed.all_reduce(total)
            total = total / torch.distributed.get_world_size()
        return per_sample.sum() / total
    if normalization == "batch":
        return per_sample.mean()
    raise ValueError(f"normalization must be 'weights' or 'batch', got {normalization!r}")


def dkl_terms(logits_student: Tensor, logits_teacher: Tensor, *, alpha: float = 1.0, beta: float = 1.0) -> GKLTerms:
    """DKL of Theorem 1 (Eq. 5), as its two weighted terms."""
    s, t = _promote(logits_student, logits_teacher)
    v = pair_weights(t)
    wmse = alpha / 4.0 * pairwise_wmse(s, t, v, student_grad=False).mean()
    return GKLTerms(wmse, beta * soft_cross_entropy(s, t))


def dkl_loss(logits_student: Tensor, logits_teacher: Tensor, *, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """DKL of Theorem 1 (Eq. 5): α/4·‖√S(w_m)(Δm − S(Δn))‖² − β·S(s_m)ᵀ log s_n, batch mean.

    The wMSE weights are the teacher's scores w_m^jk = s_m^j s_m^k. The stop-gradients make the
    wMSE term act on the teacher only and the cross-entropy on the student only, so with α = β = 1
    the gradients with respect to both inputs equal those of `kl_div` — and with a detached teacher
    the wMSE term contributes nothing (the asymmetry that GKL breaks).
    """
    return dkl_terms(logits_student, logits_teacher, alpha=alpha, beta=beta).total


def gkl_terms(
    logits_student: Tensor,
    logits_teacher: Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float = 1.0,
    temperature: float = 1.0,
    targets: Tensor | None = None,
    class_prior: Tensor | None = None,
    weight_temperature: float = 1.0,
    normalization: Normalization = "weights",
    across_ranks: bool = False,
) -> GKLTerms:
    """GKL (Eq. 13) as its two weighted terms; see `gkl_loss` (and `_normalise` for `across_ranks`)."""
    s, t = _promote(logits_student, logits_teacher)
    v = pair_weights(
        t, gamma=gamma, targets=targets, class_prior=class_prior, weight_temperature=weight_temperature
    )
    wmse = alpha / 4.0 * _normalise(pairwise_wmse(s, t, v), v, normalization, across_ranks)
    return GKLTerms(wmse, beta * soft_cross_entropy(s, t, temperature))


def gkl_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float = 1.0,
    temperature: float = 1.0,
    targets: Tensor | None = None,
    class_prior: Tensor | None = None,
    weight_temperature: float = 1.0,
    normalization: Normalization = "weights",
) -> Tensor:
    """GKL (Eq. 13): α/4·Σ w̄ (Δm − Δn)² / Σ w̄  −  β·S(softmax(t/T))ᵀ log softmax(s/T).

    * The wMSE term sends gradient to the student's logit differences (breaking the asymmetry of
      KL); it reaches the teacher side as well unless the caller detached it — the official AT code
      lets it flow into the clean logits, distillation detaches the teacher.
    * Weights: class-wise ``class_prior[targets]`` when a prior is given, else sample-wise
      ``softmax(teacher / weight_temperature)``; raised to γ.
    * ``temperature`` (T) applies to the cross-entropy only; the wMSE term uses raw logits, as in
      the official code. There is no T² factor.
    * ``normalization="weights"`` divides the batch sum by the sum of pairwise weights (official
      v2); ``"batch"`` divides by B (conference IKL, see `ikl_loss`).
    """
    return gkl_terms(
        logits_student,
        logits_teacher,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        temperature=temperature,
        targets=targets,
        class_prior=class_prior,
        weight_temperature=weight_temperature,
        normalization=normalization,
    ).total


def ikl_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float = 1.0,
    targets: Tensor | None = None,
    class_prior: Tensor | None = None,
    weight_temperature: float = 1.0,
) -> Tensor:
    """IKL, the NeurIPS-2024 conference version: GKL with no γ (γ = 1) and wMSE divided by B.

    The official v1 KD configs use sample-wise weights with ``weight_temperature=100``; v1 AT uses
    the class prior.
    """
    return gkl_loss(
        logits_student,
        logits_teacher,
        alpha=alpha,
        beta=beta,
        gamma=1.0,
        temperature=temperature,
        targets=targets,
        class_prior=class_prior,
        weight_temperature=weight_temperature,
        normalization="batch",
    )


class ClassPrior:
    """Class-wise mean predicted scores s̄_y (the C×C matrix W of Algorithm 1), built per epoch.

    `update` accumulates softmax(logits / τ) per ground-truth class during an epoch; `end_epoch`
    all-reduces the sums across DDP ranks, row-normalises them (= the per-class mean, since every
    softmax row sums to 1) and makes the result the prior used during the next epoch. Before the
    first epoch ends the prior is uniform 1/C. A class that received no sample in an epoch keeps its
    previous row (the official code would produce NaN there).
    """

    def __init__(self, num_classes: int, temperature: float = 1.0, device: torch.device | str | None = None):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_classes = num_classes
        self.temperature = float(temperature)
        self.prior = torch.full((num_classes, num_classes), 1.0 / num_classes, device=device)
        self._sum = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        self._count = torch.zeros(num_classes, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.prior.device

    def to(self, device: torch.device | str) -> ClassPrior:
        self.prior, self._sum, self._count = (x.to(device) for x in (self.prior, self._sum, self._count))
        return self

    @torch.no_grad()
    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add softmax(logits/τ) of one batch to the rows of its ground-truth classes."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits of shape (B, {self.num_classes}), got {tuple(logits.shape)}")
        probs = F.softmax(logits.detach().float() / self.temperature, dim=1).to(self._sum)
        targets = targets.to(self.device)
        self._sum.index_add_(0, targets, probs)
        self._count.index_add_(0, targets, torch.ones_like(targets, dtype=self._count.dtype))

    def rows(self, targets: Tensor) -> Tensor:
        """prior[targets]: the class-wise score vector s̄_y of each sample."""
        return self.prior[targets.to(self.device)]

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Turn this epoch's sums into the prior for the next epoch and reset the accumulators."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self._sum)
            torch.distributed.all_reduce(self._count)
        seen = self._count > 0
        rows = self._sum[seen]
        self.prior[seen] = (rows / rows.sum(dim=1, keepdim=True)).to(self.prior.dtype)
        self._sum.zero_()
        self._count.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "temperature": self.temperature,
            "prior": self.prior.clone(),
            "sum": self._sum.clone(),
            "count": self._count.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(
                f"class prior was saved for {state['num_classes']} classes, this run has {self.num_classes}"
            )
        self.temperature = float(state["temperature"])
        self.prior = state["prior"].to(self.prior)
        self._sum = state["sum"].to(self._sum)
        self._count = state["count"].to(self._count)


# ---------------------------------------------------------------------------------------------------
# The registry: every loss by name, and what it needs
# ---------------------------------------------------------------------------------------------------
#
# A task names its loss (`loss.name` of a recipe, `attack.loss` of adversarial training) and gets a
# `LossEntry`: the function, the recipe settings it reads, whether it needs the labels or a class
# prior. Steps, the `--dry-run` text and the reproduce reports all go through it; a new task adds
# entries. Kinds: "at" (the robust term of adversarial training), "kd" (the distillation term),
# "attack" (the inner maximisation of adversarial training), "clip" (CLIP distillation), "semi" (the
# consistency term of semi-supervised learning, formulas in `gklcli.semi_losses`) and "seg" (the pixel
# term of segmentation distillation: the kd formulas on pixels, `gklcli.seg_losses`).

KINDS = {"at": "adversarial-training", "kd": "distillation", "attack": "attack", "clip": "CLIP-distillation",
         "semi": "semi-supervised consistency", "seg": "segmentation distillation"}
# how each setting is written in texts (the paper's symbols)
SYMBOLS = {"alpha": "α", "beta": "β", "gamma": "γ", "prior_temperature": "τ", "temperature": "T",
           "weight_temperature": "T2", "trades_beta": "β_TRADES", "kd_weight": "KD weight", "dist_beta": "β_DIST",
           "dist_gamma": "γ_DIST"}


class LossEntry(NamedTuple):
    """One loss: `compute(student, teacher, targets, prior, settings) -> GKLTerms` and its needs.

    `settings(kind, weights)` is the tuple of `loss.*` recipe keys it reads for that kind (a key set
    but not read is refused by the recipe check); `prior` says that class-wise weights come from a
    `ClassPrior`, built with the temperature named by `prior_temperature_key(kind)`.

    `variants`: kinds with their own formula of the loss, ``(kind, compute, reads)``; `function(kind)`
    is the one a task of that kind calls. Kind "semi" calls ``compute(student, teacher, mask, None,
    settings)``: the third argument is the unlabelled samples' confidence mask (1/0 per sample, None:
    all kept) instead of labels, and the terms are masked per sample and averaged over the whole
    unlabelled batch (USB's masked mean, `gklcli.semi_losses`)."""

    name: str
    title: str
    compute: Any
    kinds: tuple[str, ...]
    reads: tuple[str, ...] = ()
    prior: bool = False
    needs_targets: bool = False
    needs_teacher: bool = True
    note: str = ""
    variants: tuple[tuple[str, Any, tuple[str, ...]], ...] = ()

    def function(self, kind: str) -> Any:
        """The compute function a task of `kind` calls (its variant, else `compute`)."""
        return next((f for k, f, _ in self.variants if k == kind), self.compute)

    def prior_temperature_key(self, kind: str) -> str:
        # the official AT code builds the prior at τ (its --T); the official KD code at T2
        return "prior_temperature" if kind == "at" else "weight_temperature"

    def uses_prior(self, kind: str, weights: str) -> bool:
        # CLIP's "classes" are the batch's captions: no class prior, its weights are sample-wise (§4.4);
        # semi-supervised consistency has no labels for the unlabelled images: sample-wise as well
        return self.prior and weights == "class" and kind not in ("attack", "clip", "semi")

    def settings(self, kind: str, weights: str = "class") -> tuple[str, ...]:
        """The loss.* keys this loss reads for `kind` (with `weights` class- or sample-wise)."""
        keys = list(next((r for k, _, r in self.variants if k == kind), self.reads))
        if self.prior:
            keys.append("weights")
            if self.uses_prior(kind, weights):
                keys.append(self.prior_temperature_key(kind))
            else:
                keys.append("weight_temperature")
        return tuple(dict.fromkeys(keys))

    def describe(self, kind: str, values: Any) -> str:
        """One line for texts: "GKL (α=20, β=4, γ=1, τ=4, T=1, class-wise weights)"."""
        parts = []
        for key in self.settings(kind, getattr(values, "weights", "class")):
            value = getattr(values, key)
            if key == "weights":
                parts.append(f"{value}-wise weights")
            elif key == "normalization":
                parts.append(f"wMSE / {'Σw' if value == 'weights' else 'B'}")
            else:
                parts.append(f"{SYMBOLS[key]}={value:g}")
        return f"{self.title} ({', '.join(parts)})" if parts else self.title


def _gkl(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    return gkl_terms(s, t, alpha=c.alpha, beta=c.beta, gamma=c.gamma, temperature=c.temperature, targets=y,
                     class_prior=prior, weight_temperature=c.weight_temperature, normalization=c.normalization,
                     across_ranks=getattr(c, "across_ranks", False))


def _ikl(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    # the conference version: no γ (γ = 1) and the wMSE sum divided by B; defined here once
    return gkl_terms(s, t, alpha=c.alpha, beta=c.beta, gamma=1.0, temperature=c.temperature, targets=y,
                     class_prior=prior, weight_temperature=c.weight_temperature, normalization="batch")


def _dkl(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    return dkl_terms(s, t, alpha=c.alpha, beta=c.beta)


def _only_ce(value: Tensor) -> GKLTerms:
    """A loss without a wMSE part, logged as its `ce` component."""
    return GKLTerms(value.new_zeros(()), value)


def _trades(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    return _only_ce(c.trades_beta * kl_div(s, t))


def _kd(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    # Hinton's KD as mdistiller's kd_loss: kd_weight·T²·KL(softmax(t/T) ‖ softmax(s/T))
    return _only_ce(c.kd_weight * c.temperature ** 2 * kl_div(s, t, c.temperature))


def _jsd(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    return _only_ce(c.kd_weight * jsd(s, t, c.temperature))


def _dkd(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    # α weights TCKD and β NCKD, as in the DKD paper and mdistiller
    return _only_ce(dkd_loss(s, t, y, alpha=c.alpha, beta=c.beta, temperature=c.temperature))


def _dist(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    return _only_ce(c.kd_weight * dist_loss(s, t, beta=c.dist_beta, gamma=c.dist_gamma, temperature=c.temperature))


def _ce(s: Tensor, t: Tensor | None, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    return _only_ce(F.cross_entropy(s.float(), y))


def _kl(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    return _only_ce(kl_div(s, t))


def _sce(s: Tensor, t: Tensor, y: Tensor | None, prior: Tensor | None, c: Any) -> GKLTerms:
    return _only_ce(soft_cross_entropy(s, t))


def _terms(compute: Any) -> Any:
    """A `gklcli.semi_losses` compute (returning (wmse, ce)) as a registry compute."""
    return lambda s, t, mask, prior, c: GKLTerms(*compute(s, t, mask, prior, c))


class _Fixed:
    """The official attack loss's fixed settings: GKL with α = β = γ = 1 (and the training prior)."""

    alpha = beta = gamma = temperature = weight_temperature = 1.0
    normalization = "weights"


_GKL_READS = ("alpha", "beta", "gamma", "temperature", "normalization")
LOSSES: dict[str, LossEntry] = {e.name: e for e in (
    LossEntry("gkl", "GKL", _gkl, ("at", "kd", "attack", "clip", "semi", "seg"), _GKL_READS, prior=True, needs_targets=True,
              note="Eq. 13: α/4·wMSE + β·soft-label CE; as an attack loss α = β = γ = 1 (official CIFAR-100); "
                   "on CLIP similarities sample-wise, both directions (§4.4); as a semi-supervised consistency "
                   "sample-wise, wMSE / Σw per sample, masked (§6.4); in segmentation distillation pixels are the "
                   "samples (TABLE XXIII, gklcli.seg_losses)",
              variants=(("semi", _terms(semi.gkl_consistency), ("alpha", "beta", "gamma")),)),
    LossEntry("ikl", "IKL", _ikl, ("at", "kd"), ("alpha", "beta", "temperature"), prior=True, needs_targets=True,
              note="the conference version: γ = 1, wMSE / B"),
    LossEntry("dkl", "DKL", _dkl, ("at",), ("alpha", "beta"), note="Theorem 1 without the GKL changes"),
    LossEntry("trades", "TRADES", _trades, ("at",), ("trades_beta",), note="β_TRADES·KL(clean ‖ adversarial)"),
    LossEntry("kd", "KD", _kd, ("kd", "clip", "seg"), ("temperature", "kd_weight"),
              note="Hinton's KD, ×T² (CLIP: KL-KD at t; segmentation: APD's pixel KL)"),
    LossEntry("jsd", "JSD", _jsd, ("kd",), ("temperature", "kd_weight"), note="Jensen-Shannon, appendix §6.6"),
    LossEntry("dkd", "DKD", _dkd, ("kd",), ("alpha", "beta", "temperature"), needs_targets=True,
              note="α·TCKD + β·NCKD (×T²), the DKD baseline"),
    LossEntry("dist", "DIST", _dist, ("kd",), ("dist_beta", "dist_gamma", "temperature", "kd_weight"),
              note="KD weight·τ²·(β_DIST·inter + γ_DIST·intra Pearson relations), the DIST baseline"),
    LossEntry("ce", "CE only", _ce, ("kd", "attack", "clip", "semi", "seg"), needs_targets=True, needs_teacher=False,
              note="the labels alone: as a distillation loss the student baseline (CLIP: the contrastive loss alone), "
                   "as an attack loss Madry's PGD; as a semi-supervised consistency the CE on hard pseudo-labels, masked",
              variants=(("semi", _terms(semi.consistency(semi.hard_ce)), ()),)),
    LossEntry("kl", "KL", _kl, ("attack",), note="KL(clean ‖ adversarial), TRADES' attack"),
    LossEntry("sce", "soft-label CE", _sce, ("attack", "semi"),
              note="the official CIFAR-10 attack loss; as a semi-supervised consistency the CE on soft pseudo-labels "
                   "(= KL up to a constant), masked", variants=(("semi", _terms(semi.consistency(semi.soft_ce)), ()),)),
    LossEntry("mse", "MSE", _terms(semi.consistency(semi.mse)), ("semi",),
              note="Mean-Teacher's consistency: the mean over classes of (softmax(s) − softmax(t))², masked"),
)}
LOSS_SETTINGS = tuple(dict.fromkeys(k for e in LOSSES.values() for kind in e.kinds for w in ("class", "sample")
                                    for k in e.settings(kind, w)))


def loss_kind(recipe_kind: str) -> str:
    """The registry kind of a recipe kind: a clip-kd recipe's loss is a "clip" loss, others share the name."""
    return {"clip-kd": "clip", "seg-kd": "seg"}.get(recipe_kind, recipe_kind)


def loss_names(kind: str) -> tuple[str, ...]:
    """The names a task of `kind` accepts, in registry order."""
    return tuple(name for name, e in LOSSES.items() if kind in e.kinds)


def get_loss(name: str, kind: str) -> LossEntry:
    """The registry entry; a name this kind does not know is a ValueError listing the names it does."""
    entry = LOSSES.get(name)
    if entry is None or kind not in entry.kinds:
        raise ValueError(f"unknown {KINDS[kind]} loss {name!r}; use one of {', '.join(loss_names(kind))}")
    return entry


class LossTerm:
    """A registry loss bound to a run's settings and, for class-wise weights, its `ClassPrior`.

    What a Step calls each batch: `term(student, teacher, targets)`. `update`/`end_epoch` build the
    prior epoch by epoch (uniform during epoch 1); `state_dict` carries it across a resume."""

    def __init__(self, name: str, kind: str, settings: Any, num_classes: int, device: torch.device | str | None = None):
        self.entry, self.kind, self.settings = get_loss(name, kind), kind, settings
        uses = self.entry.uses_prior(kind, getattr(settings, "weights", "class"))
        temperature = getattr(settings, self.entry.prior_temperature_key(kind)) if uses else 1.0
        self.prior = ClassPrior(num_classes, temperature, device) if uses else None

    @property
    def matrix(self) -> Tensor | None:
        """The class prior used for this epoch's weights (None: sample-wise or no prior)."""
        return self.prior.prior if self.prior is not None else None

    def __call__(self, student: Tensor, teacher: Tensor | None, targets: Tensor | None) -> GKLTerms:
        return self.entry.function(self.kind)(student, teacher, targets, self.matrix, self.settings)

    def both_directions(self, student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], targets: Tensor) -> GKLTerms:
        """CLIP distillation (§4.4): the loss on the image→text and on the text→image similarity logits
        (each row a sample, the batch's captions or images its "classes"), averaged."""
        a, b = (self(s, t, targets) for s, t in zip(student, teacher))
        return GKLTerms((a.wmse + b.wmse) / 2, (a.ce + b.ce) / 2)

    def attack(self, name: str) -> Any:
        """The attack loss `name` as pgd_linf calls it, sharing this term's prior (official GKL-AT)."""
        entry = get_loss(name, "attack")
        return lambda adv, nat, y: entry.compute(adv, nat, y, self.matrix, _Fixed).total

    def update(self, logits: Tensor, targets: Tensor) -> None:
        if self.prior is not None:
            self.prior.update(logits, targets)

    def end_epoch(self) -> None:
        if self.prior is not None:
            self.prior.end_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {"prior": self.prior.state_dict() if self.prior is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.prior is not None and state.get("prior") is not None:
            self.prior.load_state_dict(state["prior"])
