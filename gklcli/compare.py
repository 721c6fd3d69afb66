"""`gkl compare`: runs side by side — their final and best metrics, the recipe keys that differ, their curves.

Only what a run folder holds is read: `metrics.jsonl` (one record per epoch), `results.json` (once
finished), `recipe.yaml` (else `last.pt`'s recipe) and AutoAttack results under `RUN/eval/`
(`gkl reproduce`'s layout, or `gkl eval-aa RUN/best.pt --out RUN/eval/best-aa`). The report is
`compare.md` (the tables), `compare.json` (the same numbers) and `compare.png` (the curves overlaid).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gklcli import checkpoint as ckpt
from gklcli.errors import GKLError, show
from gklcli.recipe_files import read_yaml
from gklcli.train.resume import flatten

CURVE_PREFIXES = ("val_", "test_")  # per-epoch evaluations: accuracies (clean, top-1) and robust accuracies (PGD)
FINAL_KEYS = ("s_iter", "img_s")  # besides the train_/val_/test_ metrics of the last epoch
RESULT_KEYS = ("last.", "best.", "test_best.")  # results.json: the last and the selected model, the best test epoch
RESULT_SUFFIXES = ("_last", "_best", "_best_epoch")  # results.json's top1_last, top1_best, top1_best_epoch
MISSING = "(absent)"


@dataclass
class Run:
    """One run folder as `gkl compare` reads it."""

    label: str
    path: Path
    records: list[dict[str, Any]]
    results: Optional[dict[str, Any]]  # None: not finished
    recipe: dict[str, Any]  # flat dotted keys
    evals: dict[str, dict[str, Any]]  # checkpoint name (best, last) -> its AutoAttack results


def load_run(path: Path, label: str) -> Run:
    """A run folder's records, results, recipe and evaluations; anything else is one line naming the path."""
    if not path.is_dir():
        raise GKLError(f"{path}: not a run folder (no such directory)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise GKLError(f"{path}: not a run folder with finished epochs (no metrics.jsonl)")
    records = ckpt.read_jsonl(metrics)
    if not records or not all(isinstance(r.get("epoch"), int) for r in records):
        raise GKLError(f"{metrics}: no epoch records (each line needs an integer epoch)")
    results_path = path / "results.json"
    results = ckpt.read_json(results_path) if results_path.exists() else None
    if results is not None and not isinstance(results, dict):
        raise GKLError(f"{results_path}: not a JSON mapping; it was damaged or not written by gkl")
    return Run(label, path, records, results, flatten(_recipe(path)), _evals(path))


def _recipe(path: Path) -> dict[str, Any]:
    """The resolved recipe: recipe.yaml (written at the run's start), else the one in last.pt."""
    if (path / "recipe.yaml").is_file():
        return read_yaml(path / "recipe.yaml", str(path / "recipe.yaml"))
    if (path / "last.pt").is_file():
        saved = ckpt.load_file(path / "last.pt")
        if isinstance(saved, dict) and isinstance(saved.get("recipe"), dict):
            return saved["recipe"]
        raise GKLError(f"{path / 'last.pt'}: holds no recipe; not a gkl training checkpoint")
    raise GKLError(f"{path}: no recipe.yaml or last.pt to read the run's recipe from")


def _evals(path: Path) -> dict[str, dict[str, Any]]:
    """AutoAttack results in RUN/eval/<checkpoint>-*/; of several for one checkpoint, the one on the most images."""
    found: dict[str, dict[str, Any]] = {}
    for results in sorted(path.glob("eval/*/results.json")):
        data = ckpt.read_json(results, "AutoAttack results")
        if not isinstance(data, dict) or not _number(data.get("robust_acc")) or not _number(data.get("n_ex", 0)):
            continue  # another evaluation's results, or a hand-edited one: not comparable
        name = results.parent.name.split("-")[0]
        if name not in found or data.get("n_ex", 0) > found[name].get("n_ex", 0):
            found[name] = data
    return found


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_metrics(run: Run) -> dict[str, int | float]:
    """The numbers compared: the last epoch (final.*), the best epoch value (max.*), the mean s/iter, results.json
    (last.*, best.*, test_best.*, top1_last …) and AutoAttack (aa.<checkpoint>.*)."""
    last = run.records[-1]
    out = {f"final.{k}": v for k, v in last.items()
           if _number(v) and (k.startswith(("train_", *CURVE_PREFIXES)) or k in FINAL_KEYS)}
    for key in sorted({k for r in run.records for k in r if k.startswith(CURVE_PREFIXES)}):
        values = [r[key] for r in run.records if _number(r.get(key))]
        if values:
            out[f"max.{key}"] = max(values)
    speeds = [r["s_iter"] for r in run.records if _number(r.get("s_iter"))]
    if speeds:
        out["mean.s_iter"] = sum(speeds) / len(speeds)
    for key, value in flatten(run.results or {}).items():
        if _number(value) and (key.startswith(RESULT_KEYS) or key.endswith(RESULT_SUFFIXES) or key == "train_seconds"):
            out[key] = value
    for name, data in run.evals.items():
        out[f"aa.{name}.robust_acc"] = data["robust_acc"]
        if _number(data.get("clean_acc")):
            out[f"aa.{name}.clean_acc"] = data["clean_acc"]
    return out


def recipe_differences(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """The dotted recipe keys whose values are not the same in every run, with each run's value."""
    keys = sorted({k for run in runs for k in run.recipe})
    table = {k: {run.label: run.recipe.get(k, MISSING) for run in runs} for k in keys}
    return {k: values for k, values in table.items() if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1}


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a name; one run given twice is refused."""
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise GKLError(f"{path}: given twice")
        seen.add(path.resolve())
    names = [p.name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool) or value == MISSING:
        return str(value)
    if _number(value):
        return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.4g}"
    return show(value).replace("|", "\\|")


def markdown(report: dict[str, Any]) -> str:
    """compare.md: the metrics table, then the recipe keys that differ, then the figure."""
    labels = [run["label"] for run in report["runs"]]
    head = "| " + " | ".join(["metric", *labels]) + " |\n|" + "---|" * (len(labels) + 1)
    lines = ["# gkl compare", "", ", ".join(f"`{r['label']}`: {r['path']} ({r['epochs']} epochs, "
                                                 f"{'finished' if r['finished'] else 'not finished'})" for r in report["runs"]), ""]
    lines += ["## Metrics", "", head]
    lines += ["| " + " | ".join([key, *(_cell(values.get(label)) for label in labels)]) + " |"
              for key, values in report["metrics"].items()]
    lines += ["", "final: the last epoch; max: the best epoch value; last/best: results.json (the last and the selected "
              "model on the test set); aa: AutoAttack under RUN/eval/. Accuracies in %.", "", "## Recipe keys that differ", ""]
    if report["recipe_differences"]:
        lines.append(head.replace("metric", "key", 1))
        lines += ["| " + " | ".join([key, *(_cell(values[label]) for label in labels)]) + " |"
                  for key, values in report["recipe_differences"].items()]
    else:
        lines.append("none: the runs share every recipe setting")
    if report["curves"]:
        lines += ["", f"![curves]({report['figure']})"]
    return "\n".join(lines) + "\n"


def curve_keys(runs: list[Run]) -> list[str]:
    """The per-epoch metrics plotted: the training loss, then the evaluations (accuracies, robust accuracies)."""
    present = {k for run in runs for r in run.records for k, v in r.items() if _number(v)}
    evaluations = sorted(k for k in present if k.startswith(CURVE_PREFIXES))
    return [k for k in ("train_loss",) if k in present] + evaluations


def plot(runs: list[Run], keys: list[str], path: Path) -> None:
    """One subplot per metric, every run's curve over epochs in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    columns = min(len(keys), 3)
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run in runs:
            points = [(r["epoch"], r[key]) for r in run.records if _number(r.get(key))]
            if points:
                ax.plot(*zip(*points), marker=".", label=run.label)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss" if key.endswith("loss") else "accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    try:
        ckpt.atomic_save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


def compare(paths: list[Path], out: Path) -> tuple[dict[str, Any], str]:
    """Read the runs, write compare.md/.json/.png into `out`; returns the report and its markdown."""
    runs = [load_run(path, label) for path, label in zip(paths, _labels(paths))]
    metrics = [run_metrics(run) for run in runs]
    keys = sorted({k for m in metrics for k in m}, key=lambda k: (not k.startswith("final."), not k.startswith("max."), k))
    curves = curve_keys(runs)
    report = {
        "runs": [{"label": r.label, "path": str(r.path), "epochs": len(r.records), "finished": r.results is not None} for r in runs],
        "metrics": {k: {run.label: m.get(k) for run, m in zip(runs, metrics)} for k in keys},
        "recipe_differences": recipe_differences(runs),
        "curves": curves,
        "figure": "compare.png" if curves else None,
    }
    text = markdown(report)
    if out.exists() and not out.is_dir():
        raise GKLError(f"--out {out}: is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if curves:
        plot(runs, curves, out / "compare.png")
    ckpt.atomic_write_text(out / "compare.json", json.dumps(report, indent=2) + "\n")
    ckpt.atomic_write_text(out / "compare.md", text)
    return report, text
