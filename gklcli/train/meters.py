"""The epoch's metric sums (`Meters`): what the `train_*` columns of an epoch record are averaged from.

Its own module because it is part of the resume state as well as of the metrics: a mid-epoch
checkpoint saves these sums, and the means are reduced over every DDP rank, so an interrupted and
resumed epoch reports the numbers an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gklcli.distributed import all_reduce_sum


@dataclass
class Meters:
    """Sums over the current epoch (saved in mid-epoch checkpoints for exact epoch metrics)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    seconds: float = 0.0
    steps: int = 0

    def add(self, metrics: dict[str, Tensor | float], n: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * n
        self.count += n
        self.steps += 1

    def means(self, device: torch.device) -> dict[str, float]:
        keys = sorted(self.sums)
        totals = all_reduce_sum([self.sums[k] for k in keys] + [float(self.count)], device)
        n = max(totals[-1], 1.0)
        return {k: v / n for k, v in zip(keys, totals[:-1])}
