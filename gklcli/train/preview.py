"""`--dry-run` previews: what a recipe will do, computed without loading data or building weights.

(A *plan* in gkl is reproduce's: a table as a plan of runs.)"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from gklcli.attacks import epoch_attack
from gklcli.data import train_set_sizes
from gklcli.sampling import make_batch_sampler
from gklcli.losses import get_loss, loss_kind
from gklcli.models import count_params, get_spec
from gklcli.recipes import Recipe
from gklcli.train.schedule import ONECYCLE_DIV, ONECYCLE_MOMENTUM, learning_rate


def _e255(value: float) -> str:
    return f"{value * 255:.3g}"


def at_segments(recipe: Recipe) -> list[dict[str, Any]]:
    """Consecutive epochs with the same attack steps, step-size rule and AWP state, merged."""
    epochs = recipe.schedule.epochs
    rows: list[dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
        attack = epoch_attack(recipe.attack, epoch, epochs)
        awp = recipe.awp.enabled and epoch >= recipe.awp.warmup_epochs
        ratio = round(attack.step_size / attack.eps, 6) if attack.eps else 0.0
        key = (attack.steps, ratio if recipe.attack.schedule != "fixed" else attack.step_size, awp)
        if rows and rows[-1]["key"] == key:
            rows[-1]["last"], rows[-1]["attack_last"] = epoch, attack
        else:
            rows.append({"key": key, "first": epoch, "last": epoch, "attack_first": attack, "attack_last": attack, "awp": awp})
    return rows


def run_preview(recipe: Recipe) -> dict[str, Any]:
    """The numbers of a preview: data sizes, steps, schedule segments (JSON-friendly)."""
    if recipe.kind == "clip-kd":
        return clip_preview(recipe)
    num_train, num_generated = train_set_sizes(recipe.data)
    # a recipe that requires generated data cannot run without it: preview the run it will make
    expected_generated = num_generated or int(recipe.data.generated.required)
    sampler = make_batch_sampler(recipe.data, num_train, expected_generated, seed=0)
    steps = sampler.batches_per_epoch()
    if recipe.train.max_steps_per_epoch:
        steps = min(steps, recipe.train.max_steps_per_epoch)
    epochs = recipe.schedule.epochs
    segments = []
    for seg in at_segments(recipe) if recipe.kind == "at" else []:
        first, last = seg["attack_first"], seg["attack_last"]
        segments.append({
            "epochs": [seg["first"], seg["last"]],
            "eps": [first.eps, last.eps],
            "attack_steps": first.steps,
            "step_size": [first.step_size, last.step_size],
            "awp": seg["awp"],
            "lr": [learning_rate(recipe.optim, recipe.schedule, seg["first"], 0, steps),
                   learning_rate(recipe.optim, recipe.schedule, seg["last"], steps - 1, steps)],
        })
    return {
        "recipe": recipe.meta.name,
        "arch": get_spec(recipe.model.arch).name,
        "params": count_params(recipe.model.arch, recipe.model.num_classes),
        "train_images": num_train,
        "val_images": recipe.data.val_size,
        "generated_images": num_generated,
        "generated_expected": bool(expected_generated),
        "real_per_batch": sampler.n_real,
        "generated_per_batch": sampler.n_gen,
        "generated_sampler": recipe.data.generated.sampler if expected_generated else None,
        "batch_size": recipe.data.batch_size,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "total_steps": steps * epochs,
        "segments": segments,
    }


def _lr_text(recipe: Recipe) -> str:
    sched = recipe.schedule
    if sched.lr_schedule != "onecycle":
        return sched.lr_schedule
    return (f"onecycle (from {recipe.optim.lr / ONECYCLE_DIV:.3g} up to epoch {sched.warmup_epochs}, "
            f"momentum {ONECYCLE_MOMENTUM[1]:g}→{ONECYCLE_MOMENTUM[0]:g}→{ONECYCLE_MOMENTUM[1]:g})")


def loss_text(recipe: Recipe) -> str:
    """The training loss as the registry describes it, with the hard-label CE beside it."""
    loss, kind = recipe.loss, loss_kind(recipe.kind)
    text = get_loss(loss.name, kind).describe(kind, loss)
    first = "contrastive" if kind == "clip" else "BCE" if loss.label_loss == "bce" else "CE"
    if kind == "seg":  # the student's main and auxiliary CE (seg.*), then the pixel term
        own = f"CE ×{recipe.seg.main_weight:g} + aux CE ×{recipe.seg.aux_weight:g}"
        return f"{own} + {text}" if loss.name != "ce" else own
    return f"{first} ×{loss.ce_weight:g} + {text}" if loss.name != "ce" else f"{first} only" if kind == "clip" else text


def clip_preview(recipe: Recipe) -> dict[str, Any]:
    """A CLIP distillation's numbers; the pool is not read, so without data.samples_per_epoch the steps
    per epoch are those of the pool's size, known at the start."""
    from gklcli.models.clip import create_clip

    d, per_epoch = recipe.data, recipe.data.samples_per_epoch
    steps = per_epoch // d.batch_size if per_epoch else None
    if steps is not None and recipe.train.max_steps_per_epoch:
        steps = min(steps, recipe.train.max_steps_per_epoch)
    return {
        "recipe": recipe.meta.name, "arch": recipe.model.arch,
        "params": sum(p.numel() for p in create_clip(recipe.model.arch, device="meta").parameters()),
        "teacher": recipe.teacher.arch, "teacher_weights": recipe.teacher.checkpoint, "pool": d.pairs,
        "samples_per_epoch": per_epoch, "batch_size": d.batch_size, "steps_per_epoch": steps,
        "epochs": recipe.schedule.epochs, "total_steps": steps * recipe.schedule.epochs if steps is not None else None,
        "warmup_steps": recipe.schedule.warmup_steps, "segments": [],
    }


