"""Robustness evaluation: AutoAttack (the official `pyautoattack`), PGD and CW, with guards,
resumable chunks, shards and merging.

The evaluation set is the first `n_ex` test images in canonical order (as RobustBench). It is cut
into chunks of `chunk_size` images (0: one chunk). Each chunk is one direct call of pyautoattack
(`AutoAttack(...).run_standard_evaluation`), so for `chunk_size = 0` the robust accuracy is exactly
the number pyautoattack gives when called on the same model, data, ε, version, seed and batch size.
(AutoAttack seeds its random starts per batch, so how points are grouped into batches, and hence
chunks, moves borderline points; results record the chunk size, and shards + merge reproduce a
one-process run with the same chunk size exactly.)

Each finished chunk is written atomically with per-example flags (clean, robust per ε, per extra
attack). `--resume` skips finished chunks; `--shard i/n` takes every n-th chunk; `merge` combines
the chunk files of any number of directories into the final results.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from gklcli import __version__
from gklcli.attacks import ce_attack_loss, cw_margin_loss, pgd_linf
from gklcli.errors import GKLError, show
from gklcli.loading import LoadedModel
from gklcli.checkpoint import LOCK_NAME, RunLock, atomic_save, atomic_write_text, load_file, read_json, remove_stale_temps
from gklcli.distributed import device_name, pick_device
from gklcli.aalog import EvalProgress, StageCounter

EVAL_FILES = ("manifest.json", "results.json", "results.md", "flags.pt")
AA_ATTACKS = ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square")  # what pyautoattack's custom version runs
MANIFEST_KEYS = ("model_sha256", "dataset", "n_ex", "eps", "norm", "version", "attacks", "seed", "batch_size",
                 "chunk_size", "eps_list", "pgd", "cw", "individual", "guards")


def format_eps(eps: float) -> str:
    """8/255 style when ε is a whole number of 1/255 steps, else the decimal."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


@dataclass
class EvalConfig:
    """Everything that determines the numbers (the manifest) plus how to run.

    `dataset` and `n_ex` are what was asked (None: the checkpoint's dataset); `evaluate_checkpoint`
    records the dataset found and the images there really are."""

    dataset: Optional[str] = None
    n_ex: int = 10000
    batch_size: int = 500
    eps: float = 8 / 255
    norm: str = "Linf"
    version: str = "standard"
    attacks: Optional[list[str]] = None  # version custom
    seed: int = 0
    chunk_size: int = 0  # 0: the whole evaluation set in one pyautoattack call
    eps_list: list[float] = field(default_factory=list)  # extra AutoAttack runs (Table XIV)
    pgd: list[int] = field(default_factory=list)  # PGD-k, CE, ε, step 2/255, uniform start (Table XV)
    cw: list[int] = field(default_factory=list)  # CW-k: PGD on the CW margin loss
    step_size: float = 2 / 255
    individual: bool = False  # per-attack robust accuracy, each attack on all points
    guards: bool = True
    data_dir: Optional[str] = None  # where datasets live (not part of the numbers)

    def check(self) -> "EvalConfig":
        """Refuse settings pyautoattack would fail on, or later reject, in one line each."""
        if self.norm not in ("Linf", "L2"):
            raise GKLError(f"--norm {self.norm}: use Linf or L2")
        if self.version not in ("standard", "plus", "rand", "custom"):
            raise GKLError(f"--version {self.version}: use standard, plus, rand or custom")
        if (self.version == "custom") != bool(self.attacks):
            raise GKLError("--attacks goes with --version custom (and custom needs --attacks)")
        unknown = [a for a in self.attacks or [] if a not in AA_ATTACKS]
        if unknown:
            raise GKLError(f"--attacks {show(','.join(self.attacks or []))}: unknown attack {show(unknown[0])}; use {', '.join(AA_ATTACKS)}")
        if (self.pgd or self.cw) and self.norm != "Linf":
            raise GKLError("--pgd/--cw are L∞ attacks; use them with --norm Linf")
        return self


