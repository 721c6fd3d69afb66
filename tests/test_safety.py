"""Nothing lost: one run per output folder (a lock), no run folder overwritten silently, and a
refused start that writes nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gklcli.errors import GKLError
from gklcli.checkpoint import LOCK_NAME, RunLock, load_file, sha256_file
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
    assert results["best_sha256"] == sha256_file(out / "best.pt")  # the numbers belong to the best.pt on disk
    assert load_file(out / "best.pt")["epoch"] == results["best"]["epoch"]


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
def tiny_run(tmp_path_factory):
    """A finished tiny run (with its test evaluation) that tests copy before changing."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    code = subprocess.run([sys.executable, "-m", "gklcli", "train-at", "quickstart", "--out", str(out), "-q", "--device", "cpu",
                           *_sets()], capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    return out


@pytest.fixture()
def run_copy(tmp_path, tiny_run):
    import shutil

    return lambda name: Path(shutil.copytree(tiny_run, tmp_path / name))


def _npz(tmp_path, name, images, labels):
    import numpy as np

    path = tmp_path / name
    np.savez(path, image=images, label=labels)
    return path


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _checkpoint_variants(tmp_path, last: Path) -> dict[str, Path]:
    """Damaged, foreign and hostile checkpoint files made from a real one."""
    import torch

    saved = torch.load(last, weights_only=True)
    files = {"bare": torch.zeros(3), "keyless": {k: v for k, v in saved.items() if k not in ("recipe", "arch")},
             "no_state": {k: v for k, v in saved.items() if k != "train_state"}, "evil": {"model": _Evil()}}
    paths = {}
    for name, obj in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(obj, paths[name])
    paths["garbage"] = tmp_path / "garbage.pt"
    paths["garbage"].write_bytes(b"not a checkpoint at all")
    return paths


