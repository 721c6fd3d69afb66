"""Run outputs: metrics.jsonl/.csv, TensorBoard events, a PNG of the curves, console progress."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gklcli.checkpoint import atomic_save_figure, atomic_write_text, read_jsonl


class MetricsLog:
    """Per-epoch records in `metrics.jsonl` (append-only) with a `metrics.csv` twin rewritten each epoch.

    On resume the records after the checkpoint's epoch are dropped, so the files always describe
    exactly the epochs whose effects are in the checkpoint.
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool):
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.writer = None
        # the events file is opened with the first record, so a run refused at start writes nothing
        self._tensorboard_dir = out_dir / "tensorboard" if enabled and tensorboard else None

    def load(self, up_to_epoch: int) -> None:
        """Read earlier records (resume), keeping epochs ≤ `up_to_epoch`."""
        if self.jsonl.is_file():
            self.records = [r for r in read_jsonl(self.jsonl) if r.get("epoch", 0) <= up_to_epoch]
        if self.enabled:
            self._rewrite()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self._rewrite()
        if self.writer is None and self._tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

                self.writer = SummaryWriter(str(self._tensorboard_dir))
            except ImportError:
                pass
            self._tensorboard_dir = None
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def _rewrite(self) -> None:
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.records))
        columns: list[str] = []
        for record in self.records:
            columns += [k for k in record if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_text(self.csv, buf.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss, accuracies and the lr/ε schedule against epochs, as one PNG."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("train_loss", "train_ce", "train_wmse", "train_sce", "train_kl"):
        if key in records[-1]:
            axes[0].plot(epochs, [r.get(key) for r in records], label=key)
    axes[0].set_title("training loss")
    for key in sorted(k for k in records[-1] if k.startswith(("val_", "test_", "train_acc"))):
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if points:
            axes[1].plot(*zip(*points), marker=".", label=key)
    axes[1].set_title("accuracy (%)")
    axes[2].plot(epochs, [r["lr"] for r in records], label="lr")
    if "eps" in records[-1]:
        twin = axes[2].twinx()
        twin.plot(epochs, [r["eps"] * 255 for r in records], color="tab:red", label="ε_t ×255")
        twin.legend(loc="upper right")
    axes[2].set_title("schedule")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


class EpochProgress:
    """A rich progress bar per epoch (loss, accuracy, img/s, ETA); quiet mode prints nothing here."""

    def __init__(self, console: Console, enabled: bool):
        self.console, self.enabled = console, enabled
        self.progress: Optional[Progress] = None
        self.task = None
        self.start = time.perf_counter()
        self.images = 0

    def begin(self, epoch: int, epochs: int, total: int, done: int) -> None:
        self.start, self.images = time.perf_counter(), 0
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def advance(self, images: int, info: str) -> float:
        """Count a finished step; returns the epoch's images per second so far."""
        self.images += images
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=f"{info} {rate:,.0f} img/s")
        return rate

    def end(self) -> float:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        return self.images / max(time.perf_counter() - self.start, 1e-9)
