"""Where runs run: in this process (the default), as real subprocesses on this machine
(`--launcher local`) or as Slurm jobs (`--launcher slurm`), both through submitit's executors.

* One training run is one job. With `--gpus-per-run N` it is a DDP run: on Slurm N tasks, one per
  GPU, whose rendezvous comes from Slurm's environment (submitit's TorchDistributedEnvironment, the
  variables torchrun would set); locally `torch.distributed.run --nproc_per_node N`.
* An AutoAttack evaluation is a job that depends on its training job (Slurm `afterok`; locally it
  starts when the run has finished), or `--aa-shards K` jobs (a Slurm array) and a merge job.
* Preemption and time limits: the job's pre-timeout signal (USR2, which submitit asks Slurm for) is
  handled by the engine like SIGTERM: it checkpoints at the next step end; then submitit's own
  handler requeues the job (`scontrol requeue`, or a local restart), and the requeued job continues
  with --resume, bit-identically.
* OUT/jobs.json records every submitted job (id, kind, log); `--status` reads it. Nothing is submitted
  twice: a job whose run is done, or that is still queued or running, is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gklcli.checkpoint import atomic_write_text, pid_alive, read_json
from gklcli.errors import GKLError, show
from gklcli.train import TRAIN_VERBS

LAUNCHERS = ("none", "local", "slurm")
DEFAULT_HOURS = 72  # a run's time limit when --time is not given


def parse_minutes(text: Optional[str]) -> int:
    """--time as Slurm writes it (MM, HH:MM:SS, D-HH[:MM[:SS]]) in minutes."""
    if not text:
        return DEFAULT_HOURS * 60
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise GKLError(f"--time {show(text)}: use minutes (90), HH:MM:SS (12:00:00) or D-HH (2-00)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is None and second is None:
        return first  # plain minutes
    hours, minutes, seconds = first, second or 0, third or 0
    return (days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


@dataclass
class LaunchOptions:
    """The launcher and what a job asks the cluster for."""

    launcher: str = "none"
    gpus_per_run: int = 1
    max_parallel: int = 2  # local: jobs running at once
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    mem: Optional[str] = None  # e.g. 64G
    slurm_args: dict[str, str] = field(default_factory=dict)  # free-form --slurm-arg key=value
    aa_shards: int = 1

    def check(self) -> "LaunchOptions":
        if self.launcher not in LAUNCHERS:
            raise GKLError(f"--launcher {show(self.launcher)}: use {', '.join(LAUNCHERS)}")
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if self.launcher == "slurm" and missing:
            raise GKLError(f"--launcher slurm: {' and '.join(missing)} not on this machine's PATH "
                           "(run on a Slurm login node, or use --launcher local)")
        if self.gpus_per_run < 1 or self.max_parallel < 1 or self.aa_shards < 1:
            raise GKLError("--gpus-per-run, --max-parallel and --aa-shards must be >= 1")
        parse_minutes(self.time)
        return self

    @property
    def active(self) -> bool:
        return self.launcher != "none"


def parse_slurm_args(items: list[str]) -> dict[str, str]:
    """--slurm-arg key=value (repeatable): any sbatch option, passed through as submitit's additional parameters."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GKLError(f"--slurm-arg {show(item)}: expected key=value, e.g. --slurm-arg exclude=node12")
        out[key.strip().lstrip("-").replace("-", "_")] = value
    return out


