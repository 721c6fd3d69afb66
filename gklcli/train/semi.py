"""Semi-supervised learning (paper §6.4, TABLE XXII) as an engine `Step` and `Workload`: USB's FixMatch and
Mean-Teacher on CIFAR-100 with 2 labels per class, the consistency loss from the registry (kind "semi").

Each step takes B labelled images (weak view) and uB unlabelled ones (`gklcli.semi_data`); the loss is

    CE(labelled logits, y) + λ_u · ramp(k) · consistency(student, teacher, mask)

* **FixMatch** (USB `fixmatch.py`, `use_cat: True`): one forward in train mode over cat(labelled, weak,
  strong). teacher = the weak logits, student = the strong ones; mask = max softmax(weak, detached) ≥
  `semi.p_cutoff` (T = 1: USB's `T: 0.5` is never applied). Pseudo-labels: ``ce`` on argmax (hard,
  `semi.hard_label: true`), ``sce`` on the weak softmax (soft), ``gkl`` on the weak logits. The weak
  logits carry gradient only into GKL's wMSE term (through their differences and its weights), as the
  DKL fork computes it; `semi.weak_grad: false` detaches them. No EMA (USB's `ema_m: 0`: ema.mode none).
* **Mean-Teacher** (USB `meanteacher.py` with the DKL fork's fix): the teacher is the EMA of the student
  (`ema.mode: step`, constant decay `ema.tau` from the initial weights, `ema.dynamic: false`), run with
  the EMA weights (`ctx.averager.state`, `torch.func.functional_call`) under no_grad in train mode
  (stochastic depth on, as USB) on weak view 1; the student sees weak view 2. gkl runs the student's
  labelled and unlabelled images in one forward (USB: two; the ViT has no BatchNorm, so only the
  stochastic-depth draws differ). Mask on the teacher's softmax when `semi.p_cutoff` is set; the
  consistency is masked and averaged over the unlabelled batch; ramp(k) = min(1, k / (unsup_warmup · K))
  with k the 0-based step and K all steps (USB MT: 0.4; the DKL fork's baseline: none).
* λ_u = `semi.ulb_loss_ratio`. The deployed (evaluated, exported) weights are the EMA for Mean-Teacher and
  the raw weights for FixMatch; results.json's `last.test_top1` is the last epoch's test top-1 (the
  table's column), `eval.test_every_epochs` adds the per-epoch test curve.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from gklcli.data import to_float
from gklcli.distributed import DistEnv
from gklcli.errors import GKLError
from gklcli.losses import LossTerm, get_loss
from gklcli.models import create_model, get_spec
from gklcli.recipes import Recipe
from gklcli.semi_data import STEPS_PER_EPOCH, SemiBatches, describe_split, load_semi_sources, semi_train_loader, usb_split
from gklcli.train.engine import Context, StepResult
from gklcli.train.kd import evaluate_topk
from gklcli.train.workload import image_eval_loader, image_meta

PRETRAINED_HINT = "mkdir -p data/pretrained && curl -L -o data/pretrained/{name} {url}"


def weak_grad(recipe: Recipe) -> bool:
    """FixMatch: whether the weak logits receive the GKL wMSE gradient (the DKL fork: yes)."""
    return recipe.semi.weak_grad


def check_semi_recipe(recipe: Recipe) -> None:
    """The cross-key rules of a semi recipe, each refused in one line naming the key."""
    s, loss = recipe.semi, recipe.loss
    get_loss(loss.name, "semi")  # the recipe check names the valid ones
    if s.hard_label != (loss.name == "ce"):
        raise GKLError(f"semi.hard_label: {str(s.hard_label).lower()} with loss.name {loss.name!r}: hard pseudo-labels "
                       "are the CE loss 'ce' (hard_label: true); 'sce', 'gkl' and 'mse' use the soft prediction "
                       "(hard_label: false)")
    if loss.name == "gkl" and loss.weights != "sample":
        raise GKLError("loss.weights: the unlabelled images have no known class, so the GKL consistency's weights are "
                       "sample-wise (softmax of the teacher side); set loss.weights: sample")
    if s.algorithm == "meanteacher" and recipe.ema.mode != "step":
        raise GKLError(f"ema.mode: {recipe.ema.mode!r}: Mean-Teacher's teacher is the step EMA of the student; set "
                       "ema.mode: step (USB: ema.tau 0.999, ema.dynamic false)")
    if s.algorithm == "fixmatch" and s.unsup_warmup:
        raise GKLError(f"semi.unsup_warmup: {s.unsup_warmup}: FixMatch has no ramp of λ_u (USB's is Mean-Teacher's)")
    if (recipe.train.max_steps_per_epoch or 0) > STEPS_PER_EPOCH:
        raise GKLError(f"train.max_steps_per_epoch: {recipe.train.max_steps_per_epoch}: a semi-supervised epoch is "
                       f"{STEPS_PER_EPOCH} steps (USB's); it can only be shortened")


def resolve_pretrained(path: str, data_dir: Optional[str], root: Optional[str]) -> Path:
    """model.pretrained as given, or under --data-dir (data.root, ./data) or its parent; else one line with
    the command that downloads USB's file."""
    from gklcli.models.vit_small import PRETRAINED_URL

    given = Path(path)
    candidates = [given]
    if not given.is_absolute():
        for folder in dict.fromkeys(Path(d) for d in (data_dir, root, "data") if d):
            candidates += [folder / given, folder.parent / given]
    candidates = list(dict.fromkeys(candidates))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    name = given.name
    fetch = (PRETRAINED_HINT.format(name=name, url=PRETRAINED_URL) if name == Path(PRETRAINED_URL).name
             else "put the file there")
    raise GKLError(f"model.pretrained: {path} not found (looked in {', '.join(str(c) for c in candidates)}); {fetch}")


