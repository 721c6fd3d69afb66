"""Segmentation distillation (paper §6.4, TABLE XXIII) as an engine `Step` and `Workload`: APD on ADE20K with
its KL term or GKL in its place, and the student alone (the baseline row).

Per step (APD's `tool/train.py`, `gklcli.seg_losses` for the formulas), on B crops of 473×473:

    main_weight·CE(up(s), y) + aux_weight·CE(up(s_aux), y)                      the student's own loss
    + D(up(s), up(t))                                                           loss.name kd (APD's KL) or gkl
    + pred_kmeans_weight·prototype KL + proto_align_weight·prototype alignment   APD's adaptive-perspective terms

up(·) is the bilinear upsampling of 1/8-resolution logits to the crop; CE ignores label 255. The frozen
PSPNet-R101 teacher runs in eval mode (APD: `t_model.eval()`) under `inference_mode`. The teacher's 1×1
adapter is trained by its own Adam on the prototype segmentation loss *before* the student's update, as
APD does (at a constant lr: APD's poly update of it loops over parameter groups from index 5 of a one-group
optimizer, so it never runs), and lives in this step's state (checkpointed, resumed); the student's adapter is part of the
student (`PSPNet.kd_adapter`) and trains with its head at 10× lr. loss.name ce is the baseline: no teacher,
no adapters. The evaluated number is mIoU on ADE20K's validation split (its test labels are not public;
APD and the paper report val), single-scale sliding windows with flip (`gklcli.seg_eval`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gklcli.checkpoint import load_file
from gklcli.distributed import DistEnv, all_reduce_sum, is_distributed
from gklcli.errors import GKLError
from gklcli.loading import extract_state_dict, strip_prefixes
from gklcli.losses import LossTerm, get_loss
from gklcli.models import create_model, get_spec
from gklcli.models.pspnet import CSAIL_URL, backbone_state
from gklcli.recipes import Recipe
from gklcli.sampling import EpochBatchSampler
from gklcli.seg_data import IGNORE, SegTrainView, eval_batches, open_split
from gklcli.seg_eval import evaluate_segmentation
from gklcli.seg_losses import nearest_labels, pixel_distillation, pixels, prototype_terms, upsample
from gklcli.train.build import wrap_model
from gklcli.train.engine import Context, StepResult
from gklcli.train.kd import resolve_teacher_path
from gklcli.train.workload import image_meta, worker_errors

def uses_teacher(recipe: Recipe) -> bool:
    return get_loss(recipe.loss.name, "seg").needs_teacher


def uses_prototypes(recipe: Recipe) -> bool:
    """APD's adaptive-perspective terms (and both adapters) are on: a teacher and a non-zero weight."""
    s = recipe.seg
    return uses_teacher(recipe) and (s.pred_kmeans_weight > 0 or s.proto_align_weight > 0)


def data_root(recipe: Recipe, data_dir: Optional[str]) -> Path:
    """Where ADE20K is looked for: `data.root` when the recipe names one (the smoke runs' generated folder),
    else --data-dir (else ./data); `seg_data.dataset_root` then finds ADEChallengeData2016 in it."""
    return Path(recipe.data.root or data_dir or "data")


