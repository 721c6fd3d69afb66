"""--launcher local: runs and evaluations as real submitit subprocesses on this machine, a preempted
job that requeues and resumes to the same weights, a rerun that submits nothing, and --status."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from gklcli.checkpoint import LOCK_NAME
from gklcli.launch import parse_minutes
from tests_helpers import TINY_OVERRIDES, run_cli

pytest.importorskip("submitit")


def _sets(*extra: str) -> list[str]:
    return sum((["--set", s] for s in [*TINY_OVERRIDES, *extra]), [])


def test_time_limits_read_as_slurm_writes_them():
    assert parse_minutes("90") == 90 and parse_minutes("12:00:00") == 720 and parse_minutes("2-00") == 2880
    assert parse_minutes("1:30:00") == 90 and parse_minutes(None) == 72 * 60


def test_bad_launcher_input_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--launcher", "slurm", "--out", tmp_path / "r")
    assert code == 2 and "sbatch and srun not on this machine's PATH" in err
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--launcher", "pbs", "--out", tmp_path / "r")
    assert code == 2 and "--launcher 'pbs': use none, local, slurm" in err
    code, _, err = run_cli(capsys, "reproduce", "table3", "--launcher", "local", "--slurm-arg", "novalue", "--dry-run")
    assert code == 2 and "--slurm-arg 'novalue': expected key=value" in err
    code, _, err = run_cli(capsys, "reproduce", "table3", "--launcher", "local", "--time", "soon", "--dry-run")
    assert code == 2 and "--time 'soon'" in err


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", weights_only=True)["train_state"]["raw_model"]


def test_a_preempted_local_job_requeues_and_resumes_to_the_same_weights(tmp_path, capsys):
    sets = _sets("schedule.epochs=4", "data.synthetic.num_train=800", "train.save_every_steps=0")
    reference = tmp_path / "reference"
    assert run_cli(capsys, "train-at", "quickstart", "--out", reference, "-q", "--device", "cpu", *sets)[0] == 0
    out = tmp_path / "launched"
    args = ["train-at", "quickstart", "--out", out, "-q", "--launcher", "local", *sets]
    import subprocess
    import sys

    launcher = subprocess.Popen([sys.executable, "-m", "gklcli", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").is_file() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the first epoch has ended: the job is mid-run
    holder = json.loads((out / LOCK_NAME).read_text())["pid"]
    os.kill(holder, signal.SIGUSR2)  # Slurm's pre-timeout signal, as submitit asks for it
    stdout, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stdout + stderr
    logs = "".join(p.read_text() for p in (out / "jobs").glob("*_log.*"))
    assert "SIGUSR2" in logs and ("preempted" in logs or "timed-out" in logs)  # submitit requeued it
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 4
    for name, tensor in _final_weights(reference).items():  # bit-identical to the run that was never stopped
        assert torch.equal(tensor, _final_weights(out)[name]), name
    book = json.loads((out / "jobs.json").read_text())
    assert book["train"]["launcher"] == "local"


def test_a_smoke_table_runs_through_local_jobs_then_a_rerun_submits_nothing(tmp_path, capsys):
    args = ["reproduce", "table3", "--rows", "5,6", "--smoke", "--out", tmp_path, "-q", "--launcher", "local", "--max-parallel", "2"]
    code, text, err = run_cli(capsys, *args)
    assert code == 0, text + err
    text = " ".join(text.split())
    book = json.loads((tmp_path / "smoke" / "jobs.json").read_text())
    trains = [k for k, v in book.items() if v["kind"] == "train"]
    evals = [k for k, v in book.items() if v["kind"] == "eval"]
    assert len(trains) == 2 and sorted(evals) == sorted(f"{k}-aa" for k in trains)  # two runs at once, each with its evaluation
    assert "4 job(s) submitted, 0 already done" in text and "0 run(s) trained, 2 reused; 0 evaluation(s) run" in text
    report = json.loads((tmp_path / "smoke" / "table3.json").read_text())
    assert report["tables"][0]["table"] == "table3"
    code, text, _ = run_cli(capsys, *args)
    assert code == 0 and "0 job(s) submitted, 2 already done, queued or running" in " ".join(text.split())
    code, text, _ = run_cli(capsys, "reproduce", "table3", "--rows", "5,6", "--smoke", "--out", tmp_path, "--status")
    states = [line for line in text.splitlines() if any(k in line for k in trains)]
    assert code == 0 and states and all("done" in line for line in states)


def test_eval_aa_shards_as_local_jobs_equal_one_evaluation(tmp_path, capsys):
    ckpt_dir = tmp_path / "run"
    assert run_cli(capsys, "train-at", "quickstart", "--out", ckpt_dir, "-q", "--device", "cpu", *_sets("schedule.epochs=1"))[0] == 0
    ev = ["eval-aa", ckpt_dir / "last.pt", "--version", "custom", "--attacks", "apgd-ce", "--n-ex", "32", "--no-guards", "-q"]
    assert run_cli(capsys, *ev, "--out", tmp_path / "one", "--device", "cpu")[0] == 0
    code, text, err = run_cli(capsys, *ev, "--out", tmp_path / "jobs", "--launcher", "local", "--aa-shards", "2")
    assert code == 0, text + err
    one, jobs = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "jobs"))
    assert jobs["robust_acc"] == one["robust_acc"] and jobs["clean_acc"] == one["clean_acc"] and jobs["n_ex"] == 32
    flags = [torch.load(tmp_path / d / "flags.pt", weights_only=True)["robust"] for d in ("one", "jobs")]
    assert torch.equal(*flags)  # two shard jobs and a merge job: the same per-image flags
    book = json.loads((tmp_path / "jobs" / "jobs.json").read_text())
    assert len(book["eval"]["shards"]) == 2 and book["eval-merge"]["kind"] == "merge"


def test_sbatch_refusing_a_job_is_one_line(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--out", tmp_path / "r", "--launcher", "slurm", "--partition", "nope")
    assert code == 2 and "not submitted: sbatch: error: invalid partition specified: nope" in err and "Traceback" not in err
    assert "job files in" in err
