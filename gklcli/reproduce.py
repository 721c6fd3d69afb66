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

import hashlib
import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gklcli.errors import GKLError
from gklcli.recipes import Recipe, load_recipe, resolve_recipe_path
from gklcli.tables import Row, RunSpec, Table, is_best_metric, metric_parts, select_rows
from gklcli.checkpoint import atomic_write_text, read_json, read_jsonl

# settings that cannot change a run's numbers: where files are, how often to log, worker counts
_NOT_IN_KEY = {("meta",), ("output",), ("data", "root"), ("data", "download"), ("data", "num_workers"),
               ("data", "eval_batch_size"), ("train", "log_every_steps"), ("train", "save_every_steps")}
SMOKE_CLASSES = 10  # APGD-T needs ≥ 10 classes (9 target classes)
SMOKE_SIZE = 8
SMOKE_TEST = 32


# ---------------------------------------------------------------------------------------------------
# Content addresses
# ---------------------------------------------------------------------------------------------------


def _digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:n]


def run_key(recipe: Recipe) -> str:
    """Hash of the resolved recipe (seed included) without the settings that cannot change its numbers.
    File paths count by their file name only, so moving the data or the output does not orphan runs."""
    tree = recipe.to_dict()
    for path in _NOT_IN_KEY:
        node = tree
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    for section, key in (("teacher", "checkpoint"), ("data", "path"), ("data", "test_path")):
        if tree[section].get(key):
            tree[section][key] = Path(tree[section][key]).name
    if tree["data"]["generated"]["path"]:
        tree["data"]["generated"]["path"] = Path(tree["data"]["generated"]["path"]).name
    return _digest(tree)


def teacher_key(recipe: Recipe) -> str:
    """A teacher report depends on the teacher and the evaluation data only."""
    data = {k: v for k, v in recipe.to_dict()["data"].items() if k in ("dataset", "path", "test_path", "lt_val_list",
                                                                     "lt_test_list", "image_size", "val_size", "synthetic", "digits")}
    return _digest({"teacher": recipe.to_dict()["teacher"], "data": data, "num_classes": recipe.model.num_classes})


# ---------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------


def metric_eps(metric: str) -> float:
    """ε of an `aa@E` metric (E such as 4/255)."""
    from gklcli.recipes import _to_float

    return _to_float(metric[3:], metric, {})


@dataclass
class EvalNeeds:
    """What the evaluations of one AT run must include, the union over every cell that uses it."""

    pgd: set[int] = field(default_factory=set)
    cw: set[int] = field(default_factory=set)
    eps: set[float] = field(default_factory=set)
    individual: bool = False
    ood: set[str] = field(default_factory=set)
    adversarial: bool = False  # any AutoAttack-based metric at all

    def add(self, metric: str) -> None:
        for m in metric_parts(metric):
            if m.startswith("pgd-"):
                self.pgd.add(int(m[4:]))
            elif m.startswith("cw-"):
                self.cw.add(int(m[3:]))
            elif m.startswith("aa@"):
                self.eps.add(metric_eps(m))
            elif m in ("apgd-ce", "apgd-t", "apgd-dlr", "fab-t", "square"):
                self.individual = True
            elif m.startswith("ood:"):
                self.ood.add(m[4:])
            if m in ("clean", "aa", "worst") or m.startswith(("pgd-", "cw-", "aa@", "apgd", "fab", "square")):
                self.adversarial = True


@dataclass
class Job:
    """One training run (kind at/kd) or one teacher report (kind teacher)."""

    kind: str
    key: str
    recipe: Recipe
    spec: RunSpec
    overrides: list[str]
    dir: Path
    seed: int = 0
    needs: EvalNeeds = field(default_factory=EvalNeeds)

    @property
    def name(self) -> str:
        return f"{self.recipe.meta.name} (seed {self.seed})" if self.kind != "teacher" else f"teacher of {self.recipe.meta.name}"

    def command(self) -> str:
        """The gkl command that makes this run by hand (e.g. under torchrun) at the same path."""
        sets = "".join(f" --set {o}" for o in self.overrides)
        if self.kind == "teacher":
            return f"gkl distill {self.spec.recipe}{sets} --teacher-only"
        verb = "train-at" if self.kind == "at" else "distill"
        return f"gkl {verb} {self.spec.recipe}{sets} --out {self.dir}"


@dataclass
class CellPlan:
    row: Row
    column: str
    paper: Optional[float]
    metric: Optional[str]
    jobs: list[Job]
    worst_of: tuple[str, ...] = ()


@dataclass
class TablePlan:
    table: Table
    rows: list[Row]
    cells: list[CellPlan]


