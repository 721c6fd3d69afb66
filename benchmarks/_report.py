"""What the benchmark scripts share: the interleaved timing loop, and their ending (a rich table on the
console and, optionally, JSON)."""

from __future__ import annotations

import json
from pathlib import Path
import time
from typing import Any, Callable, Optional

import torch

from rich.console import Console
from rich.table import Table


def report(title: str, columns: list[str], cells: list[list[str]], json_path: Optional[str], payload: dict[str, Any]) -> None:
    """Print `cells` under `columns`; write `payload` to `json_path` when given."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in cells:
        table.add_row(*row)
    Console().print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=2))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(steps: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                device: torch.device) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds of each call of every step after `warmup` rounds, the steps alternating round by round (machine
    drift hits all alike), and each step's peak allocated CUDA bytes (0 on CPU)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks = {name: 0 for name in steps}
    for round_ in range(warmup + rounds):
        for name, step in steps.items():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
    return times, peaks

