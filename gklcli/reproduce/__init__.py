"""`gkl reproduce TABLE`: a registry table as a plan of content-addressed runs, executed and reported.

Each numeric cell of a runnable row names a recipe (+ overrides) and a metric. A *run* is one
training of a resolved recipe with one seed; its directory is named by a hash of the resolved recipe
(settings that do not change the numbers, such as paths and logging, left out), so any table that
needs the same run finds it finished. Robustness numbers come from `gkl eval-aa` evaluations kept
inside the run (also content-addressed, and reused when an earlier one ran a superset of attacks);
teacher accuracies from `gkl distill --teacher-only` reports under `teachers/`.

`--smoke` runs the same pipeline at toy scale (synthetic 8×8 data, resnet8, 2 short epochs, a
small AutoAttack) in its own `smoke/` folder, so its numbers never mix with real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from gklcli.errors import GKLError
from gklcli.launch import LaunchOptions
from gklcli.recipes import Recipe
from gklcli.reproduce.plan import Plan, build_plan, plan_for, run_key
from gklcli.reproduce.execute import Counts, job_state, eval_command, execute as _execute, mine, prepare_inputs, smoke_wnid
from gklcli.reproduce.report import make_figures, write_report
from gklcli.reproduce.zeroshot import zeroshot_command_line
from gklcli.reproduce.estimate import GPU_FLOPS, estimate_gpu_hours, forward_flops, list_tables, print_list

__all__ = [
    "GPU_FLOPS", "Counts", "build_plan", "forward_flops", "list_tables", "mine", "plan_for", "print_dry_run",
    "print_list", "reproduce", "run_key", "smoke_wnid", "write_report",
]


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def _recipe_summary(r: Recipe) -> str:
    """The resolved settings that tell runs apart, on one line."""
    from gklcli.train.preview import loss_text

    from gklcli.losses import get_loss, loss_kind

    parts = [f"{r.model.arch} on {r.data.dataset}", f"{r.schedule.epochs} ep × batch {r.data.batch_size}", f"lr {r.optim.lr:g}",
             f"loss {loss_text(r)}", f"seed {r.train.seed}"]
    if r.kind in ("kd", "clip-kd", "seg-kd"):
        needs = get_loss(r.loss.name, loss_kind(r.kind)).needs_teacher
        parts.insert(1, f"teacher {r.teacher.arch}" if needs else "no teacher")
        if r.kind == "seg-kd" and needs and r.seg.pred_kmeans_weight + r.seg.proto_align_weight > 0:
            parts[4] += f" + APD prototypes (KL ×{r.seg.pred_kmeans_weight:g}, align ×{r.seg.proto_align_weight:g})"
    elif r.kind == "semi":
        from gklcli.train.semi import consistency_text

        parts[3] = consistency_text(r)
    else:
        parts.insert(3, f"attack {r.attack.loss}/{r.attack.schedule}, AWP {'on' if r.awp.enabled else 'off'}, avg {r.ema.mode}")
    return "; ".join(parts)


def print_dry_run(plan: Plan, console: Any) -> None:
    """Each row with the paper's values it must match, then each run: resolved settings, command, path, state."""
    from rich.markup import escape

    parts = [tp.table.name for tp in plan.tables]
    if parts != [plan.name]:
        console.print(f"[bold]{escape(plan.name)}[/] is made of {', '.join(parts)}")
    for tp in plan.tables:
        t = tp.table
        console.print(f"\n[bold]{t.name}[/]: {escape(t.title)}")
        if t.status == "unsupported":
            console.print(f"  [yellow]not reproducible with gkl:[/] {escape(t.reason)}")
        for row in tp.rows:
            cells = [c for c in tp.cells if c.row is row]
            values = ", ".join(f"{c.column} {c.paper:g}" for c in cells if c.paper is not None)
            what = "cited" if row.cited else "runs" if row.runnable else "no run"
            console.print(f"  row {row.index} {escape(f'[{what}]')} {escape(row.label)}: paper {escape(values) or '—'}")
            for c in cells:
                if c.jobs:
                    keys = ", ".join(j.key for j in c.jobs)
                    console.print(f"      {escape(c.column)} ← {c.metric} of {keys}")
    jobs = list(plan.jobs.values())
    if not jobs:
        return
    console.print(f"\n[bold]{len(plan.train_jobs())} run(s), {len(plan.teacher_jobs())} teacher report(s)[/] "
                  f"(≈ {sum(estimate_gpu_hours(j) for j in jobs):,.1f} GPU-hours):")
    for job in jobs:
        console.print(f"  {escape(f'[{job_state(job)}]')} {job.key} {escape(job.name)} ≈ {estimate_gpu_hours(job):,.1f} GPU-h")
        console.print(f"      {escape(_recipe_summary(job.recipe))}")
        clip_teacher = job.kind == "teacher" and job.recipe.kind == "clip-kd"
        console.print(f"      $ {escape(zeroshot_command_line(job, plan) if clip_teacher else job.command())}")
        if job.kind == "at" and job.needs.adversarial:
            console.print(f"      $ {escape(eval_command(job, plan))}")
        if job.kind == "clip-kd" and job.needs.zeroshot:
            console.print(f"      $ {escape(zeroshot_command_line(job, plan))}")