class SemiWorkload:
    """The labelled / unlabelled split of a classification set, the step stream, and the backbone
    (with USB's pretrained weights when `model.pretrained` names a file)."""

    val = None  # USB evaluates the test set; there is no validation split
    class_counts = None

    def __init__(self, recipe: Recipe, data_dir: Optional[str], env: DistEnv):
        check_semi_recipe(recipe)
        self.recipe, self.env, s = recipe, env, recipe.semi
        self.pretrained = (resolve_pretrained(recipe.model.pretrained, data_dir, recipe.data.root)
                           if recipe.model.pretrained else None)  # before any data is read
        self.train, self.test, self.num_classes = load_semi_sources(recipe.data, data_dir, recipe.model.num_classes)
        self.lb_idx, self.ulb_idx = usb_split(self.train.labels, self.num_classes, s.num_labels, s.split_seed,
                                              s.include_lb_to_ulb)
        b = recipe.data.batch_size
        for what, size in (("labelled", b), ("unlabelled", b * s.uratio)):
            if size % env.world_size:
                raise GKLError(f"data.batch_size: the {size} {what} images of a step do not split over "
                               f"{env.world_size} processes")
        self.module: Optional[nn.Module] = None
        self.report: Optional[Any] = None

    def build_model(self, env: DistEnv) -> tuple[nn.Module, nn.Module, nn.Module]:
        from gklcli.train.build import wrap_model

        m = self.recipe.model
        kwargs = {"drop_path": m.drop_path} if m.drop_path else {}
        module = create_model(m.arch, self.num_classes, **kwargs)
        if self.pretrained is not None:
            from gklcli.models.vit_small import load_usb_pretrained

            self.report = load_usb_pretrained(module, self.pretrained)
            if env.is_main:
                Console().print(f"[dim]{self.report.line()}[/]", soft_wrap=True)
        self.module, model, attack = wrap_model(module, self.recipe, env)
        return self.module, model, attack

    def steps_per_epoch(self) -> int:
        cap = self.recipe.train.max_steps_per_epoch
        return min(STEPS_PER_EPOCH, cap) if cap else STEPS_PER_EPOCH

    def train_loader(self, epoch: int, start: int) -> Any:
        r, steps = self.recipe, self.steps_per_epoch()
        batches = SemiBatches(self.train.images, self.train.labels, self.lb_idx, self.ulb_idx,
                              batch_size=r.data.batch_size, uratio=r.semi.uratio, algorithm=r.semi.algorithm,
                              seed=r.train.seed, epoch=epoch, steps_per_epoch=steps, total_steps=steps * r.schedule.epochs,
                              rank=self.env.rank, world_size=self.env.world_size)
        return semi_train_loader(batches, start, r.data.num_workers, self.env.device.type == "cuda", r.train.seed)

    def eval_loader(self, source: Any, n: Optional[int]) -> Any:
        return image_eval_loader(self.recipe, self.env, source, n)

    def meta(self) -> dict[str, Any]:
        return image_meta(self.recipe, self.num_classes, self.train.image_size, self.module) | {
            "semi_split": {"labelled": len(self.lb_idx), "unlabelled": len(self.ulb_idx)}}

    def split_text(self) -> str:
        return describe_split(self.train.labels, self.lb_idx, self.ulb_idx, self.num_classes)