def _run_folder(tmp_path, name: str, last: Path) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "last.pt").write_bytes(last.read_bytes())
    return folder


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys, tiny_run):
    """Every input here once ended in a traceback, was accepted silently, or is its sibling: each is
    refused in one line with exit 2, naming what is wrong. Add to this list."""
    import numpy as np

    from gklcli.recipes import RECIPES_DIR

    ckpt = tiny_run / "last.pt"
    bad = _checkpoint_variants(tmp_path, ckpt)
    img = np.zeros((8, 8, 8, 3), dtype=np.uint8)
    ev = ["eval-aa", ckpt, "--version", "custom", "--attacks", "apgd-ce", "--n-ex", "8", "--device", "cpu", "--no-guards"]
    ev_file = ev[2:]
    folders = {}
    for name, text in (("corrupt", "{not json"), ("listed", "[1, 2]"), ("partial", '{"n_ex": 8}')):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "manifest.json").write_text(text)
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    damaged_chunk = tmp_path / "chunked"
    code, _, err = run_cli(capsys, *ev, "--n-ex", "16", "--chunk-size", "8", "--out", damaged_chunk, "-q")
    assert code == 0, err
    import torch

    torch.save({"start": 0}, next((damaged_chunk / "chunks").glob("chunk_*.pt")))
    jsonl = _run_folder(tmp_path, "jsonl", ckpt)
    (jsonl / "metrics.jsonl").write_text('{"epoch": 1}\ngarbage{\n')
    saved = torch.load(ckpt, weights_only=True)
    saved["train_state"]["finished"] = False
    torch.save(saved, jsonl / "last.pt")
    results_file = tmp_path / "results.json"
    results_file.write_text('{"n_ex": 8}')
    broken_results = tmp_path / "broken.json"
    broken_results.write_text("{bad")
    recipe_list, recipe_syntax = tmp_path / "list.yaml", tmp_path / "syntax.yaml"
    recipe_list.write_text("- a\n- b\n")
    recipe_syntax.write_text("kind: at\nmodel: {arch: [\n")
    newline_name = tmp_path / "named.yaml"
    newline_name.write_text(f'extends: {RECIPES_DIR / "quickstart.yaml"}\nmeta:\n  name: "run\\n"\n')
    train = ["train-at", "quickstart", "--device", "cpu", *_sets()]
    npz_train = [*train, "--out", tmp_path / "o", "--set", "data.dataset=npz"]
    export = ["export-robustbench", ckpt, "--dataset", "cifar10", "--out", tmp_path / "export"]
    cases = [
        # eval-aa options
        ([*ev, "--eps", "nan"], "--eps 'nan': must be a number in (0, 1]"),
        ([*ev, "--eps", "300/255"], "--eps '300/255': must be a number in (0, 1]"),
        ([*ev, "--eps", "-1/255"], "--eps '-1/255': must be a number in (0, 1]"),
        ([*ev, "--eps", "abc"], "--eps 'abc': must be a number"),
        ([*ev, "--eps-list", "2/255,1/0"], "--eps-list '1/0': must be a number"),
        (["eval-aa", ckpt, "--version", "custom", "--attacks", "nonsense", "--device", "cpu"], "unknown attack 'nonsense'"),
        (["eval-aa", ckpt, "--version", "custom", "--device", "cpu"], "custom needs --attacks"),
        (["eval-aa", ckpt, "--version", "bogus", "--device", "cpu"], "--version bogus: use standard, plus, rand or custom"),
        (["eval-aa", ckpt, "--norm", "L7", "--device", "cpu"], "--norm L7: use Linf or L2"),
        ([*ev, "--shard", "3/2", "--chunk-size", "4"], "--shard 3/2: expected i/n"),
        ([*ev, "--shard", "0/2"], "--shard needs --chunk-size"),
        ([*ev, "--pgd", "10,x"], "--pgd '10,x': expected a comma-separated list"),
        ([*ev, "--device", "tpu"], "--device 'tpu': use cpu, cuda or cuda:N"),
        ([*ev, "--device", "cuda:7"], "--device cuda:7"),
        ([*ev, "--out", locked], f"in use by pid {os.getpid()}"),
        ([*ev, "--out", folders["corrupt"], "--resume"], "manifest.json: unreadable"),
        ([*ev, "--out", folders["listed"], "--resume"], "manifest.json: unreadable as a gkl manifest"),
        ([*ev, "--out", folders["partial"], "--resume"], "manifest.json: unreadable as a gkl manifest (missing model_sha256"),
        ([*ev, "--n-ex", "16", "--chunk-size", "8", "--out", damaged_chunk, "--resume"], "not a gkl eval-aa chunk"),
        (["eval-aa", "--merge", tiny_run, "--out", tmp_path / "merged"], "no manifest.json (not a gkl eval-aa directory)"),
        # eval-aa files: checkpoints and data
        (["eval-aa", tmp_path / "missing.pt", *ev_file], "missing.pt: checkpoint not found"),
        (["eval-aa", bad["bare"], *ev_file], "bare.pt: expected a state dict, found Tensor"),
        (["eval-aa", bad["keyless"], *ev_file], "keyless.pt: a damaged gkl checkpoint (missing or bad arch)"),
        (["eval-aa", bad["evil"], *ev_file], "evil.pt: holds Python code objects"),
        (["eval-aa", bad["garbage"], *ev_file], "garbage.pt: not a checkpoint gkl can read"),
        ([*ev, "--dataset", f"npz:{_npz(tmp_path, 'big.npz', np.zeros((8, 32, 32, 3), np.uint8), np.zeros(8, np.int64))}"],
         "its images are 32×32, but the model was trained on 8×8"),
        ([*ev, "--dataset", f"npz:{_npz(tmp_path, 'empty_test.npz', img[:0], np.zeros(0, np.int64))}"], "holds 0 images"),
        ([*ev, "--dataset", f"npz:{tmp_path / 'nowhere.npz'}"], "nowhere.npz: npz file not found"),
        ([*ev, "--dataset", f"npz:{_npz(tmp_path, 'labels.npz', img, np.full(8, 9))}"], "labels.npz: labels must lie in [0, 3], found [9, 9]"),
        ([*ev, "--dataset", "imagenet-21k"], "--dataset imagenet-21k: use cifar10, cifar100"),
        # training: recipes, options and run folders
        ([*npz_train, "--set", f"data.path={_npz(tmp_path, 'empty.npz', img[:0], np.zeros(0, np.int64))}"], "holds 0 images"),
        ([*npz_train, "--set", f"data.path={_npz(tmp_path, 'float.npz', img, np.arange(8) + 0.5)}"], "`label` must hold integers, got dtype float64"),
        ([*npz_train, "--set", f"data.path={_npz(tmp_path, 'str.npz', img, np.array(list('abcdefgh')))}"], "`label` must hold integers"),
        ([*npz_train, "--set", f"data.path={_npz(tmp_path, 'obj.npz', img, np.array([1, 'a'] * 4, dtype=object))}"], "`label` cannot be read"),
        (["train-at", "quickstart", "--dry-run", "--set", "data.val_size=5000"], "data.val_size: 5000 leaves no training images"),
        ([*train, "--out", _run_folder(tmp_path, "bare_run", bad["bare"]), "--resume"], "not a gkl training checkpoint (a Tensor)"),
        ([*train, "--out", _run_folder(tmp_path, "bare_new", bad["bare"])], "not a gkl training checkpoint (a Tensor)"),
        ([*train, "--out", _run_folder(tmp_path, "keyless_run", bad["keyless"]), "--resume"], "a damaged gkl checkpoint (missing recipe)"),
        ([*train, "--out", _run_folder(tmp_path, "stateless_run", bad["no_state"]), "--resume"], "missing train_state"),
        ([*train, "--out", _run_folder(tmp_path, "evil_run", bad["evil"]), "--resume"], "holds Python code objects"),
        ([*train, "--out", jsonl, "--resume"], "metrics.jsonl: line 2 is not a JSON record"),
        ([*train, "--out", tmp_path / "d", "--device", "cuda:0"], "--device cuda:0"),
        (["train-at", "quickstart", "--dry-run", "--set", "train.seed=99999999999999999999"], "train.seed: must fit in 64 bits"),
        (["train-at", "quickstart", "--dry-run", "--set", "optim.lr=nan"], "optim.lr: must be a finite number"),
        (["train-at", "quickstart", "--dry-run", "--set", "meta.name=../../etc"], "meta.name: '../../etc' must be a letter or digit"),
        (["train-at", newline_name, "--dry-run"], r"meta.name: 'run\n' must be"),
        (["train-at", "quickstart", "--dry-run", "--set", "loss.gamma"], "--set loss.gamma: expected KEY=VALUE"),
        (["train-at", "quickstart", "--dry-run", "--set", "nokey=1"], "nokey: unknown key"),
        (["train-at", "quickstart", "--dry-run", "--set", "data.batch_size=-3"], "data.batch_size: must be >= 1, got -3"),
        (["train-at", "no-such-recipe"], "recipe not found: no-such-recipe"),
        (["train-at", recipe_list, "--dry-run"], "a recipe must be a YAML mapping, got list"),
        (["train-at", recipe_syntax, "--dry-run"], "invalid YAML"),
        (["distill", "quickstart", "--dry-run"], "`gkl distill` needs a recipe with kind: kd"),
        # export-robustbench
        ([*export, "--name", "A" * 301], "(301 characters): must be a letter"),
        ([*export, "--name", "Foo\n"], "--name 'Foo\\n': must be a letter"),
        ([*export, "--name", "../Foo"], "--name '../Foo': must be a letter"),
        ([*export, "--name", "Foo", "--results", results_file], "not a gkl eval-aa results.json (missing dataset"),
        ([*export, "--name", "Foo", "--results", broken_results], "broken.json (--results): unreadable"),
        ([*export, "--name", "Foo", "--results", tmp_path / "none.json"], "none.json (--results): not found"),
        (["export-robustbench", ckpt, "--name", "Foo", "--dataset", "imagenet"], "--dataset imagenet: use cifar10 or cifar100"),
        # reproduce
        (["reproduce", "table99", "--dry-run"], "unknown table 'table99'"),
        (["reproduce", "table1", "--shard", "5/2", "--dry-run"], "--shard 5/2: expected i/n"),
        (["reproduce", "table1", "--rows", "999", "--dry-run"], "'999' matches no row of table1"),
        (["reproduce", "table1", "--checkpoint", "foo", "--dry-run"], "--checkpoint foo: use last"),
    ]
    assert len(cases) >= 40
    failed = []
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        if not (code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2):
            failed.append(f"{' '.join(map(str, args[:3]))} …: exit {code}, expected {message!r}, got {err.strip()[-300:]!r}")
    assert not failed, "\n".join(failed)
    assert (locked / LOCK_NAME).exists()  # a refused process leaves the holder's lock alone
    assert not (tmp_path / "export").exists()  # a refused name writes nothing
    code, _, err = run_cli(capsys, *ev, "--eps", "20/255", "--out", tmp_path / "wide", "-q")
    assert code == 0 and "above 16/255" in err


