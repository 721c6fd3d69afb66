"""Image–text pairs for CLIP distillation (TABLE VII): a deterministic, resumable stream of batches.

The paper's CLIP students see 15M pairs sampled afresh from DataComp-1B every epoch, the OpenCLIP
way (``--dataset-resampled``, ``--train-num-samples``). A day-long run must survive broken samples
and resume in the middle of an epoch with the very batches it would have seen, so:

* A *pool* is where pairs come from: WebDataset ``.tar`` shards in DataComp's / img2dataset's layout
  (``<key>.jpg|jpeg|png|webp`` + ``<key>.txt`` [+ ``<key>.json``]) named by a brace pattern, a folder
  or a list file, with counts from ``sizes.json``, ``<shard>_stats.json`` or a header scan; or a
  CSV/TSV of (image path, caption) for small sets (OpenCLIP's ``--csv-img-key``/``--csv-caption-key``).
* There are S = world_size × max(num_workers, 1) independent streams. Every random choice of
  stream s comes from generators seeded by (seed, epoch, s): the shards it draws (with replacement,
  weighted by size), its shuffle buffer, the CSV permutation; each sample's augmentation from
  (seed, epoch, s, sample counter). Nothing reads a global RNG, so a resumed stream re-reads and
  re-validates its earlier samples (without transforming or tokenizing them) and then yields
  bit-identical batches.
* Rank r's batch k is the (k // W)-th batch of stream r·W + k % W. A DataLoader (``batch_size=None``)
  takes its workers' batches round-robin starting from worker 0, so in a loader started at batch b,
  worker w serves lane (b + w) % W.
* A bad sample (missing, undecodable or truncated image; empty caption; image without caption or
  caption without image) or an unreadable shard is skipped and counted in the ``bad`` of the batch
  being formed, never fatal; only a pool where everything is bad (1000 in a row) stops the run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from gklcli.checkpoint import atomic_write_bytes, atomic_write_text
from gklcli.errors import GKLError, show
from gklcli.sampling import sample_seed

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BAD_REASONS = ("image", "caption", "unpaired", "shard")
MAX_CONSECUTIVE_BAD = 1000
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
_CROP_SCALE = (0.9, 1.0)  # OpenCLIP's training crop
_CROP_LOG_RATIO = torch.log(torch.tensor((3 / 4, 4 / 3)))  # float32, as torchvision computes it


# ---------------------------------------------------------------------------------------------------
# Pools: where the pairs come from, and how many there are.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One tar shard and its number of samples."""

    path: str
    size: int


@dataclass(frozen=True)
class TarPool:
    """WebDataset shards; each stream draws them with replacement, weighted by size."""

    spec: str
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class CsvPool:
    """Rows of a CSV/TSV file as (key = the path as written, resolved image path, caption)."""

    spec: str
    rows: tuple[tuple[str, str, str], ...]


Pool = Union[TarPool, CsvPool]


def open_pool(spec: str | Path, *, image_key: str = "filepath", caption_key: str = "title") -> Pool:
    """The pool a spec names: a .csv/.tsv file (columns `image_key`, `caption_key`), a .tar shard, a
    folder of .tar shards, a text file listing shards, or a brace pattern (``/d/{00000..00009}.tar``)."""
    text = str(spec)
    path = Path(text)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        return _read_csv(path, image_key, caption_key)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise GKLError(f"{path}: no .tar shards in this folder")
    elif path.is_file():
        shards = [path] if path.suffix.lower() == ".tar" else _read_list(path)
    elif "{" in text:
        shards = _expand(text)
    else:
        raise GKLError(f"{text}: pool not found (expected a brace pattern, folder or list of .tar shards, or a .csv/.tsv)")
    return TarPool(text, _with_sizes(shards, text))


def pool_path(spec: str, data_dir: Optional[str]) -> str:
    """A relative pool (path or shard pattern) is under --data-dir (default ./data), as every dataset."""
    return spec if Path(spec).is_absolute() else str(Path(data_dir or "data") / spec)


def pool_size(pool: Pool) -> int:
    """The number of samples in the pool (bad ones included: they are only known when read)."""
    return sum(shard.size for shard in pool.shards) if isinstance(pool, TarPool) else len(pool.rows)


