"""What a resume reads and what it refuses: last.pt's required keys and the recipe/world-size checks.

The engine restores the state; this module only decides, from the saved file and the current
recipe, whether that file may be resumed at all, so every refusal (a damaged or foreign file, a
changed recipe, a different number of processes mid-epoch) is one line and is written in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gklcli import checkpoint as ckpt
from gklcli.errors import GKLError
from gklcli.recipes import RESUME_SAFE, order_settings


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


TRAIN_STATE_KEYS = ("raw_model", "optimizer", "averager", "step", "rng", "epoch", "batch", "global_step", "meters", "best",
                    "finished", "world_size")


def read_training_checkpoint(path: Path) -> dict[str, Any]:
    """last.pt, checked to hold everything a resume reads, so a damaged or foreign file is one line."""
    saved = ckpt.load_file(path)
    if not isinstance(saved, dict) or saved.get("format") != ckpt.FORMAT:
        found = f"a {type(saved).__name__}" if not isinstance(saved, dict) else "a dict without gkl's format mark"
        raise GKLError(f"{path}: not a gkl training checkpoint ({found}); use a new --out, or --overwrite to start over")
    state = saved.get("train_state")
    missing = [k for k in ("recipe", "train_state") if not isinstance(saved.get(k), dict)]
    missing += [f"train_state.{k}" for k in TRAIN_STATE_KEYS if isinstance(state, dict) and k not in state]
    if missing:
        raise GKLError(f"{path}: a damaged gkl checkpoint (missing {', '.join(missing[:4])}); it cannot be resumed: "
                       "use a new --out, or --overwrite to start over")
    return saved


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring settings that are safe to change on resume."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    # with per-epoch test evaluations the best so far depends on the test images evaluated
    unsafe = {"eval.n_test"} if b.get("eval.test_every_epochs") else set()
    unsafe |= set(order_settings(current))
    return [k for k in keys if a.get(k) != b.get(k) and (k in unsafe or not k.startswith(RESUME_SAFE))]


def check_resumable(path: Path, saved: dict[str, Any], current: dict[str, Any], world_size: int) -> None:
    """Refuse to resume `saved` (read from `path`) under the recipe `current` with `world_size` processes
    when the recipe differs beyond RESUME_SAFE, or when the number of processes changes mid-epoch."""
    diffs = recipe_differences(saved["recipe"], current)
    if diffs:
        shown = ", ".join(f"{k} ({flatten(saved['recipe']).get(k)!r} → {flatten(current).get(k)!r})" for k in diffs[:3])
        raise GKLError(f"{path}: the recipe differs from the run being resumed: {shown}; use a new --out or --overwrite")
    ts = saved["train_state"]
    if ts["world_size"] != world_size and ts["batch"] != 0:
        raise GKLError(
            f"{path}: saved mid-epoch by {ts['world_size']} process(es); resume it with the same number "
            f"(now {world_size}), or from an epoch-end checkpoint"
        )