@dataclass
class ModelRef:
    """What to evaluate: a checkpoint file (`arch`/`num_classes` for plain state dicts) or, with
    `robustbench`, a RobustBench leaderboard model from `model_dir`."""

    path: Optional[str] = None
    arch: Optional[str] = None
    num_classes: Optional[int] = None
    robustbench: Optional[str] = None
    model_dir: str = "models"
    zoo_dataset: Optional[str] = None  # the zoo of a RobustBench model (default: the evaluation dataset)

    def load(self, cfg: EvalConfig, device: torch.device) -> tuple[LoadedModel, str, Optional[str]]:
        """The model in eval mode, the default name of its evaluation folder, and the dataset to use."""
        from gklcli.loading import load_model_file, load_robustbench_zoo_model

        if (self.path is None) == (self.robustbench is None):
            raise GKLError("give a checkpoint file or --robustbench-model NAME (one of them)")
        if self.robustbench:
            zoo = self.zoo_dataset or cfg.dataset
            if zoo not in ("cifar10", "cifar100", "imagenet"):
                raise GKLError("--robustbench-model needs --zoo-dataset (or --dataset) cifar10, cifar100 or imagenet")
            loaded = load_robustbench_zoo_model(self.robustbench, self.model_dir, zoo, cfg.norm, device)
            return loaded, self.robustbench, cfg.dataset or zoo
        loaded = load_model_file(self.path, arch=self.arch, num_classes=self.num_classes, device=device)
        path = Path(self.path)
        name = path.parent.name + "-" + path.stem if loaded.source == "gkl" else path.stem
        return loaded, name, cfg.dataset


def manifest(cfg: EvalConfig, model_sha256: str) -> dict[str, Any]:
    m = {k: v for k, v in asdict(cfg).items() if k in MANIFEST_KEYS}
    m["model_sha256"] = model_sha256
    return {k: m[k] for k in MANIFEST_KEYS}


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def load_eval_data(spec: Optional[str], loaded: LoadedModel, data_dir: Optional[str], n_ex: int) -> tuple[Tensor, Tensor, str]:
    """The first `n_ex` test images (float [0,1], N×C×H×W) and labels, and the dataset's name."""
    from gklcli.data import CIFAR, load_test_set
    from gklcli.recipes import DataCfg, DigitsCfg, SyntheticCfg

    spec = spec or loaded.dataset
    if spec is None:
        raise GKLError("--dataset is needed: the checkpoint does not record its dataset (cifar10, cifar100 or npz:PATH)")
    if spec in CIFAR:
        data = DataCfg(dataset=spec, download=True)
    elif spec.startswith("npz:"):
        data = DataCfg(dataset="npz", test_path=spec[4:])
    elif spec == "synthetic":
        syn = (loaded.meta.get("recipe") or {}).get("data", {}).get("synthetic")
        if syn is None:
            raise GKLError("--dataset synthetic: only for gkl checkpoints trained on synthetic data (their recipe defines it)")
        data = DataCfg(dataset="synthetic", synthetic=SyntheticCfg(num_test=syn["num_test"], num_classes=syn["num_classes"],
                                                                   image_size=syn["image_size"], seed=syn["seed"]))
    elif spec == "digits":  # the fixed test split, at the image size the checkpoint was trained on
        recipe_digits = (loaded.meta.get("recipe") or {}).get("data", {}).get("digits") or {}
        size = recipe_digits.get("image_size") or loaded.meta.get("image_size") or DigitsCfg().image_size
        data = DataCfg(dataset="digits", digits=DigitsCfg(image_size=int(size)))
    else:
        raise GKLError(f"--dataset {spec}: use cifar10, cifar100, npz:PATH, synthetic or digits")
    source = load_test_set(data, data_dir, loaded.num_classes)
    if source is None or len(source) == 0:  # None: `npz:` without a path
        raise GKLError(f"--dataset {spec}: holds 0 test images")
    size = loaded.meta.get("image_size")
    if size and tuple(source.images.shape[1:3]) != (size, size):
        raise GKLError(f"--dataset {spec}: its images are {source.images.shape[1]}×{source.images.shape[2]}, "
                       f"but the model was trained on {size}×{size}")
    n = min(n_ex, len(source))
    images = torch.from_numpy(np.array(source.images[:n], copy=True)).permute(0, 3, 1, 2).float().div_(255.0)
    labels = torch.from_numpy(np.array(source.labels[:n], copy=True)).long()
    if len(labels) and int(labels.max()) >= loaded.num_classes:
        raise GKLError(f"{spec}: labels go up to {int(labels.max())} but the model has {loaded.num_classes} classes")
    return images.contiguous(), labels, spec