def steps_per_epoch(samples_per_epoch: Optional[int], global_batch: int, pool: Optional[Pool] = None) -> int:
    """Batches per rank and epoch, OpenCLIP's ``--train-num-samples`` // global batch; None means
    the pool's size."""
    if samples_per_epoch is None:
        if pool is None:
            raise ValueError("steps_per_epoch: samples_per_epoch=None needs the pool")
        samples_per_epoch = pool_size(pool)
    if samples_per_epoch // global_batch < 1:
        raise GKLError(f"{samples_per_epoch} samples per epoch are fewer than one global batch of {global_batch}")
    return samples_per_epoch // global_batch


def _expand(pattern: str) -> list[Path]:
    """The existing shards of a brace pattern."""
    import braceexpand

    try:
        paths = [Path(p) for p in braceexpand.braceexpand(pattern)]
    except Exception as error:  # braceexpand's UnbalancedBracesError and friends
        raise GKLError(f"{pattern}: not a brace pattern ({error})") from None
    return _existing(paths, pattern)


def _read_list(path: Path) -> list[Path]:
    """The shards a list file names, one a line (relative to the file's folder; # comments)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise GKLError(f"{path}: unreadable shard list ({error})") from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return _existing([path.parent / name for name in names], str(path))


def _existing(paths: list[Path], source: str) -> list[Path]:
    """The shards that exist; none is an error, a few missing (failed downloads) a warning."""
    found = [p for p in paths if p.is_file()]
    if not found:
        raise GKLError(f"{source}: matches no existing shard" + (f" (first: {paths[0]})" if paths else ""))
    if len(found) < len(paths):
        missing = next(p for p in paths if not p.is_file())
        log.warning("%s: %d of %d shards missing (first %s); sampling from the others", source,
                    len(paths) - len(found), len(paths), missing)
    return found


def _with_sizes(paths: list[Path], spec: str) -> tuple[Shard, ...]:
    """Each shard with its count: sizes.json in its folder, else its _stats.json, else a scan."""
    tables: dict[Path, dict[str, Any]] = {}
    shards = []
    for path in paths:
        if path.parent not in tables:
            tables[path.parent] = _sizes_json(path.parent / "sizes.json")
        size = tables[path.parent].get(path.name)
        if size is None:
            size = _stats_successes(path)
        shards.append(Shard(str(path), _scan(path) if size is None else size))
    if not any(shard.size for shard in shards):
        raise GKLError(f"{spec}: the shards hold no samples")
    return tuple(shards)


def _sizes_json(path: Path) -> dict[str, Any]:
    """OpenCLIP's ``{"00000000.tar": 10000, …}``, or {} when there is none."""
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise GKLError(f"{path}: unreadable ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(table, dict) or not all(isinstance(v, int) and v >= 0 for v in table.values()):
        raise GKLError(f"{path}: expected shard names and sample counts such as {{\"00000000.tar\": 10000}}")
    return table


def _stats_successes(shard: Path) -> Optional[int]:
    """img2dataset's ``successes`` in ``<shard>_stats.json``; None without a usable one."""
    stats = shard.with_name(f"{shard.name.split('.')[0]}_stats.json")
    try:
        value = json.loads(stats.read_text(encoding="utf-8")).get("successes")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def _scan(path: Path) -> int:
    """The samples of a shard counted from its tar headers (keys with at least one file)."""
    keys, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                key, extension = _split(member.name)
                if member.isfile() and extension and key != last:
                    keys, last = keys + 1, key
    except _TAR_ERRORS as error:
        log.warning("%s: unreadable shard (%s); counted %d samples before the damage", path, error, keys)
    return keys


def _read_csv(path: Path, image_key: str, caption_key: str) -> CsvPool:
    """A CSV (comma) or TSV (tab) with a header row; image paths relative to the file's folder."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            columns = reader.fieldnames or []
            for key in (image_key, caption_key):
                if key not in columns:
                    raise GKLError(f"{path}: no column {key!r} (columns: {show(columns)}); name the image and caption columns")
            rows = tuple(_csv_row(path.parent, row.get(image_key) or "", row.get(caption_key) or "") for row in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise GKLError(f"{path}: unreadable ({error})") from None
    if not rows:
        raise GKLError(f"{path}: no rows below the header")
    return CsvPool(str(path), rows)


def _csv_row(folder: Path, image: str, caption: str) -> tuple[str, str, str]:
    """(key, resolved path, caption) of one row."""
    resolved = str(folder / image) if image and not os.path.isabs(image) else image
    return image, resolved, caption.strip()


# ---------------------------------------------------------------------------------------------------
# Raw samples: shards read in order, CSV rows in permuted order; the cheap checks on the way.
# ---------------------------------------------------------------------------------------------------


class _Raw(NamedTuple):
    key: str
    image: Union[bytes, str]  # encoded bytes (tar) or a file path (CSV)
    caption: str


class _Bad:
    """Samples skipped since the last batch, by reason, and the guard against an all-bad pool."""

    def __init__(self, spec: str) -> None:
        self.spec, self.run, self.counts = spec, 0, dict.fromkeys(BAD_REASONS, 0)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1
        self.run += 1
        if self.run >= MAX_CONSECUTIVE_BAD:
            raise GKLError(f"{self.spec}: {self.run} bad samples in a row (the last: {reason}); is every sample of this pool broken?")

    def good(self) -> None:
        self.run = 0

    def take(self) -> dict[str, int]:
        """The counts so far, starting afresh."""
        counts, self.counts = self.counts, dict.fromkeys(BAD_REASONS, 0)
        return counts


def _split(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member: the extension starts at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def _read_shard(path: str, bad: _Bad) -> Iterator[_Raw]:
    """The complete samples of one shard in order; an unreadable or truncated shard counts once
    (the samples read before the damage are kept, the one in progress is dropped)."""
    yielded = 0
    try:
        with tarfile.open(path, "r|*") as tar:
            key, files = None, {}
            for member in tar:
                name, extension = _split(member.name)
                if not member.isfile() or not extension:
                    continue
                if name != key:
                    for sample in _paired(key, files, bad):
                        yielded += 1
                        yield sample
                    key, files = name, {}
                files[extension] = tar.extractfile(member).read()
            for sample in _paired(key, files, bad):
                yielded += 1
                yield sample
    except _TAR_ERRORS as error:
        log.warning("%s: unreadable shard, skipped (%s)", path, error)
        bad.add("shard")
        return
    if not yielded:  # an empty shard (or one without a complete pair) must count: drawn forever, it would hang a stream
        log.warning("%s: no complete image–caption pair, skipped", path)
        bad.add("shard")


def _paired(key: Optional[str], files: dict[str, bytes], bad: _Bad) -> Iterator[_Raw]:
    """The sample of one key's files, if it has an image and a non-empty caption."""
    if key is None:
        return
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    if image is None or "txt" not in files:
        bad.add("unpaired")
    elif not (caption := files["txt"].decode("utf-8", errors="replace").strip()):
        bad.add("caption")
    else:
        yield _Raw(key, image, caption)


def _tar_stream(pool: TarPool, rng: np.random.Generator, bad: _Bad) -> Iterator[_Raw]:
    """Shards drawn with replacement, weighted by size, each read through (endless)."""
    sizes = np.array([shard.size for shard in pool.shards], dtype=np.float64)
    weights = sizes / sizes.sum()
    while True:
        yield from _read_shard(pool.shards[int(rng.choice(len(weights), p=weights))].path, bad)


def _shuffled(samples: Iterator[_Raw], size: int, rng: np.random.Generator) -> Iterator[_Raw]:
    """A shuffle buffer of `size` samples over an endless stream (size 1: the stream's order)."""
    buffer: list[_Raw] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()


def _csv_stream(pool: CsvPool, seed: int, epoch: int, stream: int, streams: int, bad: _Bad) -> Iterator[_Raw]:
    """Positions stream, stream + S, … of the epoch's permutations of the rows (endless)."""
    rng = np.random.default_rng([seed, epoch])
    n, position, start = len(pool.rows), stream, 0
    order = rng.permutation(n)
    while True:
        while position >= start + n:
            order, start = rng.permutation(n), start + n
        key, path, caption = pool.rows[order[position - start]]
        position += streams
        if caption:
            yield _Raw(key, path, caption)
        else:
            bad.add("caption")


def _decode(image: Union[bytes, str]) -> Optional[Image.Image]:
    """The RGB image, fully decoded; None for a missing, undecodable or truncated one."""
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
            return opened.convert("RGB")
    except Exception:  # PIL raises OSError, ValueError, SyntaxError, struct.error… for broken files
        return None


def _valid(samples: Iterator[_Raw], bad: _Bad) -> Iterator[tuple[str, Image.Image, str]]:
    """(key, image, caption) of the samples whose image decodes."""
    for sample in samples:
        image = _decode(sample.image)
        if image is None:
            bad.add("image")
            continue
        bad.good()
        yield sample.key, image, sample.caption


# ---------------------------------------------------------------------------------------------------
# The batches of one rank and epoch.
# ---------------------------------------------------------------------------------------------------


def _share(batches: int, lane: int, lanes: int) -> int:
    """How many of the batches 0 … batches-1 fall to lane `lane` (those ≡ lane mod lanes)."""
    return (batches - lane + lanes - 1) // lanes


class PairBatches(torch.utils.data.IterableDataset):
    """This rank's batches start_batch … steps-1 of one epoch (build one per epoch).

    Each batch is ``{"images": float [B, 3, H, W], "tokens": int64 [B, context], "keys": [B keys],
    "bad": {"image": n, "caption": n, "unpaired": n, "shard": n}}``, `bad` counting the samples
    skipped while forming this batch. Iterate it directly or through a DataLoader with
    ``batch_size=None`` and `num_workers` workers; both give the same batches in the same order.
    A transform with ``seeded = True`` (`ClipTransform`) is called as ``transform(image, generator)``
    with a torch.Generator seeded for the sample; any other must be deterministic.
    """

    def __init__(self, pool: Pool, transform: Callable[..., Tensor], tokenize: Callable[[list[str]], Tensor], *,
                 batch_size: int, steps: int, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, start_batch: int = 0, shuffle_buffer: int = 1000) -> None:
        super().__init__()
        if (batch_size < 1 or steps < 0 or not 0 <= start_batch <= steps or not 0 <= rank < world_size
                or num_workers < 0 or shuffle_buffer < 1 or seed < 0 or epoch < 0):
            raise ValueError(f"PairBatches: batch_size={batch_size} steps={steps} start_batch={start_batch} rank={rank} "
                             f"world_size={world_size} num_workers={num_workers} shuffle_buffer={shuffle_buffer} "
                             f"seed={seed} epoch={epoch}")
        self.pool, self.transform, self.tokenize = pool, transform, tokenize
        self.batch_size, self.steps, self.start_batch = batch_size, steps, start_batch
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer

    def __len__(self) -> int:
        return self.steps - self.start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        lanes = max(self.num_workers, 1)
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            batches = [self._lane(lane) for lane in range(lanes)]
            for k in range(self.start_batch, self.steps):
                yield next(batches[k % lanes])
        elif worker.num_workers != lanes:
            raise ValueError(f"PairBatches was built for {lanes} workers, the DataLoader has {worker.num_workers}")
        else:
            yield from self._lane((self.start_batch + worker.id) % lanes)

    def _lane(self, lane: int) -> Iterator[dict[str, Any]]:
        """The batches of one lane: its earlier samples re-read and validated, then its share."""
        lanes = max(self.num_workers, 1)
        stream = self.rank * lanes + lane
        first, end = _share(self.start_batch, lane, lanes), _share(self.steps, lane, lanes)
        bad = _Bad(self.pool.spec)
        samples = _valid(self._samples(stream, bad), bad)
        for _ in range(first * self.batch_size):
            next(samples)
        bad.take()
        for index in range(first, end):
            chosen = [next(samples) for _ in range(self.batch_size)]
            yield self._batch(chosen, stream, index, bad.take())

    def _samples(self, stream: int, bad: _Bad) -> Iterator[_Raw]:
        """Stream `stream`'s raw samples, every random choice seeded by (seed, epoch, stream)."""
        if isinstance(self.pool, CsvPool):
            streams = self.world_size * max(self.num_workers, 1)
            return _csv_stream(self.pool, self.seed, self.epoch, stream, streams, bad)
        shards, buffer = (np.random.default_rng([self.seed, self.epoch, stream, part]) for part in (0, 1))
        return _shuffled(_tar_stream(self.pool, shards, bad), self.shuffle_buffer, buffer)

    def _batch(self, samples: list[tuple[str, Image.Image, str]], stream: int, index: int,
               bad: dict[str, int]) -> dict[str, Any]:
        """Transformed images (each seeded by its stream and position), tokens, keys, skip counts."""
        seeded = getattr(self.transform, "seeded", False)
        images = []
        for offset, (_, image, _) in enumerate(samples):
            if seeded:
                counter = index * self.batch_size + offset
                generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, stream << 40 | counter))
                images.append(self.transform(image, generator))
            else:
                images.append(self.transform(image))
        return {"images": torch.stack(images), "tokens": self.tokenize([c for _, _, c in samples]).long(),
                "keys": [key for key, _, _ in samples], "bad": bad}


