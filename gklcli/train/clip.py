"""CLIP distillation (paper §4.4, TABLE VII) as an engine `Step` and `Workload`.

The student (an OpenCLIP model, from scratch) learns from image–caption pairs with CLIP's contrastive
loss plus a distillation term on its similarity logits against a frozen, pre-trained teacher's:

    loss = ce_weight·½[CE(S_i→t, y) + CE(S_t→i, y)] + min(epoch/warmup, 1)·½[D(S_i→t, T_i→t) + D(S_t→i, T_t→i)]

* S_i→t = s·f_img·f_txtᵀ (rows: this process's images, columns: every caption of the global batch) and
  S_t→i the transpose direction; s is the model's own logit scale (exp of `logit_scale`, clamped to 100
  after each step as OpenCLIP does), T the same for the teacher. y: each row's own pair.
* D through the loss registry: ``kd`` = KL-KD at temperature t (×t²), ``gkl`` = GKL-KD with the
  sample-wise weights φ* = √(S(w_m)^γ) of §4.4 (w_m from the teacher's row), ``ce`` = no distillation
  (the baseline row). The paper gives no CLIP code; the terms are the registry's formulas unchanged.
* Under DDP the features of all ranks are gathered — the local part with its gradient
  (`torch.distributed.nn.functional.all_gather`), OpenCLIP's ``--gather-with-grad --local-loss`` — so the
  logits span the global batch and the DDP-averaged gradient is the global loss's.
* The teacher's features are computed once per batch, under `inference_mode`, on the student's
  augmented images. They are not cached across epochs: each epoch is a fresh random sample of the
  pool with fresh crops, so a cache would almost never hit, and at DataComp scale it would hold
  ~3 KB per pair (fp16 image + text features of ViT-L/14) for a pool of 1.28 B pairs. The teacher's
  share of a step is measured by `benchmarks/bench_clip_step.py`.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from gklcli.distributed import DistEnv, is_distributed
from gklcli.errors import GKLError
from gklcli.losses import LossTerm, clip_contrastive, clip_logits, get_loss
from gklcli.models.clip import create_clip, image_spec, resolve_weights, tokenizer
from gklcli.recipes import Recipe
from gklcli.train.build import wrap_model
from gklcli.train.engine import Context, StepResult
from gklcli.train.kd import warmup_factor
from gklcli.train.workload import worker_errors

MAX_LOGIT_SCALE = math.log(100)  # OpenCLIP clamps logit_scale to [0, ln 100] after every step


def gather_features(x: Tensor, *, with_grad: bool) -> Tensor:
    """The features of every rank, concatenated in rank order (the input itself without DDP).

    `with_grad` keeps the gradient of every rank's part (its backward sums the gradients from all ranks
    into the local features), so rank r's local loss reaches the other ranks' encoders."""
    if not is_distributed():
        return x
    import torch.distributed as dist

    if with_grad:
        import torch.distributed.nn.functional as dist_nn

        return torch.cat(dist_nn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def similarity_logits(image: Tensor, text: Tensor, scale: Tensor, *, with_grad: bool) -> tuple[Tensor, Tensor]:
    """(image→text, text→image) logits of the local pairs against the global batch."""
    return clip_logits(image, text, gather_features(image, with_grad=with_grad),
                       gather_features(text, with_grad=with_grad), scale)


def local_labels(n: int, device: torch.device) -> Tensor:
    """Row i of this rank's logits matches column rank·n + i of the global batch."""
    import torch.distributed as dist

    rank = dist.get_rank() if is_distributed() else 0
    return torch.arange(n, device=device) + rank * n


