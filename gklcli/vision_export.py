"""Export an OpenCLIP image tower as a Hugging Face ``CLIPVisionModel`` folder, the vision encoder LLaVA loads.

TABLE VIII plugs the distilled CLIP ViT-B/16 students into LLaVA as its vision encoder. LLaVA reads a
folder with ``CLIPVisionModel.from_pretrained(path)`` and ``CLIPImageProcessor.from_pretrained(path)``
and feeds the language model the hidden states of one layer (``--mm_vision_select_layer -2``: the
penultimate). This module writes that folder from an OpenCLIP model:

* ``config.json``: a ``CLIPVisionConfig`` (``architectures: ["CLIPVisionModel"]``, with the projection
  size so ``CLIPVisionModelWithProjection`` loads it too);
* ``model.safetensors``: the weights under the ``vision_model.*`` / ``visual_projection.weight`` names
  that transformers 4.x (LLaVA's pin) and 5.x both read;
* ``preprocessor_config.json``: bicubic resize of the short side, centre crop, the tower's mean/std;
* ``gkl_export.json``: where the weights came from, the verification numbers and the LLaVA flags.

The folder is built beside its destination, loaded back with transformers and compared with the
OpenCLIP model (image embeddings and every layer's hidden states) before it is renamed into place, so
a conversion that does not reproduce the tower never reaches disk. transformers is optional
(``pip install 'gklcli[llava]'``) and imported only here, inside functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from gklcli.errors import GKLError
from gklcli.models.clip import ImageSpec

TOLERANCE = 1e-4  # largest |difference| allowed, relative to the largest |value| of the OpenCLIP output (fp32)
SELECT_LAYER = -2  # LLaVA's --mm_vision_select_layer: the penultimate layer's hidden states
FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "gkl_export.json")
EXPORT_FORMAT = "gkl-vision-tower"


def _transformers() -> Any:
    """transformers, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise GKLError("exporting a vision tower for LLaVA needs transformers: pip install 'gklcli[llava]'") from None
    return transformers


# --------------------------------------------------------------------------- configuration


