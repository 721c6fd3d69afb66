"""`gkl train-at` end to end on synthetic data: outputs, checkpoints, resume bit-exactness,
refusals, errors, and every bundled AT recipe running a few steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gklcli.errors import GKLError
from gklcli.models import create_model
from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.at import AdversarialStep, train_at
from gklcli.train.engine import Interrupted
from tests_helpers import TINY_OVERRIDES, run_cli

TINY = TINY_OVERRIDES


def tiny(*extra: str, recipe: str = "quickstart"):
    return load_recipe(RECIPES_DIR / f"{recipe}.yaml", [*TINY, "schedule.epochs=3", "awp.warmup_epochs=2", "ema.start_epoch=1", *extra])


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_cli_trains_and_writes_every_output(tmp_path, capsys, device):
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in [*TINY, "schedule.epochs=2", "output.tensorboard=true"]), [])
    args = ["train-at", "quickstart", "--out", str(out), "-q", "--device", str(device), *sets]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 0, stderr
    for name in ("recipe.yaml", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt", "curves.png", "results.json", "summary.md"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("lr", "eps", "attack_steps", "train_loss", "train_ce", "train_wmse", "train_sce", "val_clean", "val_pgd", "img_s", "seconds"):
        assert key in records[0], key
    assert records[1]["eps"] == pytest.approx(32 / 255) and records[0]["eps"] == pytest.approx(16 / 255)  # quickstart's ε
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,lr,eps")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # the test extra installs tensorboard
    results = json.loads((out / "results.json").read_text())
    assert {"val_clean", "val_pgd", "test_clean", "test_pgd"} <= set(results["last"])
    assert results["best"]["epoch"] in (1, 2) and results["selection"]["metric"] == "val_pgd"
    assert "| last |" in (out / "summary.md").read_text()
    assert "results:" in stdout

    # a second run into the same directory is refused; --resume on a finished run does nothing
    code, _, stderr = run_cli(capsys, *args)
    assert code == 2 and "finished run" in stderr and "--overwrite" in stderr and "Traceback" not in stderr
    code, stdout, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and "already finished" in stdout
    code, _, _ = run_cli(capsys, *args, "--overwrite", "--set", "schedule.epochs=1")
    assert code == 0 and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_checkpoint_records_what_eval_and_export_need(tmp_path, device):
    recipe = tiny("schedule.epochs=2")
    train_at(recipe, out_dir=tmp_path, quiet=True, device=str(device))
    for name in ("last.pt", "best.pt"):
        ckpt = weights(tmp_path / name)
        assert ckpt["format"] == "gkl-checkpoint" and ckpt["arch"] == "resnet8" and ckpt["num_classes"] == 4
        assert ckpt["dataset"] == "synthetic" and ckpt["image_size"] == 8 and ckpt["weights"] == "averaged"
        assert ckpt["input_norm"]["mean"] == pytest.approx([0.5071, 0.4867, 0.4408])
        model = create_model(ckpt["arch"], ckpt["num_classes"])
        model.load_state_dict(ckpt["model"], strict=True)
    last = weights(tmp_path / "last.pt")
    assert last["train_state"]["finished"] and last["train_state"]["epoch"] == 3
    # the deployable weights are the epoch average (τ = 0.5 in quickstart), not the raw weights
    raw = last["train_state"]["raw_model"]
    assert not torch.equal(raw["fc.weight"], last["model"]["fc.weight"])


def _train_state(path):
    state = weights(path)
    return state["model"], state["train_state"]


# mid-epoch 1; mid-epoch 2 (AWP on); right after epoch 2's last step, before its epoch-end work (6 steps/epoch)
@pytest.mark.parametrize("interrupt_after", [3, 7, 12])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, interrupt_after):
    recipe = tiny("data.augment=autoaug", "train.save_every_steps=5")
    cpu = {"quiet": True, "device": "cpu"}  # bit-identical resume is the CPU guarantee (GPU kernels need not be deterministic)
    train_at(recipe, out_dir=tmp_path / "a", **cpu)
    with pytest.raises(Interrupted, match="continue with --resume"):
        train_at(recipe, out_dir=tmp_path / "b", interrupt_after_steps=interrupt_after, **cpu)
    partial = weights(tmp_path / "b" / "last.pt")["train_state"]
    assert not partial["finished"] and partial["global_step"] == interrupt_after
    train_at(recipe, out_dir=tmp_path / "b", resume=True, **cpu)
    model_a, state_a = _train_state(tmp_path / "a" / "last.pt")
    model_b, state_b = _train_state(tmp_path / "b" / "last.pt")
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for key in state_a["raw_model"]:
        assert torch.equal(state_a["raw_model"][key], state_b["raw_model"][key]), key
    for key, value in state_a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], state_b["optimizer"]["state"][key]["momentum_buffer"])
    assert torch.equal(state_a["step"]["prior"]["prior"], state_b["step"]["prior"]["prior"])
    strip = lambda rec: {k: v for k, v in rec.items() if k not in ("img_s", "seconds", "s_iter")}  # noqa: E731
    metrics = [[strip(json.loads(x)) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert metrics[0] == metrics[1]


def test_resume_refuses_a_changed_recipe(tmp_path):
    with pytest.raises(Interrupted):
        train_at(tiny(), out_dir=tmp_path, quiet=True, interrupt_after_steps=2, device="cpu")
    with pytest.raises(GKLError, match=r"recipe differs.*loss.gamma \(0.4 → 0.3\)"):
        train_at(tiny("loss.gamma=0.3"), out_dir=tmp_path, quiet=True, resume=True, device="cpu")
    with pytest.raises(GKLError, match="unfinished run .*--resume"):
        train_at(tiny(), out_dir=tmp_path, quiet=True, device="cpu")


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    recipe = tiny()
    original = AdversarialStep.compute
    calls = {"n": 0}

    def poisoned(self, batch, epoch):
        result = original(self, batch, epoch)
        calls["n"] += 1
        if calls["n"] == 9:  # 6 steps per epoch: epoch 2, step 3
            result.loss = result.loss * math.nan
        return result

    monkeypatch.setattr(AdversarialStep, "compute", poisoned)
    with pytest.raises(GKLError, match=r"non-finite loss \(nan\) at epoch 2, step 3 \(global step 9\).*last good checkpoint"):
        train_at(recipe, out_dir=tmp_path, quiet=True, device="cpu")
    saved = weights(tmp_path / "last.pt")["train_state"]
    assert saved["epoch"] == 2 and saved["batch"] == 0  # the epoch-1 checkpoint, untouched


def test_prior_is_fed_by_the_clean_basic_view_only(tmp_path, device):
    recipe = tiny("data.augment=autoaug", "awp.enabled=false")
    from gklcli.train.engine import Engine

    engine = Engine(recipe, AdversarialStep, out_dir=tmp_path, quiet=True, device=str(device))
    step = engine.step
    step.begin_epoch(1)
    batch = next(iter(engine._train_loader(1, 0)))
    step.compute(batch, 1)
    assert step.term.prior._count.sum() == len(batch[0])  # 16 basic images, not 32
    # hand computation: the same train-mode clean forward of both views, basic half, softmax(o/τ)
    model = engine.module
    x = (torch.cat([batch[0], batch[1]]).float() / 255).to(device)
    with torch.no_grad():
        logits = model(x)[: len(batch[0])]
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected.index_add_(0, batch[2], torch.softmax(logits / 4, dim=1).double().cpu())
    torch.testing.assert_close(step.term.prior._sum.cpu(), expected, rtol=1e-6, atol=1e-7)


def test_dry_run_prints_plan_without_training(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train-at", "cifar100_basic", "--dry-run", "--out", str(tmp_path / "x"))
    assert code == 0 and "arch: wrn-34-10" in out
    assert "200 epochs × 383 steps" in out and "attack schedule (official" in out
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train-at", "nope"], "recipe not found: nope"),
        (["train-at", "quickstart", "--set", "loss.gamma=2"], "loss.gamma: must be <= 1"),
        (["train-at", "cifar100_50m", "--set", "data.dataset=synthetic", "--set", "model.arch=resnet8"], "data.generated.path: this recipe trains on generated images"),
        (["train-at", "quickstart", "--set", "data.dataset=npz", "--set", "data.path=/no/such.npz"], "/no/such.npz: npz file not found"),
        (["train-at", "quickstart", "--set", "data.dataset=cifar10", "--set", "data.download=false", "--data-dir", "/nonexistent"],
         "cifar10: not found under /nonexistent and data.download is false"),
        (["train-at", "quickstart", "--set", "data.batch_size=4096", "--set", "data.drop_last=true"], "data.batch_size: 4096 is larger than the training set"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    code, _, stderr = run_cli(capsys, *args, "--out", str(tmp_path / "o"))
    assert code == 2 and message in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 2


def test_bf16_autocast_and_channels_last_train(tmp_path, device):
    recipe = tiny("train.amp=bf16", "model.channels_last=true", "schedule.epochs=2", "train.max_steps_per_epoch=3")
    results = train_at(recipe, out_dir=tmp_path, quiet=True, device=str(device))
    assert weights(tmp_path / "last.pt")["train_state"]["global_step"] == 6
    assert math.isfinite(results["last"]["val_clean"])


AT_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if load_recipe(p).kind == "at")


@pytest.mark.parametrize("name", AT_RECIPES)
def test_every_at_recipe_runs_three_steps(tmp_path, name):
    recipe = load_recipe(RECIPES_DIR / f"{name}.yaml")
    extra = [*TINY, "eval.final_test=false", "awp.warmup_epochs=1"]
    if recipe.schedule.lr_schedule == "onecycle":  # its warm-up is part of the schedule (≥ 2 epochs)
        extra += ["schedule.epochs=3", "schedule.warmup_epochs=2", "train.max_steps_per_epoch=1"]
    else:
        extra += ["schedule.epochs=1", "schedule.warmup_epochs=0", "train.max_steps_per_epoch=3"]
    if recipe.data.generated.required:
        arrays = {"image": np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8), "label": np.arange(64) % 4}
        np.savez(tmp_path / "gen.npz", **arrays)
        extra.append(f"data.generated.path={tmp_path / 'gen.npz'}")
    recipe = load_recipe(RECIPES_DIR / f"{name}.yaml", extra)
    results = train_at(recipe, out_dir=tmp_path / "run", quiet=True, device="cpu")
    assert weights(tmp_path / "run" / "last.pt")["train_state"]["global_step"] == 3
    assert 0.0 <= results["last"]["val_clean"] <= 100.0


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    """A preempted job (SIGTERM) stops after the current step with a checkpoint and exit code 3."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    sets = sum((["--set", s] for s in [*TINY, "schedule.epochs=6", "train.save_every_steps=1"]), [])
    cmd = [sys.executable, "-m", "gklcli", "train-at", "quickstart", "--out", str(out), "-q", "--device", "cpu", *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert "interrupted" in stderr and "SIGTERM received" in stderr and "--resume" in stderr
    state = weights(out / "last.pt")["train_state"]
    assert not state["finished"] and state["global_step"] >= 1
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert weights(out / "last.pt")["train_state"]["finished"]