@dataclass
class Plan:
    tables: list[TablePlan]
    jobs: dict[str, Job]
    out: Path
    seeds: int
    smoke: bool
    checkpoint: str
    data_dir: Optional[str]
    name: str = ""

    @property
    def root(self) -> Path:
        """Where runs and reports live: OUT, or OUT/smoke so toy numbers never mix with real ones."""
        return self.out / "smoke" if self.smoke else self.out

    def train_jobs(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.kind != "teacher"]

    def teacher_jobs(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.kind == "teacher"]


def smoke_overrides(recipe: Recipe, root: Path) -> list[str]:
    """Toy scale for `--smoke`: synthetic 8×8 data, resnet8, two epochs of three steps."""
    sets = [
        "data.dataset=synthetic", "data.synthetic.num_train=96", f"data.synthetic.num_test={SMOKE_TEST}",
        f"data.synthetic.image_size={SMOKE_SIZE}", f"data.synthetic.num_classes={SMOKE_CLASSES}", "data.val_size=16",
        "data.batch_size=16", f"data.eval_batch_size={SMOKE_TEST}", "data.num_workers=0", f"data.image_size={SMOKE_SIZE}",
        "model.arch=resnet8", "model.num_classes=null", "schedule.epochs=2", "schedule.warmup_epochs=0",
        "train.max_steps_per_epoch=3", "train.amp=none", "train.compile=false", "output.tensorboard=false",
        "output.plots=false", "eval.n_test=null", "eval.n_val=null", "eval.pgd_steps=2",
    ]
    if recipe.model.bn_group_size:  # ghost batches scaled with the batch (16 instead of 128 or 512)
        sets.append("model.bn_group_size=8")
    if recipe.schedule.lr_schedule == "onecycle":  # its warm-up (≥ 2 epochs) is part of the schedule
        sets += ["schedule.epochs=3", "schedule.warmup_epochs=2", "train.max_steps_per_epoch=2"]
    if recipe.kind == "at":
        sets += ["awp.warmup_epochs=1"]
        if recipe.data.generated.path or recipe.data.generated.required:
            sets.append(f"data.generated.path={root / 'data' / 'generated.npz'}")
    else:
        sets += ["teacher.arch=resnet8", f"teacher.checkpoint={root / 'teacher' / 'last.pt'}"]
        if recipe.data.dataset == "imagenet-lt":  # a long tail with Many (>100), Medium and Few (<20) classes
            sets += ["data.synthetic.num_train=400", "data.synthetic.imbalance=20"]
    return sets


def _resolve(spec: RunSpec, extra: list[str]) -> Recipe:
    return load_recipe(resolve_recipe_path(spec.recipe), [*spec.overrides, *extra])


def _job_for(spec: RunSpec, metric: str, seed_offset: int, plan: Plan, cache: dict[tuple, Job]) -> Job:
    """The (shared) job that produces `metric` for `spec` at one seed."""
    cache_key = (spec, seed_offset, metric == "teacher_top1")
    if cache_key in cache:
        return cache[cache_key]
    root = plan.root
    base = _resolve(spec, [])
    extra = smoke_overrides(base, root) if plan.smoke else []
    if not plan.smoke and base.data.generated.required and not base.data.generated.path and plan.data_dir:
        extra.append(f"data.generated.path={Path(plan.data_dir) / 'generated' / (base.meta.name + '.npz')}")
    if metric == "teacher_top1":
        recipe = _resolve(spec, extra)
        key = teacher_key(recipe)
        job = Job("teacher", key, recipe, spec, extra, root / "teachers" / f"{recipe.teacher.arch}-{key}.json")
    else:
        seed = base.train.seed + seed_offset
        extra = [*extra, f"train.seed={seed}"]
        recipe = _resolve(spec, extra)
        key = run_key(recipe)
        # the same settings reached through another recipe file (table1_e_class = cifar100_basic) share the run
        existing = sorted((root / "runs").glob(f"*-{key}")) if (root / "runs").is_dir() else []
        folder = existing[0] if existing else root / "runs" / f"{recipe.meta.name}-{key}"
        job = Job(recipe.kind, key, recipe, spec, extra, folder, seed)
    job = plan.jobs.setdefault(job.key, job)
    cache[cache_key] = job
    return job


def build_plan(tables: list[Table], *, rows: Optional[str], seeds: int, out: Path, smoke: bool, checkpoint: str,
               data_dir: Optional[str]) -> Plan:
    """Resolve every runnable cell of `tables` into jobs (shared across cells, tables and rows)."""
    if seeds < 1:
        raise GKLError(f"--seeds {seeds}: must be at least 1")
    plan = Plan([], {}, out, seeds, smoke, checkpoint, data_dir)
    cache: dict[tuple, Job] = {}
    for table in tables:
        chosen = select_rows(table, rows)
        cells = []
        for row in chosen:
            row_attacks = tuple(c.metric for c in row.cells if c.metric and re.match(r"^(pgd|cw)-\d+$", c.metric))
            for cell in row.cells:
                jobs: list[Job] = []
                if cell.run is not None and cell.metric is not None:
                    offsets = [0] if cell.metric == "teacher_top1" else range(seeds)
                    jobs = [_job_for(cell.run, cell.metric, k, plan, cache) for k in offsets]
                    for job in jobs:
                        job.needs.add(cell.metric)
                worst = row_attacks if cell.metric == "worst" else ()
                cells.append(CellPlan(row, cell.column, cell.paper, cell.metric, jobs, worst))
        plan.tables.append(TablePlan(table, chosen, cells))
    return plan


