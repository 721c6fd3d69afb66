"""L∞ PGD for adversarial training and validation, and the ε / step schedules of GKL-AT.

The training attack follows the official DKL code (`perturb_input`): BatchNorm in eval mode, start
at x + 0.001·N(0, 1), signed-gradient ascent, projection onto the ε-ball and [0, 1] after every
step. Gradients are taken with respect to the input only, so parameter `.grad`s are never touched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttackLoss = Callable[[Tensor, Tensor, Tensor], Tensor]  # (logits_adv, logits_nat, targets) → scalar


@dataclass(frozen=True)
class EpochAttack:
    """The inner maximisation of one epoch."""

    eps: float
    steps: int
    step_size: float


def epoch_attack(cfg: Any, epoch: int, epochs: int) -> EpochAttack:
    """ε_t, steps and step size for `epoch` (1-based) under an `AttackCfg`.

    * ``eps_ramp``: ε_t = ε·epoch/epochs (the official increasing-ε schedule), else ε.
    * ``official``: 5 steps of ε_t/2 every epoch. The official code writes a staged schedule as a
      chain of plain ``if``s (not ``elif``), so its last branch always wins; this is what ran.
    * ``staged``: the schedule that chain was meant to be, with boundaries scaled by epochs/200:
      ≤50 → 2 steps of ε_t, ≤100 → 3 of 2ε_t/3, ≤150 → 4 of ε_t/2, else 5 of ε_t/2.
    * ``fixed``: `steps` steps of `step_size` (absolute, not scaled by the ramp).
    """
    eps = cfg.eps * epoch / epochs if cfg.eps_ramp else cfg.eps
    if cfg.schedule == "official":
        return EpochAttack(eps, 5, eps / 2)
    if cfg.schedule == "staged":
        scale = epochs / 200.0
        for bound, steps, frac in ((50, 2, 1.0), (100, 3, 2 / 3), (150, 4, 0.5)):
            if epoch <= int(bound * scale):
                return EpochAttack(eps, steps, eps * frac)
        return EpochAttack(eps, 5, eps / 2)
    return EpochAttack(eps, cfg.steps, cfg.step_size)


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: Literal["eval", "train"]) -> Iterator[None]:
    """Run the attack with BatchNorm in eval mode, or in train mode without touching running stats.

    The model's previous train/eval flags (and BN `track_running_stats`) are restored afterwards.
    """
    was_training = model.training
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    try:
        if mode == "eval":
            model.eval()
        else:
            model.train()
            for m in norms:
                m.track_running_stats = False  # batch statistics, no running-stat update
        yield
    finally:
        for m, flag in zip(norms, tracked):
            m.track_running_stats = flag
        model.train(was_training)


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    loss_fn: AttackLoss,
    *,
    eps: float,
    step_size: float,
    steps: int,
    init: Literal["normal", "uniform", "none"] = "normal",
    init_std: float = 0.001,
    mode: Literal["eval", "train"] = "eval",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Tensor:
    """Maximise `loss_fn(model(x_adv), model(x), y)` over the L∞ ε-ball ∩ [0,1]^d by signed steps.

    init: ``normal`` (x + init_std·N(0,1), official DKL/TRADES), ``uniform`` (U(−ε, ε), Madry PGD
    for evaluation) or ``none``. The clean logits are computed once (the official code recomputes
    them every step; in eval mode they are identical).
    """
    x = x.detach()
    if steps == 0 or eps == 0:
        return x.clone()
    with bn_mode(model, mode):
        with torch.no_grad(), autocast():
            logits_nat = model(x)
        if init == "normal":
            x_adv = x + init_std * torch.randn_like(x)
        elif init == "uniform":
            x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
        else:
            x_adv = x.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad(), autocast():
                loss = loss_fn(model(x_adv), logits_nat, targets)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return x_adv.detach()


def ce_attack_loss(logits_adv: Tensor, logits_nat: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy with the true labels (Madry PGD); the clean logits are unused."""
    return F.cross_entropy(logits_adv.float(), targets)


def cw_margin_loss(logits_adv: Tensor, logits_nat: Tensor, targets: Tensor) -> Tensor:
    """The CW-∞ loss: max_{j≠y} z_j − z_y (summed), maximised by the attack."""
    z = logits_adv.float()
    true = z.gather(1, targets[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(targets, z.shape[1]).bool(), float("-inf")).amax(1)
    return (other - true).sum()


@torch.no_grad()
def accuracy_counts(logits: Tensor, targets: Tensor) -> int:
    return int((logits.argmax(dim=1) == targets).sum())
