"""GPU-hour estimates of `gkl reproduce` jobs, and the `--list` of registry tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gklcli.reproduce.plan import Job, plan_for


# ---------------------------------------------------------------------------------------------------
# Estimates for --list and --dry-run
# ---------------------------------------------------------------------------------------------------

# Sustained FLOP/s of one RTX 3090-class GPU, calibrated on the paper's TABLE V: a KD step
# ResNet34 → ResNet18 (teacher forward 7.3 GFLOP + student forward/backward 3 × 3.6 GFLOP per
# 224² image) on 512 images takes 0.197 s on 4 GPUs → ≈ 12 TFLOP/s per GPU.
GPU_FLOPS = 12e12
AA_PASSES = 3000  # forward-equivalents per image of standard AutoAttack (APGD-CE/T, FAB-T, Square), rough


def _forward_flops(arch: str, num_classes: int, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gklcli.models import create_model

    with torch.device("meta"):
        model = create_model(arch, num_classes=num_classes).eval()  # eval: one image passes BatchNorm of 1×1 maps
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


_FLOPS_CACHE: dict[tuple[str, int, int], float] = {}


def forward_flops(arch: str, num_classes: int, size: int) -> float:
    key = (arch, num_classes, size)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = _forward_flops(*key)
    return _FLOPS_CACHE[key]


_CLIP_FLOPS: dict[str, float] = {}
ZEROSHOT_IMAGES = {"imagenet": 50_000, "imagenet-v2": 10_000, "imagenet-sketch": 50_889, "imagenet-r": 30_000}


def clip_pair_flops(arch: str) -> float:
    """Forward FLOPs of one image and one caption through an OpenCLIP model (counted on the meta device)."""
    if arch not in _CLIP_FLOPS:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from gklcli.models.clip import create_clip, image_spec, tokenizer

        with torch.device("meta"):
            model = create_clip(arch, device="meta")
            size = image_spec(model).size
            image, tokens = torch.empty(1, 3, size, size), torch.zeros(1, tokenizer(arch).context_length, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model.encode_image(image)
            model.encode_text(tokens)
        _CLIP_FLOPS[arch] = float(counter.get_total_flops())
    return _CLIP_FLOPS[arch]


def clip_gpu_hours(job: Job) -> float:
    """A CLIP run: samples_per_epoch × epochs pairs through the teacher's forward and the student's
    forward and backward (3×), plus its zero-shot sets; a teacher report: the zero-shot sets only."""
    r = job.recipe
    evaluated = sum(ZEROSHOT_IMAGES.get(name, 0) for name in job.needs.zeroshot)
    if job.kind == "teacher":
        return clip_pair_flops(r.teacher.arch) * evaluated / GPU_FLOPS / 3600
    steps = (r.data.samples_per_epoch or 0) // r.data.batch_size
    if r.train.max_steps_per_epoch:
        steps = min(steps, r.train.max_steps_per_epoch)
    teacher = clip_pair_flops(r.teacher.arch) if r.loss.name != "ce" else 0.0
    total = steps * r.data.batch_size * r.schedule.epochs * (teacher + 3 * clip_pair_flops(r.model.arch))
    return (total + evaluated * clip_pair_flops(r.model.arch)) / GPU_FLOPS / 3600


def semi_gpu_hours(recipe: Any) -> float:
    """Order-of-magnitude GPU-hours (gkl reproduce's calibration): per step forward + backward (3 forward-FLOPs)
    of the student's images (FixMatch: B + 2uB; Mean-Teacher: B + uB, and uB teacher forwards), plus the test
    evaluations (every eval.test_every_epochs and the final one)."""
    from gklcli.train.semi import semi_preview

    p = semi_preview(recipe)
    size = recipe.data.synthetic.image_size if recipe.data.dataset == "synthetic" else 32
    fwd = forward_flops(recipe.model.arch, recipe.model.num_classes or p["classes"], size)
    b, ub = p["batch_labelled"], p["batch_unlabelled"]
    per_step = 3 * (b + 2 * ub) if recipe.semi.algorithm == "fixmatch" else 3 * (b + ub) + ub
    every = recipe.eval.test_every_epochs
    evaluations = (p["epochs"] // every if every else 0) + (1 if recipe.eval.final_test else 0)
    total = p["total_steps"] * per_step * fwd + evaluations * (recipe.eval.n_test or p["test_images"]) * fwd
    return total / GPU_FLOPS / 3600


def seg_gpu_hours(job: Job) -> float:
    """A segmentation run: per crop the teacher's forward and the student's forward and backward (3×), plus
    the validation passes (APD's sliding windows: 2 windows × flip of a 512-px image); a teacher report: the
    final validation pass of the teacher."""
    import math

    from gklcli.seg_data import ADE20K_SIZES

    r, s = job.recipe, job.recipe.seg
    long_side = round(max(s.eval_scales) * s.base_size)
    windows = (math.ceil(max(long_side - s.crop_size, 0) / math.ceil(s.crop_size * s.stride_rate)) + 1) * (2 if s.eval_flip else 1)
    passes = windows * len(s.eval_scales)
    n_val = r.eval.n_test or ADE20K_SIZES["val"]
    if job.kind == "teacher":
        return forward_flops(r.teacher.arch, s.num_classes, s.crop_size) * n_val * passes / GPU_FLOPS / 3600
    fwd = forward_flops(r.model.arch, s.num_classes, s.crop_size)
    steps = ADE20K_SIZES["train"] // r.data.batch_size
    if r.train.max_steps_per_epoch:
        steps = min(steps, r.train.max_steps_per_epoch)
    teacher = forward_flops(r.teacher.arch, s.num_classes, s.crop_size) if r.loss.name != "ce" else 0.0
    train = r.schedule.epochs * steps * r.data.batch_size * (teacher + 3 * fwd)
    validations = r.schedule.epochs // r.eval.every_epochs
    evaluated = (validations * (r.eval.n_val or ADE20K_SIZES["val"]) + (n_val if r.eval.final_test else 0)) * passes * fwd
    return (train + evaluated) / GPU_FLOPS / 3600


def estimate_gpu_hours(job: Job) -> float:
    """Order-of-magnitude GPU-hours of a job from its recipe (FLOPs counted on the meta device)."""
    from gklcli.datasets import DATASETS
    from gklcli.train.preview import at_segments

    r = job.recipe
    if r.kind == "clip-kd":
        return clip_gpu_hours(job)
    if r.kind == "semi":
        return semi_gpu_hours(r)
    if r.kind == "seg-kd":
        return seg_gpu_hours(job)
    d = r.data
    known = DATASETS.get(d.dataset)  # None for npz and synthetic
    classes = r.model.num_classes or (known.classes if known else
                                      d.synthetic.num_classes if d.dataset == "synthetic" else 1000)
    size = (known.image_size if d.dataset.startswith("cifar") else  # fixed for CIFAR, a recipe setting elsewhere
            d.synthetic.image_size if d.dataset == "synthetic" else d.digits.image_size if d.dataset == "digits" else
            d.image_size)
    n_test = known.test if known else d.synthetic.num_test
    if job.kind == "teacher":
        return forward_flops(r.teacher.arch, classes, size) * n_test / GPU_FLOPS / 3600
    fwd = forward_flops(r.model.arch, classes, size)
    n = known.train if known else d.synthetic.num_train
    n -= d.val_size if d.dataset != "imagenet-lt" else 0
    if d.generated.path or d.generated.required:  # images per epoch: the training sampler's batches (DM-AT's rule)
        from gklcli.sampling import make_batch_sampler

        n = make_batch_sampler(d, n, 1, seed=0).batches_per_epoch() * d.batch_size
    epochs = r.schedule.epochs
    if r.train.max_steps_per_epoch:
        n = min(n, r.train.max_steps_per_epoch * d.batch_size)
    if r.kind == "kd":
        teacher = forward_flops(r.teacher.arch, classes, size) if r.loss.name != "ce" else 0.0
        total = epochs * n * (teacher + 3 * fwd)
    else:
        views = 2 if d.augment == "autoaug" else 1
        total = 0.0
        for seg in at_segments(r):
            span = seg["last"] - seg["first"] + 1
            per_image = 3 * seg["attack_first"].steps + 6 + (6 if seg["awp"] else 0)  # attack, outer (adv+clean), AWP proxy
            total += span * n * views * per_image * fwd
        if job.needs.adversarial:
            extra = sum(job.needs.pgd) * 3 + sum(job.needs.cw) * 3
            total += r.eval.aa_n_ex * fwd * (AA_PASSES * (1 + len(job.needs.eps)) + extra)
    return total / GPU_FLOPS / 3600


def list_tables(seeds: int = 1) -> list[dict[str, Any]]:
    """Every registry table: status, rows, distinct runs and estimated GPU-hours (for `--list`)."""
    from gklcli.tables import load_table, table_names

    listing = []
    for name in table_names():
        table = load_table(name)
        plan = plan_for(name, rows=None, seeds=seeds, out=Path("reproduce"), smoke=False, checkpoint="last", data_dir=None)
        rows = [row for tp in plan.tables for row in tp.rows]
        listing.append({
            "table": name, "paper": table.paper, "title": table.title, "status": table.status, "reason": table.reason,
            "includes": table.includes, "rows": len(rows), "runnable_rows": sum(r.runnable for r in rows),
            "cited_rows": sum(r.cited for r in rows), "runs": len(plan.train_jobs()), "teacher_reports": len(plan.teacher_jobs()),
            "gpu_hours": sum(estimate_gpu_hours(j) for j in plan.jobs.values()),
        })
    return listing


def print_list(listing: list[dict[str, Any]], console: Any, seeds: int) -> None:
    from rich.table import Table as RichTable

    table = RichTable(title=f"gkl reproduce: the paper's tables ({seeds} seed(s) per run; GPU-hours on an RTX 3090-class GPU, rough)",
                      header_style="bold")
    for column in ("table", "status", "rows (run/cited)", "runs", "GPU-h", "title"):
        table.add_column(column, overflow="fold", no_wrap=column != "title")
    for t in listing:
        status = t["status"] if not t["includes"] else "→ " + ", ".join(t["includes"])
        title = t["title"] if t["status"] == "runnable" else f"{t['title']} [dim]({t['reason']})[/]"
        table.add_row(t["table"], status, f"{t['rows']} ({t['runnable_rows']}/{t['cited_rows']})",
                      str(t["runs"] + t["teacher_reports"]), f"{t['gpu_hours']:,.0f}" if t["runs"] else "-", title)
    console.print(table)
