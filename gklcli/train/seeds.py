"""Several seeds of one recipe, and their mean ± standard deviation (the paper averages 3 trials)."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any, Optional

from gklcli.checkpoint import atomic_write_text
from gklcli.train import trainer


def summarise_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """mean, sample std (0 for one seed), min and max of every numeric last/best/test_best metric."""
    summary: dict[str, dict[str, float]] = {}
    for part in ("last", "best", "test_best"):
        keys = sorted({k for r in per_seed.values() for k, v in (r.get(part) or {}).items() if isinstance(v, float)})
        for key in keys:
            values = [r[part][key] for r in per_seed.values() if key in (r.get(part) or {})]
            summary[f"{part}.{key}"] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
    return summary


def run_seeds(recipe: Any, seeds: int, *, out_dir: str, data_dir: Optional[str], resume: bool, quiet: bool,
              device: Optional[str], console: Any) -> dict[str, Any]:
    """One run (seeds = 1, into `out_dir`) or `seeds` runs into `out_dir/seed<k>` plus seeds.json/.md."""
    run = trainer(recipe.kind)
    if seeds == 1:
        return run(recipe, out_dir=out_dir, data_dir=data_dir, resume=resume, quiet=quiet, device=device, console=console)
    per_seed: dict[int, dict[str, Any]] = {}
    for k in range(seeds):
        seeded = copy.deepcopy(recipe)
        seeded.train.seed = recipe.train.seed + k
        per_seed[seeded.train.seed] = run(seeded, out_dir=Path(out_dir) / f"seed{seeded.train.seed}", data_dir=data_dir,
                                          resume=resume, quiet=quiet, device=device, console=console)
    result = {"recipe": recipe.meta.name, "seeds": list(per_seed), "summary": summarise_seeds(per_seed), "runs": per_seed}
    atomic_write_text(Path(out_dir) / "seeds.json", json.dumps(result, indent=2) + "\n")
    lines = [f"# {recipe.meta.name}: {seeds} seeds ({', '.join(map(str, per_seed))})", "", "| metric | mean ± std | min | max |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['mean']:.2f} ± {v['std']:.2f} | {v['min']:.2f} | {v['max']:.2f} |" for k, v in result["summary"].items()]
    atomic_write_text(Path(out_dir) / "seeds.md", "\n".join(lines) + "\n")
    return result
