"""Weight averaging: the official epoch-level EMA (`swa.py`) on the fly, and DM-AT's step EMA.

The released GKL-AT models are ``python swa.py workdir 0.9 1 200`` applied to 200 per-epoch files:
avg ← w_start at the start epoch, then avg ← (1−τ)·w_e + τ·avg for every later epoch, over *all*
state-dict entries (BatchNorm running statistics included, no recalibration). `EpochAverage` does
this at each epoch end, so no per-epoch files are needed. Integer buffers (BN's
`num_batches_tracked`) take the latest value instead of a float average; nothing reads them when
BN momentum is set.

`StepEMA` is the in-loop EMA of DM-AT's `WATrainer` (see its docstring).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

State = dict[str, Tensor]


def _state(model: nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class EpochAverage:
    def __init__(self, tau: float, start_epoch: int = 1):
        self.tau, self.start_epoch = tau, start_epoch
        self.state: Optional[State] = None

    def update_epoch(self, model: nn.Module, epoch: int) -> None:
        if epoch < self.start_epoch:
            return
        if self.state is None or epoch == self.start_epoch:
            self.state = _state(model)
            return
        with torch.no_grad():
            for key, value in model.state_dict().items():
                avg = self.state[key]
                if avg.is_floating_point():
                    avg.copy_((1 - self.tau) * value + self.tau * avg)
                else:
                    avg.copy_(value)

    def update_step(self, model: nn.Module, global_step: int, total_steps: int) -> None:
        """Nothing per step."""

    def state_dict(self) -> dict:
        return {"mode": "epoch", "tau": self.tau, "start_epoch": self.start_epoch, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        self.state = saved["state"]


class StepEMA:
    """DM-AT's `ema_update` (gowal21uncovering/utils/watrain.py), called after every optimizer step
    with the 1-based global step g: the average starts as the *initial* weights, copies the model
    while g < W (W = warmup_fraction · total steps), then decays by d = min(τ, (1+δ)/(10+δ)),
    δ = g − W. Only parameters are averaged; buffers (BN statistics) are the model's."""

    def __init__(self, tau: float, initial: nn.Module, warmup_fraction: float = 0.0, dynamic: bool = True):
        self.tau, self.warmup_fraction, self.dynamic = tau, warmup_fraction, dynamic
        self.state: Optional[State] = _state(initial)

    def update_epoch(self, model: nn.Module, epoch: int) -> None:
        """Nothing per epoch."""

    def decay(self, global_step: int, total_steps: int) -> float:
        warmup = self.warmup_fraction * total_steps
        if global_step < warmup:
            return 0.0
        if not self.dynamic:  # USB's EMA: a constant decay from the first step
            return self.tau
        delta = global_step - warmup
        return min(self.tau, (1.0 + delta) / (10.0 + delta))

    def update_step(self, model: nn.Module, global_step: int, total_steps: int) -> None:
        decay = self.decay(global_step, total_steps)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in model.state_dict().items():
                avg = self.state[key]
                if key in params and avg.is_floating_point():
                    avg.mul_(decay).add_(value.detach(), alpha=1 - decay)
                else:
                    avg.copy_(value)

    def state_dict(self) -> dict:
        return {"mode": "step", "tau": self.tau, "warmup_fraction": self.warmup_fraction, "state": self.state}

    def load_state_dict(self, saved: dict) -> None:
        self.state = saved["state"]


def make_averager(cfg, initial: nn.Module) -> Optional[EpochAverage | StepEMA]:
    """From an `EmaCfg` and the freshly built model; None when averaging is off."""
    if cfg.mode == "epoch":
        return EpochAverage(cfg.tau, cfg.start_epoch)
    if cfg.mode == "step":
        return StepEMA(cfg.tau, initial, cfg.warmup_fraction, cfg.dynamic)
    return None
