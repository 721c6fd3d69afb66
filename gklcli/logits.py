"""Logit pairs as every loss reads them: two (B, C) tensors of one shape, computed in fp32 (fp64 stays fp64)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp16/bf16 inputs are computed in fp32 (the losses sum C² terms); fp64 stays fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def promote(logits_student: Tensor, logits_teacher: Tensor) -> tuple[Tensor, Tensor]:
    if logits_student.dim() != 2 or logits_student.shape != logits_teacher.shape:
        raise ValueError(
            "expected two logit tensors of the same shape (B, C), got "
            f"{tuple(logits_student.shape)} and {tuple(logits_teacher.shape)}"
        )
    dtype = compute_dtype(logits_student, logits_teacher)
    return logits_student.to(dtype), logits_teacher.to(dtype)
