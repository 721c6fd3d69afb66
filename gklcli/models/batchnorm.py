"""BatchNorm as the official multi-GPU runs saw it: ghost batches and DM-AT's first-step statistics.

The official GKL-AT and mdistiller ImageNet runs train under `nn.DataParallel`: each GPU normalises
its own slice of the batch (32 of 128 images on 4 GPUs), and the running statistics that survive
are replica 0's (its buffers are the module's own; the other replicas' updates are discarded). In
one process a plain BatchNorm normalises over the whole batch, which changes the training signal of
the adversarial (small-batch) regime. `GhostBatchNorm2d` reproduces DataParallel's behaviour.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each of `groups` chunks of the batch on its own.

    Chunks follow `torch.chunk`, exactly as DataParallel scatters a batch over `groups` GPUs (a
    short last batch is split into the same number of smaller chunks). Only the first chunk updates
    the running statistics, as replica 0 does. Evaluation is plain BatchNorm. The state dict is
    BatchNorm2d's, so checkpoints load into models without ghost batches and back.
    """

    def __init__(self, num_features: int, groups: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.groups <= 1:
            return super().forward(x)
        first, *rest = x.chunk(self.groups)
        out = [super().forward(first)]  # running statistics (and num_batches_tracked) as replica 0
        out += [F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in rest]
        return torch.cat(out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"


def use_ghost_batch_norm(module: nn.Module, groups: int) -> int:
    """Replace every `nn.BatchNorm2d` in `module` (in place) by a `GhostBatchNorm2d` with the same
    settings and state; returns how many were replaced."""
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            ghost = GhostBatchNorm2d(
                child.num_features, groups, eps=child.eps, momentum=child.momentum, affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            ghost.load_state_dict(child.state_dict())
            setattr(module, name, ghost)
            count += 1
        else:
            count += use_ghost_batch_norm(child, groups)
    return count


@contextlib.contextmanager
def bn_momentum(module: nn.Module, value: float) -> Iterator[None]:
    """Every BatchNorm's momentum set to `value` inside the block (DM-AT's first training step uses
    1.0, so the running statistics start as that batch's: "make BN init same as Haiku")."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = value
    try:
        yield
    finally:
        for m, old in zip(norms, saved):
            m.momentum = old