def test_a_hostile_pickle_is_refused_as_code_not_with_torch_advice(tmp_path):
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(GKLError) as error:
        load_file(path)
    assert "holds Python code objects (posix.system)" in str(error.value) or "(nt.system)" in str(error.value)
    assert "weights_only" not in str(error.value) and "Re-running" not in str(error.value)


def test_a_finished_run_rebuilds_a_missing_or_damaged_results_json(run_copy, capsys):
    for damage in ("missing", "corrupt"):
        out = run_copy(damage)
        original = json.loads((out / "results.json").read_text())
        if damage == "missing":
            (out / "results.json").unlink()
        else:
            (out / "results.json").write_text('{"epochs": ')
        code, text, err = run_cli(capsys, "train-at", "quickstart", "--out", out, "--resume", "-q", "--device", "cpu", *_sets())
        text = text.replace("\n", "")  # rich wraps long lines
        assert code == 0 and f"results.json: {'not found' if damage == 'missing' else 'unreadable'}" in text, err
        assert "rebuilding it from last.pt and best.pt" in text
        rebuilt = json.loads((out / "results.json").read_text())
        original["out_dir"] = rebuilt["out_dir"] = ""  # the copy lives elsewhere
        assert rebuilt == original  # the same numbers: the saved weights, evaluated with the run's seeds


