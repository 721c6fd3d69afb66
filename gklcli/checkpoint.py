"""Atomic checkpoint files and RNG state capture.

A checkpoint is written to a temporary file in the same directory, flushed to disk and renamed
over the target, so a crash at any moment leaves either the old or the new file, never a torn one.
Files are read with ``weights_only=True``: they hold only tensors, numbers, strings, lists, dicts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def atomic_save_figure(fig: Any, path: str | Path, **savefig: Any) -> None:
    """A matplotlib figure to PNG through a temporary file of its own (two writers never share one)."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", **savefig)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file atomically: a temporary file beside it, then a rename (never half a file)."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically (results, resolved recipes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_file(path: str | Path) -> Any:
    """torch.load(weights_only=True), or the tensors of a .safetensors file, with one-line errors for missing,
    foreign or damaged files (every reader of weights goes through here, whatever torch's own formats are)."""
    path = Path(path)
    if not path.is_file():
        raise GKLError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except Exception as error:  # SafetensorError, OSError: a damaged or foreign file
            detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
            raise GKLError(f"{path}: not a readable safetensors file ({detail})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise GKLError(f"{path}: {_load_failure(str(error), type(error).__name__)}") from None


def _load_failure(message: str, kind: str) -> str:
    """One line for a refused torch.load, without torch's advice to retry with weights_only=False.

    That advice would run whatever code the file holds; a file naming a Python callable (os.system,
    a class's constructor) is refused as such, anything else as unreadable."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return (f"holds Python code objects ({found.group(1)}) that would run on loading; gkl loads tensors only "
                "and refuses it (re-save the weights alone: torch.save(model.state_dict(), path))")
    if "Weights only load failed" in message:
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", message, re.S)
        reason = detail.group(1).strip().splitlines()[0] if detail else "not a PyTorch file of tensors"
        return f"not a checkpoint gkl can read ({reason[:120]})"
    first = message.strip().splitlines()[0] if message.strip() else kind
    return f"cannot read checkpoint ({first[:200]})"


def remove_stale_temps(folder: str | Path, names: Iterable[str]) -> list[str]:
    """Delete the temporary files a killed writer left beside `names` (glob patterns) in `folder`.

    `_temp_file` names them `.NAME.<random>.tmp`; only the lock holder calls this, so no live writer
    of these names exists. Returns the removed file names."""
    removed = []
    for pattern in names:
        for path in sorted(Path(folder).glob(f".{pattern}.*.tmp")):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def read_json(path: str | Path, what: str = "") -> Any:
    """A JSON file gkl wrote (results, manifests), with one line for a missing or damaged one."""
    path = Path(path)
    label = f"{path}{f' ({what})' if what else ''}"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GKLError(f"{label}: not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise GKLError(f"{label}: unreadable ({str(error).splitlines()[0][:120]}); it was damaged or not written by gkl") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl: one JSON object a line; a damaged line is named by its number."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise GKLError(f"{path}: line {number} is not a JSON record; the file was damaged or not written by gkl")
            records.append(record)
    return records


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


LOCK_NAME = ".gkl.lock"


@contextlib.contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock that waits its turn (flock), for short set-up steps that parallel processes
    share (reproduce's smoke inputs): the first builds, the others then find the result. The kernel
    releases it when the holder dies, so it is never stale."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """An exclusive lock on an output folder for the life of a run.

    Two processes writing one folder would interleave `last.pt`, `best.pt` and `results.json` from
    different runs. The lock is a file holding the holder's pid and host, created atomically (a
    hard link of a complete temporary file, which fails if the lock exists). A lock left by a dead
    process of this host is taken over; one held by a live process, or by another host (whose
    processes cannot be checked), is refused with its holder named.
    """

    def __init__(self, folder: str | Path, name: str = LOCK_NAME):
        self.path = Path(folder) / name
        self.note: str | None = None  # set when a stale lock was taken over
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        fd, tmp = _temp_file(self.path)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    holder = _holder(self.path)
                    stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not pid_alive(holder["pid"])
                    if not stale:
                        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}" if holder else "an unreadable lock"
                        raise GKLError(f"{self.path.parent}: in use by {who} since {holder.get('started', '?')} "
                                       f"(lock {self.path}); wait for it, or delete the lock if that process is gone")
                    self.path.unlink(missing_ok=True)
                    self.note = f"took over the stale lock of pid {holder['pid']} (no longer running) in {self.path.parent}"
            raise GKLError(f"{self.path.parent}: another process took the lock at the same moment; try again")
        finally:
            os.unlink(tmp)

    def release(self) -> None:
        if self.held and _holder(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
