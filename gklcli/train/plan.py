"""`--dry-run` plans: what a recipe will do, computed without loading data or building weights."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from gklcli.attacks import attack_plan
from gklcli.data import make_batch_sampler, train_set_sizes
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
        plan = attack_plan(recipe.attack, epoch, epochs)
        awp = recipe.awp.enabled and epoch >= recipe.awp.warmup_epochs
        ratio = round(plan.step_size / plan.eps, 6) if plan.eps else 0.0
        key = (plan.steps, ratio if recipe.attack.schedule != "fixed" else plan.step_size, awp)
        if rows and rows[-1]["key"] == key:
            rows[-1]["last"], rows[-1]["plan_last"] = epoch, plan
        else:
            rows.append({"key": key, "first": epoch, "last": epoch, "plan_first": plan, "plan_last": plan, "awp": awp})
    return rows


def build_plan(recipe: Recipe) -> dict[str, Any]:
    """The numbers of a plan: data sizes, steps, schedule segments (JSON-friendly)."""
    num_train, num_generated = train_set_sizes(recipe.data)
    # a recipe that requires generated data cannot run without it: plan the run it will make
    expected_generated = num_generated or int(recipe.data.generated.required)
    sampler = make_batch_sampler(recipe.data, num_train, expected_generated, seed=0)
    steps = sampler.batches_per_epoch()
    if recipe.train.max_steps_per_epoch:
        steps = min(steps, recipe.train.max_steps_per_epoch)
    epochs = recipe.schedule.epochs
    segments = []
    for seg in at_segments(recipe) if recipe.kind == "at" else []:
        first, last = seg["plan_first"], seg["plan_last"]
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


def print_plan(plan: dict[str, Any], recipe: Recipe, console: Console) -> None:
    loss = recipe.loss
    console.print(
        f"[bold]{plan['recipe']}[/]: {plan['arch']} ({plan['params'] / 1e6:.1f}M params) on {recipe.data.dataset}, "
        f"{plan['train_images']:,} training images (+{plan['val_images']:,} held out for validation"
        + ")"
    )
    if plan["generated_expected"]:
        count = f"{plan['generated_images']:,}" if plan["generated_images"] else "the (not yet given) data.generated.path"
        console.print(
            f"generated images: {count}; each batch {plan['real_per_batch']:,} real + {plan['generated_per_batch']:,} "
            f"generated ({plan['generated_sampler']} sampler"
            + (", epoch = ceil(base training set / batch), as DM-AT" if plan["generated_sampler"] == "dmat" else ", epoch = one pass over the real images")
            + ")"
        )
    if recipe.kind == "kd":
        method = {"kd": f"KD (T={loss.temperature:g}, CE {loss.ce_weight:g}, KD {loss.kd_weight:g}, ×T²)",
                  "jsd": f"JSD (T={loss.temperature:g}, weight {loss.kd_weight:g})", "ce": "CE only"}.get(
            loss.name, f"{loss.name.upper()}-KD (α={loss.alpha:g}, β={loss.beta:g}, γ={loss.gamma:g}, T={loss.temperature:g}, "
                       f"T2={loss.weight_temperature:g}, {'class-wise (GI)' if loss.weights == 'class' else 'sample-wise'} weights)")
        detail = f"teacher {recipe.teacher.arch} ({recipe.teacher.checkpoint}); {method}; warm-up {loss.warmup_epochs} epochs"
        every = recipe.eval.test_every_epochs
        detail += (f"; test set every {every} epoch(s), best and last top-1 reported (mdistiller's protocol)" if every
                   else "; last epoch's test top-1 reported")
    else:
        detail = (f"loss {loss.name} (α={loss.alpha:g}, β={loss.beta:g}, γ={loss.gamma:g}, τ={loss.prior_temperature:g}, "
                  f"{loss.weights}-wise weights)")
    console.print(
        f"{plan['epochs']} epochs × {plan['steps_per_epoch']:,} steps = {plan['total_steps']:,} steps at batch "
        f"{plan['batch_size']}; {detail}; lr {recipe.optim.lr:g} {_lr_text(recipe)}; averaging {recipe.ema.mode}"
        + (f" τ={recipe.ema.tau:g}" if recipe.ema.mode != "none" else "")
        + (f"; BatchNorm in ghost batches of {recipe.model.bn_group_size} images" if recipe.model.bn_group_size else "")
    )
    if not plan["segments"]:
        return
    table = Table(title=f"attack schedule ({recipe.attack.schedule}, loss {recipe.attack.loss})", header_style="bold")
    for column in ("epochs", "ε_t ×255", "steps", "step ×255", "AWP", "lr"):
        table.add_column(column, no_wrap=True)
    for seg in plan["segments"]:
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