def ramp(step: int, total_steps: int, warmup: float) -> float:
    """USB Mean-Teacher's clip(k / (warmup · K), 0, 1) for the 0-based step k of K; 1 without a warm-up."""
    return 1.0 if warmup <= 0 else min(max(step / (warmup * total_steps), 0.0), 1.0)


def confidence_mask(teacher: Tensor, p_cutoff: Optional[float]) -> Optional[Tensor]:
    """1.0 where max softmax(teacher) ≥ p_cutoff, else 0.0 (USB's FixedThresholdingHook, T = 1); None: no mask."""
    if p_cutoff is None:
        return None
    return F.softmax(teacher.detach().float(), dim=1).amax(dim=1).ge(p_cutoff).float()


class SemiStep:
    """FixMatch or Mean-Teacher with the registry's consistency loss (kind "semi")."""

    selection_metric = "val_top1"  # no validation split: no best.pt, the last epoch is what the table reports

    def __init__(self, ctx: Context):
        r = ctx.recipe
        check_semi_recipe(r)
        self.ctx, self.cfg, self.device = ctx, r.semi, ctx.env.device
        self.meanteacher = r.semi.algorithm == "meanteacher"
        if self.meanteacher and ctx.averager is None:
            raise GKLError("ema.mode: Mean-Teacher needs the step EMA (ema.mode: step) as its teacher")
        self.weak_grad = weak_grad(r) and not self.meanteacher
        settings = SimpleNamespace(**dataclasses.asdict(r.loss))
        self.term = LossTerm(r.loss.name, "semi", settings, ctx.num_classes, self.device)

    def begin_epoch(self, epoch: int) -> dict[str, float]:
        return {}

    def _teacher(self, x: Tensor) -> Tensor:
        """Mean-Teacher's teacher: the student's module with the EMA weights, no_grad, train mode (as USB)."""
        from torch.func import functional_call

        with torch.no_grad(), self.ctx.autocast():
            return functional_call(self.ctx.module, self.ctx.averager.state, (x,)).float()

    def compute(self, batch: dict[str, Any], epoch: int) -> StepResult:
        ctx, cl = self.ctx, self.ctx.channels_last
        x_lb, y = to_float(batch["x_lb"], self.device, cl), batch["y_lb"].to(self.device)
        x_w, x_s = to_float(batch["x_ulb_w"], self.device, cl), to_float(batch["x_ulb_s"], self.device, cl)
        nb, nu = len(x_lb), len(x_w)
        ctx.model.train()
        if self.meanteacher:
            teacher = self._teacher(x_w)
            with ctx.autocast():
                logits = ctx.model(torch.cat([x_lb, x_s])).float()
            lb, student = logits.split([nb, nu])
        else:
            with ctx.autocast():
                logits = ctx.model(torch.cat([x_lb, x_w, x_s])).float()
            lb, teacher, student = logits.split([nb, nu, nu])
        mask = confidence_mask(teacher, self.cfg.p_cutoff)
        sup = F.cross_entropy(lb, y)
        terms = self.term(student, teacher if self.weak_grad else teacher.detach(), mask)
        lam = self.cfg.ulb_loss_ratio * ramp(int(batch["step"]), int(batch["total_steps"]), self.cfg.unsup_warmup)
        unsup = terms.total
        loss = sup + lam * unsup
        metrics: dict[str, Tensor | float] = {
            "loss": loss.detach(), "sup": sup.detach(), "unsup": unsup.detach(), "lambda_u": lam,
            "mask": float(mask.mean()) if mask is not None else 1.0,
            "acc": 100.0 * float((lb.argmax(1) == y).float().mean()),
        }
        if self.term.entry.name == "gkl":
            metrics |= {"wmse": terms.wmse.detach(), "soft_ce": terms.ce.detach()}
        return StepResult(loss, metrics, nb + 2 * nu)

    def end_epoch(self, epoch: int) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, prefix: str) -> dict[str, float]:
        return evaluate_topk(model, loader, prefix, self.device, self.ctx)

    def state_dict(self) -> dict[str, Any]:
        return {}  # the ramp reads the batch's step; the teacher is the engine's averager

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def train_semi(recipe: Recipe, *, data_dir: Optional[str] = None, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) semi-supervised training of `recipe`; keyword arguments as `engine.run_training`."""
    from gklcli.train.engine import run_training

    return run_training(recipe, SemiStep, data_dir=data_dir, make_workload=SemiWorkload, **kwargs)


# ---------------------------------------------------------------------------------------------------
# --dry-run preview and GPU-hour estimate (no data read, no weights built)
# ---------------------------------------------------------------------------------------------------

CONSISTENCY = {"ce": "CE on hard pseudo-labels", "sce": "CE on soft pseudo-labels (= KL)", "mse": "MSE of the softmax",
               "gkl": "GKL"}


def _sizes(recipe: Recipe) -> tuple[int, int, int]:
    """(training images, test images, classes) of the recipe's dataset, from the dataset facts."""
    from gklcli.datasets import DATASETS

    d = recipe.data
    if d.dataset == "synthetic":
        return d.synthetic.num_train, d.synthetic.num_test, d.synthetic.num_classes
    if d.dataset not in ("cifar10", "cifar100"):
        raise GKLError(f"data.dataset: {d.dataset!r}: semi-supervised training reads cifar100, cifar10 or synthetic")
    known = DATASETS[d.dataset]
    return known.train, known.test, known.classes


