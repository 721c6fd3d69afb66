"""Forward+backward time and peak memory of kl_div, gkl_loss (class-wise) and the naive B×C×C formula.

Every number is printed as a ratio to `kl_div` measured in the same process on the same inputs.
Targets (issue 2): gkl_loss ≤ 1.5× kl_div time at C = 1000 and peak memory within 1.3× of it.

    python benchmarks/bench_losses.py                 # CPU, the issue's shapes
    python benchmarks/bench_losses.py --device cuda   # on a GPU
    python benchmarks/bench_losses.py --json out.json

Peak memory is the high-water mark of bytes allocated *during* forward+backward (inputs excluded,
gradients included): on CUDA from the caching allocator's statistics, on CPU by tracking every
tensor storage created under a TorchDispatchMode until it is freed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gklcli.losses import gkl_loss, kl_div

SHAPES = [(128, 10), (128, 100), (512, 1000)]
ALPHA, BETA, GAMMA = 20.0, 5.0, 0.4


def naive_algorithm1(s: torch.Tensor, t: torch.Tensor, onehot: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of the paper as written (the official code's B×C×C tensors)."""
    c = s.shape[1]
    scores = (onehot @ prior).pow(GAMMA)
    weights = scores.view(-1, c, 1) @ scores.view(-1, 1, c)
    delta_a = s.view(-1, c, 1) - s.view(-1, 1, c)
    delta_b = t.view(-1, c, 1) - t.view(-1, 1, c)
    wmse = (torch.pow(delta_b - delta_a, 2) * weights).sum() / weights.sum() * 0.25
    ce = -(F.softmax(t, dim=1).detach() * F.log_softmax(s, dim=-1)).sum(1).mean()
    return BETA * ce + ALPHA * wmse


class _LiveBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created under the mode, until each is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(result)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._live:
                    nbytes = storage.nbytes()
                    self._live[key] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key, nbytes)
        return result


def _step(fn: Callable[[], torch.Tensor], s: torch.Tensor, t: torch.Tensor) -> None:
    s.grad = t.grad = None
    fn().backward()


def peak_bytes(fn: Callable[[], torch.Tensor], s: torch.Tensor, t: torch.Tensor) -> int:
    if s.device.type == "cuda":
        torch.cuda.synchronize()
        s.grad = t.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, s, t)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    s.grad = t.grad = None
    with _LiveBytes() as tracker:
        _step(fn, s, t)
    return tracker.peak


def median_seconds(methods: dict[str, Callable[[], torch.Tensor]], s: torch.Tensor, t: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median wall time per method, measured round-robin so machine drift hits all alike."""
    sync = torch.cuda.synchronize if s.device.type == "cuda" else (lambda: None)
    for fn in methods.values():
        for _ in range(3):
            _step(fn, s, t)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            sync()
            start = time.perf_counter()
            _step(fn, s, t)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def run(device: str, repeats: int, naive_limit_gb: float) -> list[dict]:
    rows = []
    for b, c in SHAPES:
        g = torch.Generator().manual_seed(b * c)
        s = (torch.randn(b, c, generator=g) * 3).to(device).requires_grad_()
        t = (torch.randn(b, c, generator=g) * 3).to(device).requires_grad_()
        targets = torch.randint(0, c, (b,), generator=g).to(device)
        prior = F.softmax(torch.randn(c, c, generator=g) * 2, dim=1).to(device)
        onehot = F.one_hot(targets, c).float()
        methods: dict[str, Callable[[], torch.Tensor]] = {
            "kl_div": lambda: kl_div(s, t),
            "gkl_loss": lambda: gkl_loss(s, t, alpha=ALPHA, beta=BETA, gamma=GAMMA, targets=targets, class_prior=prior),
            "naive": lambda: naive_algorithm1(s, t, onehot, prior),
        }
        naive_need_gb = 8 * b * c * c * 4 / 1e9  # ~8 live B×C×C fp32 tensors at the peak
        skipped = naive_need_gb > naive_limit_gb
        if skipped:
            del methods["naive"]
        # kl_div and gkl_loss interleaved; the naive formula's huge allocations would disturb them
        seconds = median_seconds({k: methods[k] for k in ("kl_div", "gkl_loss")}, s, t, repeats)
        if not skipped:
            seconds.update(median_seconds({"naive": methods["naive"]}, s, t, max(3, repeats // 10)))
        peaks = {name: peak_bytes(fn, s, t) for name, fn in methods.items()}
        for name in methods:
            rows.append(
                {
                    "B": b,
                    "C": c,
                    "method": name,
                    "ms": seconds[name] * 1e3,
                    "time_ratio": seconds[name] / seconds["kl_div"],
                    "peak_mb": peaks[name] / 2**20,
                    "mem_ratio": peaks[name] / peaks["kl_div"],
                }
            )
        if skipped:
            rows.append({"B": b, "C": c, "method": "naive", "skipped": f"needs ~{naive_need_gb:.0f} GB (> --naive-limit-gb)"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--naive-limit-gb", type=float, default=8.0, help="skip the naive formula above this estimate")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = run(args.device, args.repeats, args.naive_limit_gb)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"GKL loss forward+backward, ratios to kl_div ({device}, torch {torch.__version__})")
    for column in ("B", "C", "method", "ms", "time × kl_div", "peak MB", "memory × kl_div"):
        table.add_column(column, justify="right")
    for r in rows:
        if "skipped" in r:
            table.add_row(str(r["B"]), str(r["C"]), r["method"], "skipped", r["skipped"], "", "")
            continue
        table.add_row(
            str(r["B"]), str(r["C"]), r["method"], f"{r['ms']:.3f}", f"{r['time_ratio']:.2f}", f"{r['peak_mb']:.2f}", f"{r['mem_ratio']:.2f}"
        )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
