"""The training batch order: seeded per epoch, sliced per DDP rank, resumable at any batch.

Every random choice is derived from explicit seeds: the shuffle from (seed, epoch) and each
sample's augmentation from (seed, epoch, index) through `sample_seed`. The sampler yields
``(epoch, index)`` pairs, so DataLoader workers hold no state and a run resumed in the middle of an
epoch sees exactly the batches the interrupted run would have seen (see `gklcli.data`).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from gklcli.errors import GKLError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (splitmix-style mixing of the three integers)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


@contextlib.contextmanager
def seeded_rngs(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """Python's, NumPy's and torch's global RNGs (the CPU one, and `device`'s when it is a GPU) seeded from
    `seed` for the block, then restored: for third-party code that draws from them (timm's RandAugment,
    Mixup, RandomErasing), so its draws depend on `seed` alone and the caller's RNG streams are untouched."""
    python, numpy = random.getstate(), np.random.get_state()
    cuda = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed every GPU as well
        for dev in cuda:
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(seed)
        random.seed(seed)
        np.random.seed([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF])
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


REPEAT_ROUND = 256  # timm RepeatAugSampler's selected_round


def repeated_epoch_images(num: int, world_size: int) -> int:
    """Images per epoch of repeated augmentation, as timm's `RepeatAugSampler` counts them (summed over the
    ranks): each rank takes ⌊(num // 256 · 256) / ranks⌋. Sets smaller than 256 images, where timm's count
    would be 0, take ⌈num / ranks⌉ per rank (timm's rule with selected_round = 0)."""
    per_rank = (num // REPEAT_ROUND * REPEAT_ROUND) // world_size if num >= REPEAT_ROUND else -(-num // world_size)
    return per_rank * world_size


# ---------------------------------------------------------------------------------------------------
# Batch order: seeded per epoch, sliced per rank, resumable at any batch.
# ---------------------------------------------------------------------------------------------------


class EpochBatchSampler(torch.utils.data.Sampler):
    """Global batches of ``(epoch, index)`` for one epoch; this rank gets its slice of each.

    Without generated data an epoch is one pass over a seeded permutation of the real images. With
    generated data (indices ≥ `num_real`), `generated_sampler` picks the rule:

    * ``dmat`` — DM-AT's `SemiSupervisedSampler` (core/data/semisup.py), the paper's protocol for
      the generated-data rows: an epoch is ``ceil(epoch_images / B)`` batches, where `epoch_images`
      is the size of the whole base training set (DM-AT's `dataset_size`, counted *before* its
      1,024-image validation hold-out). Each batch takes ``B − int(B·fraction)`` real images from a
      permutation (a fresh one when the previous is used up; a short last chunk is topped up with
      generated images) plus generated images drawn uniformly with replacement, then shuffled
      (DM-AT's `np.random.shuffle(batch)`), so each DDP rank gets a random mix.
    * ``real-pass`` — gkl's earlier rule: one pass over the real images per epoch, each batch
      ``round(fraction·B)`` generated images (3.3× DM-AT's steps at fraction 0.7).

    Every choice is seeded by (seed, epoch, batch), so `set_epoch(epoch, start)` resumes exactly at
    batch `start` of the epoch.

    ``repeats`` > 1 is repeated augmentation (timm's `RepeatAugSampler`, DeiT's RASampler): the epoch's
    permutation with every index repeated `repeats` times in a row, cut to `repeated_epoch_images`; rank r
    takes every world_size-th image of a global batch starting at r (timm's `indices[rank::num_replicas]`),
    so the copies of an image go to different ranks, or into the same batch on one process. Those batches
    yield ``(epoch, index, copy)`` so that each copy gets its own augmentation.
    """

    def __init__(
        self,
        num_real: int,
        batch_size: int,
        *,
        seed: int,
        num_generated: int = 0,
        generated_fraction: float = 0.0,
        generated_sampler: str = "dmat",
        epoch_images: Optional[int] = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        repeats: int = 1,
    ):
        if repeats > 1 and num_generated:
            raise GKLError(f"data.repeated_aug: {repeats} is not implemented with generated data (data.generated.path)")
        if batch_size % world_size:
            raise GKLError(f"data.batch_size: {batch_size} is not divisible by the {world_size} DDP processes")
        self.num_real, self.batch_size, self.seed = num_real, batch_size, seed
        self.num_generated = num_generated
        self.dmat = bool(num_generated) and generated_sampler == "dmat"
        if not num_generated:
            self.n_gen = 0
        elif self.dmat:
            self.n_gen = int(batch_size * generated_fraction)  # DM-AT: int(batch_size * unsup_fraction)
        else:
            self.n_gen = round(generated_fraction * batch_size)
        self.n_real = batch_size - self.n_gen
        if self.n_real < 1:
            raise GKLError("data.generated.fraction: leaves no real images in a batch; use a value below 1")
        self.epoch_images = num_real if epoch_images is None else epoch_images
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.repeats = repeats
        if repeats > 1:
            self.num_images = min(repeated_epoch_images(num_real, world_size), num_real * repeats)
        self.epoch, self.start = 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def batches_per_epoch(self) -> int:
        if self.dmat:
            return -(-self.epoch_images // self.batch_size)
        full, rest = divmod(self.num_images if self.repeats > 1 else self.num_real, self.n_real)
        return full + (1 if rest and not self.drop_last and rest >= self.world_size else 0)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _generator(self, *keys: int) -> torch.Generator:
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, sum(keys)))

    def _generated(self, k: int, count: int) -> Tensor:
        return self.num_real + torch.randint(self.num_generated, (count,), generator=self._generator(-1 - k))

    def _permutation(self, p: int) -> Tensor:
        """The p-th real-image permutation of the epoch (p > 0 only when an epoch outlasts one pass)."""
        return torch.randperm(self.num_real, generator=self._generator(-(2**40), -p * 2**20))

    def _global_batch_dmat(self, k: int) -> Tensor:
        chunks = -(-self.num_real // self.n_real)  # batches one permutation lasts
        p, j = divmod(k, chunks)
        real = self._permutation(p)[j * self.n_real : (j + 1) * self.n_real]
        batch = torch.cat([real, self._generated(k, self.batch_size - len(real))])
        return batch[torch.randperm(len(batch), generator=self._generator(-(2**41), -k))]

    def _global_parts(self, perm: Tensor, k: int) -> list[Tensor]:
        real = perm[k * self.n_real : (k + 1) * self.n_real]
        parts = [real]
        if self.n_gen:
            # scale the batch's generated share with its real share (the last batch may be short)
            count = self.n_gen if len(real) == self.n_real else max(1, round(self.n_gen * len(real) / self.n_real))
            parts.append(self._generated(k, count))
        return parts

    def _repeated(self) -> Iterator[list[tuple[int, ...]]]:
        stream = self._permutation(0).repeat_interleave(self.repeats)[: self.num_images]
        for k in range(self.start, self.batches_per_epoch()):
            positions = torch.arange(k * self.batch_size, min((k + 1) * self.batch_size, len(stream)))[self.rank :: self.world_size]
            yield [(self.epoch, int(stream[p]), int(p) % self.repeats) for p in positions]

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        if self.repeats > 1:
            yield from self._repeated()
            return
        perm = None if self.dmat else self._permutation(0)
        for k in range(self.start, self.batches_per_epoch()):
            parts = [self._global_batch_dmat(k)] if self.dmat else self._global_parts(perm, k)
            mine = [torch.tensor_split(part, self.world_size)[self.rank] for part in parts]
            yield [(self.epoch, int(i)) for i in torch.cat(mine)]


def make_batch_sampler(cfg: Any, num_train: int, num_generated: int, *, seed: int, rank: int = 0, world_size: int = 1) -> EpochBatchSampler:
    """The training sampler of a `DataCfg`; `gkl train-at --dry-run` plans with this same function.

    `num_train` counts the training images after the validation hold-out; DM-AT sizes its epoch by
    the whole base set, so the hold-out is added back for `epoch_images`.
    """
    holdout = cfg.val_size if cfg.dataset != "imagenet-lt" else 0
    return EpochBatchSampler(
        num_train, cfg.batch_size, seed=seed, num_generated=num_generated, generated_fraction=cfg.generated.fraction,
        generated_sampler=cfg.generated.sampler, epoch_images=num_train + holdout, drop_last=cfg.drop_last,
        rank=rank, world_size=world_size, repeats=cfg.repeated_aug,
    )
