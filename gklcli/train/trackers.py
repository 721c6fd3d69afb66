"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, chosen by `output.tracker`.

Each tracker receives the scalars of every epoch record of `metrics.jsonl` (with the epoch as its step),
the resolved recipe once when its run is created (wandb config; MLflow params, flat dotted keys) and
`results.json` when training ends (wandb `run.summary`; MLflow metrics `results.*` and the file as an
artifact; TensorBoard text). `MetricsLog` drives them; this module knows nothing of training.

The tracker libraries are optional extras imported here only: `require` checks at start, on every
rank, that the chosen ones import, so a missing extra is one line before any data is read. A tracker's
`start` returns what reopens its run (W&B id, MLflow run id); `MetricsLog` keeps that in
`trackers.json` so that `--resume` continues the same tracker run.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Protocol

from gklcli.errors import GKLError
from gklcli.recipes import OutputCfg
from gklcli.train.resume import flatten

STATE_FILE = "trackers.json"
# the folders trackers write inside a run folder by default; --overwrite removes them with the run
RUN_FOLDERS = ("tensorboard", "wandb", "mlruns")
# tracker -> (module, extra); TensorBoard is absent: without its package it is skipped, as it always was
_EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


class Tracker(Protocol):
    """One experiment tracker's run, opened by `start` and fed epoch by epoch."""

    name: str
    saved_keys: tuple[str, ...]  # what `start` returns and reads back on resume

    def start(self, saved: Optional[dict[str, Any]], config: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Open a new run (saved None; log `config`) or reopen `saved`'s; returns what reopens it (None: unavailable)."""
        ...

    def log(self, epoch: int, scalars: dict[str, float]) -> None: ...

    def summary(self, results: dict[str, Any], path: Path) -> None: ...

    def close(self, finished: bool) -> None: ...


def active(output: OutputCfg) -> list[str]:
    """The trackers a run uses: `output.tracker`, less TensorBoard when the older `output.tensorboard` is false."""
    return [name for name in output.tracker if name != "tensorboard" or output.tensorboard]


def require(names: list[str]) -> None:
    """Import each chosen tracker library now, so a missing one stops the run before training starts."""
    for name in names:
        if name not in _EXTRAS:
            continue
        module, extra = _EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise GKLError(f"output.tracker: {name!r} needs the {module} package: pip install 'gklcli[{extra}]'") from None


def make(name: str, out_dir: Path, output: OutputCfg, run_name: str) -> Tracker:
    """The tracker called `name` for the run in `out_dir`."""
    if name == "tensorboard":
        return TensorBoardTracker(out_dir)
    if name == "wandb":
        return WandbTracker(out_dir, output.project, run_name)
    return MlflowTracker(mlflow_uri(output, out_dir), output.project, run_name, out_dir)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, without its epoch (the step): what every tracker logs."""
    return {k: float(v) for k, v in record.items() if k != "epoch" and isinstance(v, (int, float))}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


class TensorBoardTracker:
    """Events under OUT/tensorboard (when the `tensorboard` package is installed)."""

    name = "tensorboard"
    saved_keys: tuple[str, ...] = ()

    def __init__(self, out_dir: Path):
        self.folder = out_dir / "tensorboard"
        self.writer: Any = None

    def start(self, saved: Optional[dict[str, Any]], config: dict[str, Any]) -> Optional[dict[str, Any]]:
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
        except ImportError:
            return None
        self.writer = SummaryWriter(str(self.folder))
        if saved is None:
            self.writer.add_text("recipe", f"```\n{json.dumps(config, indent=2)}\n```")
        return {}

    def log(self, epoch: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def summary(self, results: dict[str, Any], path: Path) -> None:
        self.writer.add_text("results", f"```\n{json.dumps(results, indent=2)}\n```")

    def close(self, finished: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (online, or WANDB_MODE=offline) in project `output.project`; files under WANDB_DIR, else OUT."""

    name = "wandb"
    saved_keys: tuple[str, ...] = ("id", "project")

    def __init__(self, out_dir: Path, project: str, run_name: str):
        self.out_dir, self.project, self.run_name = out_dir, project, run_name
        self.run: Any = None

    def start(self, saved: Optional[dict[str, Any]], config: dict[str, Any]) -> Optional[dict[str, Any]]:
        import wandb

        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.out_dir)}
        # resume "allow": the saved id continues its run, online, or offline (a new offline folder with that id)
        again = {"id": saved["id"], "project": saved["project"], "resume": "allow"} if saved else {
            "project": self.project, "config": config}
        try:
            self.run = wandb.init(name=self.run_name, **where, **again)
        except Exception as error:  # authentication, network, settings: many types
            raise GKLError(f"output.tracker: wandb could not start a run ({_first_line(error)}); "
                           "run `wandb login`, or set WANDB_MODE=offline") from None
        return {"id": self.run.id, "project": self.run.project}

    def log(self, epoch: int, scalars: dict[str, float]) -> None:
        self.run.log({"epoch": epoch, **scalars}, step=epoch, commit=True)  # now, not when the next epoch comes

    def summary(self, results: dict[str, Any], path: Path) -> None:
        self.run.summary.update(results)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


