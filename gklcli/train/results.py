"""What a finished run reports: the console line per epoch, results.json and summary.md.

These are functions of plain values (the recipe, the metric records, the selections), with no
model, optimizer or process group, so the engine keeps the evaluations and this module keeps the
report's layout: a change to what a run reports is made here, and tested without training.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from gklcli import __version__
from gklcli import checkpoint as ckpt
from gklcli.recipes import Recipe


def run_results(recipe: Recipe, out_dir: Path, weights: str, selection: dict[str, Any], records: list[dict[str, Any]],
                device: str, world_size: int) -> dict[str, Any]:
    """results.json before the final evaluations: the run, its selection, the last epoch's validation
    metrics and where it ran (`best` is filled from best.pt by the engine)."""
    r = recipe
    return {
        "recipe": r.meta.name,
        "kind": r.kind,
        "table": r.meta.table,
        "row": r.meta.row,
        "out_dir": str(out_dir),
        "epochs": r.schedule.epochs,
        "weights": weights,
        "selection": selection,
        "last": {k: v for k, v in (records[-1] if records else {}).items() if k.startswith("val_")},
        "best": {},
        "train_seconds": sum(rec.get("seconds", 0.0) for rec in records),
        "device": device,
        "world_size": world_size,
        "versions": {"gkl": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def add_test_best(results: dict[str, Any], selection_metric: str, records: list[dict[str, Any]],
                  test_best: dict[str, Any]) -> None:
    """Add the per-epoch test fields to `results` (distillation, or eval.test_every_epochs)."""
    # top1_last / top1_best / top1_best_epoch (distillation): the last epoch's test top-1, and the best
    # test top-1 over epochs with its epoch (eval.test_every_epochs > 0; else null)
    name = selection_metric.removeprefix("val_")
    last = results["last"].get(f"test_{name}")
    if last is None and records:
        last = records[-1].get(f"test_{name}")
    results[f"{name}_last"] = last
    results[f"{name}_best"] = test_best.get("value")
    results[f"{name}_best_epoch"] = test_best.get("epoch")
    results["test_best"] = dict(test_best)  # every test metric of the best epoch


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    """results.json, then summary.md, each written atomically."""
    ckpt.atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    ckpt.atomic_write_text(out_dir / "summary.md", summary_markdown(results))


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One compact console line per epoch (the full record is in metrics.jsonl)."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"lr {record['lr']:.4g}"]
    if "eps" in record:
        parts.append(f"ε {record['eps'] * 255:.2f}/255×{int(record['attack_steps'])}")
    parts.append(f"loss {record.get('train_loss', float('nan')):.4f}")
    for label, keys in (("train nat/adv", ("train_acc_nat", "train_acc_adv")), ("val clean/pgd", ("val_clean", "val_pgd"))):
        values = [f"{record[k]:.1f}" for k in keys if k in record]
        if values:
            parts.append(f"{label if len(values) == 2 else label.split('/')[0]} {'/'.join(values)}")
    for label, key in (("val top-1", "val_top1"), ("test top-1", "test_top1")):
        if key in record:
            parts.append(f"{label} {record[key]:.1f}")
    parts.append(f"{record['img_s']:,.0f} img/s, {record['seconds']:.0f}s")
    return " | ".join(parts)


def summary_markdown(results: dict[str, Any]) -> str:
    """A short human-readable report of a finished run."""
    keys = sorted({k for part in ("last", "best") for k in results.get(part, {}) if k != "epoch"})
    lines = [
        f"# {results['recipe']}",
        "",
        f"{results['epochs']} epochs, {results['weights']} weights, {results['device']} × {results['world_size']}, "
        f"{results['train_seconds'] / 3600:.2f} h of training.",
        "",
        "| model | epoch | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for part in ("last", "best"):
        row = results.get(part) or {}
        if not row:
            continue
        epoch = row.get("epoch", results["epochs"] if part == "last" else "-")
        cells = [f"{row[k]:.2f}" if isinstance(row.get(k), float) else "-" for k in keys]
        lines.append(f"| {part} | {epoch} | " + " | ".join(cells) + " |")
    test_best = results.get("test_best") or {}
    if test_best:  # eval.test_every_epochs: the epoch with the best test value (mdistiller's protocol)
        cells = [f"{test_best[k]:.2f}" if isinstance(test_best.get(k), float) else "-" for k in keys]
        lines.append(f"| best test epoch | {test_best['epoch']} | " + " | ".join(cells) + " |")
    if results.get("kind") == "seg-kd":  # ADE20K's test labels are not public: both come from its validation split
        lines += ["", "mIoU and accuracies in %. `test_*`: ADE20K's validation split, as APD and the paper report it (its "
                  "test labels are not public); `val_*` and the choice of `best`: its first eval.n_val images."]
    else:
        lines += ["", "Accuracies in %. `best` is selected on the held-out validation split, never on the test set."]
    if test_best:
        lines.append(f"`best test epoch` is the epoch with the highest {test_best['metric']} among the per-epoch test "
                     "evaluations (eval.test_every_epochs): mdistiller's protocol, which the paper's CIFAR-100 and ImageNet "
                     "KD tables report; it selects on the test set, so `last` is the number that does not.")
    lines.append("")
    return "\n".join(lines)
