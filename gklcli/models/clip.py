"""CLIP models through OpenCLIP (`open-clip-torch`): the students and teachers of TABLE VII.

A CLIP architecture is named ``open_clip:NAME`` (``open_clip:ViT-B-16``, ``open_clip:ViT-L-14``) or
one of gkl's bundled toy configurations (``open_clip:gkl-tiny-clip``, ``open_clip:gkl-tiny-clip-teacher``:
a 2–3 layer ViT and text tower for tests and ``--smoke``). Weights come from

* nothing (random initialisation: the TABLE VII students train from scratch);
* an OpenCLIP pretrained tag (``datacomp_xl_s13b_b90k``: the 79.2 % ViT-L/14 teacher), fetched by
  OpenCLIP into the Hugging Face Hub cache (``HF_HOME``, or ``--set teacher.cache_dir``) or found there;
* a file: a gkl clip-kd checkpoint (``last.pt``/``best.pt``), or an OpenCLIP state dict
  (``open_clip_pytorch_model.bin``, ``.safetensors``, ``{"state_dict": …}``), read with
  ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import nn

from gklcli.errors import GKLError

PREFIX = "open_clip:"
CONFIGS = Path(__file__).with_name("clip_configs")
TINY = ("gkl-tiny-clip", "gkl-tiny-clip-teacher")


def is_clip(arch: Optional[str]) -> bool:
    return bool(arch) and str(arch).startswith(PREFIX)


@functools.lru_cache(maxsize=None)
def _open_clip() -> Any:
    """open_clip with gkl's toy configurations registered (imported on demand: it pulls in timm)."""
    import warnings

    with warnings.catch_warnings():  # its import touches deprecated torch.jit APIs
        warnings.simplefilter("ignore", FutureWarning)
        import open_clip
    open_clip.add_model_config(CONFIGS)
    return open_clip


def model_name(arch: str) -> str:
    """The OpenCLIP configuration name of ``open_clip:NAME``; a name OpenCLIP does not know is refused."""
    if not is_clip(arch):
        raise GKLError(f"{arch!r}: a CLIP architecture is written open_clip:NAME (such as open_clip:ViT-B-16)")
    name = arch[len(PREFIX):]
    known = _open_clip().list_models()
    if name not in known:
        near = [k for k in known if k.lower().startswith(name.lower()[:5])][:6]
        raise GKLError(f"{arch!r}: OpenCLIP has no model {name!r}" + (f"; similar: {', '.join(near)}" if near else ""))
    return name


def check_arch(arch: str) -> None:
    """Recipe validation: the name resolves (no weights are read)."""
    model_name(arch)


def create_clip(arch: str, pretrained: Optional[str] = None, *, cache_dir: Optional[str] = None, device: str = "cpu") -> nn.Module:
    """An OpenCLIP model (fp32, on `device`) with random weights, a pretrained tag's, or a file's
    (`device="meta"`: shapes only, for FLOP counts and parameter numbers without allocating)."""
    open_clip, name = _open_clip(), model_name(arch)
    if pretrained and not _is_file_spec(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise GKLError(f"{arch}: no pretrained weights {pretrained!r}; OpenCLIP has {', '.join(tags) or 'none'} for it "
                           "(or give a weight file)")
        try:
            return open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir)
        except Exception as error:  # network, missing cache entry, hub errors: many types
            raise GKLError(f"{arch} {pretrained}: could not load the pretrained weights ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200] if str(error) else ''}); fetch them on a machine with "
                           "internet (they land in the Hugging Face cache, HF_HOME) or pass the weight file") from None
    with _quiet_logging():  # OpenCLIP warns at random initialisation, which is what a student wants
        model = open_clip.create_model(name, pretrained=None, device=device)
    if pretrained:
        load_weights(model, Path(pretrained), arch)
    return model


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def resolve_weights(checkpoint: str, data_dir: Optional[str]) -> str:
    """A pretrained tag as it is; a weight file absolute, or under --data-dir (default ./data), or under
    the current folder — the first that exists (the recipes name `teachers/open_clip/…` under the data)."""
    if not _is_file_spec(checkpoint):
        return checkpoint
    path = Path(checkpoint)
    candidates = [path] if path.is_absolute() else [Path(data_dir or "data") / path, path]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise GKLError(f"teacher.checkpoint: {checkpoint} not found (looked in {', '.join(str(c) for c in candidates)}); "
                   "`gkl fetch teachers clip --data-dir DATA_DIR` downloads OpenCLIP's ViT-L/14 (DataComp-1B), or give an "
                   "OpenCLIP pretrained tag such as datacomp_xl_s13b_b90k")


def _is_file_spec(text: str) -> bool:
    return "/" in text or "\\" in text or Path(text).suffix in (".pt", ".pth", ".bin", ".safetensors") or Path(text).is_file()


def load_weights(model: nn.Module, path: Path, arch: str) -> None:
    """Strictly load a gkl clip checkpoint or an OpenCLIP state dict into `model`."""
    from gklcli.checkpoint import load_file

    if not path.is_file():
        raise GKLError(f"{path}: weight file not found")
    obj = load_file(path)  # .safetensors too
    if isinstance(obj, dict) and obj.get("format") == "gkl-checkpoint":
        if obj.get("arch") != arch:
            raise GKLError(f"{path}: a checkpoint of {obj.get('arch')}, not {arch}")
        obj = obj["model"]
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GKLError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GKLError(f"{path}: does not fit {arch} (missing {', '.join(missing[:3]) or 'none'}; unexpected "
                       f"{', '.join(unexpected[:3]) or 'none'})")


def tokenizer(arch: str) -> Any:
    """OpenCLIP's tokenizer for the architecture (its context length): text → int64 token ids."""
    return _open_clip().get_tokenizer(model_name(arch))


class ImageSpec(NamedTuple):
    """What a CLIP image tower expects: square size and the normalisation of its pretraining."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def image_spec(model: nn.Module) -> ImageSpec:
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return ImageSpec(int(size), tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD)))


class LoadedClip(NamedTuple):
    model: nn.Module
    arch: str
    source: str  # "random", a pretrained tag, or the weight file
    image: ImageSpec


def resolve_clip(spec: str, *, device: torch.device | str = "cpu", cache_dir: Optional[str] = None,
                 data_dir: Optional[str] = None) -> LoadedClip:
    """A CLIP model for evaluation or export, in eval mode.

    `spec` is a gkl clip checkpoint (``runs/…/last.pt``), or ``open_clip:NAME:PRETRAINED`` (a tag or a
    weight file, relative paths as `resolve_weights` finds them), e.g. ``open_clip:ViT-L-14:datacomp_xl_s13b_b90k``."""
    if is_clip(spec):
        rest = spec[len(PREFIX):]
        name, _, pretrained = rest.partition(":")
        arch = PREFIX + name
        pretrained = resolve_weights(pretrained, data_dir) if pretrained else ""
        model = create_clip(arch, pretrained or None, cache_dir=cache_dir)
        source = pretrained or "random"
    else:
        from gklcli.checkpoint import load_file

        path = Path(spec)
        obj = load_file(path)
        arch = obj.get("arch") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or obj.get("format") != "gkl-checkpoint" or not is_clip(arch):
            raise GKLError(f"{path}: not a gkl CLIP checkpoint (kind clip-kd); for OpenCLIP weights write "
                           "open_clip:NAME:FILE_OR_TAG")
        model = create_clip(arch)
        load_weights(model, path, arch)
        source = str(path)
    model = model.to(device).eval()
    return LoadedClip(model, arch, source, image_spec(model))
