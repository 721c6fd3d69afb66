"""Data of semi-supervised learning (kind semi, TABLE XXII) as USB prepares it, with gkl's seeding.

* **The split** (`usb_split`): USB's `sample_labeled_unlabeled_data` rule. For every class c in order,
  the ascending indices of its training images are shuffled by NumPy's legacy generator seeded with
  `semi.split_seed` (one `RandomState`, consumed class after class, as USB's `np.random.seed(seed)` then
  `np.random.shuffle` per class); the first num_labels / C are labelled, the rest unlabelled. With
  `include_lb_to_ulb` the unlabelled set is the labelled images followed by the others (all 50,000
  CIFAR-100 training images, 500 per class, for 200 labels). A split that cannot give num_labels / C
  images to every class is refused in one line. The unlabelled images' labels are never read in training.
* **Views** (own implementations from USB's documented behaviour, on uint8 images):
  weak = RandomCrop(32, padding 4, reflect) + horizontal flip (p ½);
  strong = weak, then RandAugment: 3 ops drawn *with replacement* from USB's 14 (`OPS`), each at a
  magnitude uniform in its range, then Cutout (always; side U[0, ½)·width, grey (125, 123, 114)).
  Mean-Teacher's second view is a second, independent weak view (USB returns the weak transform there).
* **The batch stream** (`SemiBatches`): an epoch is `STEPS_PER_EPOCH` = 1024 steps (USB: 204,800
  iterations over 200 epochs). Step k of epoch e takes labelled positions k·B … k·B+B−1 and unlabelled
  positions k·uB … of the epoch's index streams; each stream is whole seeded permutations of its set
  laid end to end, then one truncated (USB's sampler: 40 full passes over the 200 labelled images + 192
  per epoch), drawn from (train.seed, epoch). Every view of every position has its own generator seeded
  by (train.seed, epoch, stream, position): a batch depends on (seed, epoch, step) only, so any number of
  DataLoader workers gives the same batches and a run resumes at any step. (USB seeds its sampler with
  the epoch alone, whatever the seed; gkl's also depends on train.seed.)
* Under DDP the global batch is the recipe's and rank r takes the r-th slice of each step's labelled and
  unlabelled parts (DistributedSampler semantics).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch import Tensor

from gklcli.errors import GKLError
from gklcli.sampling import sample_seed

STEPS_PER_EPOCH = 1024  # USB: num_train_iter // epoch = 204,800 // 200
PADDING = 4  # USB: int(img_size · (1 − crop_ratio)) = int(32 · 0.125)
CUTOUT_FILL = (125, 123, 114)
RANDAUGMENT_OPS = 3  # USB's RandAugment(3, 5): 3 ops (the magnitude 5 is unused, each op draws its own)
CUTOUT_MAX = 0.5  # Cutout's side: U[0, 0.5) · width

# the streams of one step, each with its own seeds (positions are counted per stream within the epoch)
_LB, _ULB, _LB_VIEW, _WEAK, _STRONG = 0x1B, 0x2B, 0x3B, 0x4B, 0x5B


# ---------------------------------------------------------------------------------------------------
# The labelled / unlabelled split
# ---------------------------------------------------------------------------------------------------


def usb_split(labels: np.ndarray, num_classes: int, num_labels: int, seed: int,
              include_lb_to_ulb: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(labelled, unlabelled) indices into the training set by USB's balanced rule (see the module text)."""
    labels = np.asarray(labels)
    if num_labels % num_classes:
        raise GKLError(f"semi.num_labels: {num_labels} is not a multiple of the {num_classes} classes "
                       "(USB labels num_labels / classes images of every class)")
    per_class = num_labels // num_classes
    rng = np.random.RandomState(seed)
    lb: list[np.ndarray] = []
    ulb: list[np.ndarray] = []
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        if len(idx) < per_class:
            raise GKLError(f"semi.num_labels: {num_labels} needs {per_class} labelled images of every class, "
                           f"class {c} has {len(idx)} training image(s)")
        rng.shuffle(idx)
        lb.append(idx[:per_class])
        ulb.append(idx[per_class:])
    lb_idx = np.concatenate(lb).astype(np.int64)
    ulb_idx = np.concatenate(ulb).astype(np.int64)
    if include_lb_to_ulb:
        ulb_idx = np.concatenate([lb_idx, ulb_idx])
    if len(ulb_idx) == 0:
        raise GKLError(f"semi.num_labels: {num_labels} leaves no unlabelled image (set semi.include_lb_to_ulb: true "
                       "or label fewer images)")
    return lb_idx, ulb_idx


# ---------------------------------------------------------------------------------------------------
# Views: weak (crop + flip) and strong (weak + RandAugment + Cutout), on H×W×3 uint8 arrays
# ---------------------------------------------------------------------------------------------------


