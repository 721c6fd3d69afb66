"""Executing a `gkl reproduce` plan: training runs, teacher reports, evaluations and smoke-test inputs."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gklcli.errors import GKLError
from gklcli.checkpoint import atomic_write_bytes, atomic_write_text, waiting_lock
from gklcli.reproduce.plan import (
    SMOKE_CLASSES, SMOKE_SIZE, SMOKE_TEST, Job, Plan, digest, ood_path, resolve_spec, eval_settings, find_eval,
    smoke_overrides,
)


# ---------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------


def eval_dir(job: Job, checkpoint: str, settings: dict[str, Any]) -> Path:
    base = {k: v for k, v in settings.items() if k not in ("eps_list", "pgd", "cw", "individual")}
    lists = {k: settings[k] for k in ("eps_list", "pgd", "cw", "individual")}
    return job.dir / "eval" / f"{checkpoint}-{digest(base, 8)}-{digest(lists, 8)}"


def eval_command(job: Job, plan: Plan) -> str:
    """The `gkl eval-aa` command that makes this run's evaluation by hand, at the same path."""
    from gklcli.evaluate import format_eps

    s = eval_settings(job, plan.smoke)
    parts = [f"gkl eval-aa {job.dir / (plan.checkpoint + '.pt')}", f"--n-ex {s['n_ex']}", f"--batch-size {s['batch_size']}",
             f"--eps {format_eps(s['eps'])}", f"--version {s['version']}", f"--seed {s['seed']}", f"--chunk-size {s['chunk_size']}"]
    if s["attacks"]:
        parts.append(f"--attacks {','.join(s['attacks'])}")
    if s["eps_list"]:
        parts.append(f"--eps-list {','.join(format_eps(e) for e in s['eps_list'])}")
    parts += [f"--{k} {','.join(map(str, s[k]))}" for k in ("pgd", "cw") if s[k]]
    if s["individual"]:
        parts.append("--individual")
    if plan.data_dir:
        parts.append(f"--data-dir {plan.data_dir}")
    return " ".join([*parts, f"--out {eval_dir(job, plan.checkpoint, s)}"])


def job_state(job: Job) -> str:
    """done, unfinished (a last.pt to resume) or new."""
    if job.kind == "teacher":
        return "done" if job.dir.is_file() else "new"
    if (job.dir / "results.json").is_file():
        return "done"
    return "unfinished" if (job.dir / "last.pt").is_file() else "new"


@dataclass
class Counts:
    trained: int = 0
    reused: int = 0
    evaluated: int = 0
    teachers: int = 0

    def line(self) -> str:
        return (f"{self.trained} run(s) trained, {self.reused} reused; {self.evaluated} evaluation(s) run; "
                f"{self.teachers} teacher report(s) made")


def mine(jobs: list[Job], shard: tuple[int, int]) -> list[Job]:
    """This process's share under `--shard i/n` (jobs in a fixed order)."""
    ordered = sorted(jobs, key=lambda j: (j.kind == "teacher", j.dir.as_posix()))
    return [j for i, j in enumerate(ordered) if i % shard[1] == shard[0]]


def execute(plan: Plan, *, resume: bool, device: Optional[str], console: Any, quiet: bool,
            shard: tuple[int, int] = (0, 1)) -> Counts:
    """Make every job of this shard: teacher reports, then each run followed by its evaluations."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GKLError("gkl reproduce runs one process per GPU: use --shard i/n (one per GPU), or run the "
                       "--dry-run commands under torchrun and then --report-only")
    jobs = mine(list(plan.jobs.values()), shard)
    waiting = [j for j in jobs if job_state(j) == "unfinished"]
    if waiting and not resume:
        raise GKLError(f"{len(waiting)} run(s) are unfinished (e.g. {waiting[0].dir}); pass --resume to continue them")
    counts = Counts()
    prepare_inputs(plan, jobs, device, console)
    total = len(jobs)
    for number, job in enumerate(jobs, start=1):
        if console is not None:
            console.print(f"[bold]reproduce[/] {number}/{total}: {job.name} → {job.dir}")
        if job.kind == "teacher":
            if job_state(job) != "done":
                _teacher(job, plan, device)
                counts.teachers += 1
            continue
        if job_state(job) == "done":
            counts.reused += 1
        else:
            _train(job, plan, device=device, console=console, quiet=quiet)
            counts.trained += 1
        counts.evaluated += _evaluate_job(job, plan, device=device, console=console)
    return counts


def prepare_inputs(plan: Plan, jobs: list[Job], device: Optional[str], console: Any) -> None:
    """Before any job: build the smoke inputs, or refuse if a real run's files are missing."""
    if plan.smoke:
        _smoke_inputs(plan, plan.root, device, console)
    else:
        check_inputs([j for j in jobs if job_state(j) != "done"], plan)


