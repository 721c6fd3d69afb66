"""Loading the models users bring: gkl checkpoints, RobustBench-format files, plain state dicts,
mdistiller-style ``{"model": state_dict}`` files, ``.safetensors`` state dicts (with the config.json of
`gkl export-hub` beside them, or ``--arch``), Hub models ``hf://OWNER/NAME`` (`gklcli.hub_cache`), and
RobustBench model-zoo entries (offline).

Every .pt file is read with ``torch.load(weights_only=True)``; safetensors files hold tensors only.
Prefixes are stripped only where they are prefixes (RobustBench's own `rm_substr_from_state_dict`
cuts ``module.`` found anywhere in a key). Loading is always ``strict=True``: a key mismatch is an error naming the first keys involved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from gklcli.datasets import facts
from gklcli.errors import GKLError
from gklcli.models import create_model, get_spec
from gklcli.checkpoint import FORMAT, load_file, sha256_file
from gklcli.hub_cache import download_weights, is_hub_spec, read_model_config

_PREFIXES = ("module.", "model.", "_orig_mod.")
_HEADS = ("fc.weight", "logits.weight", "linear.weight", "classifier.weight", "classifier.1.weight", "head.weight")


@dataclass
class LoadedModel:
    """A model ready for evaluation (eval mode) and what is known about it."""

    module: nn.Module
    arch: Optional[str]  # registry name; None for RobustBench zoo models
    num_classes: int
    source: str  # "gkl", "state_dict", "robustbench-zoo"
    path: Optional[Path]
    sha256: Optional[str]
    dataset: Optional[str] = None
    input_norm: Optional[dict[str, list[float]]] = None
    meta: dict[str, Any] = field(default_factory=dict)  # the gkl checkpoint's metadata (recipe, …)


def strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove wrapper prefixes (DataParallel/DDP `module.`, `model.`, torch.compile `_orig_mod.`)
    when *every* key carries them, repeatedly."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """The weights in a RobustBench (`state_dict`), mdistiller (`model`) or plain checkpoint."""
    if _is_state_dict(obj):
        return strip_prefixes(dict(obj))
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if _is_state_dict(obj.get(key)):
                return strip_prefixes(dict(obj[key]))
        keys = ", ".join(sorted(str(k) for k in obj)[:8])
        raise GKLError(f"{path}: no state dict found (top-level keys: {keys}); expected a state dict or one under 'state_dict'/'model'")
    raise GKLError(f"{path}: expected a state dict, found {type(obj).__name__}")


def infer_num_classes(state: dict[str, Tensor]) -> Optional[int]:
    """The classifier's output count from its weight, for the usual head names."""
    for key in _HEADS:
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:3])}{' …' if len(result.missing_keys) > 3 else ''}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:3])}{' …' if len(result.unexpected_keys) > 3 else ''}")
        raise GKLError(f"{what}: the weights do not fit the architecture ({'; '.join(parts)})")


class _Found(NamedTuple):
    """What a weight file says about its model, before the model is built."""

    arch: str
    num_classes: int
    state: dict[str, Tensor]
    source: str  # "gkl", "state_dict", "safetensors" (gkl's config.json beside it)
    dataset: Optional[str]
    input_norm: Optional[dict[str, list[float]]]
    meta: dict[str, Any]


def _check_flags(path: Path, arch: Optional[str], num_classes: Optional[int], recorded: str, classes: int) -> None:
    """--arch and --num-classes may only repeat what a file records."""
    if arch is not None and get_spec(arch).name != get_spec(recorded).name:
        raise GKLError(f"{path}: --arch {arch} contradicts the checkpoint's architecture {recorded}")
    if num_classes is not None and num_classes != classes:
        raise GKLError(f"{path}: --num-classes {num_classes} contradicts the checkpoint ({classes} classes)")


def _gkl_checkpoint(path: Path, obj: dict[str, Any], arch: Optional[str], num_classes: Optional[int]) -> _Found:
    """A gkl checkpoint: it records its architecture, classes, dataset, normalisation and recipe."""
    missing = [k for k in ("arch", "num_classes", "model") if k not in obj]
    if missing or not _is_state_dict(obj.get("model")):
        raise GKLError(f"{path}: a damaged gkl checkpoint (missing or bad {', '.join(missing) or 'model'}); "
                       "re-save it from its run, or pass the weights as a plain state dict with --arch")
    if obj.get("kind") == "clip-kd":
        raise GKLError(f"{path}: a CLIP checkpoint ({obj['arch']}), not a classifier; evaluate it with gkl eval-zeroshot, "
                       "or export its image tower with gkl export-vision-tower")
    classes = int(obj["num_classes"])
    _check_flags(path, arch, num_classes, obj["arch"], classes)
    meta = {k: v for k, v in obj.items() if k not in ("model", "train_state")}
    return _Found(obj["arch"], classes, obj["model"], "gkl", obj.get("dataset"), obj.get("input_norm"), meta)


