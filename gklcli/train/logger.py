"""Run outputs: metrics.jsonl/.csv, the experiment trackers (TensorBoard, W&B, MLflow), a PNG of the curves, console progress."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gklcli.checkpoint import atomic_save_figure, atomic_write_text, read_json, read_jsonl
from gklcli.errors import GKLError
from gklcli.recipes import OutputCfg
from gklcli.train import trackers


class MetricsLog:
    """Per-epoch records in `metrics.jsonl` (append-only) with a `metrics.csv` twin rewritten each epoch,
    and the experiment trackers of `output.tracker`.

    On resume the records after the checkpoint's epoch are dropped, so the files always describe
    exactly the epochs whose effects are in the checkpoint. A tracker cannot drop what it received, so
    it receives an epoch only once a checkpoint holds it (`publish`), and each epoch once:
    `trackers.json` keeps every tracker's run id and the last epoch it received, and a resumed run
    sends it the kept epochs after that one (all of them to a tracker added on resume).
    """

    def __init__(self, out_dir: Path, enabled: bool, output: OutputCfg):
        self.out_dir = out_dir
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.output = output
        self.names = trackers.active(output)
        trackers.require(self.names)  # on every rank, so that all stop alike before any data is read
        self.trackers: list[trackers.Tracker] = []
        self.state: dict[str, dict[str, Any]] = {}  # trackers.json
        self.finished = False

    def load(self, up_to_epoch: int) -> None:
        """Read earlier records (resume), keeping epochs ≤ `up_to_epoch`."""
        if self.jsonl.is_file():
            self.records = [r for r in read_jsonl(self.jsonl) if r.get("epoch", 0) <= up_to_epoch]
        if self.enabled:
            self._rewrite()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            self._rewrite()

    def start(self, config: dict[str, Any]) -> None:
        """Open the trackers once the run is accepted (a refused start writes nothing): new tracker runs
        logging the resolved recipe `config`, or on resume those of trackers.json, then send what they lack."""
        if not self.enabled or not self.names:
            return
        path = self.out_dir / trackers.STATE_FILE
        self.state = _read_tracker_state(path) if path.is_file() else {}
        for name in self.names:
            tracker = trackers.make(name, self.out_dir, self.output, config["meta"]["name"])
            saved = self.state.get(name)
            missing = [key for key in tracker.saved_keys if not isinstance((saved or {}).get(key), str)]
            if saved is not None and missing:
                raise GKLError(f"{path}: the {name!r} entry lacks {', '.join(missing)}; it was damaged or not written by gkl")
            opened = tracker.start(saved, config)
            if opened is not None:  # None: TensorBoard without its package
                self.state[name] = {**opened, "epoch": saved["epoch"] if saved else 0}
                self.trackers.append(tracker)
        self.publish()

    def publish(self) -> None:
        """Send each tracker the records it has not received; called once the checkpoint holding them is written."""
        for tracker in self.trackers:
            entry = self.state[tracker.name]
            for record in self.records:
                if record["epoch"] > entry["epoch"]:
                    tracker.log(record["epoch"], trackers.scalars(record))
                    entry["epoch"] = record["epoch"]
        if self.trackers:
            atomic_write_text(self.out_dir / trackers.STATE_FILE, json.dumps(self.state, indent=2) + "\n")

    def finish(self, results: dict[str, Any]) -> None:
        """results.json (written) as every tracker's summary; the tracker runs then close as finished."""
        for tracker in self.trackers:
            tracker.summary(results, self.out_dir / "results.json")
        self.finished = True

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
        """Close the tracker runs: finished after `finish`, else stopped (interrupted or failed; --resume reopens them)."""
        for tracker in self.trackers:
            tracker.close(self.finished)
        self.trackers = []


def _read_tracker_state(path: Path) -> dict[str, dict[str, Any]]:
    """trackers.json: per tracker, the ids that reopen its run and the last epoch it received."""
    state = read_json(path, "tracker runs")
    if not isinstance(state, dict) or not all(isinstance(v, dict) and isinstance(v.get("epoch"), int) for v in state.values()):
        raise GKLError(f"{path}: not a mapping of tracker entries with an integer epoch; it was damaged or not written by gkl")
    return state


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