class SegWorkload:
    """ADE20K crops (APD's augmentation, seeded per sample) and a PSPNet student initialised from ImageNet."""

    class_counts = None

    def __init__(self, recipe: Recipe, data_dir: Optional[str], env: DistEnv):
        self.recipe, self.env, self.data_dir = recipe, env, data_dir
        s, root = recipe.seg, data_root(recipe, data_dir)
        self.num_classes = s.num_classes
        self.train = open_split(s, root, "train", s.num_classes)
        # ADE20K's test labels are not public: the validation split is both the per-epoch curve (eval.n_val
        # images) and the final number (eval.n_test, all by default), as in APD
        self.val = self.test = open_split(s, root, "val", s.num_classes)
        self.sampler = EpochBatchSampler(len(self.train), recipe.data.batch_size, seed=recipe.train.seed,
                                         drop_last=recipe.data.drop_last, rank=env.rank, world_size=env.world_size)
        self.adapter_dim = s.adapter_dim if uses_prototypes(recipe) else 0
        self.module: Optional[nn.Module] = None

    def build_model(self, env: DistEnv) -> tuple[nn.Module, nn.Module, nn.Module]:
        r = self.recipe
        module = create_model(r.model.arch, self.num_classes, adapter_dim=self.adapter_dim)
        if r.model.pretrained:
            load_backbone(module, pretrained_path(r, self.data_dir))
        if r.model.sync_bn and env.distributed:  # APD: sync_bn True
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        self.module, model, attack = wrap_model(module, r, env)
        return self.module, model, attack

    def steps_per_epoch(self) -> int:
        r = self.recipe
        steps = self.sampler.batches_per_epoch()
        if steps == 0:
            raise GKLError(f"data.batch_size: {r.data.batch_size} is larger than the training split ({len(self.train)} images)")
        return min(steps, r.train.max_steps_per_epoch) if r.train.max_steps_per_epoch else steps

    def train_loader(self, epoch: int, start: int) -> Any:
        self.sampler.set_epoch(epoch, start)
        loader = torch.utils.data.DataLoader(SegTrainView(self.train, self.recipe.seg, self.recipe.train.seed),
                                             batch_sampler=self.sampler, num_workers=self.recipe.data.num_workers,
                                             pin_memory=self.env.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(self.recipe.train.seed))
        return worker_errors(loader)

    def eval_loader(self, source: Any, n: Optional[int]) -> Any:
        return worker_errors(eval_batches(source, n, self.env.rank, self.env.world_size, self.recipe.data.num_workers))

    def meta(self) -> dict[str, Any]:
        meta = image_meta(self.recipe, self.num_classes, self.recipe.seg.crop_size, self.module)
        return meta | {"dataset": "ade20k", "model_kwargs": {"adapter_dim": self.adapter_dim}}


def pretrained_path(recipe: Recipe, data_dir: Optional[str]) -> Path:
    """model.pretrained, found as teacher files are; a missing file names where APD's comes from."""
    try:
        return resolve_teacher_path(recipe.model.pretrained, data_dir, key="model.pretrained")
    except GKLError as error:
        name = {"pspnet-r18": "resnet18", "pspnet-r50": "resnet50", "pspnet-r101": "resnet101"}.get(get_spec(recipe.model.arch).name)
        source = f"; APD initialises from {CSAIL_URL.format(name=name)} (gkl fetch teachers seg)" if name else ""
        raise GKLError(f"{str(error).split(';')[0]}{source}") from None


# BatchNorm's step counter: absent from files saved before PyTorch 0.4.1 and read by nothing here (fixed momentum)
OPTIONAL_BUFFER = "num_batches_tracked"


def _misfit(mine: dict[str, Tensor], state: dict[str, Tensor], optional: tuple[str, ...], unexpected: bool) -> list[str]:
    """What keeps `state` from filling `mine`: missing keys (bar `optional` prefixes and the BatchNorm counter),
    unexpected ones (when asked), the first shape that differs; empty when it fits."""
    def spare(key: str) -> bool:
        return key.startswith(optional) or key.endswith(OPTIONAL_BUFFER)

    missing = [k for k in mine if k not in state and not spare(k)]
    extra = [k for k in state if k not in mine and not spare(k)] if unexpected else []
    wrong = [k for k in mine if k in state and state[k].shape != mine[k].shape]
    return [f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(extra[:3])}" if extra else "",
            f"shape of {wrong[0]}: {tuple(state[wrong[0]].shape)} ≠ {tuple(mine[wrong[0]].shape)}" if wrong else ""]


def _fill(model: nn.Module, state: dict[str, Tensor], keys: Any) -> None:
    mine = model.state_dict()
    model.load_state_dict({**mine, **{k: state[k].to(mine[k].dtype) for k in keys if k in state}})