def _print_clip_preview(preview: dict[str, Any], recipe: Recipe, console: Console) -> None:
    o, steps = recipe.optim, preview["steps_per_epoch"]
    per_epoch = f"{preview['samples_per_epoch']:,} pairs sampled per epoch" if preview["samples_per_epoch"] else "the whole pool per epoch"
    teacher = (f"teacher {preview['teacher']} ({preview['teacher_weights']})" if recipe.loss.name != "ce" else "no teacher")
    console.print(f"[bold]{preview['recipe']}[/]: student {preview['arch']} ({preview['params'] / 1e6:.1f}M params, from scratch), "
                  f"{teacher}; pool {preview['pool']}, {per_epoch}")
    console.print(f"{preview['epochs']} epochs × {f'{steps:,}' if steps else 'pool / batch'} steps at global batch "
                  f"{preview['batch_size']:,}; loss {loss_text(recipe)}; {o.name} lr {o.lr:g} wd {o.weight_decay:g}"
                  + (f" β=({o.beta1:g}, {o.beta2:g}) eps {o.eps:g}" if o.name == "adamw" else "")
                  + f", {recipe.schedule.lr_schedule}"
                  + (f" after {preview['warmup_steps']:,} warm-up steps" if preview["warmup_steps"] else "")
                  + f"; amp {recipe.train.amp}")


def print_preview(preview: dict[str, Any], recipe: Recipe, console: Console) -> None:
    if recipe.kind == "clip-kd":
        _print_clip_preview(preview, recipe, console)
        return
    loss = recipe.loss
    console.print(
        f"[bold]{preview['recipe']}[/]: {preview['arch']} ({preview['params'] / 1e6:.1f}M params) on {recipe.data.dataset}, "
        f"{preview['train_images']:,} training images (+{preview['val_images']:,} held out for validation"
        + ")"
    )
    if preview["generated_expected"]:
        count = f"{preview['generated_images']:,}" if preview["generated_images"] else "the (not yet given) data.generated.path"
        console.print(
            f"generated images: {count}; each batch {preview['real_per_batch']:,} real + {preview['generated_per_batch']:,} "
            f"generated ({preview['generated_sampler']} sampler"
            + (", epoch = ceil(base training set / batch), as DM-AT" if preview["generated_sampler"] == "dmat" else ", epoch = one pass over the real images")
            + ")"
        )
    method = loss_text(recipe)
    if recipe.kind == "kd":
        detail = f"teacher {recipe.teacher.arch} ({recipe.teacher.checkpoint}); {method}; warm-up {loss.warmup_epochs} epochs"
        every = recipe.eval.test_every_epochs
        detail += (f"; test set every {every} epoch(s), best and last top-1 reported (mdistiller's protocol)" if every
                   else "; last epoch's test top-1 reported")
    else:
        detail = f"loss {method}"
    console.print(
        f"{preview['epochs']} epochs × {preview['steps_per_epoch']:,} steps = {preview['total_steps']:,} steps at batch "
        f"{preview['batch_size']}; {detail}; lr {recipe.optim.lr:g} {_lr_text(recipe)}; averaging {recipe.ema.mode}"
        + (f" τ={recipe.ema.tau:g}" if recipe.ema.mode != "none" else "")
        + (f"; BatchNorm in ghost batches of {recipe.model.bn_group_size} images" if recipe.model.bn_group_size else "")
    )
    if not preview["segments"]:
        return
    table = Table(title=f"attack schedule ({recipe.attack.schedule}, loss {recipe.attack.loss})", header_style="bold")
    for column in ("epochs", "ε_t ×255", "steps", "step ×255", "AWP", "lr"):
        table.add_column(column, no_wrap=True)
    for seg in preview["segments"]:
        a, b = seg["epochs"]
        span = lambda pair, fmt: fmt(pair[0]) if pair[0] == pair[1] else f"{fmt(pair[0])}→{fmt(pair[1])}"  # noqa: E731
        table.add_row(
            f"{a}" if a == b else f"{a}–{b}",
            span(seg["eps"], _e255),
            str(seg["attack_steps"]),
            span(seg["step_size"], _e255),
            "on" if seg["awp"] else "off",
            span(seg["lr"], lambda v: f"{v:.3g}"),
        )
    console.print(table)