class PairPass(torch.utils.data.IterableDataset):
    """One ordered pass over a pool for validation: every shard (or row) once, in order, no resampling and
    no augmentation; batches of `batch_size` (the last one shorter) up to `limit` pairs. One process:
    held-out sets are small, and workers would each read the whole pass."""

    def __init__(self, pool: Pool, transform: Callable[..., Tensor], tokenize: Callable[[list[str]], Tensor], *,
                 batch_size: int, limit: Optional[int] = None) -> None:
        super().__init__()
        self.pool, self.transform, self.tokenize, self.batch_size, self.limit = pool, transform, tokenize, batch_size, limit

    def _raw(self, bad: _Bad) -> Iterator[_Raw]:
        if isinstance(self.pool, CsvPool):
            return (_Raw(key, path, caption) for key, path, caption in self.pool.rows)
        return (sample for shard in self.pool.shards for sample in _read_shard(shard.path, bad))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        bad = _Bad(self.pool.spec)
        chosen: list[tuple[str, Image.Image, str]] = []
        for n, sample in enumerate(_valid(self._raw(bad), bad)):
            if self.limit is not None and n >= self.limit:
                break
            chosen.append(sample)
            if len(chosen) == self.batch_size:
                yield self._batch(chosen, bad.take())
                chosen = []
        if chosen:
            yield self._batch(chosen, bad.take())

    def _batch(self, samples: list[tuple[str, Image.Image, str]], bad: dict[str, int]) -> dict[str, Any]:
        return {"images": torch.stack([self.transform(image) for _, image, _ in samples]),
                "tokens": self.tokenize([caption for _, _, caption in samples]).long(),
                "keys": [key for key, _, _ in samples], "bad": bad}