def _plain(path: Path, state: dict[str, Tensor], arch: Optional[str], num_classes: Optional[int]) -> _Found:
    """Bare weights: the architecture from --arch, the classes from --num-classes or the classifier's weight."""
    if arch is None:
        raise GKLError(f"{path}: a plain state dict does not say its architecture; pass --arch NAME (see `gkl models`)")
    classes = num_classes or infer_num_classes(state)
    if classes is None:
        raise GKLError(f"{path}: cannot tell the number of classes from the weights; pass --num-classes N")
    return _Found(arch, classes, state, "state_dict", None, None, {})


def _safetensors_file(path: Path, arch: Optional[str], num_classes: Optional[int]) -> _Found:
    """A .safetensors state dict (safe by construction); what it is from gkl's config.json beside it (`gkl
    export-hub`), else from --arch. The normalisation is always the architecture's, whatever config.json says."""
    from gklcli.models.timm_models import read_state_dict

    state = strip_prefixes(read_state_dict(path))
    config = read_model_config(path.parent / "config.json")
    if config is None:
        return _plain(path, state, arch, num_classes)
    _check_flags(path, arch, num_classes, config["arch"], config["num_classes"])
    return _Found(config["arch"], config["num_classes"], state, "safetensors", config["dataset"], None, dict(config))


def load_model_file(
    path: str | Path, *, arch: Optional[str] = None, num_classes: Optional[int] = None, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load any supported weight file into its registry architecture, in eval mode: a gkl checkpoint, a RobustBench,
    mdistiller or plain state dict (.pt), a .safetensors state dict, or a Hub model hf://OWNER/NAME[@REVISION][/PATH]
    (through the Hugging Face cache)."""
    spec = str(path) if is_hub_spec(path) else None
    path = download_weights(spec) if spec else Path(path)
    if path.suffix == ".safetensors":
        found = _safetensors_file(path, arch, num_classes)
    else:
        obj = load_file(path)
        found = (_gkl_checkpoint(path, obj, arch, num_classes) if isinstance(obj, dict) and obj.get("format") == FORMAT
                 else _plain(path, extract_state_dict(obj, path), arch, num_classes))
    name = get_spec(found.arch).name
    module = create_model(name, found.num_classes)
    load_strict(module, {k: v.float() if v.is_floating_point() else v for k, v in found.state.items()}, f"{path} ({name})")
    norm = found.input_norm
    if norm is None and getattr(module, "mean", None) is not None:
        norm = {"mean": module.mean.flatten().tolist(), "std": module.std.flatten().tolist()}
    meta = found.meta | ({"hub": spec} if spec else {})
    module = module.to(device).eval()
    return LoadedModel(module, name, found.num_classes, found.source, path, sha256_file(path), found.dataset, norm, meta)


def load_robustbench_zoo_model(name: str, model_dir: str | Path, dataset: str, threat_model: str, device: str | torch.device = "cpu") -> LoadedModel:
    """A RobustBench leaderboard model from a local models directory, through RobustBench's own zoo.

    The file must already be at ``MODEL_DIR/<dataset>/<threat>/<name>.pt`` (RobustBench then skips
    its download); gkl never downloads at evaluation time.
    """
    from gklcli.compat import import_robustbench

    file = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    if not file.is_file():
        raise GKLError(f"--robustbench-model {name}: {file} not found (download it once with robustbench, or copy it there)")
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    try:
        zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    except ValueError as err:
        raise GKLError(f"--robustbench-model: {err}") from None
    if name not in zoo:
        raise GKLError(f"--robustbench-model {name}: not in RobustBench's {dataset}/{threat_model} zoo")
    module = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    classes = facts(dataset).classes
    return LoadedModel(module.to(device).eval(), None, classes, "robustbench-zoo", file, sha256_file(file), dataset, None, {"robustbench_name": name})
