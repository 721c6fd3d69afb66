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

The strong scheme of TABLE XIX (Hao et al.'s A2, docs/strong_kd.md) adds, on the device batch, timm's
Mixup/CutMix (and random erasing) drawn from seeds of (seed, epoch, batch, rank) — teacher and student
see the same mixed images — the label term on the mixed targets (soft-target CE, or timm's
BinaryCrossEntropy with loss.label_loss bce), and the argmax of the mixed target as the class of each
image for class-wise GKL weights, DKD and the class prior (as Hao et al.'s DKD). `DistillWorkload` builds
timm students with model.drop_path / model.pretrained and the timm training view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gklcli.data import long_tailed, to_float, train_view
from gklcli.errors import GKLError
from gklcli.losses import LossTerm, get_loss
from gklcli.distributed import DistEnv, all_reduce_sum
from gklcli.hub_cache import download_weights, is_hub_spec
from gklcli.models import create_model, get_spec
from gklcli.models.timm_models import is_timm, load_weights
from gklcli.sampling import sample_seed, seeded_rngs
from gklcli.train.build import build_model
from gklcli.train.engine import Context, StepResult
from gklcli.train.workload import ImageWorkload

LT_BOUNDS = (100, 20)  # ImageNet-LT: many > 100 training images, few < 20, medium in between


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """min(epoch / warmup, 1), epochs counted from 1 (mdistiller); 1 without warm-up."""
    return 1.0 if warmup_epochs <= 0 else min(epoch / warmup_epochs, 1.0)


TIMM_HINT = ("a timm model's file from the Hugging Face hub: huggingface-cli download timm/{tag} {file} "
             "--local-dir {folder} (docs/strong_kd.md)")


def resolve_teacher_path(checkpoint: Optional[str], data_dir: Optional[str], key: str = "teacher.checkpoint",
                         arch: Optional[str] = None) -> Path:
    """The teacher file (or another weight file named by `key`): absolute, relative to the current
    directory, to the data root, or to the data root's parent; or a Hub model hf://OWNER/NAME[@REVISION][/PATH],
    from the Hugging Face cache (downloaded on first use)."""
    if not checkpoint:
        raise GKLError(f"{key}: distillation needs the teacher's weights (--set {key}=FILE)")
    if is_hub_spec(checkpoint):
        return download_weights(checkpoint)
    candidates = [Path(checkpoint)]
    if data_dir and not Path(checkpoint).is_absolute():
        candidates += [Path(data_dir) / checkpoint, Path(data_dir).parent / checkpoint]
    for path in candidates:
        if path.is_file():
            return path
    # the recipes name timm files DATA_DIR/teachers/timm/<name.tag>/model.safetensors: the folder is the hub repository
    given = Path(checkpoint)
    folder = Path(data_dir) / given.parent if data_dir and not given.is_absolute() else given.parent
    what = (TIMM_HINT.format(tag=given.parent.name or "NAME.TAG", file=given.name, folder=folder) if is_timm(arch) else
            "mdistiller's cifar_teachers/…/ckpt_epoch_240.pth, a torchvision ImageNet .pth, a timm model.safetensors, "
            "or a gkl checkpoint")
    raise GKLError(f"{key}: {checkpoint} not found (looked in {', '.join(str(c) for c in candidates)}); "
                   f"put the weight file there — {what} — or pass --set {key}=FILE")


def load_teacher(recipe: Any, num_classes: int, device: torch.device, data_dir: Optional[str]) -> nn.Module:
    """The frozen teacher in eval mode, weights loaded strictly, no gradients. A timm teacher (timm/NAME)
    reads timm's own files (model.safetensors, pytorch_model.bin) or a gkl checkpoint of that architecture; any
    other teacher is any file `load_model_file` reads (.pt, .safetensors, a `gkl export-hub` folder on the Hub)."""
    from gklcli.loading import load_model_file

    arch = recipe.teacher.arch
    path = resolve_teacher_path(recipe.teacher.checkpoint, data_dir, arch=arch)
    if is_timm(arch):
        teacher = create_model(arch, num_classes)
        load_weights(teacher, path, get_spec(arch).name)
        teacher = teacher.to(device).eval()
    else:
        teacher = load_model_file(path, arch=arch, num_classes=num_classes, device=device).module.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class BatchAugment:
    """timm's Mixup/CutMix (mode batch: one λ per batch, the batch mixed with its flip) and then timm's
    RandomErasing (mode pixel, in the student's normalised space, as timm's prefetcher after its collate
    Mixup) on the device batch, every draw from `seeded_rngs(seed)`. Returns the images and the mixed soft
    targets (None without Mixup/CutMix)."""

    def __init__(self, data: Any, num_classes: int, smoothing: float, device: torch.device, student: nn.Module):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.device = device
        self.mixup = None
        if data.mixup > 0 or data.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mixup_prob, switch_prob=data.mixup_switch_prob,
                               mode="batch", label_smoothing=smoothing, num_classes=num_classes)
        self.erase = RandomErasing(data.re_prob, mode="pixel", device=device) if data.re_prob > 0 else None
        self.mean, self.std = getattr(student, "mean", None), getattr(student, "std", None)

    @staticmethod
    def wanted(data: Any) -> bool:
        return data.mixup > 0 or data.cutmix > 0 or data.re_prob > 0

    def __call__(self, x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Optional[Tensor]]:
        target = None
        with seeded_rngs(seed, self.device):
            if self.mixup is not None:
                if len(x) % 2:
                    raise GKLError(f"data.batch_size: Mixup/CutMix pairs each image with the flipped batch and needs an even "
                                   f"batch per process, got {len(x)} (set data.drop_last: true for an uneven last batch)")
                x, target = self.mixup(x, y)
            if self.erase is not None:
                normalised = self.mean is not None
                z = (x - self.mean) / self.std if normalised else x
                z = self.erase(z)
                x = z * self.std + self.mean if normalised else z
        return x, target


class DistillStep:
    """GKL-KD / IKL-KD / KD / JSD / DKD / DIST training step with a frozen teacher."""

    selection_metric = "val_top1"

    def __init__(self, ctx: Context, teacher: Optional[nn.Module], class_counts: Optional[Tensor] = None):
        r = ctx.recipe
        self.ctx, self.cfg, self.teacher = ctx, r.loss, teacher
        self.device = ctx.env.device
        self.term = LossTerm(r.loss.name, "kd", r.loss, ctx.num_classes, self.device)
        self.class_counts = class_counts
        self.factor = 1.0
        smoothing = r.loss.label_smoothing
        self.augment = BatchAugment(r.data, ctx.num_classes, smoothing, self.device, ctx.module) if BatchAugment.wanted(r.data) else None
        if r.loss.label_loss == "bce":
            from timm.loss import BinaryCrossEntropy

            self.bce: Optional[nn.Module] = BinaryCrossEntropy(smoothing=smoothing)
        else:
            self.bce = None
        self.position = (0, 0)  # (epoch, batches done in it): what seeds the batch's Mixup/erasing draws

    def begin_epoch(self, epoch: int) -> dict[str, float]:
        self.factor = warmup_factor(epoch, self.cfg.warmup_epochs)
        if self.position[0] != epoch:  # a resumed epoch keeps the position its checkpoint recorded
            self.position = (epoch, 0)
        return {"kd_factor": self.factor}

    def distill_loss(self, s: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The distillation term D(student, teacher) before the warm-up factor."""
        return self.term(s, t, y).total

    def label_loss(self, s: Tensor, y: Tensor, target: Optional[Tensor]) -> Tensor:
        """CE on the labels (with label smoothing), soft-target CE on mixed targets (timm's SoftTargetCrossEntropy),
        or timm's BinaryCrossEntropy on either (loss.label_loss bce, Hao et al.'s --bce-loss)."""
        s = s.float()
        if self.bce is not None:
            return self.bce(s, target if target is not None else y)
        if target is not None:
            return torch.sum(-target * F.log_softmax(s, dim=-1), dim=-1).mean()
        return F.cross_entropy(s, y, label_smoothing=self.cfg.label_smoothing)

    def compute(self, batch: Any, epoch: int) -> StepResult:
        ctx, c = self.ctx, self.cfg
        images, y = batch
        x, y = to_float(images, self.device, ctx.channels_last), y.to(self.device)
        done = self.position[1] if self.position[0] == epoch else 0
        self.position = (epoch, done + 1)
        target = None
        if self.augment is not None:
            env = ctx.env
            x, target = self.augment(x, y, sample_seed(ctx.recipe.train.seed ^ 0x6D6978, epoch, done * env.world_size + env.rank))
        hard = target.argmax(1) if target is not None else y  # each mixed image's class: the larger share (Hao et al.)
        t = None
        if self.teacher is not None:  # None for the no-distillation baseline (loss.name = ce)
            with torch.inference_mode(), ctx.autocast():
                t = self.teacher(x)
            t = t.float().clone()  # a normal tensor again: the loss saves it for the student's backward
        ctx.model.train()
        with ctx.autocast():
            s = ctx.model(x)
        ce = c.ce_weight * self.label_loss(s, y, target)
        kd = self.factor * self.distill_loss(s, t, hard) if t is not None else s.new_zeros(())
        if t is not None:
            self.term.update(t, hard)  # softmax(teacher / T2) per class, for the next epoch
        loss = ce + kd
        acc = 100.0 * float((s.argmax(1) == hard).float().mean())
        return StepResult(loss, {"loss": loss.detach(), "ce": ce.detach(), "kd": kd.detach(), "acc": acc}, len(y))

    def end_epoch(self, epoch: int) -> None:
        self.term.end_epoch()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, prefix: str) -> dict[str, float]:
        return evaluate_topk(model, loader, prefix, self.device, self.ctx, self.class_counts)

    def state_dict(self) -> dict[str, Any]:
        return {**self.term.state_dict(), "position": list(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.term.load_state_dict(state)
        self.position = tuple(state.get("position", (0, 0)))


class DistillWorkload(ImageWorkload):
    """`ImageWorkload` with what distillation recipes add: the timm training view (data.augment timm), and
    timm students built with model.drop_path (timm's drop_path_rate) and model.pretrained (a weight file,
    loaded strictly). Other students have no stochastic depth: model.drop_path does nothing for them (the
    toy-scale runs swap a timm student for resnet8)."""

    def __init__(self, recipe: Any, data_dir: Optional[str], env: DistEnv):
        super().__init__(recipe, data_dir, env)
        self.data_dir = data_dir
        self.view = train_view(recipe.data, self.data.train, self.data.generated, recipe.train.seed)

    def build_model(self, env: DistEnv) -> tuple[nn.Module, nn.Module, nn.Module]:
        cfg = self.recipe.model
        if not is_timm(cfg.arch):  # (the recipe check refuses drop_path and pretrained for other students)
            return super().build_model(env)
        weights = resolve_teacher_path(cfg.pretrained, self.data_dir, "model.pretrained", cfg.arch) if cfg.pretrained else None
        built = build_model(self.recipe, self.num_classes, env, drop_path=cfg.drop_path, weights=weights)
        self.module = built[0]
        return built


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

    kwargs.setdefault("make_workload", DistillWorkload)
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
