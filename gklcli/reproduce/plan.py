"""The plan of `gkl reproduce`: content-addressed run keys, the jobs a table needs, and where their
evaluations are found (shared by execution and the reports)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gklcli.errors import GKLError
from gklcli.recipes import RESULT_NEUTRAL, Recipe, load_recipe, order_settings, resolve_recipe_path
from gklcli.train import TRAIN_VERBS
from gklcli.tables import Row, RunSpec, Table, metric_parts, select_rows
from gklcli.checkpoint import read_json


SMOKE_CLASSES = 10  # APGD-T needs ≥ 10 classes (9 target classes)
SMOKE_SIZE = 8
SMOKE_TEST = 32


# ---------------------------------------------------------------------------------------------------
# Content addresses
# ---------------------------------------------------------------------------------------------------


def digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:n]


def run_key(recipe: Recipe) -> str:
    """Hash of the resolved recipe (seed included) without the settings that cannot change its numbers.
    File paths count by their file name only, so moving the data or the output does not orphan runs."""
    tree = recipe.to_dict()
    kept = order_settings(tree)
    for dotted in (d for d in RESULT_NEUTRAL if d not in kept):  # settings that cannot change a run's numbers: where files are, logging, workers
        *parents, last = dotted.rstrip(".").split(".")
        node = tree
        for part in parents:
            node = node[part]
        node.pop(last, None)
    for section, key in (("teacher", "checkpoint"), ("data", "path"), ("data", "test_path")):
        if tree[section].get(key):
            tree[section][key] = Path(tree[section][key]).name
    if tree["data"]["generated"]["path"]:
        tree["data"]["generated"]["path"] = Path(tree["data"]["generated"]["path"]).name
    return digest(tree)


def teacher_key(recipe: Recipe) -> str:
    """A teacher report depends on the teacher and the evaluation data only."""
    data = {k: v for k, v in recipe.to_dict()["data"].items() if k in ("dataset", "path", "test_path", "lt_val_list",
                                                                     "lt_test_list", "image_size", "val_size", "synthetic", "digits")}
    return digest({"teacher": recipe.to_dict()["teacher"], "data": data, "num_classes": recipe.model.num_classes})


# ---------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------


def metric_eps(metric: str) -> float:
    """ε of an `aa@E` metric (E such as 4/255)."""
    from gklcli.recipes import parse_number

    eps = parse_number(metric[3:])
    if eps is None:
        raise GKLError(f"{metric}: expected a number (such as 0.5 or 8/255) after 'aa@', got {metric[3:]!r}")
    return eps


@dataclass
class EvalNeeds:
    """What the evaluations of one AT run must include, the union over every cell that uses it."""

    pgd: set[int] = field(default_factory=set)
    cw: set[int] = field(default_factory=set)
    eps: set[float] = field(default_factory=set)
    individual: bool = False
    ood: set[str] = field(default_factory=set)
    zeroshot: set[str] = field(default_factory=set)  # CLIP runs: the zero-shot sets their cells read
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
            elif m.startswith(("zeroshot:", "teacher_zeroshot:")):
                self.zeroshot.add(m.partition(":")[2])
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
        verb = TRAIN_VERBS.get(self.kind, "distill")
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


def clip_smoke_overrides(root: Path) -> list[str]:
    """Toy CLIP scale: OpenCLIP's smallest shapes (gkl-tiny-clip) on generated image–caption shards."""
    return [
        f"data.pairs={root / 'data' / 'pairs'}", "data.val_pairs=null", "data.samples_per_epoch=48", "data.batch_size=16",
        "data.shuffle_buffer=32", "data.num_workers=0", "data.eval_batch_size=32", "model.arch=open_clip:gkl-tiny-clip",
        "teacher.arch=open_clip:gkl-tiny-clip-teacher", f"teacher.checkpoint={root / 'clip-teacher' / 'last.pt'}",
        "schedule.epochs=2", "schedule.warmup_steps=2", "train.max_steps_per_epoch=3", "train.amp=none", "train.compile=false",
        "train.save_every_steps=0", "optim.lr=0.001", "output.tensorboard=false", "output.plots=false",
    ]