# ---------------------------------------------------------------------------------------------------
# Evaluation settings and lookups
# ---------------------------------------------------------------------------------------------------


def eval_settings(job: Job, smoke: bool) -> dict[str, Any]:
    """The eval-aa settings for an AT run: the recipe's eval.* (RobustBench protocol), or toy scale."""
    e = job.recipe.eval
    needs = job.needs
    base: dict[str, Any] = {"n_ex": e.aa_n_ex, "batch_size": e.aa_batch_size, "eps": e.eps, "version": e.aa_version,
                            "attacks": None, "seed": 0, "chunk_size": 2 * e.aa_batch_size}
    if smoke:
        attacks = ["apgd-ce", "apgd-t"] if needs.individual else ["apgd-ce"]
        base.update(n_ex=SMOKE_TEST, batch_size=SMOKE_TEST, version="custom", attacks=attacks, chunk_size=0)
    eps_list = sorted(needs.eps)
    return base | {"eps_list": eps_list, "pgd": sorted(needs.pgd), "cw": sorted(needs.cw), "individual": needs.individual}


def _eval_dir(job: Job, checkpoint: str, settings: dict[str, Any]) -> Path:
    base = {k: v for k, v in settings.items() if k not in ("eps_list", "pgd", "cw", "individual")}
    lists = {k: settings[k] for k in ("eps_list", "pgd", "cw", "individual")}
    return job.dir / "eval" / f"{checkpoint}-{_digest(base, 8)}-{_digest(lists, 8)}"


def _covers(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """An evaluation with a superset of the wanted attacks gives the same numbers for those."""
    same = all(have.get(k) == want[k] for k in ("n_ex", "batch_size", "version", "seed", "chunk_size", "attacks"))
    same = same and abs(float(have.get("eps", -1)) - float(want["eps"])) < 1e-9
    return (same and {round(e, 9) for e in want["eps_list"]} <= {round(e, 9) for e in have.get("eps_list", [])}
            and set(want["pgd"]) <= set(have.get("pgd", [])) and set(want["cw"]) <= set(have.get("cw", []))
            and (have.get("individual") or not want["individual"]))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a checkpoint, computed once per file version (reports look it up for every cell)."""
    from gklcli.checkpoint import sha256_file

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def find_eval(job: Job, checkpoint: str, settings: dict[str, Any]) -> Optional[Path]:
    """A finished evaluation of this run's checkpoint that covers `settings` (and is of the current file)."""
    ckpt = job.dir / f"{checkpoint}.pt"
    candidates = sorted((job.dir / "eval").glob(f"{checkpoint}-*/results.json")) if (job.dir / "eval").is_dir() else []
    digest = None
    for results in candidates:
        man = read_json(results.parent / "manifest.json")
        if not _covers(man, settings):
            continue
        digest = digest or _sha256(ckpt)
        if man.get("model_sha256") == digest:
            return results.parent
    return None


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
    return " ".join([*parts, f"--out {_eval_dir(job, plan.checkpoint, s)}"])


def _ood_path(job: Job, checkpoint: str, name: str) -> Path:
    return job.dir / "ood" / f"{checkpoint}-{name}.json"


# ---------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------


def _state(job: Job) -> str:
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
    waiting = [j for j in jobs if _state(j) == "unfinished"]
    if waiting and not resume:
        raise GKLError(f"{len(waiting)} run(s) are unfinished (e.g. {waiting[0].dir}); pass --resume to continue them")
    counts = Counts()
    root = plan.root
    if plan.smoke:
        _smoke_inputs(plan, root, device, console)
    else:
        check_inputs([j for j in jobs if _state(j) != "done"], plan)
    total = len(jobs)
    for number, job in enumerate(jobs, start=1):
        if console is not None:
            console.print(f"[bold]reproduce[/] {number}/{total}: {job.name} → {job.dir}")
        if job.kind == "teacher":
            if _state(job) != "done":
                _teacher(job, plan, device)
                counts.teachers += 1
            continue
        if _state(job) == "done":
            counts.reused += 1
        else:
            _train(job, plan, device=device, console=console, quiet=quiet)
            counts.trained += 1
        counts.evaluated += _evaluate_job(job, plan, device=device, console=console)
    return counts


def check_inputs(jobs: list[Job], plan: Plan) -> None:
    """Refuse before the first of many days of training if a later run's files are missing."""
    from gklcli.train.kd import resolve_teacher_path

    for job in jobs:
        r = job.recipe
        generated = r.data.generated
        if generated.required and not (generated.path and Path(generated.path).is_file()):
            raise GKLError(f"{r.meta.name}: trains on DM-AT generated images; put them at DATA_DIR/generated/"
                           f"{r.meta.name}.npz and pass --data-dir DATA_DIR (looked for {generated.path or 'no --data-dir'})")
        if r.kind == "kd" and (job.kind == "teacher" or r.loss.name != "ce"):
            try:
                resolve_teacher_path(r.teacher.checkpoint, plan.data_dir)
            except GKLError as err:
                raise GKLError(f"{r.meta.name}: {err}") from None


def _train(job: Job, plan: Plan, *, device: Optional[str], console: Any, quiet: bool) -> None:
    from gklcli.train.at import train_at
    from gklcli.train.kd import train_distill

    run = train_at if job.kind == "at" else train_distill
    run(job.recipe, out_dir=job.dir, data_dir=plan.data_dir, resume=(job.dir / "last.pt").is_file(), quiet=quiet,
        device=device, console=console)


def _teacher(job: Job, plan: Plan, device: Optional[str]) -> None:
    from gklcli.train.kd import teacher_report

    report = teacher_report(job.recipe, data_dir=plan.data_dir, device=device)
    job.dir.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.dir, json.dumps(report, indent=2) + "\n")


