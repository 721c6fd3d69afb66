"""Experiment trackers (output.tracker): offline W&B and an MLflow file store receive exactly the scalars
of metrics.jsonl, the recipe and results.json; --resume continues the same tracker runs without
sending an epoch twice; a missing extra is one line before training."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from gklcli.errors import GKLError
from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.at import train_at
from gklcli.train.engine import Interrupted
from gklcli.train.trackers import mlflow_uri, scalars
from tests_helpers import TINY_OVERRIDES, run_cli

CPU = {"quiet": True, "device": "cpu"}


@pytest.fixture(autouse=True)
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline with its files in tmp; MLflow only where the recipe says (no user store)."""
    (tmp_path / "wandb-dir").mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tiny(*extra: str):
    """3 epochs of 6 steps."""
    return load_recipe(RECIPES_DIR / "quickstart.yaml", [*TINY_OVERRIDES, "schedule.epochs=3", "output.plots=false", *extra])


def metrics(out) -> dict[int, dict[str, float]]:
    return {r["epoch"]: scalars(r) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log of 32 KiB blocks after a
    7-byte W&B header; a record may span blocks: FIRST, MIDDLE…, LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if room < 7 or (length == 0 and kind == 0):  # block trailer
            pos += room
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items) -> dict:
    """History or summary items: a key is in `key` or, path-wise, in `nested_key`."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_parts(wandb_dir, run_id):
    """Each offline folder of run `run_id` (one per start or resume): (run ids, history rows, summary updates)."""
    parts = []
    for path in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        ids, history, summary = [], [], {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
            elif kind == "history":
                history.append(_items(record.history.item))
            elif kind == "summary":
                summary.update(_items(record.summary.update))
        parts.append((ids, history, summary))
    return parts


def test_wandb_and_mlflow_get_the_metrics_once_and_a_resume_continues_their_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "run", f"file:{tmp_path / 'store'}"
    recipe = tiny("output.tracker=[tensorboard,wandb,mlflow]", "output.tensorboard=true", f"output.mlflow_uri={store}",
                  "output.project=gkl-test")
    with pytest.raises(Interrupted):
        train_at(recipe, out_dir=out, interrupt_after_steps=8, **CPU)  # epoch 2, step 2: epoch 1 was sent
    first = json.loads((out / "trackers.json").read_text())
    assert first["wandb"]["epoch"] == first["mlflow"]["epoch"] == first["tensorboard"]["epoch"] == 1
    results = train_at(recipe, out_dir=out, resume=True, **CPU)
    state = json.loads((out / "trackers.json").read_text())
    assert state["wandb"]["id"] == first["wandb"]["id"] and state["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert state["wandb"]["epoch"] == state["mlflow"]["epoch"] == 3
    expected = metrics(out)
    assert sorted(expected) == [1, 2, 3]

    client = MlflowClient(mlflow_uri(recipe.output, out))
    run_id = state["mlflow"]["run_id"]
    for key in expected[1]:
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (epoch, pytest.approx(values[key])) for epoch, values in expected.items()], key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "gkl-test"
    assert run.data.params["loss.gamma"] == "0.4" and run.data.params["model.arch"] == "resnet8"
    assert run.data.metrics["results.last.test_pgd"] == pytest.approx(results["last"]["test_pgd"])
    assert [a.path for a in client.list_artifacts(run_id)] == ["results.json"]

    parts = wandb_parts(tmp_path / "wandb-dir", state["wandb"]["id"])
    assert len(parts) == 2 and all(ids == [state["wandb"]["id"]] for ids, _, _ in parts)  # one run, two offline parts
    rows = [row for _, history, _ in parts for row in history]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert {k: row[k] for k in expected[row["epoch"]]} == pytest.approx(expected[row["epoch"]])
    assert parts[1][2]["last"]["test_pgd"] == pytest.approx(results["last"]["test_pgd"])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_tracker_added_on_resume_gets_the_earlier_epochs_and_overwrite_starts_a_new_run(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_at(tiny("output.tracker=[]"), out_dir=out, interrupt_after_steps=14, **CPU)  # two epochs, no tracker
    assert not (out / "trackers.json").exists()
    recipe = tiny("output.tracker=[mlflow]")  # output.* may change on resume; the default store is OUT/mlruns
    train_at(recipe, out_dir=out, resume=True, **CPU)
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "val_pgd")] == [1, 2, 3]

    overwrite = tiny("output.tracker=[mlflow]", "output.overwrite=true", "schedule.epochs=1")
    train_at(overwrite, out_dir=out, **CPU)
    new_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("gkl").experiment_id])
    assert new_id != run_id and [r.info.run_id for r in runs] == [new_id]  # the old run's store went with it


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_extra_is_one_line_before_training(tmp_path, capsys, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import wandb` now raises ImportError
    sets = sum((["--set", s] for s in [*TINY_OVERRIDES, f"output.tracker=[tensorboard,{tracker}]"]), [])
    code, _, stderr = run_cli(capsys, "train-at", "quickstart", "--out", tmp_path / "o", "--device", "cpu", *sets)
    assert code == 2 and f"pip install 'gklcli[{tracker}]'" in stderr and "output.tracker" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("value, message", [
    ("[tensorboard,neptune]", "output.tracker[1]: must be one of 'tensorboard', 'wandb', 'mlflow', got 'neptune'"),
    ("[wandb,wandb]", "output.tracker: lists a tracker twice"),
    ("wandb", "output.tracker: expected a list, got 'wandb'"),
])
def test_a_bad_tracker_list_names_the_key_and_value(value, message):
    with pytest.raises(GKLError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny(f"output.tracker={value}")


def test_mlflow_store_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = tiny().output
    assert mlflow_uri(output, tmp_path / "run") == (tmp_path / "run" / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert mlflow_uri(output, tmp_path / "run") == "http://mlflow.example:5000"
    output.mlflow_uri = "file:stores/a"  # the recipe's wins; relative to the working folder
    assert mlflow_uri(output, tmp_path / "run") == (tmp_path / "stores" / "a").as_uri()


def test_the_old_tensorboard_switch_still_turns_tensorboard_off(tmp_path):
    train_at(tiny("schedule.epochs=1", "output.tensorboard=false"), out_dir=tmp_path, **CPU)
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "trackers.json").exists()


def test_a_tracker_that_cannot_start_is_one_line_and_leaves_no_run_file(tmp_path, capsys, monkeypatch):
    import wandb

    def refuse(**_):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.\nmore detail")

    monkeypatch.setattr(wandb, "init", refuse)
    sets = sum((["--set", s] for s in [*TINY_OVERRIDES, "output.tracker=[mlflow,wandb]"]), [])
    code, _, stderr = run_cli(capsys, "train-at", "quickstart", "--out", tmp_path / "o", "--device", "cpu", *sets)
    assert code == 2 and "wandb could not start a run (No API key configured" in stderr and "WANDB_MODE=offline" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not [p.name for p in (tmp_path / "o").iterdir() if p.is_file()]  # no recipe.yaml, trackers.json, lock
