"""Typed YAML recipes: `extends:` inheritance, `--set a.b=c` overrides and validation into the schema
(`gklcli.recipe_schema`, whose sections are importable from here too).

A recipe is a YAML mapping whose top-level keys are the sections of `Recipe`. `extends: base.yaml`
(a path relative to the recipe, or a list of them) deep-merges the recipe over its bases: mappings
merge key by key, everything else (lists included) is replaced. Overrides from the command line are
applied last and parsed with YAML typing (`--set loss.gamma=0.4`, `--set attack.eps=8/255`).

Every error is a `GKLError` naming the file (or `--set`) that supplied the bad key, the dotted key
and the value, e.g. ``recipes/x.yaml: loss.gamma: must be >= 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

from gklcli.errors import GKLError, show
from gklcli.names import MAX_NAME, RULES, RUN_NAME
from gklcli.recipe_files import (  # noqa: F401 (RECIPES_DIR, bundled_recipes, parse_override, resolve_recipe_path: public here too)
    RECIPES_DIR, Sources, apply_override, bundled_recipes, load_tree, parse_override, resolve_recipe_path,
)
from gklcli.recipe_schema import (  # noqa: F401 (the sections are public here too)
    AttackCfg, AwpCfg, DataCfg, DigitsCfg, EmaCfg, EvalCfg, GeneratedCfg, LossCfg, MetaCfg, ModelCfg, OptimCfg, OutputCfg,
    Recipe, ScheduleCfg, SegCfg, SemiCfg, SyntheticCfg, TeacherCfg, TrainCfg,
)

# ---------------------------------------------------------------------------------------------------
# What may change between runs that are the same run.
# ---------------------------------------------------------------------------------------------------

# Settings (dotted keys, or prefixes ending in ".") that change neither what a run trains nor the numbers
# it reports: names, paths, workers, logging. Runs that differ only here are the same run (reproduce's
# run key leaves them out) ...
RESULT_NEUTRAL = ("meta.", "output.", "data.root", "data.download", "data.num_workers", "data.eval_batch_size",
                  "train.log_every_steps", "train.save_every_steps", "teacher.cache_dir")
# ... and these change only the final report, not the training: a --resume may change them as well
RESUME_SAFE = RESULT_NEUTRAL + ("eval.final_test", "eval.n_test")


def order_settings(recipe: dict[str, Any]) -> tuple[str, ...]:
    """Neutral settings that are not neutral for this recipe: a CLIP run's image–caption streams are one per
    DataLoader worker (and rank), so data.num_workers decides which pairs and crops each batch gets."""
    return ("data.num_workers",) if recipe.get("kind") == "clip-kd" else ()
_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*/\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")


# ---------------------------------------------------------------------------------------------------
# Conversion of the merged mapping into the typed schema.
# ---------------------------------------------------------------------------------------------------


def _where(key: str, sources: Sources) -> str:
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        origin = sources.get(".".join(parts[:i]))
        if origin:
            return origin
    return "recipe"


def _fail(key: str, sources: Sources, message: str) -> GKLError:
    return GKLError(f"{_where(key, sources)}: {key}: {message}")


def parse_number(value: Any) -> Optional[float]:
    """A number, or a fraction written as the paper does ("8/255"); None when `value` is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _FRACTION.match(value)
        if match:
            num, den = (float(g) for g in match.groups())
            return num / den if den != 0 else None
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _to_float(value: Any, key: str, sources: Sources) -> float:
    number = parse_number(value)
    if number is None:
        zero = isinstance(value, str) and bool(_FRACTION.match(value))
        raise _fail(key, sources, f"division by zero in {show(value)}" if zero else
                    f"expected a number (such as 0.5 or 8/255), got {show(value)}")
    return number