def _evaluate_job(job: Job, plan: Plan, *, device: Optional[str], console: Any) -> int:
    """Run the evaluations this run still lacks; returns how many ran."""
    from gklcli.evaluate import run_cli_evaluation

    ran = 0
    if job.kind == "at" and job.needs.adversarial:
        settings = eval_settings(job, plan.smoke)
        if find_eval(job, plan.checkpoint, settings) is None:
            run_cli_evaluation(
                ckpt=str(job.dir / f"{plan.checkpoint}.pt"), arch=None, num_classes=None, dataset=None,
                data_dir=plan.data_dir, n_ex=settings["n_ex"], batch_size=settings["batch_size"], eps=settings["eps"],
                norm="Linf", version=settings["version"], attacks=settings["attacks"], seed=settings["seed"],
                chunk_size=settings["chunk_size"], shard=None, out_dir=str(_eval_dir(job, plan.checkpoint, settings)),
                resume=True, overwrite=False, eps_list=settings["eps_list"], pgd=settings["pgd"], cw=settings["cw"],
                individual=settings["individual"], robustbench_model=None, model_dir="models", guards=True,
                device=device, console=console)
            ran += 1
    for name in sorted(job.needs.ood):
        path = _ood_path(job, plan.checkpoint, name)
        if not path.is_file():
            _evaluate_ood(job, plan, name, path, device)
            ran += 1
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
    """What toy-scale runs read: a generated-data file, ImageNet-variant folders, a trained teacher."""
    import numpy as np

    from gklcli.data import make_synthetic

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "generated.npz").is_file():
        gen = make_synthetic(256, SMOKE_CLASSES, SMOKE_SIZE, 0, "generated")
        tmp = data / "generated.tmp.npz"
        np.savez(tmp, image=gen.images, label=gen.labels)
        tmp.replace(data / "generated.npz")
    if any(j.needs.ood for j in plan.train_jobs()):
        from PIL import Image

        for name, seed in (("imagenet-r", 1), ("imagenet-sketch", 2)):
            if (data / name).is_dir():
                continue
            shifted = make_synthetic(SMOKE_TEST, SMOKE_CLASSES, SMOKE_SIZE, 0, f"ood{seed}")
            staging = data / f"{name}.tmp"
            for i, (img, label) in enumerate(zip(shifted.images, shifted.labels)):
                folder = staging / smoke_wnid(int(label))
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(img)).save(folder / f"{i:04d}.png")
            staging.replace(data / name)
    kd = [j for j in plan.jobs.values() if j.recipe.kind == "kd"]
    if kd and not (root / "teacher" / "results.json").is_file():
        from gklcli.train.kd import train_distill

        teacher = _resolve(kd[0].spec, [*smoke_overrides(kd[0].recipe, root), "loss.name=ce", "loss.ce_weight=1.0",
                                         "train.seed=0", "schedule.epochs=3", "meta.name=smoke-teacher"])
        train_distill(teacher, out_dir=root / "teacher", resume=(root / "teacher" / "last.pt").is_file(), quiet=True,
                      device=device, console=console)


# ---------------------------------------------------------------------------------------------------
# Collecting numbers
# ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    return read_json(path) if path.is_file() else None