class ClipStep:
    """Contrastive training of an OpenCLIP student with an optional frozen OpenCLIP teacher."""

    selection_metric = "val_r1"

    def __init__(self, ctx: Context, teacher: Optional[nn.Module]):
        self.ctx, self.cfg, self.teacher = ctx, ctx.recipe.loss, teacher
        # one loss over the global batch, split over the processes: Σw normalisers are global (losses._normalise)
        settings = SimpleNamespace(**dataclasses.asdict(self.cfg), across_ranks=True)
        self.term = LossTerm(self.cfg.name, "clip", settings, 1, ctx.env.device)
        if not self.term.entry.needs_teacher:  # the baseline row: the contrastive loss alone
            self.teacher = None
        self.factor = 1.0

    def begin_epoch(self, epoch: int) -> dict[str, float]:
        self.factor = warmup_factor(epoch, self.cfg.warmup_epochs)
        return {"kd_factor": self.factor}

    def compute(self, batch: dict[str, Any], epoch: int) -> StepResult:
        ctx, c, device = self.ctx, self.cfg, self.ctx.env.device
        images = batch["images"].to(device, non_blocking=True)
        tokens = batch["tokens"].to(device, non_blocking=True)
        if ctx.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        teacher = None
        if self.teacher is not None:
            with torch.inference_mode(), ctx.autocast():
                t_img, t_txt, t_scale = self.teacher(images, tokens)
            t_img, t_txt, t_scale = (t.float().clone() for t in (t_img, t_txt, t_scale))  # normal tensors again
            teacher = similarity_logits(t_img, t_txt, t_scale, with_grad=False)
        ctx.model.train()
        with ctx.autocast():
            img, txt, scale = ctx.model(images, tokens)
        student = similarity_logits(img.float(), txt.float(), scale.float(), with_grad=True)
        labels = local_labels(len(images), device)
        contrastive = c.ce_weight * clip_contrastive(*student, labels)
        kd = (self.factor * self.term.both_directions(student, teacher, labels).total if teacher is not None
              else contrastive.new_zeros(()))
        loss = contrastive + kd
        n = len(images)
        metrics: dict[str, Tensor | float] = {
            "loss": loss.detach(), "contrastive": contrastive.detach(), "kd": kd.detach(),
            "acc": 100.0 * float((student[0].argmax(1) == labels).float().mean()), "logit_scale": float(scale.detach()),
        }
        # samples the data stream skipped while forming this batch, per trained sample (× samples = the count)
        for reason, count in (batch.get("bad") or {}).items():
            metrics[f"skipped_{reason}"] = count / n
        module = ctx.module
        return StepResult(loss, metrics, n, after_update=lambda: module.logit_scale.data.clamp_(0, MAX_LOGIT_SCALE))

    def end_epoch(self, epoch: int) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, prefix: str) -> dict[str, float]:
        return retrieval_metrics(model, loader, prefix, self.ctx.env.device, self.ctx.autocast)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@torch.no_grad()
def retrieval_metrics(model: nn.Module, loader: Any, prefix: str, device: torch.device, autocast: Any) -> dict[str, float]:
    """Image→text and text→image recall@1 (%) over held-out pairs, and their mean (`{prefix}_r1`)."""
    model.eval()
    images, texts = [], []
    for batch in loader:
        with autocast():
            img = model.encode_image(batch["images"].to(device), normalize=True)
            txt = model.encode_text(batch["tokens"].to(device), normalize=True)
        images.append(img.float())
        texts.append(txt.float())
    if not images:
        raise GKLError("data.val_pairs: no readable validation pairs")
    sims = torch.cat(images) @ torch.cat(texts).T
    truth = torch.arange(len(sims), device=sims.device)
    i2t = 100.0 * float((sims.argmax(1) == truth).float().mean())
    t2i = 100.0 * float((sims.argmax(0) == truth).float().mean())
    return {f"{prefix}_i2t_r1": i2t, f"{prefix}_t2i_r1": t2i, f"{prefix}_r1": (i2t + t2i) / 2, f"{prefix}_n": float(len(sims))}