def load_backbone(model: nn.Module, path: Path, what: str = "model.pretrained") -> None:
    """APD's ImageNet initialisation of layer0–layer4: every backbone tensor must come from the file."""
    state = backbone_state(strip_prefixes(extract_state_dict(load_file(path), path)))
    mine = {k: v for k, v in model.state_dict().items() if k.split(".")[0].startswith("layer")}
    problems = [p for p in _misfit(mine, state, (), unexpected=False) if p]
    if problems:
        raise GKLError(f"{what}: {path} is not a deep-stem ImageNet ResNet of this depth ({problems[0]}); APD reads CSAIL's "
                       f"{CSAIL_URL.format(name='resnet18')} (…resnet50/resnet101-imagenet.pth)")
    _fill(model, state, mine)


def load_segmentation_weights(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """A whole PSPNet's weights (APD's release or a gkl run). A teacher file without the auxiliary head or
    adapter loads too: a teacher uses neither."""
    state = strip_prefixes(state)
    problems = [p for p in _misfit(model.state_dict(), state, ("aux.", "kd_adapter."), unexpected=True) if p]
    if problems:
        raise GKLError(f"{what}: the weights do not fit {type(model).__name__} ({'; '.join(problems)})")
    _fill(model, state, model.state_dict())


def check_inputs(recipe: Recipe, data_dir: Optional[str], teacher_only: bool = False) -> None:
    """What a run reads before its first step: ADE20K's two splits, the backbone file, the teacher file."""
    from gklcli.seg_data import dataset_root

    base = dataset_root(data_root(recipe, data_dir))
    for split in ("training", "validation"):
        if not (base / "images" / split).is_dir():
            raise GKLError(f"data.root: {base / 'images' / split} is missing (ADE20K's {split} split)")
    if recipe.model.pretrained and not teacher_only:
        pretrained_path(recipe, data_dir)
    if uses_teacher(recipe) or teacher_only:
        resolve_teacher_path(recipe.teacher.checkpoint, data_dir)


def load_seg_teacher(recipe: Recipe, num_classes: int, device: torch.device, data_dir: Optional[str]) -> nn.Module:
    """The frozen PSPNet teacher: APD's release (`{'state_dict': {'module.…'}}`) or a gkl seg-kd checkpoint."""
    path = resolve_teacher_path(recipe.teacher.checkpoint, data_dir)
    teacher = create_model(recipe.teacher.arch, num_classes)
    load_segmentation_weights(teacher, extract_state_dict(load_file(path), path), f"teacher.checkpoint {path}")
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def adapter(channels: int, hidden: int) -> nn.Sequential:
    """APD's StuTransConv/TeaTransConv: 1×1 → ReLU → 1×1."""
    return nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))


def _sync_from_rank0(module: nn.Module) -> None:
    if is_distributed():
        import torch.distributed as dist

        for p in module.parameters():
            dist.broadcast(p.data, 0)


