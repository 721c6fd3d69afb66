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
from gklcli.checkpoint import LOCK_NAME, RunLock
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


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def _recipe_file(tmp_path, text: str | bytes):
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("body", "sets", "message"),
    [
        # a billion laughs (10⁹ values) under a known key, and through --set
        ("extends: quickstart.yaml\nmeta:\n  description:\n" + "".join("    " + line + "\n" for line in BOMB.splitlines()), [],
         "expands to more than 100,000 values"),
        ("extends: quickstart.yaml\n", ["loss.gamma=" + BOMB.replace("\n", ", ").join("{}")], "expands to more than 100,000 values"),
        ("extends: quickstart.yaml\nmeta:\n  description: " + "[" * 600 + "]" * 600 + "\n", [], "nested"),
        (b"extends: quickstart.yaml\nmeta:\n  description: caf\xe9\n", [], "not UTF-8 text"),
        ("extends: quickstart.yaml\n", ["optim.lr=nan"], "optim.lr: must be a finite number"),
        ("extends: quickstart.yaml\n", ["loss.gamma=.inf"], "loss.gamma: must be a finite number"),
        ("extends: quickstart.yaml\n", ["train.seed=99999999999999999999"], "train.seed: must fit in 64 bits"),
        ("extends: quickstart.yaml\n", ["meta.foo.bar=1"], "--set meta.foo.bar=1: meta.foo: unknown key"),
    ],
)
def test_hostile_recipes_are_refused_in_one_line_quickly(tmp_path, capsys, body, sets, message):
    from gklcli.recipes import RECIPES_DIR

    path = _recipe_file(tmp_path, body.replace(b"quickstart.yaml", str(RECIPES_DIR / "quickstart.yaml").encode())
                        if isinstance(body, bytes) else body.replace("quickstart.yaml", str(RECIPES_DIR / "quickstart.yaml")))
    start = time.perf_counter()
    code, _, err = run_cli(capsys, "show-recipe", path, *sum((["--set", s] for s in sets), []))
    assert time.perf_counter() - start < 1.0
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from gklcli.recipes import RECIPES_DIR, load_recipe
    from gklcli.train.at import train_at

    out = tmp_path_factory.mktemp("tiny")
    train_at(load_recipe(RECIPES_DIR / "quickstart.yaml", [*TINY_OVERRIDES, "schedule.epochs=1", "eval.final_test=false"]),
             out_dir=out, quiet=True, device="cpu")
    return out / "last.pt"


def _npz(tmp_path, name, images, labels):
    import numpy as np

    path = tmp_path / name
    np.savez(path, image=images, label=labels)
    return path


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys, tiny_checkpoint):
    import numpy as np

    img = np.zeros((8, 8, 8, 3), dtype=np.uint8)
    ev = ["eval-aa", tiny_checkpoint, "--version", "custom", "--attacks", "apgd-ce", "--n-ex", "8", "--device", "cpu", "--no-guards"]
    manifest_dir = tmp_path / "corrupt"
    manifest_dir.mkdir()
    (manifest_dir / "manifest.json").write_text("{not json")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    npz_train = ["train-at", "quickstart", "--device", "cpu", "--out", tmp_path / "o", *_sets(), "--set", "data.dataset=npz"]
    cases = [
        ([*ev, "--eps", "nan"], "--eps nan: must be in (0, 1]"),
        ([*ev, "--eps", "300/255"], "--eps 300/255: must be in (0, 1]"),
        ([*ev, "--out", manifest_dir, "--resume"], "manifest.json: unreadable"),
        ([*ev, "--out", locked], f"in use by pid {os.getpid()}"),
        ([*npz_train, "--set", f"data.path={_npz(tmp_path, 'empty.npz', img[:0], np.zeros(0, np.int64))}"], "holds 0 images"),
        ([*npz_train, "--set", f"data.path={_npz(tmp_path, 'float.npz', img, np.arange(8) + 0.5)}"], "`label` must hold integers, got dtype float64"),
        ([*npz_train, "--set", f"data.path={_npz(tmp_path, 'str.npz', img, np.array(list('abcdefgh')))}"], "`label` must hold integers"),
        ([*npz_train, "--set", f"data.path={_npz(tmp_path, 'obj.npz', img, np.array([1, 'a'] * 4, dtype=object))}"], "`label` cannot be read"),
        (["train-at", "quickstart", "--dry-run", "--set", "data.val_size=5000"], "data.val_size: 5000 leaves no training images"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, (args, err)
    assert (locked / LOCK_NAME).exists()  # a refused process leaves the holder's lock alone
    code, _, err = run_cli(capsys, *ev, "--eps", "20/255", "--out", tmp_path / "wide", "-q")
    assert code == 0 and "above 16/255" in err
