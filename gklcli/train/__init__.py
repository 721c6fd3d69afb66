"""Training: one engine, and one `Step` per task.

`engine.Engine` owns the loop, checkpoints, resume, DDP, AMP, logging and evaluation; a *step*
computes each batch's loss: `at.AdversarialStep` (`gkl train-at`) and `kd.DistillStep`
(`gkl distill`). `trainer(kind)` is the training function of a recipe kind.
"""

from __future__ import annotations

from typing import Any, Callable


def trainer(kind: str) -> Callable[..., dict[str, Any]]:
    """`train_at` or `train_distill` for a recipe's `kind` (imported on demand: both pull in torch)."""
    if kind == "at":
        from gklcli.train.at import train_at

        return train_at
    from gklcli.train.kd import train_distill

    return train_distill