def consistency_text(recipe: Recipe) -> str:
    loss = recipe.loss
    text = CONSISTENCY.get(loss.name, loss.name)
    if loss.name == "gkl":
        text += (f" (α={loss.alpha:g} wMSE, β={loss.beta:g} soft CE, γ={loss.gamma:g}, sample-wise weights at "
                 f"T2={loss.weight_temperature:g}, wMSE / Σw"
                 + (", weak logits get the wMSE gradient" if weak_grad(recipe) and recipe.semi.algorithm == "fixmatch"
                    else "") + ")")
    return text


def semi_preview(recipe: Recipe) -> dict[str, Any]:
    """The numbers of `gkl train-semi --dry-run` (JSON-friendly)."""
    from gklcli.models import count_params

    check_semi_recipe(recipe)
    n_train, n_test, classes = _sizes(recipe)
    s, d = recipe.semi, recipe.data
    steps = min(STEPS_PER_EPOCH, recipe.train.max_steps_per_epoch or STEPS_PER_EPOCH)
    labelled = s.num_labels
    return {
        "recipe": recipe.meta.name, "arch": get_spec(recipe.model.arch).name,
        "params": count_params(recipe.model.arch, recipe.model.num_classes or classes), "algorithm": s.algorithm,
        "labelled": labelled, "unlabelled": n_train if s.include_lb_to_ulb else n_train - labelled, "test_images": n_test,
        "classes": classes, "batch_labelled": d.batch_size, "batch_unlabelled": d.batch_size * s.uratio,
        "steps_per_epoch": steps, "epochs": recipe.schedule.epochs, "total_steps": steps * recipe.schedule.epochs,
        "pretrained": recipe.model.pretrained, "consistency": consistency_text(recipe),
    }