def _tower(model: nn.Module) -> nn.Module:
    """`model.visual` when it is a plain OpenCLIP ViT that CLIPVisionModel can express, else a GKLError."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if visual is None:
        raise GKLError(f"{type(model).__name__}: not an OpenCLIP model (it has no .visual image tower)")
    if type(visual) is not VisionTransformer:
        raise GKLError(f"the image tower is a {type(visual).__name__}; only OpenCLIP ViT towers "
                       "(open_clip.transformer.VisionTransformer) map to a transformers CLIPVisionModel")
    problems = _tower_problems(visual)
    if problems:
        raise GKLError(f"this ViT tower does not map to a transformers CLIPVisionModel: {'; '.join(problems)}")
    return visual


def _tower_problems(visual: nn.Module) -> list[str]:
    """What in a ViT tower CLIPVisionModel has no counterpart for (empty when it maps)."""
    problems = []
    if visual.attn_pool is not None:
        problems.append("attentional pooling (attn_pool)")
    if visual.pool_type == "avg":
        problems.append("global average pooling (pool_type 'avg'; CLIPVisionModel pools the class token)")
    elif visual.pool_type != "tok":
        problems.append(f"pool_type {visual.pool_type!r} (CLIPVisionModel pools the class token)")
    if visual.proj is None:
        problems.append("no output projection (proj)")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        problems.append("no ln_pre (no_ln_pre; CLIPVisionModel always has pre_layrnorm)")
    conv = visual.conv1
    if conv.bias is not None or conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1]:
        problems.append("a patch embedding that is not a square, bias-free, non-overlapping convolution")
    if visual.image_size[0] != visual.image_size[1]:
        problems.append(f"non-square images {tuple(visual.image_size)}")
    grid = visual.image_size[0] // conv.kernel_size[0]
    if tuple(visual.positional_embedding.shape) != (grid * grid + 1, conv.out_channels):
        problems.append(f"a positional embedding of shape {tuple(visual.positional_embedding.shape)}")
    for i, block in enumerate(visual.transformer.resblocks):
        problems += [f"block {i}: {p}" for p in _block_problems(block)]
    norms = [m for m in visual.modules() if isinstance(m, nn.LayerNorm)]
    if len({m.eps for m in norms}) > 1 or any(not m.elementwise_affine or m.bias is None for m in norms):
        problems.append("layer norms with differing eps or without affine weight and bias")
    return problems


def _block_problems(block: nn.Module) -> list[str]:
    """What in one residual block CLIPEncoderLayer cannot express."""
    from open_clip.transformer import ResidualAttentionBlock

    if type(block) is not ResidualAttentionBlock:
        return [f"a {type(block).__name__} (qk-norm, scaled-cosine or other custom attention)"]
    problems = []
    if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
        problems.append("LayerScale (ls_init_value)")
    if hasattr(block, "ln_1_kv"):
        problems.append("cross attention")
    attn = block.attn
    if attn.in_proj_weight is None or attn.in_proj_bias is None or attn.bias_k is not None:
        problems.append("attention without a packed, biased q/k/v projection")
    if list(block.mlp._modules) != ["c_fc", "gelu", "c_proj"]:
        problems.append(f"an MLP of {list(block.mlp._modules)}")
    else:
        try:
            _activation(block.mlp.gelu)
        except GKLError as error:
            problems.append(str(error))
    return problems


def _activation(act: nn.Module) -> str:
    """The transformers ``hidden_act`` name of an OpenCLIP MLP activation."""
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    raise GKLError(f"activation {act!r} (only QuickGELU and exact GELU map)")


def hf_vision_config(model: nn.Module) -> dict[str, Any]:
    """The transformers ``CLIPVisionConfig`` fields of an OpenCLIP model's ViT image tower.

    Towers CLIPVisionModel cannot express (attentional or average pooling, LayerScale, custom attention,
    non-ViT towers…) are refused with a GKLError naming what does not map."""
    visual = _tower(model)
    blocks = visual.transformer.resblocks
    first = blocks[0]
    return {
        "hidden_size": int(visual.conv1.out_channels),
        "intermediate_size": int(first.mlp.c_fc.out_features),
        "projection_dim": int(visual.proj.shape[1]),
        "num_hidden_layers": len(blocks),
        "num_attention_heads": int(first.attn.num_heads),
        "num_channels": int(visual.conv1.in_channels),
        "image_size": int(visual.image_size[0]),
        "patch_size": int(visual.conv1.kernel_size[0]),
        "hidden_act": _activation(first.mlp.gelu),
        "layer_norm_eps": float(visual.ln_pre.eps),
    }


# --------------------------------------------------------------------------- weights


def _split_qkv(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn.MultiheadAttention's packed in_proj (rows q, then k, then v) as (q, k, v)."""
    q, k, v = packed.chunk(3, dim=0)
    return q, k, v