def _train_metric(job: Job, metric: str, checkpoint: str) -> Optional[float]:
    if metric == "s_iter":
        log = job.dir / "metrics.jsonl"
        if not (job.dir / "results.json").is_file() or not log.is_file():
            return None
        values = [record.get("s_iter") for record in read_jsonl(log)]
        values = [v for v in values if isinstance(v, (int, float))]
        return statistics.fmean(values) if values else None
    results = _read_json(job.dir / "results.json") or {}
    base, _, qualifier = metric.partition("@")
    if qualifier == "best":  # the epoch with the best test top-1 (eval.test_every_epochs; mdistiller's protocol)
        value = (results.get("test_best") or {}).get(f"test_{base}")
    else:  # the final evaluation of the `--checkpoint` weights (last: the last epoch, = results' top1_last)
        value = (results.get(checkpoint) or {}).get(f"test_{metric}")
    return float(value) if isinstance(value, (int, float)) else None


def _eval_metric(job: Job, metric: str, plan: Plan, worst_of: tuple[str, ...]) -> Optional[float]:
    import torch

    from gklcli.evaluate import format_eps

    if not (job.dir / f"{plan.checkpoint}.pt").is_file():
        return None
    found = find_eval(job, plan.checkpoint, eval_settings(job, plan.smoke))
    if found is None:
        return None
    r = read_json(found / "results.json")
    if metric == "clean":
        return r["clean_acc"]
    if metric == "aa":
        return r["robust_acc"]
    if metric.startswith("aa@"):
        wanted = format_eps(metric_eps(metric))
        return next((e["robust_acc"] for e in r["eps_sweep"] if e["eps"] == wanted), None)
    if metric in r["other_attacks"]:
        return r["other_attacks"][metric]
    if metric in r["individual"]:
        return r["individual"][metric]
    if metric == "worst":  # AutoAttack and the row's PGD/CW attacks, per example
        flags = torch.load(found / "flags.pt", weights_only=True)
        robust = flags["robust"].clone()
        for attack in worst_of:
            robust &= flags[f"extra/{attack}"]
        return 100.0 * float(robust.float().mean())
    return None


def metric_value(job: Job, metric: str, plan: Plan, worst_of: tuple[str, ...] = ()) -> Optional[float]:
    """One number of one job, or None while it is not made yet."""
    parts = metric_parts(metric)
    if len(parts) > 1:
        values = [metric_value(job, m, plan) for m in parts]
        return statistics.fmean(values) if all(v is not None for v in values) else None
    if metric == "teacher_top1":
        report = _read_json(job.dir)
        return (report or {}).get("test_top1")
    if metric.startswith("ood:"):
        report = _read_json(_ood_path(job, plan.checkpoint, metric[4:]))
        return (report or {}).get("top1")
    if job.kind == "kd":
        return _train_metric(job, metric, plan.checkpoint)
    return _eval_metric(job, metric, plan, worst_of)


def cell_numbers(cell: CellPlan, plan: Plan) -> dict[str, Any]:
    """paper, per-seed values, mean ± sample std over the finished ones, and Δ = ours − paper."""
    values = [metric_value(j, cell.metric, plan, cell.worst_of) for j in cell.jobs] if cell.metric else []
    done = [v for v in values if v is not None]
    mean = statistics.fmean(done) if done else None
    std = statistics.stdev(done) if len(done) > 1 else (0.0 if done else None)
    delta = mean - cell.paper if mean is not None and cell.paper is not None else None
    numbers = {"column": cell.column, "paper": cell.paper, "metric": cell.metric, "values": values, "mean": mean, "std": std,
               "n": len(done), "delta": delta, "runs": [str(j.dir) for j in cell.jobs]}
    if cell.metric and is_best_metric(cell.metric):  # the last epoch's values beside the best-over-epochs ones
        last = [_train_metric(j, cell.metric.partition("@")[0], "last") for j in cell.jobs]
        finished = [v for v in last if v is not None]
        numbers |= {"last_values": last, "last_mean": statistics.fmean(finished) if finished else None}
    return numbers


# ---------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------


def _fmt(value: float, metric: Optional[str]) -> str:
    return f"{value:.3f}" if metric == "s_iter" else f"{value:.2f}"


