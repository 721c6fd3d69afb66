"""The reports of `gkl reproduce`: numbers collected from finished runs, markdown + JSON, and figures."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from gklcli.tables import is_best_metric, metric_parts
from gklcli.checkpoint import atomic_write_text, read_json, read_jsonl
from gklcli.reproduce.plan import CellPlan, Job, Plan, TablePlan, ood_path, zeroshot_path, eval_settings, find_eval, metric_eps

if TYPE_CHECKING:
    from gklcli.reproduce.execute import Counts


# ---------------------------------------------------------------------------------------------------
# Collecting numbers
# ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    return read_json(path) if path.is_file() else None


def _train_metric(job: Job, metric: str, checkpoint: str) -> Optional[float]:
    if metric == "s_iter":
        log = job.dir / "metrics.jsonl"
        if not (job.dir / "results.json").is_file() or not log.is_file():
            return None
        values = [record.get("s_iter") for record in read_jsonl(log)]
        values = [v for v in values if isinstance(v, (int, float))]
        return statistics.fmean(values) if values else None
    results = _read_json(job.dir / "results.json") or {}
    base, _, qualifier = metric.partition("@")
    if qualifier == "best":  # the epoch with the best test top-1 (eval.test_every_epochs; mdistiller's protocol)
        value = (results.get("test_best") or {}).get(f"test_{base}")
    else:  # the final evaluation of the `--checkpoint` weights (last: the last epoch, = results' top1_last)
        value = (results.get(checkpoint) or {}).get(f"test_{metric}")
    return float(value) if isinstance(value, (int, float)) else None


def _eval_metric(job: Job, metric: str, plan: Plan, worst_of: tuple[str, ...]) -> Optional[float]:
    import torch

    from gklcli.evaluate import format_eps

    if not (job.dir / f"{plan.checkpoint}.pt").is_file():
        return None
    found = find_eval(job, plan.checkpoint, eval_settings(job, plan.smoke))
    if found is None:
        return None
    r = read_json(found / "results.json")
    if metric == "clean":
        return r["clean_acc"]
    if metric == "aa":
        return r["robust_acc"]
    if metric.startswith("aa@"):
        wanted = format_eps(metric_eps(metric))
        return next((e["robust_acc"] for e in r["eps_sweep"] if e["eps"] == wanted), None)
    if metric in r["other_attacks"]:
        return r["other_attacks"][metric]
    if metric in r["individual"]:
        return r["individual"][metric]
    if metric == "worst":  # AutoAttack and the row's PGD/CW attacks, per example
        flags = torch.load(found / "flags.pt", weights_only=True)
        robust = flags["robust"].clone()
        for attack in worst_of:
            robust &= flags[f"extra/{attack}"]
        return 100.0 * float(robust.float().mean())
    return None


def metric_value(job: Job, metric: str, plan: Plan, worst_of: tuple[str, ...] = ()) -> Optional[float]:
    """One number of one job, or None while it is not made yet."""
    parts = metric_parts(metric)
    if len(parts) > 1:
        values = [metric_value(job, m, plan) for m in parts]
        return statistics.fmean(values) if all(v is not None for v in values) else None
    if metric in ("teacher_top1", "teacher_miou"):  # the teacher's report: test_top1 / test_miou
        report = _read_json(job.dir)
        return (report or {}).get("test_" + metric.removeprefix("teacher_"))
    if metric.startswith("ood:"):
        report = _read_json(ood_path(job, plan.checkpoint, metric[4:]))
        return (report or {}).get("top1")
    if metric.startswith("teacher_zeroshot:"):
        return ((_read_json(job.dir) or {}).get(metric.partition(":")[2]) or {}).get("top1")
    if metric.startswith("zeroshot:"):
        return (_read_json(zeroshot_path(job, plan.checkpoint, metric.partition(":")[2])) or {}).get("top1")
    if job.kind in ("kd", "semi", "seg-kd"):
        return _train_metric(job, metric, plan.checkpoint)
    return _eval_metric(job, metric, plan, worst_of)


def cell_numbers(cell: CellPlan, plan: Plan) -> dict[str, Any]:
    """paper, per-seed values, mean ± sample std over the finished ones, and Δ = ours − paper."""
    values = [metric_value(j, cell.metric, plan, cell.worst_of) for j in cell.jobs] if cell.metric else []
    done = [v for v in values if v is not None]
    mean = statistics.fmean(done) if done else None
    std = statistics.stdev(done) if len(done) > 1 else (0.0 if done else None)
    delta = mean - cell.paper if mean is not None and cell.paper is not None else None
    numbers = {"column": cell.column, "paper": cell.paper, "metric": cell.metric, "values": values, "mean": mean, "std": std,
               "n": len(done), "delta": delta, "runs": [str(j.dir) for j in cell.jobs]}
    if cell.metric and is_best_metric(cell.metric):  # the last epoch's values beside the best-over-epochs ones
        last = [_train_metric(j, cell.metric.partition("@")[0], "last") for j in cell.jobs]
        finished = [v for v in last if v is not None]
        numbers |= {"last_values": last, "last_mean": statistics.fmean(finished) if finished else None}
    return numbers


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------


def _fmt(value: float, metric: Optional[str]) -> str:
    return f"{value:.3f}" if metric == "s_iter" else f"{value:.2f}"


def cell_text(numbers: dict[str, Any], cited: bool) -> str:
    """`paper → ours ± std (Δ)`; cited cells show the paper's number only."""
    paper, metric = numbers["paper"], numbers["metric"]
    shown = _fmt(paper, metric) if paper is not None else "—"
    if cited or not numbers["runs"]:
        return f"{shown} (cited)" if cited and paper is not None else shown
    if numbers["mean"] is None:
        return f"{shown} → …"
    ours = _fmt(numbers["mean"], metric)
    if numbers["n"] > 1:
        ours += f" ± {_fmt(numbers['std'], metric)}"
    if numbers["n"] < len(numbers["runs"]):
        ours += f" ({numbers['n']}/{len(numbers['runs'])} seeds)"
    if numbers["delta"] is not None:
        ours += f" ({numbers['delta']:+.2f})" if metric != "s_iter" else f" ({numbers['delta']:+.3f})"
    return f"{shown} → **{ours}**"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_report(tp: TablePlan, plan: Plan, figures: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The markdown section and JSON record of one table."""
    t = tp.table
    smoke = " — SMOKE (toy-scale pipeline check: synthetic data, tiny model; not comparable to the paper)" if plan.smoke else ""
    lines = [f"## {t.name}: {t.title}{smoke}", ""]
    if t.status == "unsupported":
        lines += [f"**Not reproducible with gkl:** {t.reason}", ""]
    header = t.columns
    lines += ["| " + " | ".join(_escape(c) for c in header) + " |", "|" + "---|" * len(header)]
    by_row: dict[int, list[CellPlan]] = {}
    for cell in tp.cells:
        by_row.setdefault(cell.row.index, []).append(cell)
    rows_json = []
    for row in tp.rows:
        numbers = {c.column: cell_numbers(c, plan) for c in by_row.get(row.index, [])}
        if row.section:
            lines.append(f"| *{_escape(row.section)}* |" + " |" * (len(header) - 1))
        cells = [_escape(row.labels[c]) if c in row.labels else cell_text(numbers[c], row.cited) for c in header]
        lines.append("| " + " | ".join(cells) + " |")
        rows_json.append({"index": row.index, "labels": row.labels, "section": row.section, "cited": row.cited,
                          "note": row.note, "cells": list(numbers.values())})
    lines += ["", "Each cell: paper → **ours** (mean ± std over seeds) (Δ = ours − paper); “…” not run yet; "
              "“(cited)” numbers of other methods, taken from the paper."]
    best = sorted({c.metric.partition("@")[0] for c in tp.cells if c.metric and is_best_metric(c.metric)})
    if best:  # the paper's protocol for mdistiller-based tables: say so under the table
        lines += ["", f"{', '.join(best).replace('top1', 'top-1')}: best test accuracy over epochs, mdistiller's protocol "
                  "(the paper's); it selects on the test set, so the last-epoch values are in the JSON (`last_values`)."]
    notes = [f"- row {row.index} ({_escape(row.label)}): {row.note}" for row in tp.rows if row.note]
    if notes:
        lines += ["", *notes]
    for fig in figures:
        lines += ["", f"![{fig['caption']}]({fig['path']})" if fig.get("path") else f"- figure skipped ({fig['caption']}): {fig['reason']}"]
    lines.append("")
    record = {"table": t.name, "paper": t.paper, "title": t.title, "status": t.status, "reason": t.reason,
              "columns": t.columns, "numeric_columns": t.numeric, "rows": rows_json, "figures": figures,
              "best_over_epochs": best}
    return "\n".join(lines), record


def write_report(name: str, plan: Plan, figures: dict[str, list[dict[str, Any]]], counts: "Counts") -> tuple[Path, dict[str, Any]]:
    """DIR/<name>.md and .json (under DIR/smoke/ for smoke runs)."""
    root = plan.root
    sections, records = [], []
    for tp in plan.tables:
        text, record = table_report(tp, plan, figures.get(tp.table.name, []))
        sections.append(text)
        records.append(record)
    meta = {"name": name, "smoke": plan.smoke, "seeds": plan.seeds, "checkpoint": plan.checkpoint,
            "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "out": str(root), "counts": counts.__dict__}
    which = ("the final weights (the averaged model when the recipe averages; the paper's protocol)"
             if plan.checkpoint == "last" else "the best-on-validation checkpoint")
    title = f"# gkl reproduce {name}" + (" — SMOKE TEST, toy scale" if plan.smoke else "")
    head = [title, "", f"{plan.seeds} seed(s) per run; numbers of {which}; made {meta['generated']}.", ""]
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.md"
    atomic_write_text(path, "\n".join(head + sections))
    record = meta | {"tables": records}
    atomic_write_text(root / f"{name}.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path, record


def make_figures(plan: Plan, device: Optional[str]) -> dict[str, list[dict[str, Any]]]:
    """The paper's figures for tables that have one, from the first seed's checkpoints, when finished."""
    from gklcli.analyze import AnalysisUnavailable, figure_for

    out: dict[str, list[dict[str, Any]]] = {}
    root = plan.root
    for tp in plan.tables:
        for i, fig in enumerate(tp.table.figures):
            ckpts = []
            for label in fig.rows:
                cell = next((c for c in tp.cells if c.column == fig.column and c.jobs and label in c.row.label), None)
                path = cell.jobs[0].dir / f"{plan.checkpoint}.pt" if cell else None
                ckpts.append(path if path is not None and path.is_file() else None)
            record = {"kind": fig.kind, "caption": fig.caption, "rows": fig.rows}
            if not ckpts or any(c is None for c in ckpts):
                out.setdefault(tp.table.name, []).append(record | {"reason": "its runs are not finished"})
                continue
            png = root / "figures" / f"{tp.table.name}-{i + 1}-{fig.kind}.png"
            try:
                figure_for(fig.kind, [str(c) for c in ckpts], png, data_dir=plan.data_dir, device=device)
            except AnalysisUnavailable as err:
                out.setdefault(tp.table.name, []).append(record | {"reason": str(err)})
                continue
            out.setdefault(tp.table.name, []).append(record | {"path": os.path.relpath(png, root)})
    return out
