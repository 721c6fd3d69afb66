"""Atomic checkpoint files and RNG state capture.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed
over the target, so a crash at any moment leaves either the old or the new file, never a torn one.
Files are read with ``weights_only=True``: they hold only tensors, numbers, strings, lists, dicts.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gklcli.errors import GKLError

FORMAT = "gkl-checkpoint"
FORMAT_VERSION = 1


def _temp_file(path: Path) -> tuple[int, str]:
    """A temporary file beside `path` with the permissions a plain open() would give (not 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to `path` via a temporary file + fsync + rename."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically (results, resolved recipes)."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def load_file(path: str | Path) -> Any:
    """torch.load(weights_only=True) with one-line errors for missing, foreign or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise GKLError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GKLError(f"{path}: cannot read checkpoint ({first[:200]})") from None


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": repr(random.getstate()),
    }
    # only when this process uses CUDA: get_rng_state_all() would otherwise create a context on every
    # visible GPU from a CPU run (e.g. each gloo rank under torchrun), failing on exclusive-process GPUs
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_parse_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _parse_python_state(text: str) -> tuple:
    """`random.getstate()` round-trips through repr as nested tuples of ints (and a None/float)."""
    import ast

    return ast.literal_eval(text)