def cell_text(numbers: dict[str, Any], cited: bool) -> str:
    """`paper → ours ± std (Δ)`; cited cells show the paper's number only."""
    paper, metric = numbers["paper"], numbers["metric"]
    shown = _fmt(paper, metric) if paper is not None else "—"
    if cited or not numbers["runs"]:
        return f"{shown} (cited)" if cited and paper is not None else shown
    if numbers["mean"] is None:
        return f"{shown} → …"
    ours = _fmt(numbers["mean"], metric)
    if numbers["n"] > 1:
        ours += f" ± {_fmt(numbers['std'], metric)}"
    if numbers["n"] < len(numbers["runs"]):
        ours += f" ({numbers['n']}/{len(numbers['runs'])} seeds)"
    if numbers["delta"] is not None:
        ours += f" ({numbers['delta']:+.2f})" if metric != "s_iter" else f" ({numbers['delta']:+.3f})"
    return f"{shown} → **{ours}**"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_report(tp: TablePlan, plan: Plan, figures: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The markdown section and JSON record of one table."""
    t = tp.table
    smoke = " — SMOKE (toy-scale pipeline check: synthetic data, tiny model; not comparable to the paper)" if plan.smoke else ""
    lines = [f"## {t.name}: {t.title}{smoke}", ""]
    if t.status == "unsupported":
        lines += [f"**Not reproducible with gkl:** {t.reason}", ""]
    header = t.columns
    lines += ["| " + " | ".join(_escape(c) for c in header) + " |", "|" + "---|" * len(header)]
    by_row: dict[int, list[CellPlan]] = {}
    for cell in tp.cells:
        by_row.setdefault(cell.row.index, []).append(cell)
    rows_json = []
    for row in tp.rows:
        numbers = {c.column: cell_numbers(c, plan) for c in by_row.get(row.index, [])}
        if row.section:
            lines.append(f"| *{_escape(row.section)}* |" + " |" * (len(header) - 1))
        cells = [_escape(row.labels[c]) if c in row.labels else cell_text(numbers[c], row.cited) for c in header]
        lines.append("| " + " | ".join(cells) + " |")
        rows_json.append({"index": row.index, "labels": row.labels, "section": row.section, "cited": row.cited,
                          "note": row.note, "cells": list(numbers.values())})
    lines += ["", "Each cell: paper → **ours** (mean ± std over seeds) (Δ = ours − paper); “…” not run yet; "
              "“(cited)” numbers of other methods, taken from the paper."]
    best = sorted({c.metric.partition("@")[0] for c in tp.cells if c.metric and is_best_metric(c.metric)})
    if best:  # the paper's protocol for mdistiller-based tables: say so under the table
        lines += ["", f"{', '.join(best).replace('top1', 'top-1')}: best test accuracy over epochs, mdistiller's protocol "
                  "(the paper's); it selects on the test set, so the last-epoch values are in the JSON (`last_values`)."]
    notes = [f"- row {row.index} ({_escape(row.label)}): {row.note}" for row in tp.rows if row.note]
    if notes:
        lines += ["", *notes]
    for fig in figures:
        lines += ["", f"![{fig['caption']}]({fig['path']})" if fig.get("path") else f"- figure skipped ({fig['caption']}): {fig['reason']}"]
    lines.append("")
    record = {"table": t.name, "paper": t.paper, "title": t.title, "status": t.status, "reason": t.reason,
              "columns": t.columns, "numeric_columns": t.numeric, "rows": rows_json, "figures": figures,
              "best_over_epochs": best}
    return "\n".join(lines), record


def write_report(name: str, plan: Plan, figures: dict[str, list[dict[str, Any]]], counts: "Counts") -> tuple[Path, dict[str, Any]]:
    """DIR/<name>.md and .json (under DIR/smoke/ for smoke runs)."""
    root = plan.root
    sections, records = [], []
    for tp in plan.tables:
        text, record = table_report(tp, plan, figures.get(tp.table.name, []))
        sections.append(text)
        records.append(record)
    meta = {"name": name, "smoke": plan.smoke, "seeds": plan.seeds, "checkpoint": plan.checkpoint,
            "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "out": str(root), "counts": counts.__dict__}
    which = ("the final weights (the averaged model when the recipe averages; the paper's protocol)"
             if plan.checkpoint == "last" else "the best-on-validation checkpoint")
    title = f"# gkl reproduce {name}" + (" — SMOKE TEST, toy scale" if plan.smoke else "")
    head = [title, "", f"{plan.seeds} seed(s) per run; numbers of {which}; made {meta['generated']}.", ""]
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.md"
    atomic_write_text(path, "\n".join(head + sections))
    record = meta | {"tables": records}
    atomic_write_text(root / f"{name}.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path, record


def make_figures(plan: Plan, device: Optional[str]) -> dict[str, list[dict[str, Any]]]:
    """The paper's figures for tables that have one, from the first seed's checkpoints, when finished."""
    from gklcli.analyze import AnalysisUnavailable, figure_for

    out: dict[str, list[dict[str, Any]]] = {}
    root = plan.root
    for tp in plan.tables:
        for i, fig in enumerate(tp.table.figures):
            ckpts = []
            for label in fig.rows:
                cell = next((c for c in tp.cells if c.column == fig.column and c.jobs and label in c.row.label), None)
                path = cell.jobs[0].dir / f"{plan.checkpoint}.pt" if cell else None
                ckpts.append(path if path is not None and path.is_file() else None)
            record = {"kind": fig.kind, "caption": fig.caption, "rows": fig.rows}
            if not ckpts or any(c is None for c in ckpts):
                out.setdefault(tp.table.name, []).append(record | {"reason": "its runs are not finished"})
                continue
            png = root / "figures" / f"{tp.table.name}-{i + 1}-{fig.kind}.png"
            try:
                figure_for(fig.kind, [str(c) for c in ckpts], png, data_dir=plan.data_dir, device=device)
            except AnalysisUnavailable as err:
                out.setdefault(tp.table.name, []).append(record | {"reason": str(err)})
                continue
            out.setdefault(tp.table.name, []).append(record | {"path": os.path.relpath(png, root)})
    return out


# ---------------------------------------------------------------------------------------------------
# Estimates for --list and --dry-run
# ---------------------------------------------------------------------------------------------------

# Sustained FLOP/s of one RTX 3090-class GPU, calibrated on the paper's TABLE V: a KD step
# ResNet34 → ResNet18 (teacher forward 7.3 GFLOP + student forward/backward 3 × 3.6 GFLOP per
# 224² image) on 512 images takes 0.197 s on 4 GPUs → ≈ 12 TFLOP/s per GPU.
GPU_FLOPS = 12e12
AA_PASSES = 3000  # forward-equivalents per image of standard AutoAttack (APGD-CE/T, FAB-T, Square), rough


def _forward_flops(arch: str, num_classes: int, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gklcli.models import create_model

    with torch.device("meta"):
        model = create_model(arch, num_classes=num_classes)
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


_FLOPS_CACHE: dict[tuple[str, int, int], float] = {}


def forward_flops(arch: str, num_classes: int, size: int) -> float:
    key = (arch, num_classes, size)
    if key not in _FLOPS_CACHE:
        _FLOPS_CACHE[key] = _forward_flops(*key)
    return _FLOPS_CACHE[key]


def estimate_gpu_hours(job: Job) -> float:
    """Order-of-magnitude GPU-hours of a job from its recipe (FLOPs counted on the meta device)."""
    from gklcli.data import CIFAR_SIZES, DIGITS_SIZES, KNOWN_TRAIN_SIZES
    from gklcli.train.plan import at_segments

    r = job.recipe
    d = r.data
    classes = r.model.num_classes or (CIFAR_SIZES[d.dataset][2] if d.dataset in CIFAR_SIZES else
                                      d.synthetic.num_classes if d.dataset == "synthetic" else
                                      DIGITS_SIZES[2] if d.dataset == "digits" else 1000)
    size = (32 if d.dataset in CIFAR_SIZES else d.synthetic.image_size if d.dataset == "synthetic" else
            d.digits.image_size if d.dataset == "digits" else d.image_size)
    n_test = {"cifar10": 10000, "cifar100": 10000, "imagenet": 50000, "imagenet-lt": 50000,
              "digits": DIGITS_SIZES[1]}.get(d.dataset, d.synthetic.num_test)
    if job.kind == "teacher":
        return forward_flops(r.teacher.arch, classes, size) * n_test / GPU_FLOPS / 3600
    fwd = forward_flops(r.model.arch, classes, size)
    n = (CIFAR_SIZES[d.dataset][0] if d.dataset in CIFAR_SIZES else DIGITS_SIZES[0] if d.dataset == "digits" else
         KNOWN_TRAIN_SIZES.get(d.dataset, d.synthetic.num_train))
    n -= d.val_size if d.dataset != "imagenet-lt" else 0
    if d.generated.path or d.generated.required:  # images per epoch: the training sampler's batches (DM-AT's rule)
        from gklcli.data import make_batch_sampler

        n = make_batch_sampler(d, n, 1, seed=0).batches_per_epoch() * d.batch_size
    epochs = r.schedule.epochs
    if r.train.max_steps_per_epoch:
        n = min(n, r.train.max_steps_per_epoch * d.batch_size)
    if r.kind == "kd":
        teacher = forward_flops(r.teacher.arch, classes, size) if r.loss.name != "ce" else 0.0
        total = epochs * n * (teacher + 3 * fwd)
    else:
        views = 2 if d.augment == "autoaug" else 1
        total = 0.0
        for seg in at_segments(r):
            span = seg["last"] - seg["first"] + 1
            per_image = 3 * seg["plan_first"].steps + 6 + (6 if seg["awp"] else 0)  # attack, outer (adv+clean), AWP proxy
            total += span * n * views * per_image * fwd
        if job.needs.adversarial:
            extra = sum(job.needs.pgd) * 3 + sum(job.needs.cw) * 3
            total += r.eval.aa_n_ex * fwd * (AA_PASSES * (1 + len(job.needs.eps)) + extra)
    return total / GPU_FLOPS / 3600



# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def plan_for(name: str, *, rows: Optional[str], seeds: int, out: Path, smoke: bool, checkpoint: str,
             data_dir: Optional[str]) -> Plan:
    """Load `name` (with the tables it includes), check its recipes, resolve its runs."""
    from gklcli.tables import expand, load_table, validate_table

    if checkpoint not in ("last", "best"):
        raise GKLError(f"--checkpoint {checkpoint}: use last (the final weights) or best (best on validation)")
    tables = expand(load_table(name))
    for table in tables:
        validate_table(table)
    plan = build_plan(tables, rows=rows, seeds=seeds, out=out, smoke=smoke, checkpoint=checkpoint, data_dir=data_dir)
    plan.name = name
    return plan


def list_tables(seeds: int = 1) -> list[dict[str, Any]]:
    """Every registry table: status, rows, distinct runs and estimated GPU-hours (for `--list`)."""
    from gklcli.tables import load_table, table_names

    listing = []
    for name in table_names():
        table = load_table(name)
        plan = plan_for(name, rows=None, seeds=seeds, out=Path("reproduce"), smoke=False, checkpoint="last", data_dir=None)
        rows = [row for tp in plan.tables for row in tp.rows]
        listing.append({
            "table": name, "paper": table.paper, "title": table.title, "status": table.status, "reason": table.reason,
            "includes": table.includes, "rows": len(rows), "runnable_rows": sum(r.runnable for r in rows),
            "cited_rows": sum(r.cited for r in rows), "runs": len(plan.train_jobs()), "teacher_reports": len(plan.teacher_jobs()),
            "gpu_hours": sum(estimate_gpu_hours(j) for j in plan.jobs.values()),
        })
    return listing


def print_list(listing: list[dict[str, Any]], console: Any, seeds: int) -> None:
    from rich.table import Table as RichTable

    table = RichTable(title=f"gkl reproduce: the paper's tables ({seeds} seed(s) per run; GPU-hours on an RTX 3090-class GPU, rough)",
                      header_style="bold")
    for column in ("table", "status", "rows (run/cited)", "runs", "GPU-h", "title"):
        table.add_column(column, overflow="fold", no_wrap=column != "title")
    for t in listing:
        status = t["status"] if not t["includes"] else "→ " + ", ".join(t["includes"])
        title = t["title"] if t["status"] == "runnable" else f"{t['title']} [dim]({t['reason']})[/]"
        table.add_row(t["table"], status, f"{t['rows']} ({t['runnable_rows']}/{t['cited_rows']})",
                      str(t["runs"] + t["teacher_reports"]), f"{t['gpu_hours']:,.0f}" if t["runs"] else "-", title)
    console.print(table)


def _recipe_summary(r: Recipe) -> str:
    """The resolved settings that tell runs apart, on one line."""
    loss = r.loss
    parts = [f"{r.model.arch} on {r.data.dataset}", f"{r.schedule.epochs} ep × batch {r.data.batch_size}", f"lr {r.optim.lr:g}",
             f"loss {loss.name} α={loss.alpha:g} β={loss.beta:g} γ={loss.gamma:g} τ={loss.prior_temperature:g} "
             f"T={loss.temperature:g} {loss.weights}-wise", f"seed {r.train.seed}"]
    if r.kind == "kd":
        parts.insert(1, f"teacher {r.teacher.arch}")
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
        console.print(f"  {escape(f'[{_state(job)}]')} {job.key} {escape(job.name)} ≈ {estimate_gpu_hours(job):,.1f} GPU-h")
        console.print(f"      {escape(_recipe_summary(job.recipe))}")
        console.print(f"      $ {escape(job.command())}")
        if job.kind == "at" and job.needs.adversarial:
            console.print(f"      $ {escape(eval_command(job, plan))}")


def reproduce(name: str, *, rows: Optional[str], seeds: int, out: Path, data_dir: Optional[str], smoke: bool, resume: bool,
              report_only: bool, checkpoint: str, shard: tuple[int, int], device: Optional[str], quiet: bool,
              console: Any) -> dict[str, Any]:
    """Run (or reuse) every job of the table, then write its report; returns the report record."""
    plan = plan_for(name, rows=rows, seeds=seeds, out=out, smoke=smoke, checkpoint=checkpoint, data_dir=data_dir)
    counts = Counts()
    if not report_only:
        counts = execute(plan, resume=resume, device=device, console=console, quiet=quiet, shard=shard)
    figures = make_figures(plan, device) if shard == (0, 1) else {}
    path, record = write_report(name, plan, figures, counts)
    if console is not None:
        from rich.markdown import Markdown

        console.print(Markdown(path.read_text()))
        console.print(counts.line())
        console.print(f"report: {path} (+ {path.with_suffix('.json').name})")
    return record
