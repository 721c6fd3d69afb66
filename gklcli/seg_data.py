"""Semantic-segmentation data for kind seg-kd (TABLE XXIII): ADE20K's folders, masks, APD's augmentation.

ADE20K (SceneParsing, `ADEChallengeData2016`): `images/{training,validation}/*.jpg` and
`annotations/{training,validation}/*.png`, 20,210 / 2,000 pairs, 150 classes. The raw masks hold 0 for
"other" and 1…150 for the classes; `seg.reduce_zero_label` (the standard protocol, mmseg's name) maps
0 → the ignore index 255 and k → k − 1. Masks already converted (APD's semseg lists) are read with it off
and must hold 0…149 or 255. A mask with any other value stops the run in one line naming the file.

APD's training view (`util/transform.py` as its ADE20K config uses it), per image: a random scale in
[0.5, 2] (bilinear image, nearest mask), a rotation in [−10°, 10°] with probability ½ (padding: the mean
colour, ignore), a 5×5 Gaussian blur with probability ½, a horizontal flip with probability ½, and a
random 473×473 crop (padded centred with the mean colour / ignore when smaller). Every draw comes from a
generator seeded by (seed, epoch, index), so batches are a function of the recipe and the position in
training (bit-exact resume, any worker count). When a crop holds no labelled pixel gkl re-draws the crop
of the same image (up to 10 times), then, as APD does at once, takes another image drawn from that seed.
The resampling grids of the scale and the rotation are torchvision's, not OpenCV's (the same sizes and
angles; the pixel centres differ by a fraction of a pixel).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from gklcli.errors import GKLError
from gklcli.sampling import sample_seed

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = {"train": "training", "val": "validation"}
ADE20K_SIZES = {"train": 20_210, "val": 2_000}  # ADEChallengeData2016 (GPU-hour estimates)
MEAN_RGB = (0.485, 0.456, 0.406)  # APD pads with the ImageNet mean colour (0 after normalisation)
# cv2.GaussianBlur(image, (5, 5), 0): with σ = 0 and a kernel of ≤ 7 taps OpenCV uses its fixed binomial table
BLUR_TAPS = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
CROP_RETRIES = 10
IMAGE_RETRIES = 20  # APD's dataset_fix reloads random other images until a crop holds a labelled pixel


@dataclass(frozen=True)
class SegSource:
    """One split: image/mask file pairs and how their labels read."""

    root: Path
    pairs: tuple[tuple[Path, Path], ...]
    num_classes: int
    reduce_zero_label: bool

    def __len__(self) -> int:
        return len(self.pairs)


def dataset_root(root: Path) -> Path:
    """The folder holding images/ and annotations/: the data root itself, or its ADEChallengeData2016."""
    for candidate in (root, root / "ADEChallengeData2016", root / "ade20k" / "ADEChallengeData2016", root / "ade20k"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise GKLError(f"data.root: no ADE20K under {root} (looked for images/ and annotations/ in it and in "
                   f"{root / 'ADEChallengeData2016'}); unzip ADEChallengeData2016.zip from "
                   "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip there")


def _from_list(base: Path, listing: Path) -> list[tuple[Path, Path]]:
    """APD's semseg list files: `image_path mask_path` per line, relative to the dataset root."""
    if not listing.is_file():
        raise GKLError(f"seg.train_list/val_list: {listing} not found")
    pairs = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise GKLError(f"{listing}:{n}: expected `image mask`, got {line.strip()[:80]!r}")
        pairs.append((base / parts[0], base / parts[1]))
    return pairs


def _from_folders(base: Path, split: str) -> list[tuple[Path, Path]]:
    images, masks = base / "images" / SPLITS[split], base / "annotations" / SPLITS[split]
    for folder in (images, masks):
        if not folder.is_dir():
            raise GKLError(f"data.root: {folder} is missing (ADE20K's {SPLITS[split]} split)")
    by_stem = {p.stem: p for p in masks.iterdir() if p.suffix == ".png"}
    pictures = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    unmatched = [p.name for p in pictures if p.stem not in by_stem]
    if unmatched:
        raise GKLError(f"{masks}: no mask for {len(unmatched)} image(s) of {images}, e.g. {unmatched[0]}")
    return [(p, by_stem[p.stem]) for p in pictures]


def open_split(cfg: Any, root: Path, split: str, num_classes: int) -> SegSource:
    """A split of ADE20K (folders, or `seg.train_list`/`val_list`), refused in one line when missing or empty."""
    base = dataset_root(root)
    listing = cfg.train_list if split == "train" else cfg.val_list
    pairs = _from_list(base, base / listing) if listing else _from_folders(base, split)
    if not pairs:
        raise GKLError(f"data.root: the {SPLITS[split]} split under {base} holds no images")
    return SegSource(base, tuple(pairs), num_classes, cfg.reduce_zero_label)


