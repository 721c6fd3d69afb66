"""Learning-rate schedules as pure functions of the position in training.

The engine sets the lr before every step from (epoch, step in epoch), so a resumed run needs no
scheduler state and the schedule can be printed in `--dry-run` plans.
"""

from __future__ import annotations

import math
from typing import Any


# DM-AT's `cosinew` is torch's OneCycleLR with its defaults: start at lr/25, end at lr/25/1e4, and
# momentum cycled between these two values (SGD's own momentum setting is overwritten).
ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_MOMENTUM = 25.0, 1e4, (0.85, 0.95)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _onecycle(sched: Any, epoch: int, start: float, peak: float, end: float) -> float:
    """torch's two-phase OneCycleLR stepped once per epoch (DM-AT's `cosinew`: total_steps = epochs,
    pct_start = warmup_epochs/epochs, `scheduler.step()` after each epoch), so epoch e uses step e−1;
    (start, peak, end) are the lr's or the momentum's values at the phase boundaries."""
    step, total = epoch - 1, sched.epochs
    phase1_end = float(sched.warmup_epochs) - 1  # OneCycleLR: pct_start·total_steps − 1
    if step <= phase1_end:
        return _cos_anneal(start, peak, step / phase1_end)
    return _cos_anneal(peak, end, (step - phase1_end) / (total - 1 - phase1_end))


def learning_rate(optim: Any, sched: Any, epoch: int, step: int, steps_per_epoch: int) -> float:
    """lr for `epoch` (1-based) and `step` (0-based within it) under `OptimCfg`/`ScheduleCfg`.

    * ``cosine-official``: lr·½(1+cos(π(e−w)/(E−w+1))) per epoch, e = 1…E (DKL's
      `adjust_learning_rate_cosine`; note E+1 in the denominator, so the last epoch is not 0).
    * ``cosine-trades``: lr·½(1+cos(π(e−1)/E)) per epoch (the official TRADES baseline script
      `train_trades_cifar.py`: the first epoch at full lr).
    * ``onecycle``: DM-AT's `cosinew` (torch OneCycleLR per epoch, warm-up `warmup_epochs` from
      lr/25, cosine down to lr/25/1e4; see `momentum`). Its warm-up is part of the schedule.
    * ``cosine``: per-step cosine from lr to 0 after the warm-up.
    * ``multistep``: lr·decay^k with k the milestones already passed (epoch > milestone, mdistiller).
    * ``poly``: lr·(1 − k/K)^poly_power at step k of K (APD/semseg; no warm-up).
    * ``constant``.
    A linear warm-up over ``warmup_epochs`` precedes every schedule but ``onecycle``: per step, or
    with ``warmup_mode: epoch`` lr·e/W held for each epoch e ≤ W (the ImageNet-LT script's).
    """
    base, total, warm = optim.lr, sched.epochs, sched.warmup_epochs
    if sched.lr_schedule == "cosine-usb":
        return _usb_cosine(base, sched.warmup_steps, (epoch - 1) * steps_per_epoch + step, total * steps_per_epoch)
    if sched.lr_schedule == "poly":  # APD's poly_learning_rate: step k of K uses lr·(1 − k/K)^power
        k, total_steps = (epoch - 1) * steps_per_epoch + step, total * steps_per_epoch
        return base * (1.0 - k / total_steps) ** sched.poly_power
    if sched.warmup_steps:
        return _step_cosine(base, sched.warmup_steps, (epoch - 1) * steps_per_epoch + step, total * steps_per_epoch)
    if sched.lr_schedule == "cosine-timm":
        return _timm_cosine(base, sched, epoch - 1)
    if sched.lr_schedule == "onecycle":
        initial = base / ONECYCLE_DIV
        return _onecycle(sched, epoch, initial, base, initial / ONECYCLE_FINAL_DIV)
    position = (epoch - 1) + step / max(steps_per_epoch, 1)  # epochs completed, fractional
    if warm and position < warm:
        if sched.warmup_mode == "epoch":  # lr·e/W for the whole epoch e (PaCo's adjust_learning_rate)
            return base * epoch / warm
        return base * (position + 1.0 / max(steps_per_epoch, 1)) / warm
    if sched.lr_schedule == "cosine-official":
        return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / (total - warm + 1)))
    if sched.lr_schedule == "cosine-trades":
        return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / total))
    if sched.lr_schedule == "cosine":
        progress = (position - warm) / max(total - warm, 1e-12)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if sched.lr_schedule == "multistep":
        return base * sched.lr_decay ** sum(epoch > m for m in sched.milestones)
    return base


def _step_cosine(base: float, warmup: int, step: int, total: int) -> float:
    """OpenCLIP's `cosine_lr`: base·(step+1)/warmup during the warm-up, then ½(1+cos(π·e/es))·base with
    e = step − warmup and es = total − warmup (steps counted over the whole run from 0)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))) * base


def _usb_cosine(base: float, warmup: int, step: int, total: int) -> float:
    """USB's `get_cosine_schedule_with_warmup` (num_cycles 7/16): base·k/warmup during the warm-up (0 at
    the first step), then base·max(0, cos(7π/16 · (k − warmup)/(total − warmup)))."""
    if step < warmup:
        return base * step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return base * max(0.0, math.cos(math.pi * 7.0 / 16.0 * progress))


def _timm_cosine(base: float, sched: Any, t: int) -> float:
    """timm's CosineLRScheduler stepped per epoch t = 0, 1, …: warmup_lr + t·(lr − warmup_lr)/warmup_epochs
    during the warm-up, else min_lr + ½(lr − min_lr)(1 + cos(π·t/epochs)) (warm-up inside the cosine, as
    timm without warmup_prefix)."""
    if t < sched.warmup_epochs:
        return sched.warmup_lr + t * (base - sched.warmup_lr) / sched.warmup_epochs
    return sched.min_lr + 0.5 * (base - sched.min_lr) * (1 + math.cos(math.pi * t / sched.epochs))


def momentum(optim: Any, sched: Any, epoch: int) -> float:
    """SGD momentum for `epoch`: the recipe's, except under ``onecycle``, which cycles it
    0.95 → 0.85 during the warm-up and back to 0.95 (OneCycleLR's `cycle_momentum` default)."""
    if sched.lr_schedule != "onecycle":
        return optim.momentum
    low, high = ONECYCLE_MOMENTUM
    return _onecycle(sched, epoch, high, low, high)
