"""A timm-like model registry: `create_model(name, num_classes)` for every architecture gkl trains.

Every registered model takes raw [0, 1] images. Where a family expects normalised inputs, the
normalisation happens *inside* the model with non-persistent `mean`/`std` buffers, so AutoAttack
numbers are valid and state dicts stay free of extra keys (foreign checkpoints load `strict=True`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from gklcli.datasets import facts
from gklcli.errors import GKLError

Stats = tuple[Sequence[float], Sequence[float]]

# Input normalisation. The dataset statistics live in `gklcli.datasets` (RobustBench's constants for
# CIFAR); mdistiller normalises CIFAR-100 with constants that differ in the last digits, and each
# family uses the constants of the code it must match.
CIFAR10_STATS: Stats = facts("cifar10").stats
CIFAR100_STATS: Stats = facts("cifar100").stats
MDISTILLER_CIFAR100_STATS: Stats = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
IMAGENET_STATS: Stats = facts("imagenet").stats


def register_input_norm(module: nn.Module, stats: Stats | None) -> None:
    """Give `module` non-persistent `mean`/`std` buffers (None: the model takes raw [0,1] input)."""
    if stats is None:
        module.register_buffer("mean", None, persistent=False)
        module.register_buffer("std", None, persistent=False)
        return
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in stats)
    module.register_buffer("mean", mean, persistent=False)
    module.register_buffer("std", std, persistent=False)


def normalize_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std with the buffers set by `register_input_norm`; identity when there are none."""
    if module.mean is None:
        return x
    return (x - module.mean) / module.std


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture."""

    name: str
    family: str
    builder: Callable[..., nn.Module]
    default_num_classes: int
    input_norm: str
    robustbench: str | None = None
    aliases: tuple[str, ...] = field(default=())
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add `spec` to the registry (import time, once per name)."""
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY or key in _ALIASES:
            raise RuntimeError(f"model name {key!r} registered twice")
    _REGISTRY[spec.name] = spec
    _ALIASES.update({alias: spec.name for alias in spec.aliases})
    return spec


def _canonical(name: str) -> str | None:
    for candidate in (name, name.replace("_", "-")):
        if candidate in _REGISTRY:
            return candidate
        if candidate in _ALIASES:
            return _ALIASES[candidate]
    return None


def get_spec(name: str) -> ModelSpec:
    """The spec registered under `name` (or one of its aliases); a GKLError lists near misses."""
    canonical = _canonical(name)
    if canonical is None:
        close = difflib.get_close_matches(name, list(_REGISTRY) + list(_ALIASES), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise GKLError(f"unknown model {name!r}{hint}; `gkl models` lists the registry")
    return _REGISTRY[canonical]


def list_models(family: str | None = None) -> list[str]:
    """Registered names in registration order, optionally only one family."""
    return [n for n, s in _REGISTRY.items() if family is None or s.family == family]


def create_model(name: str, num_classes: int | None = None, **kwargs: object) -> nn.Module:
    """Build an untrained model; `num_classes` defaults to the family's usual dataset."""
    spec = get_spec(name)
    n = spec.default_num_classes if num_classes is None else int(num_classes)
    if n < 2:
        raise GKLError(f"model {spec.name}: num_classes must be >= 2, got {n}")
    try:
        return spec.builder(num_classes=n, **kwargs)
    except TypeError as err:
        raise GKLError(f"model {spec.name}: bad keyword arguments {sorted(kwargs)}: {err}") from err


def count_params(name: str, num_classes: int | None = None) -> int:
    """Parameter count without allocating weights (the model is built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name, num_classes)
    return sum(p.numel() for p in model.parameters())
