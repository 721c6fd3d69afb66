"""Learning-rate schedules as pure functions of the position in training.

The engine sets the lr before every step from (epoch, step in epoch), so a resumed run needs no
scheduler state and the schedule can be printed in `--dry-run` plans.
"""

from __future__ import annotations

import math
from typing import Any


def learning_rate(optim: Any, sched: Any, epoch: int, step: int, steps_per_epoch: int) -> float:
    """lr for `epoch` (1-based) and `step` (0-based within it) under `OptimCfg`/`ScheduleCfg`.

    * ``cosine-official``: lr·½(1+cos(π(e−w)/(E−w+1))) per epoch, e = 1…E (DKL's
      `adjust_learning_rate_cosine`; note E+1 in the denominator, so the last epoch is not 0).
    * ``cosine``: per-step cosine from lr to 0 after the warm-up (DM-AT style).
    * ``multistep``: lr·decay^k with k the milestones already passed (epoch > milestone, mdistiller).
    * ``constant``.
    A linear warm-up over ``warmup_epochs`` (per step) precedes every schedule.
    """
    base, total, warm = optim.lr, sched.epochs, sched.warmup_epochs
    position = (epoch - 1) + step / max(steps_per_epoch, 1)  # epochs completed, fractional
    if warm and position < warm:
        return base * (position + 1.0 / max(steps_per_epoch, 1)) / warm
    if sched.lr_schedule == "cosine-official":
        return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / (total - warm + 1)))
    if sched.lr_schedule == "cosine":
        progress = (position - warm) / max(total - warm, 1e-12)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if sched.lr_schedule == "multistep":
        return base * sched.lr_decay ** sum(epoch > m for m in sched.milestones)
    return base