def _average_grads(module: nn.Module) -> None:
    """DDP's gradient averaging for the teacher adapter (APD wraps it in DDP; it trains outside the engine).
    Every rank runs the same collectives, whatever its batch held (a missing gradient counts as zero)."""
    if is_distributed():
        import torch.distributed as dist

        for p in module.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def labelled_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """nn.CrossEntropyLoss(ignore_index=255): the mean over labelled pixels (0, not NaN, when there are none)."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp_min(1)


class SegStep:
    """APD's segmentation distillation (or the student alone) on one batch of crops."""

    selection_metric = "val_miou"

    def __init__(self, ctx: Context, teacher: Optional[nn.Module]):
        r = ctx.recipe
        self.ctx, self.seg, self.teacher = ctx, r.seg, teacher
        settings = SimpleNamespace(**dataclasses.asdict(r.loss))
        self.term = LossTerm(r.loss.name, "seg", settings, ctx.num_classes, ctx.env.device)
        self.teacher_adapter: Optional[nn.Module] = None
        self.teacher_optim: Optional[torch.optim.Optimizer] = None
        if teacher is not None and uses_prototypes(r):
            self.teacher_adapter = adapter(teacher.merge_dim, r.seg.adapter_dim).to(ctx.env.device)
            _sync_from_rank0(self.teacher_adapter)
            self.teacher_optim = torch.optim.Adam(self.teacher_adapter.parameters(), lr=r.seg.teacher_lr, betas=(0.9, 0.99))

    def begin_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def _distill(self, out: Any, teacher: Any, labels: Tensor, metrics: dict[str, Any]) -> Tensor:
        """The pixel term (KL or GKL, pixels as samples) and APD's prototype terms."""
        c = self.ctx.num_classes
        kd = pixel_distillation(self.term, out.logits.float(), teacher.logits, labels, self.seg.kd_reduction)
        if self.term.prior is not None:  # the class prior: the teacher's mean prediction per labelled class, over
            # its own output pixels (1/8 resolution, the mask by nearest): the same mean, 64× fewer rows than the crop
            small = nearest_labels(labels, tuple(teacher.logits.shape[2:])).reshape(-1)
            valid = small != IGNORE
            self.term.update(pixels(teacher.logits)[valid], small[valid])
        metrics["kd"] = kd.detach()
        if self.teacher_adapter is None:
            return kd
        protos = prototype_terms(out.adapted.float(), self.teacher_adapter(teacher.features), labels, num_classes=c,
                                 temperature=self.seg.kmeans_temp, normalize=self.seg.kmeans_norm)
        # APD trains the teacher adapter first, on its own loss, with its own Adam, and skips the step when the batch
        # has no labelled pixel at the feature size; under DDP every rank runs the backward and the averaging (a rank
        # without prototypes adds zeros) and all step unless no rank had any, so the collectives always pair up
        self.teacher_optim.zero_grad(set_to_none=True)
        protos.teacher_ce.backward()
        _average_grads(self.teacher_adapter)
        if all_reduce_sum([float(protos.classes)], self.ctx.env.device)[0] > 0:
            self.teacher_optim.step()
        metrics.update(proto_kl=protos.student_kl.detach(), proto_align=protos.align.detach(), teacher_ce=protos.teacher_ce.detach())
        return kd + self.seg.pred_kmeans_weight * protos.student_kl + self.seg.proto_align_weight * protos.align

    def compute(self, batch: Any, epoch: int) -> StepResult:
        ctx, s, device = self.ctx, self.seg, self.ctx.env.device
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        if ctx.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        teacher = None
        if self.teacher is not None:
            with torch.inference_mode(), ctx.autocast():
                t = self.teacher.parts(images, aux=False)
            teacher = SimpleNamespace(logits=t.logits.float().clone(), features=t.features.float().clone())
        ctx.model.train()
        with ctx.autocast():
            out = ctx.model(images)
        size = tuple(labels.shape[1:])
        logits = upsample(out.logits.float(), size)
        main = labelled_ce(logits, labels)
        aux = labelled_ce(upsample(out.aux.float(), size), labels)
        loss = s.main_weight * main + s.aux_weight * aux
        metrics: dict[str, Any] = {"main": main.detach(), "aux": aux.detach()}
        if teacher is not None:
            loss = loss + self._distill(out, teacher, labels, metrics)
        valid = labels != IGNORE
        metrics["acc"] = 100.0 * float((logits.argmax(1)[valid] == labels[valid]).float().mean()) if valid.any() else 0.0
        metrics["loss"] = loss.detach()
        return StepResult(loss, metrics, len(images))

    def end_epoch(self, epoch: int) -> None:
        self.term.end_epoch()

    def evaluate(self, model: nn.Module, loader: Any, prefix: str) -> dict[str, float]:
        result = evaluate_segmentation(model, loader, self.seg, self.ctx.num_classes, self.ctx.env.device, self.ctx.autocast)
        return {f"{prefix}_{k}": v for k, v in result.items()}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"term": self.term.state_dict()}
        if self.teacher_adapter is not None:
            state |= {"teacher_adapter": self.teacher_adapter.state_dict(), "teacher_optim": self.teacher_optim.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.term.load_state_dict(state["term"])
        if self.teacher_adapter is not None:
            self.teacher_adapter.load_state_dict(state["teacher_adapter"])
            self.teacher_optim.load_state_dict(state["teacher_optim"])


def train_seg(recipe: Recipe, *, data_dir: Optional[str] = None, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) segmentation distillation of `recipe`; keyword arguments as `engine.run_training`."""
    from gklcli.train.engine import run_training

    def make_step(ctx: Context) -> SegStep:
        teacher = load_seg_teacher(recipe, ctx.num_classes, ctx.env.device, data_dir) if uses_teacher(recipe) else None
        return SegStep(ctx, teacher)

    return run_training(recipe, make_step, data_dir=data_dir, make_workload=SegWorkload, **kwargs)


def seg_teacher_report(recipe: Recipe, *, data_dir: Optional[str], device: Optional[str]) -> dict[str, Any]:
    """`gkl distill --teacher-only` (and TABLE XXIII's Teacher mIoU): the frozen teacher's mIoU on the
    validation split, evaluated as the students are (`test_*`: the split the table reports)."""
    import contextlib

    from gklcli.distributed import pick_device

    dev = pick_device(device)
    s = recipe.seg
    source = open_split(s, data_root(recipe, data_dir), "val", s.num_classes)
    teacher = load_seg_teacher(recipe, s.num_classes, dev, data_dir)
    batches = worker_errors(eval_batches(source, recipe.eval.n_test, 0, 1, recipe.data.num_workers))
    result = evaluate_segmentation(teacher, batches, s, s.num_classes, dev, contextlib.nullcontext)
    return {"teacher": recipe.teacher.arch, "checkpoint": recipe.teacher.checkpoint} | {f"test_{k}": v for k, v in result.items()}


# ---------------------------------------------------------------------------------------------------
# `gkl reproduce table23 --smoke`: generated scenes, tiny PSPNets, a briefly trained teacher
# ---------------------------------------------------------------------------------------------------

SMOKE_CLASSES = 8


def smoke_overrides(root: Path) -> list[str]:
    """Toy scale: pspnet-tiny on 8-class generated scenes of ~40 px, two epochs of three steps."""
    return [
        f"data.root={root / 'data' / 'ade20k'}", "data.batch_size=4", "data.num_workers=0", "model.arch=pspnet-tiny",
        "model.pretrained=null", "model.sync_bn=false", f"seg.num_classes={SMOKE_CLASSES}", "seg.crop_size=33",
        "seg.base_size=40", "seg.adapter_dim=16", "teacher.arch=pspnet-tiny", f"teacher.checkpoint={root / 'seg-teacher' / 'last.pt'}",
        "schedule.epochs=2", "train.max_steps_per_epoch=3", "eval.every_epochs=1", "eval.n_val=4", "eval.n_test=null",
        "train.amp=none", "output.tensorboard=false", "output.plots=false",
    ]


def build_smoke_inputs(jobs: list[Any], root: Path, device: Optional[str], console: Any) -> None:
    """The generated ADE20K folder, and the teacher: the baseline recipe at toy scale, 4 epochs."""
    from gklcli.recipes import load_recipe, resolve_recipe_path
    from gklcli.seg_data import write_synthetic_ade20k

    seg = [j for j in jobs if j.recipe.kind == "seg-kd"]
    if not seg:
        return
    write_synthetic_ade20k(root / "data" / "ade20k", num_train=24, num_val=6, size=40, num_classes=SMOKE_CLASSES)
    folder = root / "seg-teacher"
    if not (folder / "results.json").is_file():
        recipe = load_recipe(resolve_recipe_path(seg[0].spec.recipe),
                             [*smoke_overrides(root), "loss.name=ce", "schedule.epochs=4", "train.seed=0", "meta.name=smoke-seg-teacher"])
        train_seg(recipe, out_dir=folder, resume=(folder / "last.pt").is_file(), quiet=True, device=device, console=console)


def seg_preview(recipe: Recipe) -> dict[str, Any]:
    """The numbers of `gkl distill --dry-run` for kind seg-kd (no data read: ADE20K's split sizes)."""
    from gklcli.models import count_params
    from gklcli.seg_data import ADE20K_SIZES

    s, d = recipe.seg, recipe.data
    steps = ADE20K_SIZES["train"] // d.batch_size if d.drop_last else -(-ADE20K_SIZES["train"] // d.batch_size)
    steps = min(steps, recipe.train.max_steps_per_epoch or steps)
    teacher = uses_teacher(recipe)
    return {
        "recipe": recipe.meta.name, "arch": get_spec(recipe.model.arch).name, "params": count_params(recipe.model.arch, s.num_classes),
        "teacher": recipe.teacher.arch if teacher else None, "teacher_checkpoint": recipe.teacher.checkpoint if teacher else None,
        "prototypes": uses_prototypes(recipe), "pretrained": recipe.model.pretrained, "classes": s.num_classes,
        "train_images": ADE20K_SIZES["train"], "val_images": ADE20K_SIZES["val"], "crop": s.crop_size, "batch": d.batch_size,
        "steps_per_epoch": steps, "epochs": recipe.schedule.epochs, "total_steps": steps * recipe.schedule.epochs,
        "pixel_term": get_loss(recipe.loss.name, "seg").describe("seg", recipe.loss) if teacher else None,
    }


def print_seg_preview(p: dict[str, Any], recipe: Recipe, console: Any) -> None:
    s, o, sched = recipe.seg, recipe.optim, recipe.schedule
    console.print(f"[bold]{p['recipe']}[/]: {p['arch']} ({p['params'] / 1e6:.1f}M params, "
                  + (f"backbone from {p['pretrained']}" if p["pretrained"] else "from scratch") + f") on ADE20K: "
                  f"{p['train_images']:,} training / {p['val_images']:,} validation images, {p['classes']} classes")
    if p["teacher"]:
        protos = (f"; APD prototypes: KL ×{s.pred_kmeans_weight:g}, align ×{s.proto_align_weight:g}, temperature "
                  f"{s.kmeans_temp:g}, adapters {s.adapter_dim}, teacher adapter Adam lr {s.teacher_lr:g}") if p["prototypes"] else ""
        console.print(f"teacher {p['teacher']} ({p['teacher_checkpoint']}, frozen, eval mode); pixel term {p['pixel_term']}, "
                      f"{'÷C (APD element mean)' if s.kd_reduction == 'elements' else 'per-pixel mean'}{protos}")
    else:
        console.print("no teacher: the student alone (CE + auxiliary CE)")
    console.print(f"{p['epochs']} epochs × {p['steps_per_epoch']:,} steps = {p['total_steps']:,} steps of {p['batch']} crops "
                  f"{p['crop']}×{p['crop']} (scale {s.scale_range[0]:g}–{s.scale_range[1]:g}, rotate ±{max(map(abs, s.rotate_range)):g}°, "
                  f"blur, flip); CE ×{s.main_weight:g} + aux ×{s.aux_weight:g}")
    console.print(f"{o.name} lr {o.lr:g} (head ×{o.head_lr_scale:g}) momentum {o.momentum:g} wd {o.weight_decay:g}; "
                  f"{sched.lr_schedule}" + (f" power {sched.poly_power:g}" if sched.lr_schedule == "poly" else "")
                  + f"; evaluation: {s.eval_mode} {s.crop_size}² windows at long side {s.base_size}"
                  + (f" × scales {s.eval_scales}" if s.eval_scales != [1.0] else " (single scale)")
                  + (", flip" if s.eval_flip else "") + "; reported: the last epoch's validation mIoU")
