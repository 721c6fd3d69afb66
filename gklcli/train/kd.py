"""Knowledge distillation (paper §4.2–4.3, official DKLv2/KD-dkl on mdistiller) as an engine `Step`.

The frozen teacher runs in eval mode under `torch.inference_mode()`; only the student gets gradients.
Loss = ce_weight·CE(student, y) + min(epoch/warmup, 1)·D(student, teacher) with D:

* ``gkl``: GKL (α wMSE, β soft-label CE at temperature T). Weights: class-wise (GI, the official
  `GI: True`) from the prior of the teacher's softmax(logits/T2), rebuilt every epoch (uniform in
  epoch 1); or sample-wise softmax(teacher/T2)^γ (`GI: False`). No T² factor, as officially.
* ``ikl``: the conference version (γ = 1, wMSE / B; v1 configs: sample-wise, T2 = 100).
* ``kd``: Hinton's KD, kd_weight·T²·KL(softmax(t/T) ‖ softmax(s/T)) (mdistiller's `kd_loss`).
* ``jsd``: kd_weight·JSD(softmax(t/T), softmax(s/T)) (appendix §6.6, Table XXIV).
* ``dkd``: the DKD baseline, α·TCKD + β·NCKD (×T²) with mdistiller's warm-up.

The official configs swap the names: mdistiller's ``GKL_KD.ALPHA`` is the paper's β (soft-label CE)
and ``GKL_KD.BETA`` the paper's α (wMSE). Recipes use the paper's names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gklcli.data import long_tailed, to_float
from gklcli.errors import GKLError
from gklcli.losses import LossTerm, get_loss
from gklcli.distributed import all_reduce_sum
from gklcli.train.engine import Context, StepResult

LT_BOUNDS = (100, 20)  # ImageNet-LT: many > 100 training images, few < 20, medium in between


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """min(epoch / warmup, 1), epochs counted from 1 (mdistiller); 1 without warm-up."""
    return 1.0 if warmup_epochs <= 0 else min(epoch / warmup_epochs, 1.0)


def resolve_teacher_path(checkpoint: Optional[str], data_dir: Optional[str]) -> Path:
    """The teacher file: absolute, relative to the current directory, or to the data root's parent."""
    if not checkpoint:
        raise GKLError("teacher.checkpoint: distillation needs the teacher's weights (--set teacher.checkpoint=FILE)")
    candidates = [Path(checkpoint)]
    if data_dir and not Path(checkpoint).is_absolute():
        candidates += [Path(data_dir) / checkpoint, Path(data_dir).parent / checkpoint]
    for path in candidates:
        if path.is_file():
            return path
    raise GKLError(
        f"teacher.checkpoint: {checkpoint} not found (looked in {', '.join(str(c) for c in candidates)}); "
        "put the teacher's weight file there — mdistiller's cifar_teachers/…/ckpt_epoch_240.pth, a torchvision "
        "ImageNet .pth, or a gkl checkpoint — or pass --set teacher.checkpoint=FILE"
    )