def _convert(value: Any, tp: Any, key: str, sources: Sources) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, sources)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise _fail(key, sources, f"must be one of {choices}, got {show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _fail(key, sources, f"expected a list, got {show(value)}")
        return [_convert(v, args[0], f"{key}[{i}]", sources) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(key, sources, f"expected a mapping of settings, got {show(value)}")
        return build_section(tp, value, sources, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(key, sources, f"expected true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, sources, f"expected an integer, got {show(value)}")
        if not -(2**63) <= value < 2**63:
            raise _fail(key, sources, f"must fit in 64 bits, got {show(value)}")
        return value
    if tp is float:
        number = _to_float(value, key, sources)
        if not math.isfinite(number):
            raise _fail(key, sources, f"must be a finite number, got {show(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise _fail(key, sources, f"expected a string, got {show(value)}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {key}")  # a bug in the schema, not user input


def _check_range(value: Any, f: dataclasses.Field, key: str, sources: Sources) -> None:
    if value is None or isinstance(value, (bool, str, list)):
        return
    lo, hi, lo_open = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("lo_open")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _fail(key, sources, f"must be {'>' if lo_open else '>='} {lo}, got {show(value)}")
    if hi is not None and value > hi:
        raise _fail(key, sources, f"must be <= {hi}, got {show(value)}")


def build_section(cls: type, data: dict[str, Any], sources: Sources, prefix: str = "") -> Any:
    """The schema dataclass `cls` (such as `DataCfg`) from a mapping, each value converted and range-checked."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        allowed = ", ".join(fields)
        raise _fail(key, sources, f"unknown key; allowed keys{' in ' + prefix[:-1] if prefix else ''}: {allowed}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        converted = _convert(value, hints[name], key, sources)
        _check_range(converted, fields[name], key, sources)
        kwargs[name] = converted
    return cls(**kwargs)


def _check_consistency(recipe: Recipe, sources: Sources) -> None:
    """Rules that involve more than one key."""
    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise _fail(key, sources, message)

    _check_archs(recipe, sources)
    data = recipe.data
    require(data.dataset != "npz" or data.path is not None, "data.path", "dataset 'npz' needs data.path (the .npz file)")
    require(data.augment != "autoaug" or recipe.kind == "at", "data.augment", "'autoaug' two-view training is for kind 'at'")
    model = recipe.model
    if model.bn_group_size is not None:
        forward = data.batch_size * (2 if data.augment == "autoaug" else 1)  # both views in one forward
        require(forward % model.bn_group_size == 0, "model.bn_group_size",
                f"{model.bn_group_size} does not divide the {forward} images of a training forward")
        require(not model.sync_bn, "model.bn_group_size", "ghost batches and model.sync_bn exclude each other")
    require(recipe.ema.mode == "step" or recipe.ema.warmup_fraction == 0, "ema.warmup_fraction", "is for ema.mode 'step'")
    require(recipe.ema.mode != "step" or recipe.ema.start_epoch == 1, "ema.start_epoch",
            "is for ema.mode 'epoch'; the step EMA starts through ema.warmup_fraction")
    sched = recipe.schedule
    require(sched.lr_schedule != "multistep" or bool(sched.milestones), "schedule.milestones", "'multistep' needs milestones")
    require(sorted(sched.milestones) == sched.milestones, "schedule.milestones", f"must be increasing, got {sched.milestones}")
    require(sched.warmup_epochs < sched.epochs, "schedule.warmup_epochs", f"must be < schedule.epochs ({sched.epochs})")
    require(sched.lr_schedule != "onecycle" or sched.warmup_epochs >= 2, "schedule.warmup_epochs",
            f"'onecycle' needs a warm-up of at least 2 epochs (torch's OneCycleLR divides by warm-up − 1), got {sched.warmup_epochs}")
    if recipe.kind in ("kd", "clip-kd") or (recipe.kind == "seg-kd" and recipe.loss.name != "ce"):
        require(recipe.teacher.arch is not None, "teacher.arch", f"kind {recipe.kind!r} needs a teacher architecture")
    clip = recipe.kind == "clip-kd"
    require(clip == (data.dataset == "pairs"), "data.dataset",
            "kind 'clip-kd' trains on dataset 'pairs'" if clip else "'pairs' (image–caption pairs) is for kind 'clip-kd'")
    require(not clip or data.pairs is not None, "data.pairs", "kind 'clip-kd' needs the pool of image–caption pairs "
            "(tar shards such as datacomp/{00000000..00127999}.tar, or a CSV/TSV)")
    require(not clip or data.augment == "none", "data.augment", "CLIP training crops as OpenCLIP does "
            "(RandomResizedCrop, scale 0.9–1): set data.augment: none")
    require(not clip or recipe.loss.label_smoothing == 0, "loss.label_smoothing", "CLIP's contrastive loss has no label smoothing")
    require(clip or not model.grad_checkpointing, "model.grad_checkpointing", "is for kind 'clip-kd' (OpenCLIP models)")
    for key in ("mixup", "cutmix", "re_prob"):  # the device-batch augmentations of the KD step (TABLE XIX)
        require(recipe.kind == "kd" or getattr(data, key) == 0, f"data.{key}", "is applied by the distillation step (kind 'kd')")
    require(recipe.kind == "kd" or recipe.loss.label_loss == "ce", "loss.label_loss", "'bce' is for kind 'kd'")
    require(data.augment == "timm" or data.rand_augment is None, "data.rand_augment", "is for data.augment 'timm'")
    require(data.augment == "timm" or data.train_interpolation == "bilinear", "data.train_interpolation", "is for data.augment 'timm'")
    from gklcli.models.timm_models import is_timm

    _check_seg(recipe, require)
    # what builds such students: USB's ViTs, timm students, APD's ImageNet-initialised PSPNet backbones
    reads_init = recipe.kind in ("semi", "seg-kd") or (recipe.kind == "kd" and is_timm(model.arch))
    require(reads_init or model.drop_path == 0, "model.drop_path", f"is read for timm students (timm/NAME) of kind 'kd' "
            f"and the ViTs of kind 'semi', not for {model.arch!r} of kind {recipe.kind!r}")
    require(reads_init or model.pretrained is None, "model.pretrained", f"is read for timm students (timm/NAME) of kind "
            f"'kd' and the ViTs of kind 'semi', not for {model.arch!r} of kind {recipe.kind!r}")
    require(recipe.optim.name == "sgd" or recipe.optim.nesterov is False, "optim.nesterov", "is for optim.name 'sgd'")
    trackers = recipe.output.tracker
    require(len(set(trackers)) == len(trackers), "output.tracker", f"lists a tracker twice: {show(trackers)}")
    require(sched.warmup_steps == 0 or (sched.lr_schedule in ("cosine", "cosine-usb") and sched.warmup_epochs == 0),
            "schedule.warmup_steps", "is a step warm-up before schedule.lr_schedule 'cosine' (OpenCLIP's) or 'cosine-usb' "
            "(USB's), without warmup_epochs")
    _check_loss(recipe, sources)


def _check_seg(recipe: Recipe, require: Any) -> None:
    """kind seg-kd: ADE20K, segmentation models, APD's list-valued settings."""
    seg, data = recipe.kind == "seg-kd", recipe.data
    require(seg == (data.dataset == "ade20k"), "data.dataset",
            "kind 'seg-kd' trains on dataset 'ade20k'" if seg else "'ade20k' (segmentation masks) is for kind 'seg-kd'")
    if not seg:
        return
    from gklcli.models import get_spec

    for key, arch in (("model.arch", recipe.model.arch), ("teacher.arch", recipe.teacher.arch)):
        require(arch is None or get_spec(arch).family == "segmentation", key,
                f"{arch!r} is not a segmentation model (pspnet-r18, pspnet-r101, …; `gkl models`)")
    require(data.augment == "none", "data.augment", "segmentation crops, scales and rotates as APD does (seg.*): set data.augment: none")
    s = recipe.seg
    lo, hi = (s.scale_range + [0.0, 0.0])[:2]
    require(len(s.scale_range) == 2 and 0 < lo <= hi, "seg.scale_range", f"must be [min, max] with 0 < min ≤ max, got {s.scale_range}")
    require(len(s.rotate_range) == 2 and s.rotate_range[0] <= s.rotate_range[1], "seg.rotate_range",
            f"must be [min, max] in degrees, got {s.rotate_range}")
    require(bool(s.eval_scales) and all(x > 0 for x in s.eval_scales), "seg.eval_scales", f"must be positive scales, got {s.eval_scales}")
    require((s.crop_size - 1) % 8 == 0, "seg.crop_size", f"must be 8k + 1 (APD: 473), so that the 1/8-resolution logits upsampled with "
            f"align_corners line up with the pixels; got {s.crop_size}")
    require(recipe.model.num_classes in (None, s.num_classes), "model.num_classes", f"must equal seg.num_classes ({s.num_classes})")


def _check_archs(recipe: Recipe, sources: Sources) -> None:
    """Architectures by name: gkl's registry for images, OpenCLIP's for kind clip-kd (no weights read)."""
    from gklcli.models import get_spec  # torch import kept out of module import time
    from gklcli.models.clip import check_arch, is_clip

    clip = recipe.kind == "clip-kd"
    for key, arch in (("model.arch", recipe.model.arch), ("teacher.arch", recipe.teacher.arch)):
        if arch is None:
            continue
        if clip != is_clip(arch):
            raise _fail(key, sources, f"{show(arch)}: kind 'clip-kd' uses OpenCLIP models (open_clip:NAME, such as "
                        "open_clip:ViT-B-16)" if clip else f"{show(arch)}: OpenCLIP models are for kind 'clip-kd'")
        try:
            check_arch(arch) if clip else get_spec(arch)
        except GKLError as err:
            raise _fail(key, sources, str(err)) from None


def _check_loss(recipe: Recipe, sources: Sources) -> None:
    """The loss names through the registry, and no loss setting that the chosen loss does not read:
    a value that changes nothing would still change the run key and mislead whoever reads the recipe."""
    from gklcli.losses import KINDS, LOSS_SETTINGS, get_loss, loss_kind

    def registered(name: str, kind: str, key: str) -> Any:
        try:
            return get_loss(name, kind)
        except ValueError as error:
            raise _fail(key, sources, str(error)) from None

    kind = loss_kind(recipe.kind)
    entry = registered(recipe.loss.name, kind, "loss.name")
    if kind == "clip" and entry.prior and recipe.loss.weights != "sample":
        raise _fail("loss.weights", sources, "CLIP distillation has no classes: its weights are sample-wise "
                    "(φ* = √(S(w_m)^γ), paper §4.4); set loss.weights: sample")
    if kind == "at":
        registered(recipe.attack.loss, "attack", "attack.loss")
    used = entry.settings(kind, recipe.loss.weights)
    name_origin = sources.get("loss.name")
    for key in LOSS_SETTINGS:
        origin = sources.get(f"loss.{key}")
        # refused when written beside the loss choice or on the command line; a value inherited from a base
        # recipe written for another loss (a KD row extending the GKL recipe) is that base's business
        chosen_here = origin is not None and (origin.startswith("--set") or name_origin is None or origin == name_origin)
        if chosen_here and key not in used and getattr(recipe.loss, key) != getattr(LossCfg(), key):
            raise _fail(f"loss.{key}", sources, f"does nothing for the {KINDS[kind]} loss {recipe.loss.name!r} "
                        f"(it reads {', '.join(used) or 'no loss settings'}); remove it")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override and validate a recipe file into a `Recipe`."""
    sources: Sources = {}
    tree = load_tree(Path(path), sources, ())
    for text in overrides:
        apply_override(tree, text, sources)
    recipe = build_section(Recipe, tree, sources)
    if recipe.meta.name is None:
        recipe.meta.name = Path(path).stem
        sources.setdefault("meta.name", f"{path} (its file name)")
    if not RUN_NAME.fullmatch(recipe.meta.name):
        raise _fail("meta.name", sources, f"{show(recipe.meta.name)} must be {RULES[RUN_NAME]}, at most {MAX_NAME} "
                    "characters (it names the folder runs/<name>)")
    _check_consistency(recipe, sources)
    return recipe