def read_pair(source: SegSource, index: int) -> tuple[Tensor, Tensor]:
    """(image 3×H×W float in [0, 1], mask H×W int64 with classes 0…C−1 and IGNORE), checked."""
    from PIL import Image

    image_path = source.pairs[index][0]
    try:
        with Image.open(image_path) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
    except (OSError, ValueError) as error:
        raise GKLError(f"{image_path}: unreadable image ({error})") from None
    return image.permute(2, 0, 1).float().div_(255), read_mask(source, index, tuple(image.shape[:2]))


def read_mask(source: SegSource, index: int, image_hw: tuple[int, int]) -> Tensor:
    """Pair `index`'s mask in training labels, refused in one line when unreadable, not one channel, not of
    its image's size (H, W) or holding values outside the class range."""
    from PIL import Image

    image_path, mask_path = source.pairs[index]
    try:
        with Image.open(mask_path) as im:
            raw = np.asarray(im)
    except (OSError, ValueError) as error:
        raise GKLError(f"{mask_path}: unreadable mask ({error})") from None
    if raw.ndim != 2:
        raise GKLError(f"{mask_path}: a mask must be a single-channel PNG of class indices, got shape {raw.shape}")
    if raw.shape != tuple(image_hw):
        raise GKLError(f"{mask_path}: mask {raw.shape[1]}×{raw.shape[0]} ≠ image {image_hw[1]}×{image_hw[0]} ({image_path.name})")
    return check_labels(torch.from_numpy(raw.astype(np.int64)), source.num_classes, source.reduce_zero_label, mask_path)


