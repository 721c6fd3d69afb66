"""torchrun / DDP detection and the few collective helpers the engine needs."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from gklcli.errors import GKLError, show


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: Optional[str], local_rank: int = 0) -> torch.device:
    """--device if given (refusing CUDA where there is none), else cuda:LOCAL_RANK, else cpu."""
    if requested:
        try:
            device = torch.device(requested)
        except (RuntimeError, ValueError):
            raise GKLError(f"--device {show(requested)}: use cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise GKLError(f"--device {requested}: gkl runs on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise GKLError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise GKLError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 …)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The device as results.json names it: the GPU's name, or the CPU's with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def init_distributed(requested_device: Optional[str] = None) -> DistEnv:
    """One process (plain `python`/`gkl`) or one rank of `torchrun --nproc_per_node=N`.

    torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; then the process group is created with NCCL on GPUs
    and gloo on CPU, and each rank uses cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (counts, loss sums); identity in a single process."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A tensor (a confusion matrix) summed over ranks in place; itself in a single process."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (stop requests, non-finite losses)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_equal(value: float, device: torch.device) -> bool:
    """Whether every rank passed the same number (exact comparison)."""
    if not is_distributed():
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0].item() == -t[1].item())


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each forward, so after the last forward of an epoch every
    rank holds statistics updated with its own shard; syncing before averaging, validation and
    checkpointing makes all ranks (and the saved file) agree.
    """
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, 0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] without DDP); a collective: all ranks call it."""
    if not is_distributed():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def barrier() -> None:
    if is_distributed():
        dist.barrier()