class ClipWorkload:
    """Image–caption pairs streamed from tar shards or a CSV, and an OpenCLIP student."""

    num_classes = 0
    class_counts = None
    test = None

    def __init__(self, recipe: Recipe, data_dir: Optional[str], env: DistEnv):
        from gklcli.pairs import open_pool, pool_path

        self.recipe, self.env, d = recipe, env, recipe.data
        self.module = create_clip(recipe.model.arch)
        if recipe.model.grad_checkpointing:  # OpenCLIP's --grad-checkpointing: recompute activations in backward
            self.module.set_grad_checkpointing(True)
        self.image = image_spec(self.module)
        self.tokenize = tokenizer(recipe.model.arch)
        if d.batch_size % env.world_size:
            raise GKLError(f"data.batch_size: the global batch {d.batch_size} does not split over {env.world_size} processes")
        self.pool = open_pool(pool_path(d.pairs, data_dir), image_key=d.csv_image_key, caption_key=d.csv_caption_key)
        self.val = (open_pool(pool_path(d.val_pairs, data_dir), image_key=d.csv_image_key, caption_key=d.csv_caption_key)
                    if d.val_pairs else None)

    def build_model(self, env: DistEnv) -> tuple[nn.Module, nn.Module, nn.Module]:
        self.module, model, attack = wrap_model(self.module, self.recipe, env)
        return self.module, model, attack

    def steps_per_epoch(self) -> int:
        from gklcli.pairs import steps_per_epoch

        r = self.recipe
        try:
            steps = steps_per_epoch(r.data.samples_per_epoch, r.data.batch_size, self.pool)
        except GKLError as error:
            raise GKLError(f"data.batch_size: {error}") from None
        return min(steps, r.train.max_steps_per_epoch) if r.train.max_steps_per_epoch else steps

    def _loader(self, stream: Any) -> Iterator[Any]:
        """Batches come collated from the stream (its workers each own a lane of the epoch). The loader's
        own generator keeps the training RNG untouched; a worker's GKLError stays one line."""
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.recipe.data.num_workers,
                                             pin_memory=self.env.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(self.recipe.train.seed))
        return worker_errors(loader)

    def train_loader(self, epoch: int, start: int) -> Any:
        from gklcli.pairs import PairBatches, clip_transform

        r, i = self.recipe, self.image
        stream = PairBatches(self.pool, clip_transform(i.size, i.mean, i.std, train=True), self.tokenize,
                             batch_size=r.data.batch_size // self.env.world_size, seed=r.train.seed, rank=self.env.rank,
                             world_size=self.env.world_size, num_workers=r.data.num_workers, epoch=epoch,
                             start_batch=start, steps=self.steps_per_epoch(), shuffle_buffer=r.data.shuffle_buffer)
        return self._loader(stream)

    def eval_loader(self, source: Any, n: Optional[int]) -> Any:
        from gklcli.pairs import PairPass, clip_transform

        i, d = self.image, self.recipe.data
        return PairPass(source, clip_transform(i.size, i.mean, i.std, train=False), self.tokenize,
                        batch_size=d.eval_batch_size, limit=n)

    def meta(self) -> dict[str, Any]:
        i = self.image
        return {"arch": self.recipe.model.arch, "num_classes": None, "dataset": "pairs", "image_size": i.size,
                "input_norm": {"mean": list(i.mean), "std": list(i.std)}}


def load_clip_teacher(recipe: Recipe, student: nn.Module, device: torch.device, data_dir: Optional[str] = None) -> nn.Module:
    """The frozen OpenCLIP teacher; it must read the student's images and tokens (one stream feeds both)."""
    t = recipe.teacher
    if not t.checkpoint:
        raise GKLError("teacher.checkpoint: CLIP distillation needs the teacher's weights: an OpenCLIP pretrained tag "
                       "(such as datacomp_xl_s13b_b90k for open_clip:ViT-L-14) or a weight file")
    teacher = create_clip(t.arch, resolve_weights(t.checkpoint, data_dir), cache_dir=t.cache_dir)
    mine, theirs = image_spec(student), image_spec(teacher)
    if mine != theirs:
        raise GKLError(f"teacher.arch: {t.arch} expects {theirs.size}-px images normalised by {theirs.mean}/{theirs.std}, "
                       f"the student {mine.size}-px by {mine.mean}/{mine.std}; gkl feeds both the same images")
    if tokenizer(t.arch).context_length != tokenizer(recipe.model.arch).context_length:
        raise GKLError(f"teacher.arch: {t.arch} reads captions of another context length than {recipe.model.arch}")
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def train_clip(recipe: Recipe, *, data_dir: Optional[str] = None, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) CLIP distillation of `recipe`; keyword arguments as `engine.run_training`."""
    from gklcli.train.engine import run_training

    def make_step(ctx: Context) -> ClipStep:
        needs = get_loss(recipe.loss.name, "clip").needs_teacher
        return ClipStep(ctx, load_clip_teacher(recipe, ctx.module, ctx.env.device, data_dir) if needs else None)

    return run_training(recipe, make_step, data_dir=data_dir, make_workload=ClipWorkload, **kwargs)