def executor(folder: Path, opts: LaunchOptions, name: str, *, gpus: int = 1, dependency: Optional[list[str]] = None) -> Any:
    """A submitit executor for one kind of job."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm" if opts.launcher == "slurm" else "local")
    params: dict[str, Any] = {"name": name, "timeout_min": parse_minutes(opts.time)}
    if opts.launcher == "slurm":
        params |= {"tasks_per_node": gpus, "gpus_per_node": gpus, "nodes": 1}
        params |= {f"slurm_{k}": v for k, v in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                                                ("constraint", opts.constraint)) if v}
        if opts.mem:
            params["slurm_mem"] = opts.mem
        extra = dict(opts.slurm_args)
        if dependency:
            extra["dependency"] = "afterok:" + ":".join(dependency)
        if extra:
            params["slurm_additional_parameters"] = extra
        params["slurm_signal_delay_s"] = 120  # USR2 two minutes before the limit: time to finish a step and save
    ex.update_parameters(**params)
    return ex


class TrainJob:
    """One training run as a submitit job (picklable); `checkpoint` makes it requeue as itself."""

    def __init__(self, recipe: Any, out_dir: Path, data_dir: Optional[str], gpus: int, launcher: str, recipe_file: Path,
                 resume: bool = True):
        self.recipe, self.out_dir, self.data_dir = recipe, Path(out_dir), data_dir
        self.gpus, self.launcher, self.recipe_file, self.resume = gpus, launcher, Path(recipe_file), resume

    def __call__(self) -> str:
        if self.gpus > 1 and self.launcher == "local":
            return self._torchrun()
        if self.gpus > 1:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export()  # RANK, WORLD_SIZE, MASTER_ADDR … as torchrun sets them
        from rich.console import Console

        from gklcli.train import trainer
        from gklcli.train.engine import Interrupted

        try:
            trainer(self.recipe.kind)(self.recipe, out_dir=self.out_dir, data_dir=self.data_dir, resume=self.resume, quiet=True,
                                      device=None, console=Console(stderr=False))
        except Interrupted as stop:
            if stop.signal == "SIGUSR2":  # the run is checkpointed: let submitit's handler requeue this job
                signal.raise_signal(signal.SIGUSR2)
            raise
        return str(self.out_dir)

    def _torchrun(self) -> str:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.gpus}",
                   "-m", "gklcli", TRAIN_VERBS[self.recipe.kind], str(self.recipe_file),
                   "--out", str(self.out_dir), "-q"] + (["--resume"] if self.resume else []) + (["--data-dir", self.data_dir] if self.data_dir else [])
        subprocess.run(command, check=True)
        return str(self.out_dir)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """What submitit requeues: this run again, resuming from the checkpoint it just wrote."""
        import copy

        import submitit

        again = copy.copy(self)
        again.resume = True
        return submitit.helpers.DelayedSubmission(again, *args, **kwargs)


def launch_run(recipe: Any, out_dir: Path, data_dir: Optional[str], resume: bool, opts: LaunchOptions, console: Any) -> Optional[str]:
    """`gkl train-at|distill --launcher local|slurm`: one run as a job (OUT/jobs.json); locally, wait for it."""
    book = JobBook(out_dir)
    if book.active("train"):
        raise GKLError(f"{out_dir}: job {book.jobs['train']['job_id']} for this run is still {book.state('train')}; "
                       f"its log: {book.jobs['train']['log']}")
    folder = out_dir / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "recipe.yaml"
    atomic_write_text(recipe_file, recipe.to_yaml())
    (job,) = submit(executor(folder, opts, f"gkl-{recipe.meta.name}", gpus=opts.gpus_per_run),
                    [TrainJob(recipe, out_dir, data_dir, opts.gpus_per_run, opts.launcher, recipe_file, resume=resume)], recipe.meta.name)
    book.record("train", "train", job, folder, opts.launcher, out_dir)
    if console is not None:
        console.print(f"submitted {recipe.meta.name}: job {job.job_id} ({opts.launcher}), log {book.jobs['train']['log']}")
    if opts.launcher == "slurm":
        return None
    while book.active("train"):
        time.sleep(1.0)
    if book.state("train") != "done":
        raise GKLError(f"{out_dir}: the job failed; its log: {book.jobs['train']['log']}")
    return str(out_dir)


class EvalJob:
    """An AutoAttack evaluation (or one shard of it, or the merge of its shards) as a submitit job;
    `model` is a checkpoint path or an `evaluate.ModelRef`."""

    def __init__(self, model: Any, cfg: Any, out: Path, shard: Optional[str] = None, merge: bool = False):
        self.checkpoint, self.cfg, self.out, self.shard, self.merge = model, cfg, Path(out), shard, merge

    def __call__(self) -> str:
        from gklcli.evaluate import evaluate_checkpoint, write_results

        if self.merge:
            write_results(self.out, [self.out], {"merged_from": [str(self.out)]})
        else:
            evaluate_checkpoint(self.checkpoint, self.cfg, self.out, shard=self.shard, resume=True)
        return str(self.out)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:  # chunks already written are skipped on the rerun
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit(ex: Any, jobs: list[Any], what: str) -> list[Any]:
    """Submit `jobs` (several: one Slurm array); sbatch's refusal (a bad partition, account …) is one line."""
    try:
        if len(jobs) == 1:
            return [ex.submit(jobs[0])]
        with ex.batch():
            submitted = [ex.submit(job) for job in jobs]
        return submitted
    except Exception as error:  # submitit reports sbatch's stderr as FailedJobError; anything else as itself
        text = str(error).strip().splitlines()
        raise GKLError(f"{what}: not submitted: {text[-1][:300] if text else type(error).__name__} (job files in {ex.folder})") from None