def smoke_overrides(recipe: Recipe, root: Path) -> list[str]:
    """Toy scale for `--smoke`: synthetic 8×8 data, resnet8, two epochs of three steps."""
    if recipe.kind == "clip-kd":
        return clip_smoke_overrides(root)
    if recipe.kind == "semi":
        from gklcli.train.semi import smoke_overrides as semi_smoke_overrides

        return semi_smoke_overrides(SMOKE_SIZE, SMOKE_CLASSES, SMOKE_TEST)
    if recipe.kind == "seg-kd":
        from gklcli.train.seg import smoke_overrides as seg_smoke_overrides

        return seg_smoke_overrides(root)
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
    else:  # (resnet8 reads neither drop path nor initial weights: a strong-scheme row's are reset)
        sets += ["teacher.arch=resnet8", f"teacher.checkpoint={root / 'teacher' / 'last.pt'}", "model.drop_path=0.0",
                 "model.pretrained=null"]
        if recipe.data.dataset == "imagenet-lt":  # a long tail with Many (>100), Medium and Few (<20) classes
            sets += ["data.synthetic.num_train=400", "data.synthetic.imbalance=20"]
    return sets


def is_teacher_metric(metric: str) -> bool:
    """A number of the (pretrained, frozen) teacher rather than of a trained run."""
    return metric in ("teacher_top1", "teacher_miou") or metric.startswith("teacher_zeroshot:")


def resolve_spec(spec: RunSpec, extra: list[str]) -> Recipe:
    return load_recipe(resolve_recipe_path(spec.recipe), [*spec.overrides, *extra])


def _teacherless(spec: RunSpec, metric: str) -> bool:
    """A teacher's number asked of a row without a teacher (TABLE XXIII's baseline): the cell stays empty."""
    from gklcli.losses import get_loss, loss_kind

    if not is_teacher_metric(metric):
        return False
    recipe = resolve_spec(spec, [])
    return not get_loss(recipe.loss.name, loss_kind(recipe.kind)).needs_teacher


def _job_for(spec: RunSpec, metric: str, seed_offset: int, plan: Plan, cache: dict[tuple, Job]) -> Job:
    """The (shared) job that produces `metric` for `spec` at one seed."""
    cache_key = (spec, seed_offset, is_teacher_metric(metric))
    if cache_key in cache:
        return cache[cache_key]
    root = plan.root
    base = resolve_spec(spec, [])
    extra = smoke_overrides(base, root) if plan.smoke else []
    if not plan.smoke and base.data.generated.required and not base.data.generated.path and plan.data_dir:
        extra.append(f"data.generated.path={Path(plan.data_dir) / 'generated' / (base.meta.name + '.npz')}")
    if is_teacher_metric(metric):
        recipe = resolve_spec(spec, extra)
        key = teacher_key(recipe)
        arch = str(recipe.teacher.arch).replace(":", "-")  # open_clip:ViT-L-14 → a plain file name
        job = Job("teacher", key, recipe, spec, extra, root / "teachers" / f"{arch}-{key}.json")
    else:
        seed = base.train.seed + seed_offset
        extra = [*extra, f"train.seed={seed}"]
        recipe = resolve_spec(spec, extra)
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
                if cell.run is not None and cell.metric is not None and not _teacherless(cell.run, cell.metric):
                    offsets = [0] if is_teacher_metric(cell.metric) else range(seeds)
                    jobs = [_job_for(cell.run, cell.metric, k, plan, cache) for k in offsets]
                    for job in jobs:
                        job.needs.add(cell.metric)
                worst = row_attacks if cell.metric == "worst" else ()
                cells.append(CellPlan(row, cell.column, cell.paper, cell.metric, jobs, worst))
        plan.tables.append(TablePlan(table, chosen, cells))
    return plan


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
    file_digest = None
    for results in candidates:
        man = read_json(results.parent / "manifest.json")
        if not _covers(man, settings):
            continue
        file_digest = file_digest or _sha256(ckpt)
        if man.get("model_sha256") == file_digest:
            return results.parent
    return None


def ood_path(job: Job, checkpoint: str, name: str) -> Path:
    return job.dir / "ood" / f"{checkpoint}-{name}.json"


def zeroshot_path(job: Job, checkpoint: str, name: str) -> Path:
    """Where a CLIP run's zero-shot result on `name` lives (a teacher's are all in its report file)."""
    return job.dir / "zeroshot" / f"{checkpoint}-{name}.json"
