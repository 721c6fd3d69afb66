"""Top-1 accuracy on ImageNet variants whose class folders are WordNet ids (ImageNet-R, ImageNet-Sketch).

TABLE XIII evaluates the ImageNet-LT students on them. ImageNet-R has 200 of the 1000 classes, so
the prediction is the arg-max over the logits of the classes present (the protocol of its authors);
ImageNet-Sketch has all 1000. The WordNet id → class index map comes from the training list file
(ImageNet-LT's `train/n01440764/… 0` lines), so no class list is hard-coded here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gklcli.data import FileSource, make_eval_loader, to_float
from gklcli.errors import GKLError

WNID = re.compile(r"n\d{8}")


def wnid_index_from_list(list_file: Path) -> dict[str, int]:
    """WordNet id → label from a list file whose paths contain the class folder."""
    if not list_file.is_file():
        raise GKLError(f"{list_file}: not found; the WordNet-id → class map of ImageNet variants is read from it")
    mapping: dict[str, int] = {}
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2:
            continue
        match = WNID.search(parts[0])
        if match is None:
            raise GKLError(f"{list_file}:{number}: no WordNet id (n########) in {parts[0]!r}")
        if mapping.setdefault(match.group(0), int(parts[1])) != int(parts[1]):
            raise GKLError(f"{list_file}:{number}: {match.group(0)} has two labels ({mapping[match.group(0)]} and {parts[1]})")
    return mapping


def class_root(root: Path) -> Path:
    """The folder holding the WordNet-id class folders: `root` itself or one level below (sketch/)."""
    if not root.is_dir():
        raise GKLError(f"{root}: not found; expected class folders named by WordNet id (n01440764, …)")
    for candidate in (root, *sorted(d for d in root.iterdir() if d.is_dir())):
        if any(WNID.fullmatch(d.name) for d in candidate.iterdir() if d.is_dir()):
            return candidate
    raise GKLError(f"{root}: no class folders named by WordNet id (n01440764, …)")


def variant_source(root: Path, wnid_to_index: dict[str, int], size: int) -> tuple[FileSource, list[int]]:
    """The variant's images labelled with the model's class indices, and the class indices present."""
    base = class_root(root)
    folders = sorted(d for d in base.iterdir() if d.is_dir() and WNID.fullmatch(d.name))
    unknown = [d.name for d in folders if d.name not in wnid_to_index]
    if unknown:
        raise GKLError(f"{base}: class folder {unknown[0]} is not a class of the training set")
    paths, labels = [], []
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
                paths.append(str(file))
                labels.append(wnid_to_index[folder.name])
    if not paths:
        raise GKLError(f"{base}: no images")
    return FileSource(paths, np.asarray(labels, dtype=np.int64), base.name, size), sorted({wnid_to_index[d.name] for d in folders})


@torch.no_grad()
def variant_top1(model: nn.Module, source: FileSource, classes: list[int], *, batch_size: int, num_workers: int,
                 device: torch.device) -> dict[str, Any]:
    """Top-1 in % with the arg-max restricted to `classes`."""
    model.eval()
    index = torch.tensor(classes, device=device)
    correct = total = 0
    for images, y in make_eval_loader(source, None, batch_size, num_workers):
        logits = model(to_float(images, device))
        pred = index[logits[:, index].argmax(1)]
        correct += int((pred.cpu() == y).sum())
        total += len(y)
    return {"top1": 100.0 * correct / max(total, 1), "n": total, "classes": len(classes)}