def check_inputs(jobs: list[Job], plan: Plan) -> None:
    """Refuse before the first of many days of training if a later run's files are missing."""
    from gklcli.fetch import fetch_command
    from gklcli.losses import get_loss
    from gklcli.train.kd import resolve_teacher_path

    def hint(kind: str, recipe: Any) -> str:
        command = fetch_command(kind, recipe)
        return f"; `{command}` fetches it (or `gkl reproduce ... --fetch`)" if command else ""

    for job in jobs:
        r = job.recipe
        generated = r.data.generated
        if generated.required and not (generated.path and Path(generated.path).is_file()):
            raise GKLError(f"{r.meta.name}: trains on DM-AT generated images; put them at DATA_DIR/generated/"
                           f"{r.meta.name}.npz and pass --data-dir DATA_DIR (looked for {generated.path or 'no --data-dir'})"
                           + hint("generated", r))
        if r.kind == "clip-kd":
            from gklcli.reproduce.zeroshot import check_inputs as check_clip_inputs

            check_clip_inputs(job, plan)
        if r.kind == "seg-kd":
            from gklcli.train.seg import check_inputs as check_seg_inputs

            try:
                check_seg_inputs(r, plan.data_dir, teacher_only=job.kind == "teacher")
            except GKLError as err:
                raise GKLError(f"{r.meta.name}: {err}{hint('teacher', r) if 'data.root' not in str(err) else ''}") from None
        if r.kind == "semi" and r.model.pretrained:  # USB's ViT-small starts from its ImageNet weights
            from gklcli.train.semi import resolve_pretrained

            resolve_pretrained(r.model.pretrained, plan.data_dir, r.data.root)
        if r.kind == "kd" and (job.kind == "teacher" or get_loss(r.loss.name, "kd").needs_teacher):
            try:
                resolve_teacher_path(r.teacher.checkpoint, plan.data_dir, arch=r.teacher.arch)
            except GKLError as err:
                raise GKLError(f"{r.meta.name}: {err}{hint('teacher', r)}") from None


def _train(job: Job, plan: Plan, *, device: Optional[str], console: Any, quiet: bool) -> None:
    from gklcli.train import trainer

    trainer(job.recipe.kind)(job.recipe, out_dir=job.dir, data_dir=plan.data_dir, resume=(job.dir / "last.pt").is_file(), quiet=quiet,
        device=device, console=console)


def _teacher(job: Job, plan: Plan, device: Optional[str]) -> None:
    from gklcli.train import teacher_reporter

    if job.recipe.kind == "clip-kd":
        from gklcli.reproduce.zeroshot import teacher_report as clip_teacher_report

        clip_teacher_report(job, plan, device)
        return

    report = teacher_reporter(job.recipe.kind)(job.recipe, data_dir=plan.data_dir, device=device)
    job.dir.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.dir, json.dumps(report, indent=2) + "\n")


def eval_config(settings: dict[str, Any], plan: Plan) -> Any:
    """The EvalConfig of a run's AutoAttack evaluation (`eval_settings`), as eval-aa would build it."""
    from gklcli.evaluate import EvalConfig

    return EvalConfig(n_ex=settings["n_ex"], batch_size=settings["batch_size"], eps=settings["eps"], norm="Linf",
                      version=settings["version"], attacks=settings["attacks"], seed=settings["seed"],
                      chunk_size=settings["chunk_size"], eps_list=settings["eps_list"], pgd=settings["pgd"],
                      cw=settings["cw"], individual=settings["individual"], data_dir=plan.data_dir)