def weak_view(img: np.ndarray, rng: np.random.Generator, padding: int = PADDING) -> np.ndarray:
    """RandomCrop(size, padding, reflect) then a horizontal flip with probability ½ (H×W×3 uint8)."""
    h, w, _ = img.shape
    padded = np.pad(img, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
    top, left = (int(v) for v in rng.integers(0, 2 * padding + 1, size=2))
    out = padded[top:top + h, left:left + w]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _enhance(kind: Any) -> Callable[[Image.Image, float], Image.Image]:
    return lambda img, v: kind(img).enhance(v)


def _affine(matrix: Callable[[Image.Image, float], tuple]) -> Callable[[Image.Image, float], Image.Image]:
    # PIL's defaults, as USB: nearest neighbour, areas from outside the image black
    return lambda img, v: img.transform(img.size, Image.Transform.AFFINE, matrix(img, v))


# USB's 14 RandAugment ops and their magnitude ranges (semilearn/datasets/augmentation/randaugment.py,
# `augment_list`); the magnitude of each drawn op is uniform in [lo, hi]
OPS: tuple[tuple[str, Callable[[Image.Image, float], Image.Image], float, float], ...] = (
    ("AutoContrast", lambda img, v: ImageOps.autocontrast(img), 0.0, 1.0),
    ("Brightness", _enhance(ImageEnhance.Brightness), 0.05, 0.95),
    ("Color", _enhance(ImageEnhance.Color), 0.05, 0.95),
    ("Contrast", _enhance(ImageEnhance.Contrast), 0.05, 0.95),
    ("Equalize", lambda img, v: ImageOps.equalize(img), 0.0, 1.0),
    ("Identity", lambda img, v: img, 0.0, 1.0),
    ("Posterize", lambda img, v: ImageOps.posterize(img, max(1, int(v))), 4.0, 8.0),
    ("Rotate", lambda img, v: img.rotate(v), -30.0, 30.0),
    ("Sharpness", _enhance(ImageEnhance.Sharpness), 0.05, 0.95),
    ("ShearX", _affine(lambda img, v: (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    ("ShearY", _affine(lambda img, v: (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    ("Solarize", lambda img, v: ImageOps.solarize(img, v), 0.0, 256.0),
    ("TranslateX", _affine(lambda img, v: (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),
    ("TranslateY", _affine(lambda img, v: (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),
)


def cutout(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """USB's Cutout after the ops: a square of side v = U[0, ½)·width filled with (125, 123, 114).

    Its centre is drawn as USB draws it, `np.random.uniform(w)` — NumPy's uniform(low=w, high=1), a value in
    (1, w] — then the corner is int(max(0, centre − v/2)) and the far corner min(w, corner + v), drawn by
    PIL's `rectangle` (both corners inclusive)."""
    w, h = img.size
    v = rng.random() * CUTOUT_MAX * w
    x0 = w + (1.0 - w) * rng.random()
    y0 = h + (1.0 - h) * rng.random()
    x0, y0 = int(max(0.0, x0 - v / 2.0)), int(max(0.0, y0 - v / 2.0))
    x1, y1 = min(w, x0 + v), min(h, y0 + v)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), fill=CUTOUT_FILL)
    return img


def rand_augment(img: np.ndarray, rng: np.random.Generator, n: int = RANDAUGMENT_OPS) -> tuple[np.ndarray, list[str]]:
    """USB's RandAugment on an H×W×3 uint8 array: n ops with replacement, uniform magnitudes, then Cutout.
    Returns the image and the names of the ops applied (for tests and logs)."""
    pil = Image.fromarray(img)
    names = []
    for k in rng.integers(0, len(OPS), size=n):
        name, op, lo, hi = OPS[int(k)]
        pil = op(pil, lo + (hi - lo) * rng.random())
        names.append(name)
    return np.asarray(cutout(pil, rng), dtype=np.uint8), names


def strong_view(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """USB's strong transform: the weak crop and flip, then RandAugment(3) with Cutout."""
    return rand_augment(weak_view(img, rng), rng)[0]


def view_rng(seed: int, epoch: int, stream: int, position: int) -> np.random.Generator:
    """The generator of one view of one position of the epoch (nothing global is read)."""
    return np.random.Generator(np.random.PCG64(sample_seed(seed ^ (stream << 56), epoch, position)))


# ---------------------------------------------------------------------------------------------------
# The batch stream
# ---------------------------------------------------------------------------------------------------


def epoch_stream(size: int, count: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """`count` positions over a set of `size`: seeded permutations end to end, the last one truncated."""
    gen = torch.Generator().manual_seed(sample_seed(seed ^ (stream << 56), epoch, -1))
    parts, have = [], 0
    while have < count:
        parts.append(torch.randperm(size, generator=gen)[:count - have])
        have += len(parts[-1])
    return torch.cat(parts).numpy()


class SemiBatches(torch.utils.data.Dataset):
    """The batches of one epoch, indexed by step: `batch[k]` depends on (seed, epoch, k) only.

    Each item is a dict: ``x_lb`` (B×3×H×W uint8, weak views of labelled images), ``y_lb``, ``x_ulb_w`` and
    ``x_ulb_s`` (uB unlabelled images: weak, and strong — for Mean-Teacher a second independent weak view,
    as USB), ``step`` (0-based over the run) and ``total_steps``. Under DDP a rank's slice of each part."""

    def __init__(self, images: Any, labels: np.ndarray, lb_idx: np.ndarray, ulb_idx: np.ndarray, *, batch_size: int,
                 uratio: int, algorithm: str, seed: int, epoch: int, steps_per_epoch: int, total_steps: int,
                 rank: int = 0, world_size: int = 1):
        self.images, self.labels, self.lb_idx, self.ulb_idx = images, labels, lb_idx, ulb_idx
        self.b, self.ub = batch_size, batch_size * uratio
        self.strong = algorithm == "fixmatch"
        self.seed, self.epoch, self.steps = seed, epoch, steps_per_epoch
        self.total_steps, self.rank, self.world_size = total_steps, rank, world_size
        self.lb_positions = epoch_stream(len(lb_idx), STEPS_PER_EPOCH * self.b, seed, epoch, _LB)
        self.ulb_positions = epoch_stream(len(ulb_idx), STEPS_PER_EPOCH * self.ub, seed, epoch, _ULB)

    def __len__(self) -> int:
        return self.steps

    def _mine(self, start: int, count: int) -> range:
        positions = torch.tensor_split(torch.arange(start, start + count), self.world_size)[self.rank]
        return range(int(positions[0]), int(positions[-1]) + 1) if len(positions) else range(0)

    def _image(self, index: int) -> np.ndarray:
        return np.asarray(self.images[index], dtype=np.uint8)

    def __getitem__(self, step: int) -> dict[str, Any]:
        e, seed = self.epoch, self.seed
        x_lb, y_lb, x_w, x_s = [], [], [], []
        for p in self._mine(step * self.b, self.b):
            index = int(self.lb_idx[self.lb_positions[p]])
            x_lb.append(weak_view(self._image(index), view_rng(seed, e, _LB_VIEW, p)))
            y_lb.append(int(self.labels[index]))
        for p in self._mine(step * self.ub, self.ub):
            img = self._image(int(self.ulb_idx[self.ulb_positions[p]]))
            x_w.append(weak_view(img, view_rng(seed, e, _WEAK, p)))
            second = view_rng(seed, e, _STRONG, p)
            x_s.append(strong_view(img, second) if self.strong else weak_view(img, second))
        return {"x_lb": _stack(x_lb), "y_lb": torch.tensor(y_lb, dtype=torch.int64), "x_ulb_w": _stack(x_w),
                "x_ulb_s": _stack(x_s), "step": (e - 1) * self.steps + step, "total_steps": self.total_steps}


def _stack(views: list[np.ndarray]) -> Tensor:
    """H×W×3 uint8 arrays → N×3×H×W uint8 (the engine's `to_float` makes [0, 1] floats on the device)."""
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous()


def semi_train_loader(batches: SemiBatches, start: int, num_workers: int, pin_memory: bool,
                      seed: int) -> torch.utils.data.DataLoader:
    """Steps `start` … of the epoch, in order; the loader's own generator leaves the training RNG alone."""
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, len(batches)),
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(seed))


def class_of(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class among `indices` (the labelled split's counts, for messages and tests)."""
    return np.bincount(np.asarray(labels)[indices], minlength=num_classes)


def describe_split(labels: np.ndarray, lb_idx: np.ndarray, ulb_idx: np.ndarray, num_classes: int) -> str:
    counts = class_of(labels, lb_idx, num_classes)
    return (f"{len(lb_idx):,} labelled ({int(counts.min())}–{int(counts.max())} per class), "
            f"{len(ulb_idx):,} unlabelled")


def load_semi_sources(cfg: Any, data_dir: Optional[str], num_classes: Optional[int]) -> tuple[Any, Any, int]:
    """(training source, test source, classes) of a semi recipe's `DataCfg`: CIFAR through torchvision
    (`gklcli.data.torchvision_cifar`), or gkl's synthetic generator for tests and smoke runs. There is no
    validation split: USB evaluates the test set (data.val_size must be 0)."""
    from pathlib import Path

    from gklcli.data import load_test_set, make_synthetic, torchvision_cifar
    from gklcli.datasets import facts

    if cfg.val_size:
        raise GKLError(f"data.val_size: {cfg.val_size}: semi-supervised runs hold out no validation images "
                       "(USB evaluates the test set, and the labelled split is drawn from every training image); set 0")
    if cfg.dataset in ("cifar10", "cifar100"):
        classes = facts(cfg.dataset).classes
        train = torchvision_cifar(cfg.dataset, Path(data_dir or cfg.root or "data"), True, cfg.download)
    elif cfg.dataset == "synthetic":
        syn = cfg.synthetic
        classes = syn.num_classes
        train = make_synthetic(syn.num_train, classes, syn.image_size, syn.seed, "train", syn.imbalance)
    else:
        raise GKLError(f"data.dataset: {cfg.dataset!r}: semi-supervised training reads cifar100, cifar10 or synthetic")
    if num_classes is not None and num_classes != classes:
        raise GKLError(f"model.num_classes: {num_classes} does not match dataset {cfg.dataset} ({classes} classes)")
    return train, load_test_set(cfg, data_dir, classes), classes
