"""TABLE VII in `gkl reproduce`: the zero-shot evaluations of CLIP runs and of their teacher, what the
runs must find before they start, and the toy inputs of `--smoke` (generated image–caption shards, a
generated classification set per zero-shot column, a briefly trained tiny teacher)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from gklcli.checkpoint import atomic_write_text
from gklcli.errors import GKLError
from gklcli.reproduce.plan import Job, Plan, resolve_spec, smoke_overrides, zeroshot_path

SMOKE_SETS = {"imagenet": 1, "imagenet-v2": 2, "imagenet-sketch": 3, "imagenet-r": 4}  # name → generator seed


def zeroshot_command_line(job: Job, plan: Plan) -> str:
    """The `gkl eval-zeroshot` command that makes a CLIP job's numbers by hand."""
    # a teacher's weight file as the recipe names it: eval-zeroshot finds it under --data-dir as training does
    spec = f"{job.recipe.teacher.arch}:{job.recipe.teacher.checkpoint}" if job.kind == "teacher" else str(job.dir / f"{plan.checkpoint}.pt")
    sets = " ".join(f"--dataset {name}" for name in sorted(job.needs.zeroshot))
    return f"gkl eval-zeroshot {spec} {sets} --data-dir {plan.data_dir or 'data'}"


def teacher_spec(recipe: Any, data_dir: Optional[str]) -> str:
    """`open_clip:NAME:WEIGHTS` of the recipe's teacher, a weight file resolved under the data root."""
    from gklcli.models.clip import resolve_weights

    return f"{recipe.teacher.arch}:{resolve_weights(recipe.teacher.checkpoint, data_dir)}"


def _evaluate(spec: str, job: Job, plan: Plan, names: list[str], device: Optional[str]) -> dict[str, dict[str, Any]]:
    from gklcli.distributed import pick_device
    from gklcli.models.clip import resolve_clip
    from gklcli.zeroshot import evaluate_zeroshot

    dev = pick_device(device)
    loaded = resolve_clip(spec, device=dev, cache_dir=job.recipe.teacher.cache_dir, data_dir=plan.data_dir)
    d = job.recipe.data
    results = {}
    for name in names:
        if plan.smoke:  # every column a generated set of the shards' classes, with its own images
            result = evaluate_zeroshot(loaded, "folder", plan.root / "data" / f"zeroshot-{name}", batch_size=d.eval_batch_size,
                                       num_workers=0, device=dev, templates="simple")
        else:
            result = evaluate_zeroshot(loaded, name, Path(plan.data_dir or d.root or "data"), batch_size=d.eval_batch_size,
                                       num_workers=d.num_workers, device=dev)
        results[name] = result | {"checkpoint": plan.checkpoint if job.kind != "teacher" else spec}
    return results


def _current(path: Path, digest: str) -> bool:
    """A zero-shot result of this very checkpoint file (a retrained run's old numbers are not reused)."""
    from gklcli.checkpoint import read_json

    try:
        return path.is_file() and read_json(path).get("checkpoint_sha256") == digest
    except GKLError:
        return False


def evaluate_run(job: Job, plan: Plan, device: Optional[str]) -> int:
    """The zero-shot results a CLIP run still lacks, one file per set; returns how many ran."""
    from gklcli.checkpoint import sha256_file

    checkpoint = job.dir / f"{plan.checkpoint}.pt"
    digest = sha256_file(checkpoint)
    missing = [name for name in sorted(job.needs.zeroshot) if not _current(zeroshot_path(job, plan.checkpoint, name), digest)]
    if not missing:
        return 0
    for name, result in _evaluate(str(checkpoint), job, plan, missing, device).items():
        result["checkpoint_sha256"] = digest
        path = zeroshot_path(job, plan.checkpoint, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return len(missing)


def teacher_report(job: Job, plan: Plan, device: Optional[str]) -> None:
    """The pretrained teacher's zero-shot results ({set: result}) in the teacher job's report file."""
    spec = teacher_spec(job.recipe, plan.data_dir)
    report = _evaluate(spec, job, plan, sorted(job.needs.zeroshot), device)
    job.dir.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.dir, json.dumps(report, indent=2) + "\n")


def check_inputs(job: Job, plan: Plan) -> None:
    """Before days of training: the pool opens and a teacher weight file (not a pretrained tag) exists."""
    from gklcli.pairs import open_pool, pool_path

    r = job.recipe
    if job.kind != "teacher":
        d = r.data
        try:
            open_pool(pool_path(d.pairs, plan.data_dir), image_key=d.csv_image_key, caption_key=d.csv_caption_key)
        except GKLError as err:
            raise GKLError(f"{r.meta.name}: {err}; see docs/clip.md for preparing DataComp shards with img2dataset") from None
    if r.loss.name != "ce" or job.kind == "teacher":
        try:
            teacher_spec(r, plan.data_dir)
        except GKLError as err:
            raise GKLError(f"{r.meta.name}: {err}") from None


def build_smoke_inputs(plan: Plan, root: Path, device: Optional[str], console: Any) -> None:
    """Generated shards and zero-shot folders under root/data, and the tiny teacher under root/clip-teacher."""
    from gklcli.pairs import write_synthetic_classification, write_synthetic_shards

    clip = [j for j in plan.jobs.values() if j.recipe.kind == "clip-kd"]
    if not clip:
        return
    data = root / "data"
    if not (data / "pairs").is_dir():
        _staged(data / "pairs", lambda folder: write_synthetic_shards(folder, shards=2, per_shard=48, size=32, seed=0))
    for name, seed in SMOKE_SETS.items():
        if not (data / f"zeroshot-{name}").is_dir():
            _staged(data / f"zeroshot-{name}",
                    lambda folder, seed=seed: write_synthetic_classification(folder, per_class=3, size=32, seed=seed))
    if not (root / "clip-teacher" / "results.json").is_file():
        from gklcli.train.clip import train_clip

        teacher = resolve_spec(clip[0].spec, [*smoke_overrides(clip[0].recipe, root), "loss.name=ce",
                                              "model.arch=open_clip:gkl-tiny-clip-teacher", "train.seed=0",
                                              "schedule.epochs=3", "meta.name=smoke-clip-teacher"])
        train_clip(teacher, out_dir=root / "clip-teacher", resume=(root / "clip-teacher" / "last.pt").is_file(), quiet=True,
                   device=device, console=console)


def _staged(target: Path, write: Any) -> None:
    """Write a folder under a temporary name and rename it into place: a killed build leaves no half set."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