def launch_eval(model: Any, cfg: Any, out: Path, opts: LaunchOptions, console: Any) -> Optional[dict[str, Any]]:
    """`gkl eval-aa --launcher local|slurm`: the evaluation as a job, or `--aa-shards K` shard jobs (a Slurm
    array) and a merge job after them; locally, wait and return the results."""
    book = JobBook(out)
    for key in ("eval", "eval-merge"):
        if book.active(key):
            raise GKLError(f"{out}: job {book.jobs[key]['job_id']} of this evaluation is still {book.state(key)}; log {book.jobs[key]['log']}")
    folder = out / "jobs"
    if opts.aa_shards > 1:
        cfg.chunk_size = cfg.chunk_size or max(1, -(-cfg.n_ex // (4 * opts.aa_shards)))
    shards = [EvalJob(model, cfg, out, shard=f"{i}/{opts.aa_shards}" if opts.aa_shards > 1 else None) for i in range(opts.aa_shards)]
    jobs = submit(executor(folder, opts, f"gkl-eval-{out.name}"), shards, "eval-aa")
    book.record("eval", "eval", jobs[0], folder, opts.launcher, out, shards=[str(j.job_id) for j in jobs])
    if opts.aa_shards > 1:
        after = [str(j.job_id) for j in jobs] if opts.launcher == "slurm" else None
        if opts.launcher == "local":
            while book.active("eval"):
                time.sleep(1.0)
        merge = submit(executor(folder, opts, f"gkl-merge-{out.name}", dependency=after), [EvalJob(model, cfg, out, merge=True)], "eval-aa merge")
        book.record("eval-merge", "merge", merge[0], folder, opts.launcher, out)
    if console is not None:
        console.print(f"submitted eval-aa ({opts.launcher}): job(s) {', '.join(book.jobs['eval']['shards'])}; logs in {folder}")
    if opts.launcher == "slurm":
        return None
    final = "eval-merge" if opts.aa_shards > 1 else "eval"
    while book.active(final):
        time.sleep(1.0)
    if book.state(final) != "done":
        raise GKLError(f"{out}: the evaluation job failed; its log: {book.jobs[final]['log']}")
    return read_json(out / "results.json")


# ---------------------------------------------------------------------------------------------------
# jobs.json: what was submitted, and what became of it
# ---------------------------------------------------------------------------------------------------


class JobBook:
    """OUT/jobs.json: key → {kind, job_id, folder, launcher, log, target}. `state` says what a job is now."""

    def __init__(self, root: Path):
        self.path = Path(root) / "jobs.json"
        self.jobs: dict[str, dict[str, Any]] = read_json(self.path) if self.path.is_file() else {}

    def record(self, key: str, kind: str, job: Any, folder: Path, launcher: str, target: Path,
               shards: Optional[list[str]] = None) -> None:
        self.jobs[key] = {"kind": kind, "job_id": str(job.job_id), "folder": str(folder), "launcher": launcher,
                          "log": str(Path(folder) / f"{job.job_id}_0_log.out"), "target": str(target),
                          "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "shards": shards or [str(job.job_id)]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.jobs, indent=2) + "\n")

    def state(self, key: str) -> str:
        """done, running, queued, failed or unknown."""
        entry = self.jobs.get(key)
        if entry is None:
            return "not submitted"
        if (Path(entry["target"]) / "results.json").is_file():
            return "done"
        states = {self._job_state(entry, job_id) for job_id in entry.get("shards") or [entry["job_id"]]}
        for state in ("failed", "running", "queued", "unknown"):
            if state in states:
                return state
        return "done"

    @staticmethod
    def _job_state(entry: dict[str, Any], job_id: str) -> str:
        folder = Path(entry["folder"])
        if (folder / f"{job_id}_0_result.pkl").is_file():
            return "failed" if _failed(folder, job_id) else "done"
        if entry["launcher"] == "local":
            return "running" if pid_alive(int(job_id)) else "failed"
        return _slurm_state(job_id)

    def active(self, key: str) -> bool:
        return self.state(key) in ("running", "queued")


def _failed(folder: Path, job_id: str) -> bool:
    """Whether submitit's result file for this finished job holds an error (read through submitit)."""
    from submitit.local.local import LocalJob

    return LocalJob(folder=folder, job_id=job_id).exception() is not None


def _slurm_state(job_id: str) -> str:
    import submitit

    raw = (submitit.SlurmJob(folder=".", job_id=job_id).state or "UNKNOWN").upper().split()[0]  # sacct's state
    if raw == "UNKNOWN":
        return "unknown"
    return {"PENDING": "queued", "REQUEUED": "queued", "RUNNING": "running", "COMPLETING": "running", "COMPLETED": "done"}.get(raw, "failed")