def check_labels(mask: Tensor, num_classes: int, reduce_zero_label: bool, path: Any) -> Tensor:
    """The mask in training labels (reduce: 0 → IGNORE, k → k − 1), refusing values outside the class range."""
    if reduce_zero_label:
        bad = mask > num_classes
        if bool(bad.any()):
            raise GKLError(f"{path}: mask values {sorted(set(mask[bad].unique().tolist()))[:5]} outside 0–{num_classes} "
                           f"(ADE20K's raw masks: 0 = other, 1–{num_classes} the classes; seg.reduce_zero_label is on)")
        return torch.where(mask == 0, IGNORE, mask - 1)
    bad = (mask >= num_classes) & (mask != IGNORE)
    if bool(bad.any()):
        raise GKLError(f"{path}: mask values {sorted(set(mask[bad].unique().tolist()))[:5]} outside 0–{num_classes - 1} "
                       f"and the ignore value {IGNORE} (raw ADE20K masks need seg.reduce_zero_label: true)")
    return mask


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _pad_to(image: Tensor, mask: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Centred padding up to h×w (APD's Crop: the mean colour, ignore)."""
    ph, pw = max(h - image.shape[1], 0), max(w - image.shape[2], 0)
    if not ph and not pw:
        return image, mask
    box = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    mean = torch.tensor(MEAN_RGB).view(3, 1, 1)
    image = torch.nn.functional.pad(image - mean, box) + mean
    return image, torch.nn.functional.pad(mask, box, value=IGNORE)


def blur5(image: Tensor) -> Tensor:
    """cv2.GaussianBlur(image, (5, 5), 0): the separable [1, 4, 6, 4, 1]/16 kernel with OpenCV's default
    border (reflect-101, torch's 'reflect')."""
    taps = torch.tensor(BLUR_TAPS, dtype=image.dtype)
    x = torch.nn.functional.pad(image[None], (2, 2, 2, 2), mode="reflect")
    x = torch.nn.functional.conv2d(x, taps.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
    return torch.nn.functional.conv2d(x, taps.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)[0]


def train_view(image: Tensor, mask: Tensor, cfg: Any, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """APD's training augmentation of one pair, every draw from `g` (see the module docstring)."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode as IM

    scale = _uniform(g, *cfg.scale_range)
    h, w = image.shape[1:]
    size = [max(1, round(h * scale)), max(1, round(w * scale))]
    image = TF.resize(image, size, IM.BILINEAR, antialias=False)
    mask = TF.resize(mask[None], size, IM.NEAREST)[0]
    if float(torch.rand((), generator=g)) < 0.5:
        angle = _uniform(g, *cfg.rotate_range)
        image = TF.rotate(image, angle, IM.BILINEAR, fill=list(MEAN_RGB))
        mask = TF.rotate(mask[None], angle, IM.NEAREST, fill=[IGNORE])[0]
    if float(torch.rand((), generator=g)) < 0.5:
        image = blur5(image)
    if float(torch.rand((), generator=g)) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    crop = cfg.crop_size
    image, mask = _pad_to(image, mask, crop, crop)
    for _ in range(CROP_RETRIES):
        top = int(torch.randint(image.shape[1] - crop + 1, (), generator=g))
        left = int(torch.randint(image.shape[2] - crop + 1, (), generator=g))
        piece = mask[top:top + crop, left:left + crop]
        if bool((piece != IGNORE).any()):
            break
    return image[:, top:top + crop, left:left + crop].contiguous(), piece.contiguous()


class SegTrainView(torch.utils.data.Dataset):
    """Training pairs addressed by the sampler's (epoch, index), augmented from their own seed."""

    def __init__(self, source: SegSource, cfg: Any, seed: int):
        self.source, self.cfg, self.seed = source, cfg, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The crop of image `index`; when no crop of it holds a labelled pixel, that of another image drawn
        from the same seed (APD's dataset_fix reloads a random image), so no crop is all ignore."""
        epoch, index = key[0], key[1]
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        for _ in range(IMAGE_RETRIES):
            image, mask = train_view(*read_pair(self.source, index), self.cfg, g)
            if bool((mask != IGNORE).any()):
                break
            index = int(torch.randint(len(self.source), (), generator=g))
        return image, mask


class SegEvalView(torch.utils.data.Dataset):
    """Whole validation pairs (each its own size: the evaluation runs one image at a time)."""

    def __init__(self, source: SegSource, indices: list[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return read_pair(self.source, self.indices[i])


def eval_indices(n_total: int, n: Optional[int], rank: int, world_size: int) -> list[int]:
    """The first n images, split over the ranks in contiguous shards (their confusion matrices are summed)."""
    count = n_total if n is None else min(n, n_total)
    return torch.tensor_split(torch.arange(count), world_size)[rank].tolist()


def eval_batches(source: SegSource, n: Optional[int], rank: int, world_size: int, num_workers: int) -> Any:
    """(image, mask) pairs of this rank's shard, batch dimension 1."""
    return torch.utils.data.DataLoader(SegEvalView(source, eval_indices(len(source), n, rank, world_size)),
                                       batch_size=1, num_workers=num_workers)


# ---------------------------------------------------------------------------------------------------
# Generated ADE20K-layout data (tests, `gkl reproduce table23 --smoke`)
# ---------------------------------------------------------------------------------------------------


def _scene(rng: random.Random, h: int, w: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A picture of a few filled rectangles and discs, each class with its own colour; mask in raw ADE20K
    values (0 = other, 1…C)."""
    palette = np.random.default_rng(7).integers(0, 256, size=(num_classes + 1, 3))
    mask = np.zeros((h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.randint(2, 5)):
        k = rng.randint(1, num_classes)
        cy, cx, r = rng.randrange(h), rng.randrange(w), rng.randint(max(2, h // 8), max(3, h // 3))
        shape = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r) if rng.random() < 0.5 else (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        mask[shape] = k
    noise = np.random.default_rng(rng.randrange(2**31)).integers(-20, 21, size=(h, w, 3))
    image = np.clip(palette[mask] + noise, 0, 255).astype(np.uint8)
    return image, mask


def write_synthetic_ade20k(root: Path, *, num_train: int, num_val: int, size: int, num_classes: int, seed: int = 0) -> Path:
    """An `ADEChallengeData2016` folder of generated scenes (jpg images, raw png masks), built beside and
    renamed into place, so a half-written folder never looks complete."""
    import tempfile

    from PIL import Image

    final = root / "ADEChallengeData2016"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ade20k.", dir=root))
    rng = random.Random(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        for sub in ("images", "annotations"):
            (staging / sub / split).mkdir(parents=True)
        for i in range(count):
            h = size + rng.randint(-size // 4, size // 4)
            w = size + rng.randint(-size // 4, size // 4)
            image, mask = _scene(rng, h, w, num_classes)
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            Image.fromarray(image).save(staging / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(mask).save(staging / "annotations" / split / f"{name}.png")
    staging.replace(final)
    return final



def check_ade20k(root: Path, *, expected: Optional[dict[str, int]] = None) -> list[tuple[str, int, int]]:
    """`gkl data check ade20k`: every split's (name, found, expected) pairs, after reading every mask (values,
    size against its image's header) — the check a 2-day run would otherwise meet at its first bad file."""
    from types import SimpleNamespace

    from PIL import Image

    cfg = SimpleNamespace(reduce_zero_label=True, train_list=None, val_list=None)
    sizes = expected or ADE20K_SIZES
    rows, problems = [], []
    for split in ("train", "val"):
        source = open_split(cfg, root, split, 150)
        for index, (image_path, _) in enumerate(source.pairs):
            with Image.open(image_path) as im:  # the header only: no image is decoded
                width, height = im.size
            read_mask(source, index, (height, width))
        rows.append((split, len(source), sizes[split]))
        if len(source) != sizes[split]:
            problems.append(f"{SPLITS[split]}: {len(source):,} pairs, expected {sizes[split]:,}")
    if problems:
        raise GKLError(f"{root}: not a complete ADE20K folder: " + "; ".join(problems))
    return rows