def test_temporary_files_of_a_killed_run_are_removed_at_its_next_start(run_copy, capsys, tmp_path):
    import torch

    out = run_copy("killed")
    saved = torch.load(out / "last.pt", weights_only=True)
    saved["train_state"]["finished"] = False  # as if killed before the end
    torch.save(saved, out / "last.pt")
    stale = [".last.pt.k2j3.tmp", ".best.pt.x9.tmp", ".recipe.yaml.a1.tmp", ".results.json.q.tmp"]
    for name in stale:
        (out / name).write_bytes(b"half")
    (out / "notes.tmp").write_text("mine")  # not gkl's: kept
    code, text, err = run_cli(capsys, "train-at", "quickstart", "--out", out, "--resume", "-q", "--device", "cpu", *_sets())
    text = text.replace("\n", "")  # rich wraps long lines
    assert code == 0 and "removed 4 temporary file(s) a killed run left" in text, err
    assert not any((out / name).exists() for name in stale) and (out / "notes.tmp").exists()
    # eval-aa: the chunk and result temporaries of an unsharded evaluation
    ev = tmp_path / "ev"
    args = ["eval-aa", out / "last.pt", "--version", "custom", "--attacks", "apgd-ce", "--n-ex", "8", "--device", "cpu",
            "--no-guards", "--out", ev, "-q"]
    assert run_cli(capsys, *args)[0] == 0
    (ev / ".results.json.zz.tmp").write_text("{")
    (ev / "chunks" / ".chunk_0000000_0000008.pt.y.tmp").write_bytes(b"half")
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0 and "removed 2 temporary file(s)" in err, err
    assert not list(ev.rglob("*.tmp"))


def test_eval_aa_reports_each_attack_as_it_ends(run_copy, capsys, tmp_path):
    out = run_copy("progress")
    code, _, err = run_cli(capsys, "eval-aa", out / "last.pt", "--version", "custom", "--attacks", "apgd-ce,apgd-t",
                           "--n-ex", "16", "--chunk-size", "8", "--device", "cpu", "--no-guards", "--out", tmp_path / "ev", "-q")
    assert code == 0, err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    import re

    done = re.findall(r"AutoAttack images (\d+)–(\d+): (apgd-ce|apgd-t) done: (\d+)/8 robust, [\d.]+ s", err)
    assert {(a, b, name) for a, b, name, _ in done} <= {(a, b, n) for a, b in (("0", "8"), ("8", "16")) for n in ("apgd-ce", "apgd-t")}
    assert ("0", "8", "apgd-ce") in {(a, b, name) for a, b, name, _ in done}
    assert "AutoAttack 16/16 images | images 8–16 done" in err
    # what the lines say adds up to the results: robust after the last attack, summed over chunks
    last = {}
    for a, _, _, robust in done:
        last[a] = int(robust)
    assert sum(last.values()) == round(results["robust_acc"] * 16 / 100)