def mlflow_uri(output: OutputCfg, out_dir: Path) -> str:
    """output.mlflow_uri, else MLFLOW_TRACKING_URI, else a file store in OUT/mlruns; local paths made absolute."""
    uri = output.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or str(out_dir / "mlruns")
    if uri.startswith("file://"):
        return uri
    if uri.startswith("file:"):
        uri = uri[len("file:"):]
    elif ":" in uri:
        return uri  # a server, a database, databricks
    return Path(uri).resolve().as_uri()


class MlflowTracker:
    """An MLflow run in experiment `output.project` of the store `uri` (a file store by default)."""

    name = "mlflow"
    saved_keys: tuple[str, ...] = ("run_id",)

    def __init__(self, uri: str, project: str, run_name: str, out_dir: Path):
        self.uri, self.project, self.run_name, self.out_dir = uri, project, run_name, out_dir
        self.client: Any = None
        self.run_id = ""

    def start(self, saved: Optional[dict[str, Any]], config: dict[str, Any]) -> Optional[dict[str, Any]]:
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its file store only on request; it is the one that needs no server or database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            from mlflow.store.tracking.file_store import FileStore

            # MLflow caches a store per URI and lays out its folder only when it builds one; --overwrite may have
            # removed OUT/mlruns since, in this process (several runs in one process: tests, reproduce)
            FileStore(self.uri)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(self.uri)
            if saved:
                self._reopen(saved["run_id"])
            else:
                self._create(config)
        except MlflowException as error:
            raise GKLError(f"output.mlflow_uri: MLflow store {self.uri}: {_first_line(error)}") from None
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def _reopen(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            raise GKLError(f"{self.out_dir / STATE_FILE}: MLflow run {run_id} is not in {self.uri}; set output.mlflow_uri "
                           "(or MLFLOW_TRACKING_URI) to the store it was logged to, or delete the file's 'mlflow' entry "
                           "to log to a new MLflow run") from None
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")

    def _create(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        found = self.client.get_experiment_by_name(self.project)
        experiment = found.experiment_id if found else self.client.create_experiment(self.project)
        self.run_id = self.client.create_run(experiment, run_name=self.run_name, tags={"gkl.out_dir": str(self.out_dir)}).info.run_id
        # params are flat strings of bounded length: dotted recipe keys, long values (lists, paths) cut
        params = [Param(key, str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in flatten(config).items()]
        self.client.log_batch(self.run_id, params=params)

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log(self, epoch: int, scalars: dict[str, float]) -> None:
        self._metrics(scalars, epoch)

    def summary(self, results: dict[str, Any], path: Path) -> None:
        numbers = {f"results.{k}": float(v) for k, v in flatten(results).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._metrics(numbers, int(results.get("epochs") or 0))
        self.client.log_artifact(self.run_id, str(path))

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")