def print_semi_preview(preview: dict[str, Any], recipe: Recipe, console: Console) -> None:
    s, o, sched, p = recipe.semi, recipe.optim, recipe.schedule, preview
    mask = f"mask max softmax ≥ {s.p_cutoff:g}" if s.p_cutoff is not None else "no mask"
    algo = "FixMatch" if s.algorithm == "fixmatch" else "Mean-Teacher"
    console.print(f"[bold]{p['recipe']}[/]: {algo}, {p['arch']} ({p['params'] / 1e6:.1f}M params"
                  + (f", pretrained {p['pretrained']}" if p["pretrained"] else ", from scratch") + f") on {recipe.data.dataset}: "
                  f"{p['labelled']:,} labelled ({p['labelled'] // p['classes']} per class, split seed {s.split_seed}), "
                  f"{p['unlabelled']:,} unlabelled, {p['test_images']:,} test images")
    teacher = ("weak view" if s.algorithm == "fixmatch" else f"EMA teacher (τ={recipe.ema.tau:g}) on weak view 1") \
        + " → " + ("strong view" if s.algorithm == "fixmatch" else "student on weak view 2")
    warm = f", ramp over {s.unsup_warmup:g} of training" if s.unsup_warmup else ""
    console.print(f"{p['epochs']} epochs × {p['steps_per_epoch']:,} steps = {p['total_steps']:,} steps of "
                  f"{p['batch_labelled']} labelled + {p['batch_unlabelled']} unlabelled images; consistency "
                  f"{p['consistency']}, {teacher}, {mask}, λ_u={s.ulb_loss_ratio:g}{warm}")
    console.print(f"{o.name} lr {o.lr:g} wd {o.weight_decay:g} β=({o.beta1:g}, {o.beta2:g}) eps {o.eps:g}, layer decay "
                  f"{o.layer_decay:g}; {sched.lr_schedule}" + (f" after {sched.warmup_steps:,} warm-up steps"
                                                             if sched.warmup_steps else "")
                  + f"; averaging {recipe.ema.mode}" + (f" τ={recipe.ema.tau:g}" if recipe.ema.mode != "none" else "")
                  + "; reported: the last epoch's test top-1"
                  + (f" (test set every {recipe.eval.test_every_epochs} epochs)" if recipe.eval.test_every_epochs else ""))


def smoke_overrides(size: int, classes: int, test: int) -> list[str]:
    """`gkl reproduce --smoke` at toy scale (for `gklcli.reproduce.plan.smoke_overrides`): gkl-tiny-vit on
    size×size synthetic images of `classes` classes, 2 labels each, two epochs of three steps, no pretrained
    file (the smoke run checks the pipeline; the real rows start from USB's)."""
    return [
        "data.dataset=synthetic", f"data.synthetic.num_train={classes * 12}", f"data.synthetic.num_test={test}",
        f"data.synthetic.image_size={size}", f"data.synthetic.num_classes={classes}", f"semi.num_labels={2 * classes}",
        "data.batch_size=4", f"data.eval_batch_size={test}", "data.num_workers=0", "model.arch=gkl-tiny-vit",
        "model.num_classes=null", "model.pretrained=null", "schedule.epochs=2", "schedule.warmup_steps=2",
        "train.max_steps_per_epoch=3", "train.amp=none", "train.compile=false", "output.tensorboard=false",
        "output.plots=false", "eval.n_test=null", "eval.test_every_epochs=1",
    ]