def reproduce(name: str, *, rows: Optional[str], seeds: int, out: Path, data_dir: Optional[str], smoke: bool, resume: bool,
              report_only: bool, checkpoint: str, shard: tuple[int, int], device: Optional[str], quiet: bool,
              console: Any, fetch: bool = False, mirror: Optional[str] = None,
              launch: Optional[LaunchOptions] = None) -> Optional[dict[str, Any]]:
    """Run (or reuse) every job of the table, then write its report; returns the report record.

    `fetch`: first download what the runs read and DATA_DIR lacks (generated sets, teachers).
    `launch` (local or slurm): the trainings and AutoAttack evaluations run as submitit jobs; on Slurm
    the command returns once they are submitted (None; rerun with --report-only when they are done)."""
    plan = plan_for(name, rows=rows, seeds=seeds, out=out, smoke=smoke, checkpoint=checkpoint, data_dir=data_dir)
    if fetch and not smoke and not report_only:
        from gklcli.fetch import Fetcher, fetch_for

        fetch_for([j.recipe for j in plan.jobs.values()], Fetcher(Path(data_dir or "data"), mirror, None if quiet else console))
    counts = Counts()
    if launch is not None and launch.active and not report_only:
        from gklcli.reproduce.submit import submit_plan

        prepare_inputs(plan, list(plan.jobs.values()), device, console)
        submitted = submit_plan(plan, launch, console)
        if console is not None:
            console.print(submitted.line())
        if submitted.failed:
            raise GKLError(f"{len(submitted.failed)} job(s) failed: {', '.join(submitted.failed[:4])}; "
                           f"`gkl reproduce {name} --status` shows their logs")
        if launch.launcher == "slurm":
            if console is not None:
                cheap = any(j.kind == "teacher" or j.needs.ood or j.needs.zeroshot for j in plan.jobs.values())
                console.print(f"when they are done: gkl reproduce {name} " + (
                    "without --launcher (it reuses every run, makes the teacher reports and OOD/zero-shot evaluations here, "
                    "and the report)" if cheap else "--report-only") + "; --status follows them")
            return None
    if not report_only:  # locally launched runs are done by now: this reuses them and makes what is cheap
        counts = _execute(plan, resume=resume or bool(launch and launch.active), device=device, console=console, quiet=quiet,
                          shard=shard)
    figures = make_figures(plan, device) if shard == (0, 1) else {}
    path, record = write_report(name, plan, figures, counts)
    if console is not None:
        from rich.markdown import Markdown

        console.print(Markdown(path.read_text()))
        console.print(counts.line())
        console.print(f"report: {path} (+ {path.with_suffix('.json').name})")
    return record
