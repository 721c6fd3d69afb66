"""timm architectures as `timm/NAME` (TABLE XIX: the BEiTv2-L teacher and the ResNet-50 student of Hao et al.).

* The module *is* timm's model (its class subclassed only to normalise the input), so its state-dict keys
  are timm's: a `model.safetensors` / `pytorch_model.bin` from the Hugging Face hub (`timm/<name>.<tag>`)
  loads `strict=True` (`load_weights`).
* Like every gkl model it takes [0, 1] images and normalises inside, with the mean/std of timm's default
  pretrained configuration of that architecture (ImageNet's for ResNet-50 and BEiTv2; 0.5/0.5 for BEiT v1),
  so a teacher and a student with different normalisations see the same batch.
* Keyword arguments of `create_model`: ``drop_path`` (timm's ``drop_path_rate``, `model.drop_path`) and
  ``weights`` (a local weight file loaded strictly into the new model, `model.pretrained`).
* On the meta device (FLOP counts, parameter counts) only parameters and buffers go to meta: timm's BEiT
  computes its stochastic-depth rates with `.item()` while it is built, which a meta context refuses.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from gklcli.errors import GKLError
from gklcli.models.registry import ModelSpec, normalize_input, register, register_input_norm

PREFIX = "timm/"

# (registry name, timm architecture, description); timm's default pretrained tag decides the normalisation
TIMM_ARCHS = (
    ("resnet50", "timm's resnet50 (ResNet-50 'strikes back' layout; TABLE XIX's student)"),
    ("resnet18", "timm's resnet18"),
    ("resnet34", "timm's resnet34"),
    ("beitv2_large_patch16_224", "timm's BEiTv2-L/16 (TABLE XIX's teacher: beitv2_large_patch16_224.in1k_ft_in22k_in1k, 88.39)"),
    ("beit_large_patch16_224", "timm's BEiT-L/16 v1 (mean = std = 0.5)"),
)

_NORMALISED: dict[type, type] = {}


def is_timm(arch: Optional[str]) -> bool:
    return bool(arch) and str(arch).startswith(PREFIX)


def _normalised_class(base: type) -> type:
    """`base` with a forward that normalises its [0, 1] input first (one subclass per timm class)."""
    cls = _NORMALISED.get(base)
    if cls is None:
        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return base.forward(self, normalize_input(self, x))

        cls = type(base.__name__, (base,), {"forward": forward, "__module__": __name__,
                                           "__doc__": f"timm's {base.__name__}, input normalised inside (gkl)"})
        _NORMALISED[base] = cls
    return cls


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build on the CPU but register every parameter and buffer on the meta device (accelerate's
    `init_empty_weights`): weights are never allocated, and build-time `.item()` calls still work."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        register_buffer(self, name, tensor.to("meta") if tensor is not None else None, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


def create_timm(name: str, num_classes: int, *, drop_path: float = 0.0, weights: Optional[str | Path] = None) -> nn.Module:
    """timm's `name` (random weights, or `weights` loaded strictly) normalising its [0, 1] input inside."""
    import timm

    meta = torch.get_default_device().type == "meta"
    try:
        with torch.device("cpu") if meta else contextlib.nullcontext(), _parameters_on_meta() if meta else contextlib.nullcontext():
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path)
    except (RuntimeError, ValueError, TypeError) as error:
        raise GKLError(f"{PREFIX}{name}: timm cannot build it ({str(error).splitlines()[0][:160]})") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    model.__class__ = _normalised_class(type(model))
    register_input_norm(model, (cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))))
    if meta:
        model.mean, model.std = model.mean.to("meta"), model.std.to("meta")
    if weights is not None:
        load_weights(model, Path(weights), PREFIX + name)
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file, a gkl checkpoint, or a torch state dict (plain or under
    `state_dict`/`model`/`module`), read without running code (weights_only); one-line errors."""
    from gklcli.checkpoint import load_file

    if not path.is_file():
        raise GKLError(f"{path}: weight file not found")
    obj = load_file(path)
    for key in ("model", "state_dict", "module"):  # gkl checkpoints keep the weights under "model"
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GKLError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: Path, arch: str) -> None:
    """Load `path` into `model` strictly. Keys of the model's non-persistent buffers that a file written by
    an older timm still carries (BEiT's constant `relative_position_index`) are dropped when they equal the
    model's own values; every other missing, unexpected or misshapen key is an error."""
    state = read_state_dict(path)
    persistent = model.state_dict()
    buffers = dict(model.named_buffers())
    for key in [k for k in state if k not in persistent and k in buffers]:
        if state[key].shape == buffers[key].shape and torch.equal(state[key].to(buffers[key].dtype), buffers[key].cpu()):
            del state[key]
    missing = [k for k in persistent if k not in state]
    unexpected = [k for k in state if k not in persistent]
    shapes = [k for k in persistent if k in state and state[k].shape != persistent[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{what} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        raise GKLError(f"{path}: the weights do not fit {arch} ({'; '.join(parts)})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)


def _builder(timm_name: str) -> Any:
    def build(num_classes: int, drop_path: float = 0.0, weights: Optional[str | Path] = None) -> nn.Module:
        return create_timm(timm_name, num_classes, drop_path=drop_path, weights=weights)

    return build


for _name, _desc in TIMM_ARCHS:
    register(ModelSpec(name=PREFIX + _name, family="timm", builder=_builder(_name), default_num_classes=1000,
                       input_norm="in-model: timm's pretrained cfg", description=_desc))
