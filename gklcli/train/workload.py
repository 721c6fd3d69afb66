"""What a task trains on and with: its data, batch order and model (the engine owns everything else).

Adversarial training and classification distillation share `ImageWorkload` (labelled images, gkl's
model registry, the seeded batch sampler); CLIP distillation brings its own (`train/clip.py`: image–text
streams and OpenCLIP models). The engine asks a workload only for what is listed in `Workload`, so a
new kind of data never touches the loop, checkpoints, resume or DDP.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Protocol

import torch
from torch import Tensor, nn

from gklcli.data import DataBundle, TrainView, build_data, make_eval_loader, make_train_loader
from gklcli.distributed import DistEnv
from gklcli.errors import GKLError
from gklcli.models import get_spec
from gklcli.recipes import Recipe
from gklcli.sampling import make_batch_sampler
from gklcli.train.build import build_model


class Workload(Protocol):
    """Data and model of one run, as the engine uses them."""

    num_classes: int
    val: Any  # a validation source for `Step.evaluate` (None: no validation)
    test: Any  # the final test source (None: none)
    class_counts: Optional[Tensor]  # training samples per class (ImageNet-LT groups); None without labels

    def build_model(self, env: DistEnv) -> tuple[nn.Module, nn.Module, nn.Module]: ...

    def steps_per_epoch(self) -> int: ...

    def train_loader(self, epoch: int, start: int) -> Iterable[Any]: ...

    def eval_loader(self, source: Any, n: Optional[int]) -> Iterable[Any]: ...

    def meta(self) -> dict[str, Any]: ...  # arch, dataset, image_size, input_norm for the checkpoint


def worker_errors(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches; a GKLError raised in a worker (which carries the worker's traceback in its
    message) comes out as its one line."""
    try:
        yield from loader
    except GKLError as error:
        raise GKLError(str(error).strip().splitlines()[-1].removeprefix("gklcli.errors.GKLError: ")) from None


def input_norm(module: nn.Module) -> Optional[dict[str, list[float]]]:
    mean, std = getattr(module, "mean", None), getattr(module, "std", None)
    if mean is None or std is None:
        return None
    return {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}


def image_eval_loader(recipe: Recipe, env: DistEnv, source: Any, n: Optional[int]) -> Any:
    """The sharded evaluation loader of labelled images (every image workload's)."""
    d = recipe.data
    return make_eval_loader(source, n, d.eval_batch_size, d.num_workers, env.rank, env.world_size)


def image_meta(recipe: Recipe, num_classes: int, image_size: int, module: Optional[nn.Module]) -> dict[str, Any]:
    """The checkpoint meta of a registry classifier trained on images of `image_size`."""
    return {"arch": get_spec(recipe.model.arch).name, "num_classes": num_classes, "dataset": recipe.data.dataset,
            "image_size": image_size, "input_norm": input_norm(module) if module else None}


class ImageWorkload:
    """Labelled images (CIFAR, ImageNet, npz, DM-AT generated data) and a registry model."""

    def __init__(self, recipe: Recipe, data_dir: Optional[str], env: DistEnv):
        self.recipe, self.env = recipe, env
        self.data: DataBundle = build_data(recipe.data, data_dir, recipe.model.num_classes)
        d = self.data
        self.num_classes, self.val, self.test = d.num_classes, d.val, d.test
        self.class_counts = torch.bincount(torch.as_tensor(d.train.labels), minlength=self.num_classes)
        self.sampler = make_batch_sampler(
            recipe.data, len(d.train), len(d.generated) if d.generated is not None else 0,
            seed=recipe.train.seed, rank=env.rank, world_size=env.world_size,
        )
        self.view = TrainView(d.train, d.generated, recipe.data.augment, recipe.train.seed, recipe.data.autoaug_fill)
        self.module: Optional[nn.Module] = None

    def build_model(self, env: DistEnv) -> tuple[nn.Module, nn.Module, nn.Module]:
        built = build_model(self.recipe, self.num_classes, env)
        self.module = built[0]
        return built

    def steps_per_epoch(self) -> int:
        r = self.recipe
        steps = self.sampler.batches_per_epoch()
        if r.train.max_steps_per_epoch:
            steps = min(steps, r.train.max_steps_per_epoch)
        if steps == 0:
            raise GKLError(f"data.batch_size: {r.data.batch_size} is larger than the training set ({len(self.data.train)} images)")
        return steps

    def train_loader(self, epoch: int, start: int) -> Any:
        self.sampler.set_epoch(epoch, start)
        loader = make_train_loader(self.view, self.sampler, self.recipe.data.num_workers, self.env.device.type == "cuda")
        # the loader draws its worker base seed from this private generator, not the global RNG,
        # so creating a loader (at each epoch and on resume) leaves the training RNG untouched
        loader.generator = torch.Generator().manual_seed(self.recipe.train.seed)
        return loader

    def eval_loader(self, source: Any, n: Optional[int]) -> Any:
        return image_eval_loader(self.recipe, self.env, source, n)

    def meta(self) -> dict[str, Any]:
        return image_meta(self.recipe, self.num_classes, self.data.train.image_size, self.module)