def _evaluate_job(job: Job, plan: Plan, *, device: Optional[str], console: Any) -> int:
    """Run the evaluations this run still lacks; returns how many ran."""
    from gklcli.evaluate import evaluate_checkpoint

    ran = 0
    if job.kind == "at" and job.needs.adversarial:
        settings = eval_settings(job, plan.smoke)
        if find_eval(job, plan.checkpoint, settings) is None:
            evaluate_checkpoint(str(job.dir / f"{plan.checkpoint}.pt"), eval_config(settings, plan),
                                eval_dir(job, plan.checkpoint, settings), resume=True, device=device, console=console)
            ran += 1
    for name in sorted(job.needs.ood):
        path = ood_path(job, plan.checkpoint, name)
        if not path.is_file():
            _evaluate_ood(job, plan, name, path, device)
            ran += 1
    if job.needs.zeroshot:
        from gklcli.reproduce.zeroshot import evaluate_run

        ran += evaluate_run(job, plan, device)
    return ran


def _evaluate_ood(job: Job, plan: Plan, name: str, path: Path, device: Optional[str]) -> None:
    from gklcli.loading import load_model_file
    from gklcli.ood import variant_source, variant_top1, wnid_index_from_list
    from gklcli.distributed import pick_device

    dev = pick_device(device)
    data = job.recipe.data
    if plan.smoke:
        root = plan.root / "data"
        classes = {smoke_wnid(k): k for k in range(SMOKE_CLASSES)}
    else:
        root = Path(plan.data_dir or data.root or "data")
        list_file = Path(data.lt_train_list)
        classes = wnid_index_from_list(list_file if list_file.is_absolute() else root / list_file)
    source, present = variant_source(root / name, classes, data.image_size)
    loaded = load_model_file(str(job.dir / f"{plan.checkpoint}.pt"), device=dev)
    result = variant_top1(loaded.module, source, present, batch_size=data.eval_batch_size, num_workers=data.num_workers,
                          device=dev) | {"dataset": name, "checkpoint": plan.checkpoint}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def smoke_wnid(k: int) -> str:
    return f"n{k:08d}"


def _smoke_inputs(plan: Plan, root: Path, device: Optional[str], console: Any) -> None:
    """What toy-scale runs read: a generated-data file, ImageNet-variant folders, a trained teacher.

    Parallel `--shard` processes share them: the first builds each under a waiting lock, the others
    find it built."""
    with waiting_lock(root / ".smoke-inputs.lock"):
        _build_smoke_inputs(plan, root, device, console)


def _build_smoke_inputs(plan: Plan, root: Path, device: Optional[str], console: Any) -> None:
    import tempfile

    import numpy as np

    from gklcli.data import make_synthetic

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "generated.npz").is_file():
        gen = make_synthetic(256, SMOKE_CLASSES, SMOKE_SIZE, 0, "generated")
        buffer = io.BytesIO()
        np.savez(buffer, image=gen.images, label=gen.labels)
        atomic_write_bytes(data / "generated.npz", buffer.getvalue())
    if any(j.needs.ood for j in plan.train_jobs()):
        from PIL import Image

        for name, seed in (("imagenet-r", 1), ("imagenet-sketch", 2)):
            if (data / name).is_dir():
                continue
            shifted = make_synthetic(SMOKE_TEST, SMOKE_CLASSES, SMOKE_SIZE, 0, f"ood{seed}")
            staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=data))
            for i, (img, label) in enumerate(zip(shifted.images, shifted.labels)):
                folder = staging / smoke_wnid(int(label))
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(img)).save(folder / f"{i:04d}.png")
            staging.replace(data / name)
    from gklcli.reproduce.zeroshot import build_smoke_inputs

    build_smoke_inputs(plan, root, device, console)
    from gklcli.train.seg import build_smoke_inputs as build_seg_smoke_inputs

    build_seg_smoke_inputs(list(plan.jobs.values()), root, device, console)
    kd = [j for j in plan.jobs.values() if j.recipe.kind == "kd"]
    if kd and not (root / "teacher" / "results.json").is_file():
        from gklcli.train.kd import train_distill

        teacher = resolve_spec(kd[0].spec, [*smoke_overrides(kd[0].recipe, root), "loss.name=ce", "loss.ce_weight=1.0",
                                         "train.seed=0", "schedule.epochs=3", "meta.name=smoke-teacher"])
        train_distill(teacher, out_dir=root / "teacher", resume=(root / "teacher" / "last.pt").is_file(), quiet=True,
                      device=device, console=console)
