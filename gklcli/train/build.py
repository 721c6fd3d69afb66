"""What the engine builds before the first step: the seeded RNG, the model with its wrappers, the optimizer.

Construction is its own module because it is fixed by the recipe and the process layout alone
(no data order, checkpoint or step state): ghost BatchNorm, SyncBN, channels_last, DDP and
torch.compile wrap the model here, and the SGD parameter groups (no weight decay on BatchNorm
where the recipe says so) are chosen here, so they can be built and checked without training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gklcli.distributed import DistEnv
from gklcli.errors import GKLError
from gklcli.models import create_model, use_ghost_batch_norm
from gklcli.recipes import Recipe


def configure_determinism(recipe: Recipe, env: DistEnv) -> None:
    """Seed torch and ask for deterministic kernels where the recipe wants them."""
    torch.manual_seed(recipe.train.seed + env.rank)
    if recipe.train.deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def build_model(recipe: Recipe, num_classes: int, env: DistEnv, **create: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(module, model, attack_model): the plain module on the device, the model to train (DDP-wrapped
    and/or compiled) and the module the inner attacks run (compiled when train.compile is on). `create`:
    what the architecture's constructor takes beyond the class count (a timm student's drop_path, weights)."""
    cfg = recipe.model
    module = create_model(cfg.arch, num_classes, **create)
    if cfg.bn_group_size:
        use_ghost_batch_norm(module, bn_groups(recipe, env.world_size))
    if cfg.sync_bn and env.distributed:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return wrap_model(module, recipe, env)


def wrap_model(module: nn.Module, recipe: Recipe, env: DistEnv) -> tuple[nn.Module, nn.Module, nn.Module]:
    """`build_model`'s wrappers for any module: device, channels_last, DDP, torch.compile."""
    cfg = recipe.model
    module = module.to(env.device)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    model: nn.Module = module
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(module, device_ids=ids)  # rank 0's BN buffers each forward
    attack_model = module
    if recipe.train.compile:
        model = torch.compile(model)
        attack_model = torch.compile(module)
    return module, model, attack_model


def bn_groups(recipe: Recipe, world_size: int) -> int:
    """Ghost-batch groups per training forward of this process (both AutoAugment views count)."""
    r = recipe
    forward = r.data.batch_size // world_size * (2 if r.data.augment == "autoaug" else 1)
    if forward % r.model.bn_group_size:
        raise GKLError(f"model.bn_group_size: {r.model.bn_group_size} does not divide the {forward} images each of the "
                       f"{world_size} processes forwards")
    return forward // r.model.bn_group_size


def parameter_groups(module: nn.Module, opt: Any) -> list[dict[str, Any]]:
    """Parameter groups: without weight decay, BatchNorm weights and biases when `optim.bn_weight_decay`
    is false (DM-AT's `group_weight`), and every tensor of fewer than 2 dimensions when `optim.decay_1d`
    is false (OpenCLIP's rule: biases, LayerNorm gains, logit_scale)."""
    params = [p for p in module.parameters() if p.requires_grad]
    exempt = set()
    if not opt.bn_weight_decay:
        exempt |= {id(p) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters(recurse=False)}
    if not opt.decay_1d:
        exempt |= {id(p) for p in params if p.ndim < 2}
    if not exempt:
        return [{"params": params}]
    return [{"params": [p for p in params if id(p) not in exempt]},
            {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]


def head_groups(module: nn.Module, groups: list[dict[str, Any]], scale: float) -> list[dict[str, Any]]:
    """Each group split in two: the model's head (its `head_modules`) at lr_scale `scale`, the rest at 1 —
    APD's 10× lr for the PPM, classifier, auxiliary head and adapter of a PSPNet."""
    names = getattr(module, "head_modules", None)
    if not names:
        raise GKLError(f"optim.head_lr_scale: {type(module).__name__} does not say which modules are its head")
    head = {id(p) for n in names if getattr(module, n, None) is not None for p in getattr(module, n).parameters()}
    out = []
    for group in groups:
        for in_head, lr_scale in ((False, 1.0), (True, scale)):
            params = [p for p in group["params"] if (id(p) in head) == in_head]
            if params:
                out.append({**group, "params": params, "lr_scale": group.get("lr_scale", 1.0) * lr_scale})
    return out


def layer_decay_groups(module: nn.Module, opt: Any) -> list[dict[str, Any]]:
    """timm's layer-wise lr decay (USB's, BEiT's): groups by the model's `group_matcher` depth d of D, each
    with lr_scale = layer_decay^(D − d); no weight decay on 1-D tensors and `no_weight_decay()` names."""
    from timm.optim.optim_factory import param_groups_layer_decay

    if not hasattr(module, "group_matcher"):
        raise GKLError(f"optim.layer_decay: {type(module).__name__} has no layer groups (timm's group_matcher); "
                       "layer-wise lr decay is for timm ViTs")
    skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
    return param_groups_layer_decay(module, weight_decay=opt.weight_decay, no_weight_decay_list=skip,
                                    layer_decay=opt.layer_decay)


def make_optimizer(module: nn.Module, opt: Any) -> torch.optim.Optimizer:
    """The recipe's SGD, AdamW or LAMB (`optim`) over `parameter_groups(module, opt)` (or, with
    `optim.layer_decay` < 1, `layer_decay_groups`; the engine scales each group's lr by its lr_scale)."""
    groups = layer_decay_groups(module, opt) if opt.layer_decay < 1 else parameter_groups(module, opt)
    if opt.head_lr_scale != 1:
        groups = head_groups(module, groups, opt.head_lr_scale)
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.name == "lamb":  # timm's LAMB (Hao et al.'s strong KD scheme)
        from timm.optim import Lamb

        return Lamb(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay)
    return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=opt.nesterov)