def _block_state(src: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """One OpenCLIP residual block's weights under CLIPEncoderLayer names (consumed from `src`)."""
    a, b = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
    out = {}
    for part in ("weight", "bias"):
        q, k, v = _split_qkv(src.pop(f"{a}attn.in_proj_{part}"))
        out |= {f"{b}self_attn.q_proj.{part}": q, f"{b}self_attn.k_proj.{part}": k, f"{b}self_attn.v_proj.{part}": v}
        for old, new in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{b}{new}.{part}"] = src.pop(f"{a}{old}.{part}")
    return out


def _renamed_state(visual: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tower's weights under CLIPVisionModelWithProjection names, and the OpenCLIP keys left unused."""
    src = dict(visual.state_dict())
    e = "vision_model.embeddings."
    out = {
        f"{e}patch_embedding.weight": src.pop("conv1.weight"),
        f"{e}class_embedding": src.pop("class_embedding"),
        f"{e}position_embedding.weight": src.pop("positional_embedding"),
        "visual_projection.weight": src.pop("proj").t(),
    }
    for part in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{part}"] = src.pop(f"ln_pre.{part}")
        out[f"vision_model.post_layernorm.{part}"] = src.pop(f"ln_post.{part}")
    for i in range(len(visual.transformer.resblocks)):
        out |= _block_state(src, i)
    return out, sorted(src)


def _hf_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of CLIPVisionModelWithProjection for `config`, with its shape (no weights made)."""
    transformers = _transformers()
    with torch.device("meta"):
        skeleton = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config))
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def convert_vision_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """OpenCLIP image-tower weights as a CLIPVisionModelWithProjection state dict (fp32, contiguous, CPU).

    Strict: every key of the transformers model is filled with the right shape and every OpenCLIP
    tower weight is used, or a GKLError says which are not."""
    config = hf_vision_config(model)
    state, unused = _renamed_state(model.visual)
    expected = _hf_shapes(config)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if unused or missing or extra or wrong:
        raise GKLError("the OpenCLIP → CLIPVisionModel conversion does not fit: "
                       f"unused {_few(unused)}; unfilled {_few(missing)}; unknown {_few(extra)}; wrong shape {_few(wrong)}")
    return {k: v.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3})" if len(keys) > 3 else "") if keys else "none"


# --------------------------------------------------------------------------- verification


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """No TF32 in CUDA matmuls/convolutions while comparing (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers without its loading progress bars and load reports (restored afterwards)."""
    logging = _transformers().utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _load_back(out_dir: Path, device: torch.device) -> nn.Module:
    """The folder as CLIPVisionModelWithProjection (eval, fp32); CLIPVisionModel must load it without gaps."""
    transformers = _transformers()
    with _quiet_transformers():
        try:
            plain, info = transformers.CLIPVisionModel.from_pretrained(str(out_dir), output_loading_info=True)
            if info["missing_keys"] or info["mismatched_keys"]:
                raise GKLError(f"{out_dir}: CLIPVisionModel loads it with missing {_few(sorted(info['missing_keys']))}, "
                               f"mismatched {_few(sorted(map(str, info['mismatched_keys'])))}")
            del plain
            hf, info = transformers.CLIPVisionModelWithProjection.from_pretrained(str(out_dir), output_loading_info=True)
        except (OSError, ValueError) as error:
            raise GKLError(f"{out_dir}: transformers cannot load it ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200] if str(error) else ''})") from None
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise GKLError(f"{out_dir}: CLIPVisionModelWithProjection loads it with missing {_few(sorted(info['missing_keys']))}, "
                       f"unexpected {_few(sorted(info['unexpected_keys']))}")
    return hf.to(device=device, dtype=torch.float32).eval()


def _openclip_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """OpenCLIP's image embeddings and hidden states (after ln_pre, then after every block: HF's layout)."""
    visual = model.visual
    hidden: list[torch.Tensor] = []
    batch_first = getattr(visual.transformer, "batch_first", True)

    def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        hidden.append(output if batch_first else output.transpose(0, 1))

    hooks = [m.register_forward_hook(keep) for m in (visual.ln_pre, *visual.transformer.resblocks)]
    try:
        embeds = model.encode_image(x)
    finally:
        for hook in hooks:
            hook.remove()
    return embeds, hidden


def compare_vision_tower(model: nn.Module, out_dir: str | Path, *, n: int = 4, seed: int = 0) -> dict[str, float]:
    """Load `out_dir` back with transformers and compare it with the OpenCLIP model on `n` random
    normalised images of the tower's size: max |difference| and max |OpenCLIP value| of the image
    embeddings and of the hidden states (every layer, the ones LLaVA reads)."""
    out_dir = Path(out_dir)
    size = hf_vision_config(model)["image_size"]
    device = next(model.parameters()).device
    if any(p.dtype != torch.float32 for p in model.visual.parameters()):
        raise GKLError("the OpenCLIP model is not fp32; export and verify from the fp32 weights")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=generator).to(device)
    hf = _load_back(out_dir, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _exact_fp32():
            ref_embeds, ref_hidden = _openclip_outputs(model, x)
            got = hf(pixel_values=x, output_hidden_states=True)
    finally:
        model.train(was_training)
    if len(got.hidden_states) != len(ref_hidden):
        raise GKLError(f"{out_dir}: {len(got.hidden_states)} hidden states from transformers, {len(ref_hidden)} from OpenCLIP")
    return {
        "image_embeds_max_abs_diff": (got.image_embeds - ref_embeds).abs().max().item(),
        "image_embeds_scale": ref_embeds.abs().max().item(),
        "hidden_states_max_abs_diff": max((g - r).abs().max().item() for g, r in zip(got.hidden_states, ref_hidden)),
        "hidden_states_scale": max(r.abs().max().item() for r in ref_hidden),
    }


def verify_vision_tower(model: nn.Module, out_dir: str | Path, *, n: int = 4, seed: int = 0) -> float:
    """max |image_embeds of the exported folder (CLIPVisionModelWithProjection) − OpenCLIP encode_image|
    on `n` random normalised images (seeded); the folder must also load as CLIPVisionModel."""
    return compare_vision_tower(model, out_dir, n=n, seed=seed)["image_embeds_max_abs_diff"]


def _check(diffs: dict[str, float], where: Path) -> None:
    """Refuse an export whose outputs differ from OpenCLIP's by more than TOLERANCE of their scale."""
    for name in ("image_embeds", "hidden_states"):
        diff, scale = diffs[f"{name}_max_abs_diff"], diffs[f"{name}_scale"]
        if not diff <= TOLERANCE * scale:  # also refuses NaN
            raise GKLError(f"{where}: the exported tower does not reproduce the OpenCLIP model: {name} differ by up to "
                           f"{diff:.3g} (values up to {scale:.3g}; allowed {TOLERANCE:g} of that); nothing was written")


# --------------------------------------------------------------------------- the folder


def _write_config(config: dict[str, Any], folder: Path) -> None:
    transformers = _transformers()
    transformers.CLIPVisionConfig(**config, architectures=["CLIPVisionModel"]).save_pretrained(str(folder))


def _write_weights(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(convert_vision_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})


def _write_processor(image: ImageSpec, folder: Path) -> None:
    """LLaVA's CLIPImageProcessor: short side to the tower's size (bicubic), centre crop, mean/std."""
    transformers = _transformers()
    from transformers.image_utils import PILImageResampling

    size = int(image.size)
    transformers.CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[float(v) for v in image.mean], image_std=[float(v) for v in image.std], do_convert_rgb=True,
    ).save_pretrained(str(folder))


def _record(out_dir: Path, *, source: str, arch: Optional[str], image: ImageSpec, diffs: dict[str, float],
            n: int, seed: int) -> dict[str, Any]:
    """The contents of gkl_export.json."""
    import open_clip

    flags = ["--vision_tower", str(out_dir), "--mm_vision_select_layer", str(SELECT_LAYER)]
    return {
        "format": EXPORT_FORMAT,
        "source": source,
        "arch": arch,
        "max_abs_diff": diffs["image_embeds_max_abs_diff"],
        "verification": {"n": n, "seed": seed, "relative_tolerance": TOLERANCE, "dtype": "float32", **diffs},
        "image": {"size": int(image.size), "mean": list(image.mean), "std": list(image.std)},
        "transformers_version": _transformers().__version__,
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
        "llava_flags": flags,
        "llava_command_line": shlex.join(flags),
    }


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise GKLError(f"{out_dir}: exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GKLError(f"{out_dir}: folder exists and is not empty; pass overwrite (--overwrite) to replace it")


def _temp_folder(out_dir: Path) -> Path:
    """An empty folder beside `out_dir`, with the permissions a plain mkdir would give (not 0700)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`; a previous `out_dir` is moved aside first, then removed."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_vision_tower(model: nn.Module, image: ImageSpec, out_dir: str | Path, *, source: str,
                        arch: Optional[str] = None, overwrite: bool = False, n: int = 4, seed: int = 0) -> dict[str, Any]:
    """Write the OpenCLIP model's image tower to `out_dir` as a LLaVA-loadable CLIPVisionModel folder.

    The folder is built beside `out_dir`, verified (`compare_vision_tower`: loaded back with
    transformers, outputs within TOLERANCE of OpenCLIP's) and only then renamed into place; on any
    failure nothing is left. An existing non-empty `out_dir` is refused unless `overwrite`. Returns
    what gkl_export.json records (source, arch, max_abs_diff, versions, LLaVA flags)."""
    out_dir = Path(out_dir).absolute()
    config = hf_vision_config(model)
    if int(image.size) != config["image_size"]:
        raise GKLError(f"image size {image.size} does not match the tower's {config['image_size']}")
    _refuse_existing(out_dir, overwrite)
    tmp = _temp_folder(out_dir)
    try:
        _write_config(config, tmp)
        _write_weights(model, tmp)
        _write_processor(image, tmp)
        diffs = compare_vision_tower(model, tmp, n=n, seed=seed)
        _check(diffs, out_dir)
        record = _record(out_dir, source=source, arch=arch, image=image, diffs=diffs, n=n, seed=seed)
        (tmp / "gkl_export.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _refuse_existing(out_dir, overwrite)  # again: another writer may have filled it meanwhile
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