# ---------------------------------------------------------------------------------------------------
# Guards: refuse to report numbers that would not mean what they say.
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_guards(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, dataset: str, device: torch.device) -> dict[str, Any]:
    """Checks before any number: eval mode, class count, determinism, batch-size invariance, and that
    the model takes [0,1] inputs (normalisation inside). Raises GKLError naming the failed guard."""
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise GKLError(f"guard: the model stays in training mode after .eval() ({', '.join(training[:3])}); results would depend on the batch")
    n = min(len(x), 256)
    xb, yb = x[:n].to(device), y[:n].to(device)
    if xb.min() < 0 or xb.max() > 1:
        raise GKLError("guard: evaluation inputs must lie in [0, 1]")
    first = model(xb).float()
    if first.dim() != 2 or first.shape[1] != num_classes:
        raise GKLError(f"guard: the model returns shape {tuple(first.shape)}, the data has {num_classes} classes")
    second = model(xb).float()
    scale = 1.0 + float(first.abs().max())
    repeat_diff = float((first - second).abs().max())
    if repeat_diff > 1e-4 * scale:
        raise GKLError(f"guard: the forward pass is not deterministic (logits differ by {repeat_diff:.3g} between two identical calls)")
    half = max(1, n // 2)
    split = torch.cat([model(xb[:half]).float(), model(xb[half:]).float()]) if n > 1 else first
    batch_diff = float((first - split).abs().max())
    if batch_diff > 1e-3 * scale:
        raise GKLError(f"guard: logits depend on the batch (differ by {batch_diff:.3g} when the batch is split); is BatchNorm in train mode?")
    raw_acc = float((first.argmax(1) == yb).float().mean())
    from gklcli.datasets import DATASETS

    known = DATASETS[dataset].stats if dataset in DATASETS else None  # else the statistics of these images
    mean, std = known or (tuple(x[:n].mean((0, 2, 3)).tolist()), tuple(x[:n].std((0, 2, 3)).tolist()))
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    normalised_acc = float((model((xb - m) / s).argmax(1) == yb).float().mean())
    chance = 1.0 / num_classes
    if normalised_acc >= raw_acc + 0.2 and raw_acc < 2 * chance:
        raise GKLError(
            f"guard: the model seems to expect normalised inputs ({100 * raw_acc:.1f}% on [0,1] images vs "
            f"{100 * normalised_acc:.1f}% after normalising); put the normalisation inside the model"
        )
    return {"eval_mode": True, "repeat_max_diff": repeat_diff, "batch_split_max_diff": batch_diff,
            "acc_raw_inputs": 100 * raw_acc, "acc_normalised_inputs": 100 * normalised_acc, "num_classes": num_classes}


# ---------------------------------------------------------------------------------------------------
# Attacks on one chunk
# ---------------------------------------------------------------------------------------------------


def _autoattack(model: nn.Module, cfg: EvalConfig, eps: float, device: torch.device) -> Any:
    from pyautoattack import AutoAttack

    attacks = cfg.attacks if cfg.version == "custom" else None
    return AutoAttack(model, attacks=attacks, device=device, eps=eps, norm=cfg.norm, seed=cfg.seed, version=cfg.version)


def autoattack_flags(
    model: nn.Module, x: Tensor, y: Tensor, cfg: EvalConfig, eps: float, device: torch.device,
    on_stage: Optional[Callable[[str, bool], None]] = None,
) -> tuple[Tensor, dict[str, int], float]:
    """Robust flags of one direct pyautoattack call, the points each attack removed, max perturbation."""
    logger = logging.getLogger("auto-attack")
    counter = StageCounter(len(x), on_stage)
    level = logger.level
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    try:
        x_adv, y_adv = _autoattack(model, cfg, eps, device).run_standard_evaluation(x, y, batch_size=cfg.batch_size)
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
    size = perturbation_size(x_adv, x, cfg.norm)
    if size > eps + 1e-5:
        raise GKLError(f"AutoAttack returned a perturbation of {size:.6f} > ε = {eps:.6f}; refusing to report")
    flags = y_adv.cpu() == y.cpu()
    counter.verify(int(flags.sum()))
    return flags, {a: counter.removed[a] for a in counter.order}, size


def perturbation_size(x_adv: Tensor, x: Tensor, norm: str) -> float:
    """The largest per-image L∞ (or L2) perturbation; 0 for no images."""
    if not len(x):
        return 0.0
    delta = (x_adv - x).reshape(len(x), -1)
    return float(delta.abs().max()) if norm == "Linf" else float(delta.norm(dim=1).max())


def individual_flags(model: nn.Module, x: Tensor, y: Tensor, cfg: EvalConfig, device: torch.device) -> dict[str, Tensor]:
    """Each attack of the version run alone on all points (pyautoattack's individual evaluation)."""
    adversary = _autoattack(model, cfg, cfg.eps, device)
    results = adversary.run_standard_evaluation_individual(x, y, batch_size=cfg.batch_size)
    return {attack: (y_adv.cpu() == y.cpu()) for attack, (_, y_adv) in results.items()}


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    return torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def pgd_flags(model: nn.Module, x: Tensor, y: Tensor, loss: str, steps: int, cfg: EvalConfig, device: torch.device) -> Tensor:
    """Robust flags under PGD-`steps` (uniform start, step `cfg.step_size`) on CE or the CW loss."""
    loss_fn = ce_attack_loss if loss == "pgd" else cw_margin_loss
    flags = []
    for i in range(0, len(x), cfg.batch_size):
        xb, yb = x[i:i + cfg.batch_size].to(device), y[i:i + cfg.batch_size].to(device)
        x_adv = pgd_linf(model, xb, yb, loss_fn, eps=cfg.eps, step_size=cfg.step_size, steps=steps, init="uniform", mode="eval")
        with torch.no_grad():
            flags.append((model(x_adv).argmax(1) == yb).cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def evaluate_chunk(model: nn.Module, x: Tensor, y: Tensor, start: int, cfg: EvalConfig, device: torch.device,
                   progress: Optional[EvalProgress] = None) -> dict[str, Any]:
    """Every configured evaluation on one chunk; the payload of its chunk file."""
    tick = time.perf_counter()
    payload: dict[str, Any] = {"start": start, "end": start + len(x), "clean": predict(model, x, cfg.batch_size, device) == y}
    payload["aa"] = {}
    runs = [cfg.eps, *[e for e in cfg.eps_list if abs(e - cfg.eps) > 1e-12]]
    for eps in runs:
        where = f"images {start}–{start + len(x)}" + (f", ε {format_eps(eps)}" if len(runs) > 1 else "")
        on_stage = (lambda text, finished, where=where: progress.stage(f"{where}: {text}", finished)) if progress else None
        flags, removed, size = autoattack_flags(model, x, y, cfg, eps, device, on_stage)
        payload["aa"][format_eps(eps)] = {"robust": flags, "removed": removed, "max_perturbation": size}
    extra = {}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed * 1_000_003 + start)  # independent of sharding
        for kind, steps_list in (("pgd", cfg.pgd), ("cw", cfg.cw)):
            for steps in steps_list:
                extra[f"{kind}-{steps}"] = pgd_flags(model, x, y, kind, steps, cfg, device)
    payload["extra"] = extra
    payload["individual"] = individual_flags(model, x, y, cfg, device) if cfg.individual else {}
    payload["seconds"] = time.perf_counter() - tick
    return payload


# ---------------------------------------------------------------------------------------------------
# Chunks, shards, resume, merge
# ---------------------------------------------------------------------------------------------------


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    size = chunk_size or n
    return [(s, min(s + size, n)) for s in range(0, n, size)] if n else []


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    if not text:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not (0 <= int(match.group(1)) < int(match.group(2))):
        raise GKLError(f"--shard {text}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def chunk_path(out: Path, start: int, end: int) -> Path:
    return out / "chunks" / f"chunk_{start:07d}_{end:07d}.pt"


def check_manifest(out: Path, wanted: dict[str, Any], resume: bool, overwrite: bool, sharded: bool = False) -> None:
    """Create OUT/manifest.json, or check an existing one: resuming (or joining sibling shards in a
    shared directory) needs identical settings."""
    path = out / "manifest.json"
    if path.is_file():
        old = read_manifest(out) if not overwrite else {}
        if sharded and old == wanted and not overwrite:
            return
        if overwrite:
            for file in (out / "chunks").glob("chunk_*.pt"):
                file.unlink()
            for name in EVAL_FILES[1:]:
                (out / name).unlink(missing_ok=True)
        elif not resume:
            raise GKLError(f"{out}: holds an evaluation already; pass --resume to continue or reuse it, or --overwrite")
        elif old != wanted:
            diff = [k for k in MANIFEST_KEYS if old.get(k) != wanted.get(k)]
            raise GKLError(f"{out}: was started with different settings ({', '.join(diff)}); use another --out or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(wanted, indent=2) + "\n")


def read_manifest(folder: Path) -> dict[str, Any]:
    """FOLDER/manifest.json, with every key a resume or merge compares."""
    path = folder / "manifest.json"
    if not path.is_file():
        raise GKLError(f"{folder}: no manifest.json (not a gkl eval-aa directory)")
    try:
        man = read_json(path)
    except GKLError as error:
        raise GKLError(f"{error}; remove the folder's evaluation or pass --overwrite") from None
    missing = [k for k in MANIFEST_KEYS if k not in man] if isinstance(man, dict) else ["all keys"]
    if missing:
        raise GKLError(f"{path}: unreadable as a gkl manifest (missing {', '.join(missing[:4])}); remove it or pass --overwrite")
    return man


def _read_chunk(file: Path) -> dict[str, Any]:
    payload = load_file(file)
    if not isinstance(payload, dict) or not {"start", "end", "clean", "aa", "extra", "individual"} <= set(payload):
        raise GKLError(f"{file}: not a gkl eval-aa chunk (damaged?); delete it and rerun with --resume to redo those images")
    return payload


def merge(dirs: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Combine the chunk files of `dirs` (one evaluation, possibly sharded): (manifest, aggregate)."""
    manifests = [read_manifest(d) for d in dirs]
    for d, m in zip(dirs[1:], manifests[1:]):
        if m != manifests[0]:
            diff = [k for k in MANIFEST_KEYS if m.get(k) != manifests[0].get(k)]
            raise GKLError(f"{d}: a different evaluation than {dirs[0]} ({', '.join(diff)}); cannot merge")
    man = manifests[0]
    chunks: dict[tuple[int, int], dict[str, Any]] = {}
    for d in dirs:
        for file in sorted((d / "chunks").glob("chunk_*.pt")):
            payload = _read_chunk(file)
            chunks[(payload["start"], payload["end"])] = payload
    expected = chunk_ranges(man["n_ex"], man["chunk_size"])
    missing = [r for r in expected if r not in chunks]
    if missing:
        shown = ", ".join(f"{a}–{b}" for a, b in missing[:4])
        raise GKLError(f"{len(missing)} of {len(expected)} chunks are not finished yet (images {shown}{' …' if len(missing) > 4 else ''})")
    ordered = [chunks[r] for r in expected]
    return man, aggregate(ordered)


def aggregate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-example flags concatenated in image order, and the per-stage removal counts summed."""
    clean = torch.cat([c["clean"] for c in chunks])
    out: dict[str, Any] = {"clean": clean, "aa": {}, "extra": {}, "individual": {}, "seconds": sum(c["seconds"] for c in chunks)}
    for eps in chunks[0]["aa"]:
        removed: dict[str, int] = {}
        for c in chunks:
            for attack, count in c["aa"][eps]["removed"].items():
                removed[attack] = removed.get(attack, 0) + count
        out["aa"][eps] = {"robust": torch.cat([c["aa"][eps]["robust"] for c in chunks]), "removed": removed,
                          "max_perturbation": max(c["aa"][eps]["max_perturbation"] for c in chunks)}
    for part in ("extra", "individual"):
        for key in chunks[0][part]:
            out[part][key] = torch.cat([c[part][key] for c in chunks])
    return out


def _pct(flags: Tensor) -> float:
    return 100.0 * float(flags.float().mean()) if len(flags) else float("nan")


def summarise(man: dict[str, Any], agg: dict[str, Any], extra_info: dict[str, Any]) -> dict[str, Any]:
    """results.json: accuracies in %, per-stage robust accuracy, and the provenance of the numbers."""
    import pyautoattack

    n = len(agg["clean"])
    main = format_eps(man["eps"])
    n_clean = int(agg["clean"].sum())
    stages, remaining = [], n_clean
    for attack, removed in agg["aa"][main]["removed"].items():
        remaining -= removed
        stages.append({"attack": attack, "removed": removed, "robust_acc": 100.0 * remaining / n})
    robust = agg["aa"][main]["robust"]
    worst = robust.clone()
    for flags in agg["extra"].values():
        worst &= flags
    results = {
        "clean_acc": _pct(agg["clean"]),
        "robust_acc": _pct(robust),
        "n_ex": n,
        "n_clean": n_clean,
        "n_robust": int(robust.sum()),
        "eps": main,
        "norm": man["norm"],
        "version": man["version"],
        "attacks": man["attacks"],
        "seed": man["seed"],
        "batch_size": man["batch_size"],
        "chunk_size": man["chunk_size"],
        "stages": stages,
        "max_perturbation": agg["aa"][main]["max_perturbation"],
        "eps_sweep": [{"eps": eps, "robust_acc": _pct(v["robust"])} for eps, v in agg["aa"].items()],
        "other_attacks": {k: _pct(v) for k, v in agg["extra"].items()},
        "worst_case_acc": _pct(worst) if agg["extra"] else None,
        "individual": {k: _pct(v) for k, v in agg["individual"].items()},
        "dataset": man["dataset"],
        "guards": man["guards"],
        "model_sha256": man["model_sha256"],
        "attack_seconds": agg["seconds"],
        "versions": {"gkl": __version__, "torch": torch.__version__, "pyautoattack": pyautoattack.__version__,
                     "python": platform.python_version()},
    }
    results.update(extra_info)
    return results


def _model_label(r: dict[str, Any]) -> str:
    model = r.get("model") or {}
    if model.get("robustbench_name"):
        return f"RobustBench {model['robustbench_name']}"
    return model.get("path") or f"merged from {', '.join(r.get('merged_from', []))}"


def results_markdown(r: dict[str, Any]) -> str:
    """The human-readable twin of results.json."""
    lines = [
        f"# AutoAttack ({r['version']}, {r['norm']}, ε = {r['eps']})",
        "",
        f"Model `{_model_label(r)}` "
        f"(sha256 `{r['model_sha256'][:16]}…`), {r['dataset']}, first {r['n_ex']} test images, seed {r['seed']}, "
        f"batch {r['batch_size']}, chunk {r['chunk_size'] or 'all'}; guards {'on' if r['guards'] else 'OFF (--no-guards)'}.",
        "",
        "| | accuracy (%) |",
        "|---|---:|",
        f"| clean | {r['clean_acc']:.2f} |",
    ]
    lines += [f"| after {s['attack']} (−{s['removed']}) | {s['robust_acc']:.2f} |" for s in r["stages"]]
    lines.append(f"| **AutoAttack** | **{r['robust_acc']:.2f}** |")
    for eps in r["eps_sweep"][1:]:
        lines.append(f"| AutoAttack ε = {eps['eps']} | {eps['robust_acc']:.2f} |")
    for name, acc in r["other_attacks"].items():
        lines.append(f"| {name.upper()} | {acc:.2f} |")
    if r["worst_case_acc"] is not None:
        lines.append(f"| worst case (all attacks) | {r['worst_case_acc']:.2f} |")
    for name, acc in r["individual"].items():
        lines.append(f"| {name} alone | {acc:.2f} |")
    lines += ["", f"{r['attack_seconds']:.1f} s of attack time; torch {r['versions']['torch']}, "
              f"pyautoattack {r['versions']['pyautoattack']}, device {r.get('device', '?')}.", ""]
    return "\n".join(lines)


def write_results(out: Path, dirs: list[Path], extra_info: dict[str, Any]) -> dict[str, Any]:
    """Merge `dirs` and write results.json, results.md and flags.pt (per-example flags) into `out`."""
    man, agg = merge(dirs)
    results = summarise(man, agg, extra_info)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save({"clean": agg["clean"], "robust": agg["aa"][format_eps(man["eps"])]["robust"],
                 **{f"extra/{k}": v for k, v in agg["extra"].items()}}, out / "flags.pt")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    return results


def run_evaluation(
    loaded: LoadedModel, x: Tensor, y: Tensor, cfg: EvalConfig, out: Path, *, device: torch.device,
    shard: tuple[int, int] = (0, 1), resume: bool = False, overwrite: bool = False,
    progress: Optional[EvalProgress] = None, guard_info: Optional[dict[str, Any]] = None,
) -> Optional[dict[str, Any]]:
    """Evaluate this shard's unfinished chunks; merge and return results when all chunks exist."""
    if shard[1] > 1 and cfg.chunk_size == 0:
        raise GKLError("--shard needs --chunk-size N (the same for every shard) to split the work")
    # one process per (folder, shard): sibling shards share the folder, a second copy of one is refused
    name = LOCK_NAME if shard[1] == 1 else f".gkl.shard-{shard[0]}-of-{shard[1]}.lock"
    with RunLock(out, name):
        return _evaluate_shard(loaded, x, y, cfg, out, device=device, shard=shard, resume=resume, overwrite=overwrite,
                               progress=progress, guard_info=guard_info)


def _evaluate_shard(
    loaded: LoadedModel, x: Tensor, y: Tensor, cfg: EvalConfig, out: Path, *, device: torch.device,
    shard: tuple[int, int], resume: bool, overwrite: bool, progress: Optional[EvalProgress],
    guard_info: Optional[dict[str, Any]],
) -> Optional[dict[str, Any]]:
    wanted = manifest(cfg, loaded.sha256 or "unknown")
    check_manifest(out, wanted, resume, overwrite, sharded=shard[1] > 1)
    ranges = chunk_ranges(len(x), cfg.chunk_size)
    mine = [r for i, r in enumerate(ranges) if i % shard[1] == shard[0]]
    # temporary files a killed writer left: this shard's chunks; the folder's own files only when unsharded
    if shard[1] > 1:
        removed = remove_stale_temps(out / "chunks", [chunk_path(out, *r).name for r in mine])
    else:
        removed = remove_stale_temps(out / "chunks", ["chunk_*"]) + remove_stale_temps(out, EVAL_FILES)
    if removed and progress:
        progress.note(f"removed {len(removed)} temporary file(s) a killed evaluation left: {', '.join(removed[:3])}")
    todo = [r for r in mine if not chunk_path(out, *r).is_file()]
    total = sum(b - a for a, b in mine)
    done_images = total - sum(b - a for a, b in todo)
    if progress:
        progress.chunk(done_images, total, f"{len(todo)} of {len(mine)} chunk(s) to evaluate" if todo else "all chunks done")
    for a, b in todo:
        payload = evaluate_chunk(loaded.module, x[a:b], y[a:b], a, cfg, device, progress)
        atomic_save(payload, chunk_path(out, a, b))
        done_images += b - a
        if progress:
            robust = int(payload["aa"][format_eps(cfg.eps)]["robust"].sum())
            progress.chunk(done_images, total, f"images {a}–{b} done: {robust}/{b - a} robust, {payload['seconds']:.0f} s")
    info = {"model": {"path": str(loaded.path) if loaded.path else None, "arch": loaded.arch, "source": loaded.source,
                      "num_classes": loaded.num_classes},
            "guard_checks": guard_info or {}, "device": device_name(device)}
    if loaded.source == "robustbench-zoo":
        info["model"]["robustbench_name"] = loaded.meta["robustbench_name"]
    try:
        return write_results(out, [out], info)
    except GKLError:
        if shard[1] > 1:
            return None  # other shards still running; `gkl eval-aa --merge` combines them
        raise


def evaluate_checkpoint(model: ModelRef | str, cfg: EvalConfig, out: Optional[str | Path] = None, *,
                        shard: Optional[str] = None, resume: bool = False, overwrite: bool = False,
                        device: Optional[str] = None, console: Any = None, quiet: bool = False) -> Optional[dict[str, Any]]:
    """`gkl eval-aa`: load, check, evaluate this shard (`i/n`), merge when complete.

    Returns the results, or None when other shards are still missing. `out` defaults to
    evals/<checkpoint or model name>."""
    ref = ModelRef(path=str(model)) if isinstance(model, (str, Path)) else model
    cfg.check()
    dev = pick_device(device)
    shard_spec = parse_shard(shard)
    loaded, name, dataset = ref.load(cfg, dev)
    x, y, data_name = load_eval_data(dataset, loaded, cfg.data_dir, cfg.n_ex)
    cfg = replace(cfg, dataset=data_name, n_ex=len(x))
    loaded.module.eval()
    guard_info = run_guards(loaded.module, x, y, loaded.num_classes, data_name, dev) if cfg.guards else {"disabled": True}
    with EvalProgress(console, quiet) as progress:
        return run_evaluation(loaded, x, y, cfg, Path(out or f"evals/{name}"), device=dev, shard=shard_spec, resume=resume,
                              overwrite=overwrite, progress=progress, guard_info=guard_info)