def load_teacher(recipe: Any, num_classes: int, device: torch.device, data_dir: Optional[str]) -> nn.Module:
    """The frozen teacher in eval mode, weights loaded strictly, no gradients."""
    from gklcli.loading import load_model_file

    path = resolve_teacher_path(recipe.teacher.checkpoint, data_dir)
    loaded = load_model_file(path, arch=recipe.teacher.arch, num_classes=num_classes, device=device)
    teacher = loaded.module.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillStep:
    """GKL-KD / IKL-KD / KD / JSD training step with a frozen teacher."""

    selection_metric = "val_top1"

    def __init__(self, ctx: Context, teacher: Optional[nn.Module], class_counts: Optional[Tensor] = None):
        r = ctx.recipe
        self.ctx, self.cfg, self.teacher = ctx, r.loss, teacher
        self.device = ctx.env.device
        self.term = LossTerm(r.loss.name, "kd", r.loss, ctx.num_classes, self.device)
        self.class_counts = class_counts
        self.factor = 1.0

    def begin_epoch(self, epoch: int) -> dict[str, float]:
        self.factor = warmup_factor(epoch, self.cfg.warmup_epochs)
        return {"kd_factor": self.factor}

    def distill_loss(self, s: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The distillation term D(student, teacher) before the warm-up factor."""
        return self.term(s, t, y).total

    def compute(self, batch: Any, epoch: int) -> StepResult:
        ctx, c = self.ctx, self.cfg
        images, y = batch
        x, y = to_float(images, self.device, ctx.channels_last), y.to(self.device)
        t = None
        if self.teacher is not None:  # None for the no-distillation baseline (loss.name = ce)
            with torch.inference_mode(), ctx.autocast():
                t = self.teacher(x)
            t = t.float().clone()  # a normal tensor again: the loss saves it for the student's backward
        ctx.model.train()
        with ctx.autocast():
            s = ctx.model(x)
        ce = c.ce_weight * F.cross_entropy(s.float(), y, label_smoothing=c.label_smoothing)
        kd = self.factor * self.distill_loss(s, t, y) if t is not None else s.new_zeros(())
        if t is not None:
            self.term.update(t, y)  # softmax(teacher / T2) per class, for the next epoch
        loss = ce + kd
        acc = 100.0 * float((s.argmax(1) == y).float().mean())
        return StepResult(loss, {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach(), "acc": acc}, len(y))

    def end_epoch(self, epoch: int) -> None:
        self.term.end_epoch()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, prefix: str) -> dict[str, float]:
        return evaluate_topk(model, loader, prefix, self.device, self.ctx, self.class_counts)

    def state_dict(self) -> dict[str, Any]:
        return self.term.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.term.load_state_dict(state)


def shot_groups(class_counts: Tensor) -> dict[str, Tensor]:
    """ImageNet-LT's class groups by training images per class: many > 100, 20 ≤ medium ≤ 100, few < 20."""
    many, few = LT_BOUNDS
    return {"many": class_counts > many, "medium": (class_counts >= few) & (class_counts <= many), "few": class_counts < few}


@torch.no_grad()
def evaluate_topk(model: nn.Module, loader: Any, prefix: str, device: torch.device, ctx: Any,
                  class_counts: Optional[Tensor] = None) -> dict[str, float]:
    """Top-1/top-5 accuracy in %, and Many/Medium/Few top-1 when training class counts are given."""
    model.eval()
    num_classes = ctx.num_classes
    correct = torch.zeros(num_classes, dtype=torch.float64)
    total = torch.zeros(num_classes, dtype=torch.float64)
    top5 = 0.0
    for images, y in loader:
        x, y = to_float(images, device, ctx.channels_last), y.to(device)
        with ctx.autocast():
            logits = model(x).float()
        k = min(5, logits.shape[1])
        hits = (logits.topk(k, dim=1).indices == y[:, None])
        top5 += float(hits.any(1).sum())
        correct.index_add_(0, y.cpu(), hits[:, 0].double().cpu())
        total.index_add_(0, y.cpu(), torch.ones(len(y), dtype=torch.float64))
    sums = all_reduce_sum([*correct.tolist(), *total.tolist(), top5], device)
    correct, total = torch.tensor(sums[:num_classes]), torch.tensor(sums[num_classes:2 * num_classes])
    n = max(float(total.sum()), 1.0)
    out = {f"{prefix}_top1": 100.0 * float(correct.sum()) / n, f"{prefix}_top5": 100.0 * sums[-1] / n}
    if class_counts is not None:
        for name, mask in shot_groups(class_counts).items():
            denom = float(total[mask].sum())
            if denom:
                out[f"{prefix}_{name}"] = 100.0 * float(correct[mask].sum()) / denom
    return out


def train_distill(recipe: Any, *, data_dir: Optional[str] = None, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) distillation of `recipe`; keyword arguments as `engine.run_training`."""
    from gklcli.train.engine import run_training

    def make_step(ctx: Context) -> DistillStep:
        # the plain-CE baseline rows of the tables train the student alone: no teacher file needed
        needs = get_loss(recipe.loss.name, "kd").needs_teacher
        teacher = load_teacher(recipe, ctx.num_classes, ctx.env.device, data_dir) if needs else None
        return DistillStep(ctx, teacher, ctx.class_counts if long_tailed(recipe.data) else None)

    return run_training(recipe, make_step, data_dir=data_dir, **kwargs)


def teacher_report(recipe: Any, *, data_dir: Optional[str], device: Optional[str]) -> dict[str, Any]:
    """`gkl distill --teacher-only`: the teacher's top-1/top-5 on the validation and test splits."""
    import contextlib
    from types import SimpleNamespace

    from gklcli.data import build_data, make_eval_loader
    from gklcli.distributed import pick_device

    dev = pick_device(device)
    data = build_data(recipe.data, data_dir, recipe.model.num_classes)
    teacher = load_teacher(recipe, data.num_classes, dev, data_dir)
    ctx = SimpleNamespace(num_classes=data.num_classes, channels_last=False, autocast=contextlib.nullcontext)
    counts = torch.bincount(torch.as_tensor(data.train.labels), minlength=data.num_classes) if long_tailed(recipe.data) else None
    report: dict[str, Any] = {"teacher": recipe.teacher.arch, "checkpoint": recipe.teacher.checkpoint}
    for split, source in (("val", data.val), ("test", data.test)):
        if source is not None:
            loader = make_eval_loader(source, None, recipe.data.eval_batch_size, recipe.data.num_workers)
            report.update(evaluate_topk(teacher, loader, split, dev, ctx, counts))
    return report