# ---------------------------------------------------------------------------------------------------
# OpenCLIP's image preprocessing, with the random crop drawn from a given generator.
# ---------------------------------------------------------------------------------------------------


class ClipTransform:
    """PIL image → normalised float tensor [3, size, size], as OpenCLIP's `image_transform`.

    Training: RandomResizedCrop(size, scale=(0.9, 1.0), bicubic), the crop box drawn from the
    generator exactly as torchvision draws it from the global RNG; evaluation: bicubic resize of the
    shorter side, centre crop. Picklable, for DataLoader workers.
    """

    seeded = True

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], train: bool) -> None:
        self.size, self.mean, self.std, self.train = int(size), list(mean), list(std), bool(train)

    def __call__(self, image: Image.Image, generator: Optional[torch.Generator] = None) -> Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        image = image.convert("RGB")
        if self.train:
            if generator is None:
                raise ValueError("ClipTransform(train=True) needs a torch.Generator for its random crop")
            top, left, height, width = _crop_box(image.width, image.height, generator)
            image = F.resized_crop(image, top, left, height, width, [self.size, self.size],
                                   InterpolationMode.BICUBIC, antialias=True)
        else:
            image = F.center_crop(F.resize(image, self.size, InterpolationMode.BICUBIC, antialias=True), self.size)
        return F.normalize(F.to_tensor(image), self.mean, self.std)


