"""Nothing lost: one run per output folder (a lock), no run folder overwritten silently, and a
refused start that writes nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from gklcli.errors import GKLError
from gklcli.train.checkpoint import LOCK_NAME, RunLock
from tests_helpers import TINY_OVERRIDES, run_cli


def _sets(*extra: str) -> list[str]:
    return sum((["--set", s] for s in [*TINY_OVERRIDES, "schedule.epochs=1", *extra]), [])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    held = RunLock(tmp_path).acquire()
    with pytest.raises(GKLError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    held.release()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x"}))
    lock = RunLock(tmp_path).acquire()
    assert lock.note and "stale lock" in lock.note
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    # another host's processes cannot be checked: refused
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(GKLError, match="in use by pid 1 on elsewhere.example"):
        RunLock(tmp_path).acquire()


def test_a_second_process_on_the_same_folder_is_refused_and_the_first_finishes_whole(tmp_path, capsys):
    out = tmp_path / "run"
    sets = _sets("schedule.epochs=3", "data.synthetic.num_train=400")
    cmd = [sys.executable, "-m", "gklcli", "train-at", "quickstart", "--out", str(out), "-q", "--device", "cpu", *sets]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (out / LOCK_NAME).exists(), first.communicate()
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--out", out, "--overwrite", "--device", "cpu", *_sets("loss.gamma=0.9"))
    assert code == 2 and f"in use by pid {first.pid}" in err and "Traceback" not in err
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err
    assert not (out / LOCK_NAME).exists()
    assert "gamma: 0.4" in (out / "recipe.yaml").read_text()  # the first run's recipe, untouched by the second
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 3 and results["best"]["epoch"] == results["selection"]["epoch"]


def test_a_folder_with_run_files_but_no_last_pt_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name, text in (("best.pt", "x"), ("results.json", "{}"), ("metrics.csv", "epoch\n1\n")):
        (out / name).write_text(text)
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--out", out, "--device", "cpu", *_sets())
    assert code == 2 and "holds run files (best.pt, metrics.csv, results.json)" in err and "--overwrite" in err
    assert (out / "metrics.csv").read_text() == "epoch\n1\n" and not (out / "recipe.yaml").exists()
    # last.pt as a directory: --resume must not start over
    (out / "last.pt").mkdir()
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--out", out, "--resume", "--device", "cpu", *_sets())
    assert code == 2 and "last.pt: is not a file" in err
    assert (out / "metrics.csv").read_text() == "epoch\n1\n"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.csv", "results.json"]


def test_a_refused_resume_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    sets = _sets("output.tensorboard=true", "train.save_every_steps=2")
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--out", out, "-q", "--device", "cpu", *sets)
    assert code == 0, err
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    recipe = (out / "recipe.yaml").read_text()
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--out", out, "--resume", "--device", "cpu", *sets, "--set", "loss.gamma=0.9")
    assert code == 2 and "the recipe differs" in err
    assert (out / "recipe.yaml").read_text() == recipe
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before  # no new events file, no lock
