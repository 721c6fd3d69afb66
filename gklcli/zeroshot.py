"""Zero-shot top-1/top-5 of CLIP models on ImageNet and its variants (TABLE VII).

TABLE VII reports the zero-shot accuracy of the distilled CLIP students on ImageNet, ImageNet-V2,
ImageNet-Sketch and ImageNet-R. The protocol is OpenCLIP's, so the numbers compare with published
ones: the class names `open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES`, the 80 OpenAI prompt
templates (or the 7 "simple" ones), `open_clip.build_zero_shot_classifier` (per class: the mean of
the normalised prompt embeddings, renormalised), OpenCLIP's evaluation transform (resize the short
side to the image size, bicubic; centre crop; RGB; the model's mean/std), and
``logits = 100 · normalise(encode_image(x)) @ classifier``. ImageNet-R has 200 of the 1000 classes
and is scored with the arg-max over those 200 (its authors' protocol, as in TABLE XIII).

Layouts under the data root (``--data-dir``), as the datasets are usually downloaded:

* ``imagenet``: ``<root>/imagenet/val/<wnid>/*.JPEG`` (the val images sorted into WordNet-id folders
  with the usual ``valprep.sh``), or ``<root>/val/<wnid>/…`` when the root is the ImageNet folder;
* ``imagenet-v2``: ``<root>/imagenet-v2/`` holding folders ``0`` … ``999`` (the extracted
  ``imagenetv2-matched-frequency-format-val``, directly or as its one sub-folder); folder number =
  class index;
* ``imagenet-sketch``: ``<root>/imagenet-sketch/`` (or ``<root>/sketch/``) with the 1000 WordNet-id
  folders, directly or one level below (the archive's ``sketch/``);
* ``imagenet-r``: ``<root>/imagenet-r/`` with its 200 WordNet-id folders;
* ``folder``: ``<root>`` itself is an ImageFolder whose folder names are the class names
  (underscores read as spaces), for small custom sets.

WordNet id → class index: ImageNet's class order is the sorted list of its 1000 WordNet ids. It is
taken from a ``--wnids`` file when one is given (one id per line in class order, such as ImageNet's
``LOC_synset_mapping.txt``, or ``imagenet_class_index.json``); else from an ImageNet folder under the
same root that has all 1000 class folders (``imagenet/val``, ``imagenet/train``, ``val``, ``train``);
else, for a set that itself has all 1000 folders (ImageNet, Sketch), from its own sorted folders.
Otherwise (ImageNet-R alone) the error says what to provide. No class list is shipped with gkl.

Unreadable image files are skipped and counted (``skipped`` in the result), never fatal.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gklcli.errors import GKLError, show
from gklcli.models.clip import LoadedClip, resolve_clip, tokenizer

log = logging.getLogger(__name__)

ZEROSHOT_DATASETS = ("imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-r", "folder")
TEMPLATE_SETS = ("openai", "simple")
NUM_IMAGENET_CLASSES = 1000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
WNID = re.compile(r"n\d{8}")
# folder names under the data root each dataset is looked for in, first match wins
DATASET_DIRS = {
    "imagenet-v2": ("imagenet-v2", "imagenetv2-matched-frequency-format-val"),
    "imagenet-sketch": ("imagenet-sketch", "sketch"),
    "imagenet-r": ("imagenet-r",),
}

Template = Union[str, Callable[[str], str]]


def _open_clip() -> Any:
    """open_clip, imported on demand (it pulls in timm)."""
    import open_clip

    return open_clip


@dataclass(frozen=True)
class ZeroShotSet:
    """An evaluation set: image files, labels as positions in `classnames` (the classifier's classes)."""

    dataset: str
    root: Path  # the folder the class folders were found in
    paths: list[str]
    labels: np.ndarray
    classnames: list[str]
    class_indices: Optional[list[int]] = None  # ImageNet indices of `classnames` when a subset (ImageNet-R)

    def __len__(self) -> int:
        return len(self.paths)


# ---------------------------------------------------------------------------------------------------
# Class names and templates
# ---------------------------------------------------------------------------------------------------


def imagenet_classnames() -> list[str]:
    """OpenCLIP's 1000 ImageNet class names, in class-index order."""
    return list(_open_clip().zero_shot_metadata.IMAGENET_CLASSNAMES)


def resolve_templates(templates: Union[str, Path, Sequence[Template]]) -> tuple[str, list[Template]]:
    """(name, templates): ``openai`` (80), ``simple`` (7), a text file of ``{}`` templates, or a list."""
    if not isinstance(templates, (str, Path)):
        listed = list(templates)
        if not listed or not all(isinstance(t, str) or callable(t) for t in listed):
            raise GKLError(f"templates {show(templates)}: expected format strings with {{}} or callables")
        return f"custom({len(listed)})", listed
    meta = _open_clip().zero_shot_metadata
    if str(templates) == "openai":
        return "openai", list(meta.OPENAI_IMAGENET_TEMPLATES)
    if str(templates) == "simple":
        return "simple", list(meta.SIMPLE_IMAGENET_TEMPLATES)
    path = Path(templates)
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        listed = [line for line in lines if line and not line.startswith("#")]
        bad = [line for line in listed if "{}" not in line]
        if not listed or bad:
            raise GKLError(f"{path}: expected one prompt template with {{}} per line"
                           + (f"; {show(bad[0])} has none" if bad else "; the file has none"))
        return str(path), listed
    raise GKLError(f"templates {show(str(templates))}: unknown template set; expected "
                   f"{' or '.join(TEMPLATE_SETS)}, or a text file with one {{}} template per line")


# ---------------------------------------------------------------------------------------------------
# Finding the evaluation sets
# ---------------------------------------------------------------------------------------------------


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _wnid_dirs(folder: Path) -> list[Path]:
    return [d for d in _subdirs(folder) if WNID.fullmatch(d.name)]


def _images(folder: Path) -> list[str]:
    return [str(f) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise GKLError(f"{path}: not found; expected {what}")
    return path


def _dataset_dir(root: Path, dataset: str) -> Path:
    """`<root>/<name>` for the first of the dataset's folder names present."""
    _require_dir(root, "the data root holding the evaluation sets")
    names = DATASET_DIRS[dataset]
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise GKLError(f"{root / names[0]}: not found; {dataset} is looked for in {' or '.join(names)} under {root}")


def read_wnids(path: Path) -> list[str]:
    """The 1000 WordNet ids in class order from a text file (first id on each line) or a JSON class index."""
    if not path.is_file():
        raise GKLError(f"{path}: wnids file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            table = json.loads(text)  # imagenet_class_index.json: {"0": ["n01440764", "tench"], …}
            wnids = [table[str(i)][0] for i in range(len(table))]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise GKLError(f"{path}: not an imagenet_class_index.json ({{\"0\": [wnid, name], …}}): "
                           f"{error}") from None
    else:
        wnids = [m.group(0) for line in text.splitlines() if not line.lstrip().startswith("#")
                 for m in [WNID.search(line)] if m]
    if len(wnids) != NUM_IMAGENET_CLASSES or len(set(wnids)) != NUM_IMAGENET_CLASSES:
        raise GKLError(f"{path}: {len(set(wnids))} distinct WordNet ids (n########); expected the "
                       f"{NUM_IMAGENET_CLASSES} of ImageNet, one per line in class order")
    if wnids != sorted(wnids):
        log.warning("%s: WordNet ids are not in sorted order; ImageNet's class order (and OpenCLIP's class "
                    "names) is the sorted one", path)
    return wnids


def _imagenet_candidates(root: Path) -> list[Path]:
    return [root / "imagenet" / "val", root / "imagenet" / "train", root / "val", root / "train"]


def wnid_order(root: Path, wnids: Optional[Path] = None, *, own: Optional[Path] = None) -> list[str]:
    """ImageNet's 1000 WordNet ids in class order (see the module docstring for where they come from)."""
    if wnids is not None:
        return read_wnids(Path(wnids))
    for folder in [*_imagenet_candidates(root), *([own] if own is not None else [])]:
        if folder.is_dir():
            found = [d.name for d in _wnid_dirs(folder)]
            if len(found) == NUM_IMAGENET_CLASSES:
                return found
    looked = ", ".join(str(p) for p in _imagenet_candidates(root))
    raise GKLError(f"the WordNet-id → class order needs the {NUM_IMAGENET_CLASSES} ImageNet class folders and "
                   f"none of {looked} has them; give --wnids FILE (ImageNet's LOC_synset_mapping.txt: one id per line)")


def _index_map(order: list[str]) -> dict[str, int]:
    return {w: i for i, w in enumerate(order)}


def _wnid_images(base: Path, index: dict[str, int]) -> tuple[list[str], list[int], list[int]]:
    """Images under the WordNet-id folders of `base`: paths, ImageNet labels, classes present."""
    folders = _wnid_dirs(base)
    unknown = [d.name for d in folders if d.name not in index]
    if unknown:
        raise GKLError(f"{base / unknown[0]}: {unknown[0]} is not one of the {NUM_IMAGENET_CLASSES} ImageNet "
                       "WordNet ids of the class order")
    paths: list[str] = []
    labels: list[int] = []
    for folder in folders:
        files = _images(folder)
        paths += files
        labels += [index[folder.name]] * len(files)
    if not paths:
        raise GKLError(f"{base}: no images ({', '.join(IMAGE_SUFFIXES[:3])}, …) in its class folders")
    return paths, labels, sorted(index[d.name] for d in folders)


def imagenet_set(root: Path, wnids: Optional[Path] = None) -> ZeroShotSet:
    """ImageNet val: `<root>/imagenet/val/<wnid>/` or `<root>/val/<wnid>/`; 1000-way."""
    _require_dir(root, "the data root holding imagenet/val")
    base = next((p for p in (root / "imagenet" / "val", root / "val") if p.is_dir()), None)
    if base is None:
        raise GKLError(f"{root / 'imagenet' / 'val'}: not found (nor {root / 'val'}); expected ImageNet's val images "
                       "in WordNet-id folders (valprep.sh)")
    if not _wnid_dirs(base):
        raise GKLError(f"{base}: no class folders named by WordNet id (n01440764, …); sort the val images into "
                       "them with valprep.sh")
    paths, labels, _ = _wnid_images(base, _index_map(wnid_order(root, wnids, own=base)))
    return ZeroShotSet("imagenet", base, paths, np.asarray(labels, dtype=np.int64), imagenet_classnames())


def _numeric_base(folder: Path) -> Path:
    """`folder` or its one sub-folder holding the class folders 0 … 999."""
    for candidate in (folder, *_subdirs(folder)):
        if any(d.name.isdigit() for d in _subdirs(candidate)):
            return candidate
    raise GKLError(f"{folder}: no class folders 0 … 999 (the imagenetv2-matched-frequency-format-val layout)")


def imagenet_v2_set(root: Path) -> ZeroShotSet:
    """ImageNet-V2: numeric folders, folder number = ImageNet class index; 1000-way."""
    base = _numeric_base(_dataset_dir(root, "imagenet-v2"))
    paths: list[str] = []
    labels: list[int] = []
    for folder in _subdirs(base):
        if not folder.name.isdigit() or int(folder.name) >= NUM_IMAGENET_CLASSES:
            raise GKLError(f"{folder}: not a class folder; ImageNet-V2's are named 0 … {NUM_IMAGENET_CLASSES - 1}")
        files = _images(folder)
        paths += files
        labels += [int(folder.name)] * len(files)
    if not paths:
        raise GKLError(f"{base}: no images in its class folders 0 … 999")
    return ZeroShotSet("imagenet-v2", base, paths, np.asarray(labels, dtype=np.int64), imagenet_classnames())


def _wnid_base(folder: Path) -> Path:
    """`folder` or one level below it (Sketch's `sketch/`) holding the WordNet-id folders."""
    from gklcli.ood import class_root

    return class_root(folder)


def imagenet_sketch_set(root: Path, wnids: Optional[Path] = None) -> ZeroShotSet:
    """ImageNet-Sketch: the 1000 WordNet-id folders; 1000-way."""
    base = _wnid_base(_dataset_dir(root, "imagenet-sketch"))
    paths, labels, _ = _wnid_images(base, _index_map(wnid_order(root, wnids, own=base)))
    return ZeroShotSet("imagenet-sketch", base, paths, np.asarray(labels, dtype=np.int64), imagenet_classnames())


def imagenet_r_set(root: Path, wnids: Optional[Path] = None) -> ZeroShotSet:
    """ImageNet-R: 200 WordNet-id folders; the classifier holds only the classes present."""
    base = _wnid_base(_dataset_dir(root, "imagenet-r"))
    paths, labels, present = _wnid_images(base, _index_map(wnid_order(root, wnids)))
    position = {c: i for i, c in enumerate(present)}
    names = imagenet_classnames()
    return ZeroShotSet("imagenet-r", base, paths, np.asarray([position[y] for y in labels], dtype=np.int64),
                       [names[c] for c in present], present)


def folder_set(root: Path) -> ZeroShotSet:
    """An ImageFolder at `root` whose folder names are the class names (underscores → spaces)."""
    _require_dir(root, "an ImageFolder: one sub-folder per class, named by the class name")
    folders = _subdirs(root)
    if not folders:
        raise GKLError(f"{root}: no class folders (one sub-folder per class, named by the class name)")
    paths: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = _images(folder)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise GKLError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES[:3])}, …) in its class folders")
    return ZeroShotSet("folder", root, paths, np.asarray(labels, dtype=np.int64),
                       [d.name.replace("_", " ") for d in folders])


