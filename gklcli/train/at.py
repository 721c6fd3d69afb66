"""GKL adversarial training (paper §4.1, official DKLv2/Adv-training-dkl) as an engine `Step`.

One step, as the official `train()`:

1. inner maximisation (`gklcli.attacks.pgd_linf`) in eval mode with the epoch's ε_t / steps,
   attack loss from `attack.loss` (official: GKL with α=β=γ=1 and the class prior on CIFAR-100,
   soft-label CE on CIFAR-10, KL for TRADES);
2. AWP from `awp.warmup_epochs` on: gradient of the training loss at the current weights, perturb;
3. outer loss in train mode: CE(clean) + GKL(adv, clean) (or TRADES' β·KL), the adversarial
   forward first and the clean one second, as in the official code (BN statistics depend on it;
   `loss.forward_order: clean-first` is DM-AT's order);
4. the clean logits of the basic view feed the class prior (softmax(o/τ) per ground-truth class),
   which becomes the prior of the next epoch (uniform during epoch 1).

With AutoAugment the batch holds the basic and the augmented view; CE covers both, the robust term
is GKL(basic) + aug_weight·GKL(augmented), each normalised on its own half as officially.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gklcli.attacks import EpochAttack, accuracy_counts, epoch_attack, ce_attack_loss, cw_margin_loss, pgd_linf
from gklcli.data import to_float
from gklcli.losses import GKLTerms, LossTerm
from gklcli.train.awp import AWP
from gklcli.distributed import all_reduce_sum
from gklcli.train.engine import Context, StepResult


class AdversarialStep:
    """GKL-AT / IKL-AT / DKL-AT / TRADES training step."""

    def __init__(self, ctx: Context):
        r = ctx.recipe
        self.ctx, self.loss_cfg, self.attack_cfg = ctx, r.loss, r.attack
        self.device = ctx.env.device
        self.term = LossTerm(r.loss.name, "at", r.loss, ctx.num_classes, self.device)
        # the attack shares the training term's class prior (official GKL-AT on CIFAR-100)
        self.attack_loss = self.term.attack(r.attack.loss)
        self.awp = AWP(ctx.module, r.awp.gamma) if r.awp.enabled else None
        self.awp_on = False
        self.two_view = r.data.augment == "autoaug"
        self.selection_metric = "val_pgd" if r.eval.select == "pgd" and r.eval.pgd_steps > 0 else "val_clean"
        self.epoch_attack = EpochAttack(0.0, 0, 0.0)

    # ------------------------------------------------------------------------------ the losses

    def robust_terms(self, logits_adv: Tensor, logits_nat: Tensor, targets: Tensor) -> GKLTerms:
        """The robust term of the training loss, split for logging (TRADES: all in `ce`)."""
        return self.term(logits_adv, logits_nat, targets)

    def training_loss(
        self, forward: Callable[[Tensor], Tensor], x: Tensor, x_adv: Tensor, targets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """CE(clean) + robust term; returns (loss, metrics, clean logits, adversarial logits)."""
        c = self.loss_cfg
        with self.ctx.autocast():
            if c.forward_order == "clean-first":  # DM-AT's TRADES: model(x_natural), then model(x_adv)
                logits_nat = forward(x)
                logits_adv = forward(x_adv)
            else:  # the official GKL code: logits_adv first
                logits_adv = forward(x_adv)
                logits_nat = forward(x)
        ce = c.ce_weight * F.cross_entropy(logits_nat.float(), targets, label_smoothing=c.label_smoothing)
        if self.two_view:
            half = len(targets) // 2
            basic = self.robust_terms(logits_adv[:half], logits_nat[:half], targets[:half])
            aug = self.robust_terms(logits_adv[half:], logits_nat[half:], targets[half:])
            terms = GKLTerms(basic.wmse + c.aug_weight * aug.wmse, basic.ce + c.aug_weight * aug.ce)
        else:
            terms = self.robust_terms(logits_adv, logits_nat, targets)
        loss = ce + terms.total
        metrics = {"loss": loss.detach(), "ce": ce.detach(), "robust": terms.total.detach()}
        if c.name != "trades":
            metrics.update(wmse=terms.wmse.detach(), sce=terms.ce.detach())
        return loss, metrics, logits_nat, logits_adv

    # ------------------------------------------------------------------------------- the step

    def begin_epoch(self, epoch: int) -> dict[str, float]:
        r = self.ctx.recipe
        self.epoch_attack = epoch_attack(r.attack, epoch, r.schedule.epochs)
        self.awp_on = self.awp is not None and epoch >= r.awp.warmup_epochs
        return {"eps": self.epoch_attack.eps, "attack_steps": float(self.epoch_attack.steps), "attack_step_size": self.epoch_attack.step_size, "awp": float(self.awp_on)}

    def _inputs(self, batch: Any) -> tuple[Tensor, Tensor, int]:
        """Float images on the device, targets, and the size of the basic view."""
        cl = self.ctx.channels_last
        if self.two_view:
            basic, aug, y = batch
            x = torch.cat([to_float(basic, self.device, cl), to_float(aug, self.device, cl)])
            y = y.to(self.device)
            return x, torch.cat([y, y]), len(basic)
        images, y = batch
        return to_float(images, self.device, cl), y.to(self.device), len(images)

    def compute(self, batch: Any, epoch: int) -> StepResult:
        ctx, a = self.ctx, self.attack_cfg
        x, y, n_basic = self._inputs(batch)
        x_adv = pgd_linf(
            ctx.attack_model, x, y, self.attack_loss, eps=self.epoch_attack.eps, step_size=self.epoch_attack.step_size,
            steps=self.epoch_attack.steps, init=a.init, init_std=a.init_std, mode=a.bn_mode, autocast=ctx.autocast,
        )
        ctx.model.train()
        diff = None
        if self.awp_on:
            diff = self.awp.direction(lambda fwd: self.training_loss(fwd, x, x_adv, y)[0])
            self.awp.perturb(diff)
        loss, metrics, logits_nat, logits_adv = self.training_loss(ctx.model, x, x_adv, y)
        self.term.update(logits_nat[:n_basic].detach(), y[:n_basic])
        n = len(y)
        metrics["acc_nat"] = 100.0 * accuracy_counts(logits_nat, y) / n
        metrics["acc_adv"] = 100.0 * accuracy_counts(logits_adv, y) / n
        before = after = None
        if diff is not None:
            if ctx.recipe.awp.restore == "exact":
                before = self.awp.restore_exact
            else:
                after = lambda: self.awp.restore_subtract(diff)  # noqa: E731
        return StepResult(loss, metrics, n, before, after)

    def end_epoch(self, epoch: int) -> None:
        self.term.end_epoch()

    def evaluate(self, model: nn.Module, loader: Any, prefix: str) -> dict[str, float]:
        """Clean accuracy and PGD accuracy (CE or CW loss, uniform start; eval.* settings) in %."""
        e = self.ctx.recipe.eval
        model.eval()
        clean = robust = total = 0
        for images, y in loader:
            x, y = to_float(images, self.device, self.ctx.channels_last), y.to(self.device)
            with torch.no_grad(), self.ctx.autocast():
                clean += accuracy_counts(model(x), y)
            if e.pgd_steps > 0:
                x_adv = pgd_linf(
                    model, x, y, cw_margin_loss if e.pgd_loss == "cw" else ce_attack_loss, eps=e.eps, step_size=e.pgd_step_size, steps=e.pgd_steps,
                    init="uniform", mode="eval", autocast=self.ctx.autocast,
                )
                with torch.no_grad(), self.ctx.autocast():
                    robust += accuracy_counts(model(x_adv), y)
            total += len(y)
        clean, robust, total = all_reduce_sum([clean, robust, total], self.device)
        out = {f"{prefix}_clean": 100.0 * clean / max(total, 1)}
        if e.pgd_steps > 0:
            out[f"{prefix}_pgd"] = 100.0 * robust / max(total, 1)
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.term.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.term.load_state_dict(state)


def train_at(recipe: Any, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) adversarial training of `recipe`; keyword arguments as `engine.run_training`."""
    from gklcli.train.engine import run_training

    return run_training(recipe, AdversarialStep, **kwargs)
