"""`gkl reproduce TABLE --launcher local|slurm`: the table's trainings and AutoAttack evaluations as
submitit jobs, recorded in OUT/jobs.json; `--status` reads it back.

Slurm: every job is submitted at once, each evaluation `afterok` on its training run, and the command
returns; rerun it (or `--report-only`) once they finish. Local: at most `--max-parallel` jobs run at
a time on this machine, an evaluation starts when its run is done, and the command waits, then
finishes in-process what is cheap (teacher reports, OOD sets, figures) and writes the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gklcli.checkpoint import atomic_write_text
from gklcli.launch import EvalJob, JobBook, LaunchOptions, TrainJob, executor, submit
from gklcli.reproduce.execute import eval_config, eval_dir
from gklcli.reproduce.plan import Job, Plan, eval_settings, find_eval

POLL_S = 1.0


@dataclass
class Pending:
    """A job to submit once the jobs it depends on are done."""

    key: str
    kind: str
    make: Any  # the picklable callable (TrainJob / EvalJob)
    target: Path  # the folder whose results.json means done
    after: list[str] = field(default_factory=list)
    gpus: int = 1
    array: Optional[list[Any]] = None  # an AutoAttack shard array: one callable each


def _pending(plan: Plan, opts: LaunchOptions, book: JobBook) -> list[Pending]:
    """Every training and evaluation of the plan that is neither done nor queued/running."""
    items: list[Pending] = []
    for job in plan.train_jobs():
        trained = (job.dir / "results.json").is_file()
        if not trained and not book.active(job.key):
            recipe_file = plan.root / "jobs" / f"{job.key}.yaml"
            recipe_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(recipe_file, job.recipe.to_yaml())  # what torchrun's processes read (local, N GPUs)
            items.append(Pending(job.key, "train", TrainJob(job.recipe, job.dir, plan.data_dir, opts.gpus_per_run,
                                                             opts.launcher, recipe_file), job.dir, gpus=opts.gpus_per_run))
        items += _evaluations(job, plan, opts, book, after=[] if trained else [job.key])
    return items


def _evaluations(job: Job, plan: Plan, opts: LaunchOptions, book: JobBook, after: list[str]) -> list[Pending]:
    if job.kind != "at" or not job.needs.adversarial:
        return []
    settings = eval_settings(job, plan.smoke)
    if find_eval(job, plan.checkpoint, settings) is not None:
        return []
    key, out = f"{job.key}-aa", eval_dir(job, plan.checkpoint, settings)
    if book.active(key) or book.active(f"{key}-merge"):
        return []
    checkpoint, cfg = str(job.dir / f"{plan.checkpoint}.pt"), eval_config(settings, plan)
    if opts.aa_shards == 1:
        return [Pending(key, "eval", EvalJob(checkpoint, cfg, out), out, after)]
    cfg.chunk_size = cfg.chunk_size or max(1, -(-cfg.n_ex // (4 * opts.aa_shards)))  # chunks to share out
    shards = [EvalJob(checkpoint, cfg, out, shard=f"{i}/{opts.aa_shards}") for i in range(opts.aa_shards)]
    return [Pending(f"{key}-shards", "eval-shards", None, out / "chunks", after, array=shards),
            Pending(f"{key}-merge", "merge", EvalJob(checkpoint, cfg, out, merge=True), out, [f"{key}-shards"])]


@dataclass
class Submitted:
    submitted: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        failed = f"; failed: {', '.join(self.failed)} (see `gkl reproduce ... --status` for the logs)" if self.failed else ""
        return f"{self.submitted} job(s) submitted, {self.skipped} already done, queued or running{failed}"


def _submit(item: Pending, plan: Plan, opts: LaunchOptions, book: JobBook) -> None:
    folder = plan.root / "jobs" / "logs"
    ids = [book.jobs[k]["job_id"] for k in item.after if opts.launcher == "slurm" and book.active(k)]
    ex = executor(folder, opts, f"gkl-{item.kind}-{item.key}", gpus=item.gpus if item.kind == "train" else 1, dependency=ids)
    jobs = submit(ex, item.array or [item.make], f"{item.kind} {item.key}")  # shards: one Slurm job array
    book.record(item.key, item.kind, jobs[0], folder, opts.launcher, item.target, shards=[str(j.job_id) for j in jobs])


def submit_plan(plan: Plan, opts: LaunchOptions, console: Any) -> Submitted:
    """Submit what is missing; locally, also wait until it has run."""
    book = JobBook(plan.root)
    items = _pending(plan, opts, book)
    counts = Submitted(skipped=len(plan.train_jobs()) - sum(i.kind == "train" for i in items))
    if opts.launcher == "slurm":
        for item in items:  # in plan order: every dependency is submitted before what needs it
            _submit(item, plan, opts, book)
            counts.submitted += 1
            if console is not None:
                console.print(f"submitted {item.kind} {item.key}: job {book.jobs[item.key]['job_id']} (log {book.jobs[item.key]['log']})")
        return counts
    waiting, running = list(items), set()
    while waiting or running:
        for key in list(running):
            state = book.state(key)
            if state in ("done", "failed"):
                running.discard(key)
                if state == "failed":
                    counts.failed.append(key)
        for item in list(waiting):
            blocked = [k for k in item.after if k in running or any(w.key == k for w in waiting)]
            broken = [k for k in item.after if k in counts.failed]
            if broken:
                waiting.remove(item)
                counts.failed.append(item.key)
            elif not blocked and len(running) < opts.max_parallel:
                _submit(item, plan, opts, book)
                waiting.remove(item)
                running.add(item.key)
                counts.submitted += 1
                if console is not None:
                    console.print(f"started {item.kind} {item.key} (job {book.jobs[item.key]['job_id']})")
        time.sleep(POLL_S)
    return counts


def print_status(plan: Plan, console: Any) -> None:
    """Every run and evaluation of the plan with its state, from OUT/jobs.json and the run folders."""
    from rich.table import Table

    book = JobBook(plan.root)
    table = Table(title=f"{plan.name}: jobs ({book.path})", header_style="bold")
    for column in ("key", "kind", "state", "job", "log"):
        table.add_column(column, overflow="fold")
    for job in plan.train_jobs():
        done = (job.dir / "results.json").is_file()
        rows = [(job.key, "train")]
        if job.kind == "at" and job.needs.adversarial:
            rows += [(f"{job.key}-aa", "eval"), (f"{job.key}-aa-merge", "merge")]
        for key, kind in rows:
            entry = book.jobs.get(key)
            if entry is None and kind == "merge":
                continue
            state = "done" if kind == "train" and done else book.state(key)
            if kind == "eval" and find_eval(job, plan.checkpoint, eval_settings(job, plan.smoke)) is not None:
                state = "done"
            table.add_row(key, kind, state, entry["job_id"] if entry else "-", entry["log"] if entry and state == "failed" else "")
    console.print(table)