def clip_transform(size: int, mean: Sequence[float], std: Sequence[float], *, train: bool) -> ClipTransform:
    """OpenCLIP's training (random crop, seeded per sample by `PairBatches`) or evaluation transform."""
    return ClipTransform(size, mean, std, train)


def _crop_box(width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (top, left, height, width), drawn from `generator`."""
    area = width * height
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*_CROP_SCALE, generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(_CROP_LOG_RATIO[0], _CROP_LOG_RATIO[1], generator=generator)).item()
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    ratio = width / height  # fallback: the central crop of the nearest allowed aspect ratio
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        w, h = int(round(height * (4 / 3))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ---------------------------------------------------------------------------------------------------
# Synthetic pairs for tests and --smoke: coloured shapes that a tiny CLIP can learn.
# ---------------------------------------------------------------------------------------------------

SYNTHETIC_COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215),
                     "yellow": (230, 205, 40), "purple": (150, 60, 190)}
SYNTHETIC_SHAPES = ("circle", "square")
SYNTHETIC_CLASSES = tuple(f"{colour} {shape}" for colour in SYNTHETIC_COLOURS for shape in SYNTHETIC_SHAPES)
CAPTION_TEMPLATES = ("a photo of a {}", "a {} on a grey background", "a picture of a {}", "a simple drawing of a {}")


def write_synthetic_shards(folder: str | Path, *, shards: int = 2, per_shard: int = 64, size: int = 32, seed: int = 0,
                           classes: Sequence[str] = SYNTHETIC_CLASSES, corrupt: int = 0,
                           empty_captions: int = 0) -> list[Path]:
    """WebDataset shards ``00000000.tar`` … (+ sizes.json) of JPEG shapes with templated captions;
    `corrupt` samples get garbage for a .jpg and `empty_captions` an empty .txt (chosen by seed)."""
    folder = Path(folder)
    total = shards * per_shard
    if corrupt + empty_captions > total:
        raise ValueError(f"write_synthetic_shards: {corrupt} corrupt + {empty_captions} empty of {total} samples")
    _check_classes(classes)
    picks = np.random.default_rng([seed, 1]).permutation(total)
    broken, empty = set(picks[:corrupt].tolist()), set(picks[corrupt:corrupt + empty_captions].tolist())
    width = max(4, len(str(per_shard - 1)))
    paths, sizes = [], {}
    for shard in range(shards):
        members = []
        for i in range(per_shard):
            n = shard * per_shard + i
            rng = np.random.default_rng([seed, n])
            name, key = classes[n % len(classes)], f"{shard:05d}{i:0{width}d}"
            image = b"not a jpeg" + rng.bytes(200) if n in broken else _jpeg(_render(name, size, rng))
            caption = "" if n in empty else CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(name)
            meta = {"key": key, "caption": caption, "class": name, "label": n % len(classes)}
            members += [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]
        path = folder / f"{shard:08d}.tar"
        atomic_write_bytes(path, _tar_bytes(members))
        paths.append(path)
        sizes[path.name] = per_shard
    atomic_write_text(folder / "sizes.json", json.dumps(sizes, indent=1) + "\n")
    return paths


def write_synthetic_classification(folder: str | Path, *, per_class: int = 8, size: int = 32, seed: int = 1,
                                   classes: Sequence[str] = SYNTHETIC_CLASSES) -> Path:
    """An ImageFolder (``red_circle/00000.jpg`` …) of the shards' kind of images, for zero-shot tests."""
    root = Path(folder)
    _check_classes(classes)
    for label, name in enumerate(classes):
        for i in range(per_class):
            image = _render(name, size, np.random.default_rng([seed, label, i]))
            atomic_write_bytes(root / name.replace(" ", "_") / f"{i:05d}.jpg", _jpeg(image))
    return root


def _check_classes(classes: Sequence[str]) -> None:
    """Every class is "<colour> <shape>" of the synthetic palette."""
    for name in classes:
        colour, _, shape = name.partition(" ")
        if colour not in SYNTHETIC_COLOURS or shape not in SYNTHETIC_SHAPES:
            raise ValueError(f"synthetic class {name!r}: expected '<{'|'.join(SYNTHETIC_COLOURS)}> <{'|'.join(SYNTHETIC_SHAPES)}>'")


def _render(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A jittered coloured shape at a random place on a grey background."""
    colour, _, shape = name.partition(" ")
    image = Image.new("RGB", (size, size), (int(rng.integers(100, 160)),) * 3)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in SYNTHETIC_COLOURS[colour])
    radius = size * rng.uniform(0.2, 0.35)
    x, y = rng.uniform(radius, size - radius, 2)
    box = [x - radius, y - radius, x + radius, y + radius]
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=fill)
    return image


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, data) members with fixed metadata (same input, same bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
