"""Datasets and augmentation for training and evaluation (the batch order is `gklcli.sampling`).

Design choices, and why:

* Images stay uint8 (N×H×W×C) until they reach the device, where `to_float` turns a batch into
  [0, 1] floats. Models normalise internally, so nothing else touches the pixels.
* Every random choice is derived from explicit seeds: the shuffle from (seed, epoch) and each
  sample's augmentation from (seed, epoch, index). The sampler yields ``(epoch, index)`` pairs, so
  DataLoader workers hold no state, any number of workers gives the same batches, and a run resumed
  in the middle of an epoch sees exactly the batches the interrupted run would have seen.
* Under DDP the *global* batch is the recipe's batch size and rank r takes the r-th slice of it:
  N ranks see the same global batches as one process (DistributedSampler semantics, resumable).
* Generated data (DM-AT `.npz` with `image`/`label`, up to 50M images ≈ 150 GB) is memory-mapped
  straight out of the (uncompressed) zip archive, never loaded whole.
"""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from gklcli.datasets import DATASETS, facts
from gklcli.errors import GKLError
from gklcli.sampling import EpochBatchSampler, sample_seed, seeded_rngs

CIFAR = ("cifar10", "cifar100")  # loaded through torchvision
_SPLIT_SEED = 0  # the validation split is the same for every run and seed (never the test set)


# ---------------------------------------------------------------------------------------------------
# Image sources: uint8 arrays N×H×W×C (in memory or memory-mapped) with int64 labels.
# ---------------------------------------------------------------------------------------------------


@dataclass
class ArraySource:
    """Images (N×H×W×C uint8, possibly a memmap) and labels; `name` is used in messages."""

    images: Any
    labels: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int) -> tuple[Tensor, int]:
        """One image as a C×H×W uint8 tensor and its label."""
        img = torch.from_numpy(np.array(self.images[index], copy=True)).permute(2, 0, 1)
        return img, int(self.labels[index])

    eval_get = get  # fixed-size images need no evaluation transform

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, indices: np.ndarray, name: str) -> "ArraySource":
        """Row subset; memmaps stay unmaterialised."""
        return ArraySource(_IndexedArray(self.images, indices), self.labels[indices], name)