def check_dataset(dataset: str) -> None:
    if dataset not in ZEROSHOT_DATASETS:
        raise GKLError(f"dataset {show(dataset)}: not a zero-shot set; expected one of {', '.join(ZEROSHOT_DATASETS)}")


def find_set(dataset: str, root: Path, wnids: Optional[Path] = None) -> ZeroShotSet:
    """The evaluation set `dataset` under the data root `root` (layouts in the module docstring)."""
    check_dataset(dataset)
    root = Path(root)
    if dataset == "imagenet":
        return imagenet_set(root, wnids)
    if dataset == "imagenet-v2":
        return imagenet_v2_set(root)
    if dataset == "imagenet-sketch":
        return imagenet_sketch_set(root, wnids)
    if dataset == "imagenet-r":
        return imagenet_r_set(root, wnids)
    return folder_set(root)


def limit_set(data: ZeroShotSet, limit: Optional[int]) -> ZeroShotSet:
    """At most `limit` images, evenly spaced over the (class-sorted) list so every class keeps some."""
    if limit is None or limit >= len(data):
        return data
    if limit <= 0:
        raise GKLError(f"limit {limit}: expected a positive number of images")
    keep = np.unique(np.linspace(0, len(data) - 1, num=limit).round().astype(np.int64))
    return replace(data, paths=[data.paths[i] for i in keep], labels=data.labels[keep])


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------


