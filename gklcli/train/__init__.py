"""Training: one engine, and one `Step` per task.

`engine.Engine` owns the loop, checkpoints, resume, DDP, AMP, logging and evaluation; a *step*
computes each batch's loss: `at.AdversarialStep` (`gkl train-at`), `kd.DistillStep` and
`clip.ClipStep` and `seg.SegStep` (`gkl distill`), `semi.SemiStep` (`gkl train-semi`); a *workload*
(`workload.ImageWorkload`, `clip.ClipWorkload`, `semi.SemiWorkload`, `seg.SegWorkload`) supplies the data and the model. `trainer(kind)` is the training function of a recipe kind.
"""

from __future__ import annotations

from typing import Any, Callable


TRAIN_VERBS = {"at": "train-at", "kd": "distill", "clip-kd": "distill", "semi": "train-semi", "seg-kd": "distill"}  # the gkl command of a kind


def trainer(kind: str) -> Callable[..., dict[str, Any]]:
    """`train_at`, `train_distill`, `train_clip`, `train_semi` or `train_seg` for a recipe's `kind` (imported on demand: they pull in torch)."""
    if kind == "at":
        from gklcli.train.at import train_at

        return train_at
    if kind == "clip-kd":
        from gklcli.train.clip import train_clip

        return train_clip
    if kind == "semi":
        from gklcli.train.semi import train_semi

        return train_semi
    if kind == "seg-kd":
        from gklcli.train.seg import train_seg

        return train_seg
    from gklcli.train.kd import train_distill

    return train_distill


def teacher_reporter(kind: str) -> Callable[..., dict[str, Any]]:
    """The `--teacher-only` report of a distillation kind: top-1 of a classifier (kd), mIoU of a segmenter (seg-kd)."""
    if kind == "seg-kd":
        from gklcli.train.seg import seg_teacher_report

        return seg_teacher_report
    from gklcli.train.kd import teacher_report

    return teacher_report