@dataclass
class FileSource:
    """Images in files (ImageNet ImageFolder, ImageNet-LT lists), decoded on access to uint8 C×H×W.

    `get` returns the full image (training crops it); `eval_get` the standard evaluation view:
    resize the short side to size·256/224, then centre-crop `size`. Another `crop_pct` or a bicubic
    `interpolation` is timm's evaluation transform instead (resize to ⌊size/crop_pct⌋ on the PIL image).
    """

    paths: list[str]
    labels: np.ndarray
    name: str
    size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return self.size

    def get(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image  # what torchvision's ImageFolder decodes with

        try:
            with Image.open(self.paths[index]) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except OSError as error:
            raise GKLError(f"{self.paths[index]}: cannot read image ({error})") from None
        return torch.from_numpy(pixels).permute(2, 0, 1), int(self.labels[index])

    def eval_get(self, index: int) -> tuple[Tensor, int]:
        from torchvision.transforms.v2 import functional as TF

        img, label = self.get(index)
        if (self.crop_pct, self.interpolation) != (0.875, "bilinear"):
            return timm_eval_view(img, self.size, self.crop_pct, self.interpolation), label
        img = TF.resize(img, [round(self.size * 256 / 224)], antialias=True)
        return TF.center_crop(img, [self.size, self.size]), label

    def subset(self, indices: np.ndarray, name: str) -> "FileSource":
        return FileSource([self.paths[i] for i in indices], self.labels[indices], name, self.size, self.crop_pct, self.interpolation)


def eval_view_settings(cfg: Any) -> dict[str, Any]:
    """The evaluation crop of a `DataCfg`: data.eval_crop_pct; bicubic with augment timm (timm's resnet50 and
    BEiTv2 configurations, Hao et al.'s evaluation), torchvision's bilinear otherwise."""
    return {"crop_pct": cfg.eval_crop_pct, "interpolation": "bicubic" if cfg.augment == "timm" else "bilinear"}


def image_folder(root: Path, size: int, name: str, **view: Any) -> FileSource:
    """torchvision ImageFolder layout: one folder per class, classes in sorted order."""
    if not root.is_dir():
        raise GKLError(f"{name}: {root} not found; expected one sub-folder per class (ImageFolder layout)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((root / cls).iterdir()):
            if file.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
                paths.append(str(file))
                labels.append(label)
    if not paths:
        raise GKLError(f"{name}: no images under {root}")
    return FileSource(paths, np.asarray(labels, dtype=np.int64), name, size, **view)


def image_list(root: Path, list_file: str, size: int, name: str, **view: Any) -> FileSource:
    """ImageNet-LT list files: `relative/path.JPEG label` per line, paths relative to the data root."""
    path = Path(list_file) if Path(list_file).is_absolute() else root / list_file
    if not path.is_file():
        raise GKLError(f"{name}: list file {path} not found (ImageNet-LT's {Path(list_file).name}; pass --data-dir)")
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise GKLError(f"{path}:{number}: expected 'relative/path.jpg label', got {line!r}")
        paths.append(str(root / parts[0]))
        labels.append(int(parts[1]))
    return FileSource(paths, np.asarray(labels, dtype=np.int64), name, size, **view)


def _check_arrays(images: Any, labels: np.ndarray, name: str, num_classes: Optional[int]) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise GKLError(f"{name}: `image` must be uint8 of shape (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise GKLError(f"{name}: `label` must have shape ({len(images)},), got {tuple(labels.shape)}")
    if len(labels) and num_classes is not None:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise GKLError(f"{name}: labels must lie in [0, {num_classes - 1}], found [{lo}, {hi}]")


def _zip_member_memmap(path: Path, archive: zipfile.ZipFile, member: str) -> Optional[np.ndarray]:
    """Memory-map an uncompressed `.npy` member of an `.npz` file; None if it is compressed."""
    info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise GKLError(f"{path}: corrupt zip header for {member}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
        offset = fh.tell()
    if fortran:
        raise GKLError(f"{path}: {member} is Fortran-ordered; re-save it C-ordered")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def load_npz(path: str | Path, num_classes: Optional[int] = None, *, max_in_memory_gb: float = 4.0) -> ArraySource:
    """An `.npz` with `image` (N×H×W×3 uint8) and `label`; memory-mapped when stored uncompressed."""
    path = Path(path)
    if not path.is_file():
        raise GKLError(f"{path}: npz file not found")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise GKLError(f"{path}: not an .npz (zip) file") from None
    with archive:
        members = {Path(n).stem: n for n in archive.namelist()}
        missing = [k for k in ("image", "label") if k not in members]
        if missing:
            raise GKLError(f"{path}: missing key(s) {', '.join(missing)}; found {', '.join(sorted(members)) or 'none'}")
        images = _zip_member_memmap(path, archive, members["image"])
        if images is None:
            size_gb = archive.getinfo(members["image"]).file_size / 1e9
            if size_gb > max_in_memory_gb:
                raise GKLError(
                    f"{path}: `image` is compressed ({size_gb:.0f} GB uncompressed) and cannot be memory-mapped; "
                    "re-save it with np.savez (not savez_compressed)"
                )
            with np.load(path) as npz:
                images = npz["image"]
        try:
            with np.load(path) as npz:  # allow_pickle stays off: object arrays are refused
                raw = np.asarray(npz["label"])
        except ValueError as error:
            raise GKLError(f"{path}: `label` cannot be read as numbers ({error})") from None
        if raw.dtype.kind not in "iu":  # float labels would be truncated silently, strings cannot be classes
            raise GKLError(f"{path}: `label` must hold integers, got dtype {raw.dtype}")
        labels = raw.astype(np.int64).reshape(-1)
    if len(labels) == 0:
        raise GKLError(f"{path}: holds 0 images")
    _check_arrays(images, labels, str(path), num_classes)
    return ArraySource(images, labels, str(path))


def torchvision_cifar(name: str, root: Path, train: bool, download: bool) -> ArraySource:
    """CIFAR-10/100's training or test split through torchvision (downloaded when missing and allowed)."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise GKLError(f"{name}: not found under {root} and data.download is false; pass --data-dir DIR") from None
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as error:  # network errors come in many types
            raise GKLError(
                f"{name}: not found under {root} and the download failed ({type(error).__name__}: {error}); "
                f"put the extracted dataset there or pass --data-dir DIR"
            ) from None
    return ArraySource(np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64), f"{name} {'train' if train else 'test'}")


def long_tail_counts(num: int, num_classes: int, imbalance: float) -> list[int]:
    """Images per class, n_c ∝ imbalance^(−c/(C−1)) (ImageNet-LT's exponential profile), summing to `num`."""
    weights = [imbalance ** (-c / max(num_classes - 1, 1)) for c in range(num_classes)]
    counts = [int(num * w / sum(weights)) for w in weights]
    for c in range(num - sum(counts)):  # the rounding remainder, one each to the largest classes
        counts[c % num_classes] += 1
    return counts


def make_synthetic(num: int, num_classes: int, image_size: int, seed: int, split: str, imbalance: float = 1.0) -> ArraySource:
    """A small learnable dataset: each class is a smooth random colour pattern; samples are shifted,
    contrast-jittered, noisy copies. Templates depend on `seed` only, so every split shares them;
    each split name draws its own samples. `imbalance` > 1 gives a long-tailed class profile."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(num_classes, 3, 4, 4, generator=gen)
    templates = torch.nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    offset = {"train": 1, "test": 2}.get(split, zlib.crc32(split.encode()))
    sample_gen = torch.Generator().manual_seed(seed * 1000003 + offset)
    if imbalance > 1:
        labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(long_tail_counts(num, num_classes, imbalance)))
    else:
        labels = torch.arange(num) % num_classes
    labels = labels[torch.randperm(num, generator=sample_gen)]
    base = templates[labels]
    contrast = 0.6 + 0.4 * torch.rand(num, 1, 1, 1, generator=sample_gen)
    images = 0.5 + 0.4 * contrast * (base - 0.5) + 0.16 * torch.randn(base.shape, generator=sample_gen)
    shifts = torch.randint(-2, 3, (num, 2), generator=sample_gen)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        images[i] = torch.roll(images[i], shifts=(dy, dx), dims=(1, 2))
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return ArraySource(pixels.numpy(), labels.numpy().astype(np.int64), f"synthetic {split}")


DIGITS_TEST_PER_CLASS = 40  # 400 test images; the other 1,397 of the 1,797 are the training set
_DIGITS_SPLIT_SEED = 0


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: float32 N×8×8 images (0..16) and int64 labels, in the dataset's order."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise GKLError("data.dataset: 'digits' needs scikit-learn (pip install scikit-learn)") from None
    digits = sklearn_digits()
    return np.asarray(digits.images, dtype=np.float32), np.asarray(digits.target, dtype=np.int64)


def digits_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of gkl's fixed digits split, each sorted: `DIGITS_TEST_PER_CLASS` test
    images per class drawn by `RandomState(0)`, the rest for training."""
    rng = np.random.RandomState(_DIGITS_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        test[rng.permutation(np.flatnonzero(labels == c))[:DIGITS_TEST_PER_CLASS]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def load_digits(split: str, image_size: int = DATASETS["digits"].image_size) -> ArraySource:
    """scikit-learn's handwritten digits (1,797 8×8 grey images, values 0..16, 10 classes) as a
    uint8 N×S×S×3 `ArraySource`: scaled to 0..255, upsampled bilinearly to `image_size`, replicated
    to three channels.

    Why: it is a *real* dataset that ships inside a package (no download), so the quick start and
    the real-data tests train on real images on any machine. The train/test split is fixed and
    stratified: 40 test images per class chosen by NumPy's legacy `RandomState(0)` (whose stream
    NumPy keeps stable across versions), in dataset order; `data.val_size` is then held out of the
    training split by `split_validation` as for every dataset.
    """
    if split not in ("train", "test"):
        raise GKLError(f"digits: unknown split {split!r} (train or test)")
    images, labels = _sklearn_digits()
    keep = digits_split(labels)[0 if split == "train" else 1]
    x = torch.from_numpy(images[keep] * (255.0 / 16.0)).unsqueeze(1)  # N×1×8×8, 0..255
    if image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    pixels = x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()
    return ArraySource(pixels.numpy(), labels[keep], f"digits {split}")


@dataclass
class DataBundle:
    """The training set, the held-out validation set, the test set (if any), the generated set."""

    train: Any  # ArraySource or FileSource
    val: Optional[Any]
    test: Optional[Any]
    generated: Optional[ArraySource]
    num_classes: int
    dataset: str


class _IndexedArray:
    """A lazy view `array[indices]` that keeps memmaps unmaterialised."""

    def __init__(self, array: Any, indices: np.ndarray):
        self.array, self.indices = array, indices
        self.shape = (len(indices), *array.shape[1:])
        self.ndim, self.dtype = array.ndim, array.dtype

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[self.indices[i]]


def split_validation(source: ArraySource, val_size: int) -> tuple[ArraySource, Optional[ArraySource]]:
    """Hold out `val_size` training images (fixed seed, the same for every run) for model selection."""
    if val_size == 0:
        return source, None
    if val_size >= len(source):
        raise GKLError(f"data.val_size: {val_size} leaves no training images (the training set has {len(source)})")
    perm = torch.randperm(len(source), generator=torch.Generator().manual_seed(_SPLIT_SEED)).numpy()
    val_idx, train_idx = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    return source.subset(train_idx, f"{source.name} (train split)"), source.subset(val_idx, f"{source.name} (validation split)")


def load_test_set(cfg: Any, data_dir: Optional[str] = None, num_classes: Optional[int] = None) -> Optional[Any]:
    """The test split of a `DataCfg` (an `ArraySource` or `FileSource`; None for npz without
    data.test_path): the one way gkl reads test images, for training (`build_data`), `gkl eval-aa`,
    `gkl analyze` and teacher reports. `num_classes` bounds the labels of an npz test file."""
    root = Path(data_dir or cfg.root or "data")
    name = cfg.dataset
    if name in CIFAR:
        return torchvision_cifar(name, root, False, cfg.download)
    if name == "synthetic":
        syn = cfg.synthetic
        return make_synthetic(syn.num_test, syn.num_classes, syn.image_size, syn.seed, "test")
    if name == "digits":
        return load_digits("test", cfg.digits.image_size)
    if name == "npz":
        return load_npz(cfg.test_path, num_classes) if cfg.test_path else None
    if name == "imagenet":
        return image_folder(root / "val", cfg.image_size, "imagenet val", **eval_view_settings(cfg))
    if name == "imagenet-lt":
        return image_list(root, cfg.lt_test_list, cfg.image_size, "imagenet-lt test", **eval_view_settings(cfg))
    raise _not_available(name)


def _not_available(name: str) -> GKLError:
    return GKLError(f"data.dataset: {name!r} is not available for this command (use cifar10, cifar100, npz, synthetic or digits)")


def build_data(cfg: Any, data_dir: Optional[str] = None, num_classes: Optional[int] = None) -> DataBundle:
    """Load the recipe's dataset (`cfg` is a `DataCfg`), split validation, attach generated data."""
    root = Path(data_dir or cfg.root or "data")
    name = cfg.dataset
    if name in CIFAR:
        classes = facts(name).classes
        train = torchvision_cifar(name, root, True, cfg.download)
    elif name == "synthetic":
        syn = cfg.synthetic
        classes = syn.num_classes
        train = make_synthetic(syn.num_train, classes, syn.image_size, syn.seed, "train", syn.imbalance)
    elif name == "digits":
        classes = facts(name).classes
        train = load_digits("train", cfg.digits.image_size)
    elif name == "npz":
        train = load_npz(cfg.path, num_classes)
        classes = num_classes or int(train.labels.max()) + 1
    elif name == "imagenet":
        train = image_folder(root / "train", cfg.image_size, "imagenet train", **eval_view_settings(cfg))
        classes = int(train.labels.max()) + 1
    elif name == "imagenet-lt":
        train = image_list(root, cfg.lt_train_list, cfg.image_size, "imagenet-lt train", **eval_view_settings(cfg))
        classes = num_classes or facts(name).classes
        test = load_test_set(cfg, data_dir, classes)
        val = image_list(root, cfg.lt_val_list, cfg.image_size, "imagenet-lt val", **eval_view_settings(cfg))
        return DataBundle(train, val, test, None, classes, name)
    else:
        raise _not_available(name)
    test = load_test_set(cfg, data_dir, classes)
    if num_classes is not None and num_classes != classes:
        raise GKLError(f"model.num_classes: {num_classes} does not match dataset {name} ({classes} classes)")
    train, val = split_validation(train, cfg.val_size)
    if cfg.generated.required and not cfg.generated.path:
        raise GKLError("data.generated.path: this recipe trains on generated images; pass --set data.generated.path=FILE.npz")
    generated = load_npz(cfg.generated.path, classes) if cfg.generated.path else None
    if generated is not None and generated.images.shape[1:] != train.images.shape[1:]:
        raise GKLError(
            f"data.generated.path: image shape {tuple(generated.images.shape[1:])} differs from the training set's "
            f"{tuple(train.images.shape[1:])}"
        )
    return DataBundle(train, val, test, generated, classes, name)


def long_tailed(cfg: Any) -> bool:
    """Whether results are reported by ImageNet-LT's Many/Medium/Few class groups."""
    return cfg.dataset == "imagenet-lt" or (cfg.dataset == "synthetic" and cfg.synthetic.imbalance > 1)


def train_set_sizes(cfg: Any) -> tuple[int, int]:
    """(training images after the validation split, generated images) without loading pixels; for plans."""
    name = cfg.dataset
    if name in DATASETS:
        n = DATASETS[name].train
    elif name == "synthetic":
        n = cfg.synthetic.num_train
    elif name == "npz":
        n = len(load_npz(cfg.path).labels)
    else:
        raise GKLError(f"data.dataset: {name!r} is not available for this command")
    gen = len(load_npz(cfg.generated.path).labels) if cfg.generated.path else 0
    held_out = cfg.val_size if name != "imagenet-lt" else 0
    if held_out >= n:
        raise GKLError(f"data.val_size: {held_out} leaves no training images (the training set has {n})")
    return n - held_out, gen


# ---------------------------------------------------------------------------------------------------
# Augmentation: per-sample seeded, on uint8 C×H×W tensors.
# ---------------------------------------------------------------------------------------------------


def crop_flip(img: Tensor, gen: torch.Generator, padding: int = 4) -> Tensor:
    """RandomCrop(size, padding) with zero padding, then a horizontal flip with probability ½."""
    _, h, w = img.shape
    padded = torch.nn.functional.pad(img, (padding,) * 4)
    top, left = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,), generator=gen))
    out = padded[:, top : top + h, left : left + w]
    if torch.rand((), generator=gen) < 0.5:
        out = out.flip(-1)
    return out


class _SeededTransform:
    """A torchvision transform made reproducible per sample.

    torchvision draws from the global torch RNG, so the call runs inside `fork_rng` seeded with the
    sample's seed: the result depends only on (seed, epoch, index), and the caller's RNG is untouched.
    kinds: ``autoaug`` (AutoAugment, CIFAR10 policy, areas uncovered by rotations/shears filled
    with grey `fill`: the official CIFAR10Policy's fillcolor is 128, torchvision's default 0),
    ``rotate15`` (RandomRotation(15), nearest, black fill: DM-AT's CIFAR-100 `base`) and
    ``resized_crop`` (RandomResizedCrop(size) and a horizontal flip, the standard ImageNet training
    augmentation).
    """

    def __init__(self, kind: str, size: int = 224, fill: int = 128) -> None:
        from torchvision.transforms import v2

        if kind == "autoaug":
            self.transform = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=fill)
        elif kind == "rotate15":
            self.transform = v2.RandomRotation(15)
        else:
            self.transform = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])

    def __call__(self, img: Tensor, seed: int) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(img)


# timm's `t` section names an op set (rand_augment_choices: weights, 3aw, 3a); any other name silently
# falls back to the default set, so it is refused here
_RAND_AUGMENT = re.compile(r"rand(-((m|n|mmax|inc)\d+|(p|mstd)\d+(\.\d+)?|t(weights|3aw|3a)))*")


class TimmTransform:
    """timm's ImageNet training transform (`create_transform(is_training=True)`: RandomResizedCrop with
    `interpolation`, flip ½, RandAugment `rand_augment`, no colour jitter, prefetcher output = uint8) on
    the PIL image, its draws (Python's, NumPy's and torch's global RNGs) seeded per sample. Random erasing
    (data.re_prob) runs on the device batch (the distillation step), as timm's prefetcher does."""

    def __init__(self, size: int, rand_augment: Optional[str], interpolation: str) -> None:
        from timm.data import create_transform

        try:  # timm skips sections it cannot parse (rand-m7-xyz); gkl accepts the RandAugment grammar only
            if rand_augment is not None and not _RAND_AUGMENT.fullmatch(rand_augment):
                raise ValueError("expected rand-SECTION-… with sections m, n, p, mstd, mmax, inc (a number) or t (weights, "
                                 "3aw or 3a)")
            self.transform = create_transform(size, is_training=True, auto_augment=rand_augment, interpolation=interpolation,
                                              color_jitter=None, re_prob=0.0, use_prefetcher=True)
            self(torch.full((3, max(size, 16), max(size, 16)), 128, dtype=torch.uint8), 0)  # a string timm parses lazily
        except Exception as error:  # timm's parsers raise AssertionError, KeyError, ValueError …
            detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            raise GKLError(f"data.rand_augment: {rand_augment!r} is not a RandAugment string timm takes ({detail}); "
                           "e.g. rand-m7-mstd0.5") from None

    def __call__(self, img: Tensor, seed: int) -> Tensor:
        from PIL import Image

        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        with seeded_rngs(seed):
            return torch.from_numpy(np.ascontiguousarray(self.transform(pil)))


_EVAL_TRANSFORMS: dict[tuple, Any] = {}


def timm_eval_view(img: Tensor, size: int, crop_pct: float, interpolation: str) -> Tensor:
    """timm's evaluation transform: resize the short side to ⌊size/crop_pct⌋ and centre-crop `size` (PIL)."""
    from PIL import Image
    from timm.data import create_transform

    key = (size, crop_pct, interpolation)
    if key not in _EVAL_TRANSFORMS:
        _EVAL_TRANSFORMS[key] = create_transform(size, crop_pct=crop_pct, interpolation=interpolation, use_prefetcher=True)
    out = _EVAL_TRANSFORMS[key](Image.fromarray(img.permute(1, 2, 0).numpy()))
    return torch.from_numpy(np.ascontiguousarray(out))


class TrainView(torch.utils.data.Dataset):
    """Augmented training samples, indexed by ``(epoch, index)`` pairs from `EpochBatchSampler`
    (``(epoch, index, copy)`` under repeated augmentation: each copy is augmented with its own seed).

    Indices ≥ len(real) address the generated set. augment: basic (crop+flip), basic-rot15 (crop,
    flip, RandomRotation(15): DM-AT's CIFAR-100 training transform), none, autoaug (returns the
    basic view *and* an independently cropped/flipped AutoAugment view), imagenet, or timm (`timm`: a
    `TimmTransform`; `train_view` builds it from the recipe).
    """

    def __init__(self, real: ArraySource, generated: Optional[ArraySource], augment: str, seed: int, autoaug_fill: int = 128,
                 timm: Optional[TimmTransform] = None):
        if augment == "mdistiller":  # mdistiller's CIFAR augmentation is the basic crop + flip
            augment = "basic"
        if augment not in ("basic", "basic-rot15", "autoaug", "none", "imagenet", "timm"):
            raise GKLError(f"data.augment: {augment!r} is not supported (basic, basic-rot15, mdistiller, autoaug, imagenet, timm, none)")
        self.real, self.generated, self.augment, self.seed = real, generated, augment, seed
        self._autoaug = _SeededTransform("autoaug", fill=autoaug_fill) if augment == "autoaug" else None
        self._rotate = _SeededTransform("rotate15") if augment == "basic-rot15" else None
        self._resized_crop = _SeededTransform("resized_crop", real.image_size) if augment == "imagenet" else None
        self._timm = timm

    def __len__(self) -> int:
        return len(self.real) + (len(self.generated) if self.generated is not None else 0)

    def __getitem__(self, key: tuple[int, ...]) -> tuple:
        epoch, index, *copy = key
        n_real = len(self.real)
        img, label = self.real.get(index) if index < n_real else self.generated.get(index - n_real)
        seed = sample_seed(self.seed, epoch, index)
        if copy and copy[0]:  # repeated augmentation: copy 0 keeps the sample's seed, the others get their own
            seed = sample_seed(seed, copy[0], -1)
        gen = torch.Generator().manual_seed(seed)
        if self.augment == "none":
            return img, label
        if self.augment == "timm":
            if self._timm is None:
                raise GKLError("data.augment: 'timm' needs its settings (data.rand_augment, …): it is for kind 'kd' "
                               "(the view data.train_view builds)")
            return self._timm(img, seed), label
        if self._resized_crop is not None:
            return self._resized_crop(img, seed), label
        basic = crop_flip(img, gen)
        if self._rotate is not None:
            return self._rotate(basic, seed ^ 0x2545F491), label
        if self._autoaug is None:
            return basic, label
        aug = self._autoaug(crop_flip(img, gen), seed ^ 0x5DEECE66D)
        return basic, aug, label


class EvalView(torch.utils.data.Dataset):
    """Un-augmented images in canonical order (the first n of the split)."""

    def __init__(self, source: ArraySource, n: Optional[int] = None):
        self.source = source
        self.n = len(source) if n is None else min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.source.eval_get(index)


def train_view(cfg: Any, real: Any, generated: Optional[ArraySource], seed: int) -> TrainView:
    """The training view of a `DataCfg` (augment timm: its RandAugment string and interpolation)."""
    timm = TimmTransform(real.image_size, cfg.rand_augment, cfg.train_interpolation) if cfg.augment == "timm" else None
    return TrainView(real, generated, cfg.augment, seed, cfg.autoaug_fill, timm)


def to_float(images: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    """uint8 N×C×H×W → float [0, 1] on `device` (the transfer happens in uint8, 4× less traffic)."""
    x = images.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_train_loader(
    view: TrainView, sampler: EpochBatchSampler, num_workers: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        view,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def make_eval_loader(
    source: ArraySource, n: Optional[int], batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1
) -> torch.utils.data.DataLoader:
    """Sequential batches of the first n images; under DDP each rank takes a contiguous shard."""
    view = EvalView(source, n)
    shard = torch.tensor_split(torch.arange(len(view)), world_size)[rank].tolist()
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(view, shard), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