def eval_transform(loaded: LoadedClip) -> Callable[[Any], Tensor]:
    """OpenCLIP's evaluation transform for the model: resize (short side, bicubic), centre crop, RGB, normalise."""
    cfg = getattr(loaded.model.visual, "preprocess_cfg", None) or {}
    return _open_clip().image_transform(loaded.image.size, is_train=False, mean=loaded.image.mean, std=loaded.image.std,
                                        resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
                                        fill_color=cfg.get("fill_color", 0))


class ZeroShotImages(Dataset):
    """Decoded, transformed images; an unreadable file gives ``(None, "path: error")`` instead of failing."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform: Callable[[Any], Tensor]):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Optional[Tensor], Any]:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image.load()
                pixels = self.transform(image)
        except Exception as error:  # PIL raises many types for damaged files (OSError, SyntaxError, ValueError…)
            return None, f"{path}: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        return pixels, int(self.labels[index])


def collate_skipping(batch: list[tuple[Optional[Tensor], Any]]) -> tuple[Optional[Tensor], Optional[Tensor], list[str]]:
    """Stack the readable images; return the messages of the unreadable ones."""
    good = [(x, y) for x, y in batch if x is not None]
    skipped = [y for x, y in batch if x is None]
    if not good:
        return None, None, skipped
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), skipped


# ---------------------------------------------------------------------------------------------------
# Classifier and evaluation
# ---------------------------------------------------------------------------------------------------


def zeroshot_classifier(loaded: LoadedClip, classnames: Sequence[str], templates: Sequence[Template],
                        device: Union[str, torch.device] = "cpu") -> Tensor:
    """D×C zero-shot weights: per class, the normalised mean of the normalised prompt embeddings."""
    if not classnames:
        raise GKLError("zero-shot classifier: no class names")
    _, listed = resolve_templates(templates)
    kinds = {isinstance(t, str) for t in listed}
    if len(kinds) > 1:  # OpenCLIP formats all as strings or calls all
        listed = [t.format if isinstance(t, str) else t for t in listed]
    with torch.no_grad():
        return _open_clip().build_zero_shot_classifier(loaded.model, tokenizer(loaded.arch), list(classnames), listed,
                                                       num_classes_per_batch=10, device=device, use_tqdm=False)


@torch.no_grad()
def _score(loaded: LoadedClip, loader: DataLoader, classifier: Tensor, device: torch.device) -> dict[str, Any]:
    """Top-1/top-5 counts over the loader; unreadable images are counted, not scored."""
    k = min(5, classifier.shape[1])
    top1 = top5 = n = 0
    skipped: list[str] = []
    for images, labels, bad in loader:
        skipped += bad
        if images is None:
            continue
        features = loaded.model.encode_image(images.to(device), normalize=True)
        logits = 100.0 * features @ classifier
        hits = logits.topk(k, dim=1).indices.cpu() == labels[:, None]
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(dim=1).sum())
        n += len(labels)
    return {"top1_count": top1, "top5_count": top5, "n": n, "skipped": skipped}


def evaluate_zeroshot(loaded: LoadedClip, dataset: str, root: Union[str, Path], *, batch_size: int = 256,
                      num_workers: int = 4, device: Union[str, torch.device] = "cpu",
                      templates: Union[str, Path, Sequence[Template]] = "openai", limit: Optional[int] = None,
                      wnids: Optional[Path] = None) -> dict[str, Any]:
    """Zero-shot top-1/top-5 (%) of `loaded` (already on `device`) on `dataset` under `root`.

    Top-5 is top-min(5, classes). `limit` keeps that many images, evenly spaced; `wnids` is the class-order file."""
    name, listed = resolve_templates(templates)
    data = limit_set(find_set(dataset, Path(root), wnids), limit)
    device = torch.device(device)
    loaded.model.eval()
    classifier = zeroshot_classifier(loaded, data.classnames, listed, device)
    images = ZeroShotImages(data.paths, data.labels, eval_transform(loaded))
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skipping)
    counts = _score(loaded, loader, classifier, device)
    for message in counts["skipped"][:5]:
        log.warning("skipped unreadable image %s", message)
    if counts["n"] == 0:
        raise GKLError(f"{data.root}: none of its {len(data)} images could be read (first: {counts['skipped'][0]})")
    n = counts["n"]
    return {"dataset": dataset, "top1": 100.0 * counts["top1_count"] / n, "top5": 100.0 * counts["top5_count"] / n,
            "n": n, "skipped": len(counts["skipped"]), "classes": len(data.classnames), "templates": name,
            "prompts_per_class": len(listed), "arch": loaded.arch, "source": loaded.source, "root": str(data.root),
            "limit": limit}


def zeroshot_command(spec: str, datasets: list[str], data_dir: Union[str, Path], out: Optional[Path],
                     batch_size: int = 256, num_workers: int = 4, device: Union[str, torch.device] = "cpu",
                     templates: Union[str, Path, Sequence[Template]] = "openai", limit: Optional[int] = None, *,
                     wnids: Optional[Path] = None) -> dict[str, dict[str, Any]]:
    """`gkl eval-zeroshot SPEC --dataset …`: every dataset's result, also written to `out`/results.json."""
    from gklcli.checkpoint import atomic_write_text

    if not datasets:
        raise GKLError(f"no dataset given; expected one or more of {', '.join(ZEROSHOT_DATASETS)}")
    for dataset in datasets:
        check_dataset(dataset)
    resolve_templates(templates)
    for dataset in datasets:  # every folder is checked before the model is loaded
        find_set(dataset, Path(data_dir), wnids)
    loaded = resolve_clip(spec, device=device, data_dir=str(data_dir))
    results = {d: evaluate_zeroshot(loaded, d, data_dir, batch_size=batch_size, num_workers=num_workers, device=device,
                                    templates=templates, limit=limit, wnids=wnids) for d in datasets}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results
