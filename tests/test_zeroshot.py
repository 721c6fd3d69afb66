"""Zero-shot CLIP evaluation (gklcli.zeroshot, TABLE VII): numbers against hand computations on tiny sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from gklcli import zeroshot as zs
from gklcli.errors import GKLError
from gklcli.models.clip import CONFIGS, resolve_clip

ARCH = "open_clip:gkl-tiny-clip"
SIZES = [(40, 56), (64, 48), (32, 32), (50, 37)]


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return resolve_clip(ARCH)


def write_images(folder: Path, count: int, seed: int, gray_first: bool = False) -> list[Path]:
    """`count` PNGs of varied sizes; each folder has its own dominant colour so the classes differ."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    paths = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        if gray_first and i == 0:
            image = image.convert("L")  # exercises the to-RGB step
        path = folder / f"img{i}.png"
        image.save(path)
        paths.append(path)
    return paths


# --- the hand computation: OpenCLIP's recipe written out step by step -------------------------------


def hand_classifier(model, classnames, templates) -> torch.Tensor:
    """C×D: per class, tokenize each template, encode, normalise, mean, renormalise."""
    open_clip.add_model_config(CONFIGS)
    tok = open_clip.get_tokenizer("gkl-tiny-clip")
    rows = []
    with torch.no_grad():
        for name in classnames:
            texts = [t(name) if callable(t) else t.format(name) for t in templates]
            emb = model.encode_text(tok(texts))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def hand_preprocess(path: Path, spec) -> torch.Tensor:
    """OpenCLIP's eval transform by hand: short side → size (bicubic), centre crop, RGB, to tensor, normalise."""
    with Image.open(path) as image:
        image = T.Resize(spec.size, interpolation=T.InterpolationMode.BICUBIC)(image)
        image = T.CenterCrop(spec.size)(image).convert("RGB")
        return TF.normalize(TF.to_tensor(image), spec.mean, spec.std)


def hand_logits(loaded, paths, weights) -> torch.Tensor:
    """N×C logits, every image encoded on its own."""
    out = []
    with torch.no_grad():
        for path in paths:
            feature = loaded.model.encode_image(hand_preprocess(path, loaded.image)[None])[0]
            out.append(feature / feature.norm() @ weights.T)
    return torch.stack(out)


# --- (a) folder set ----------------------------------------------------------------------------------


def test_folder_top1_equals_hand_computation(tmp_path, loaded):
    names = ["golden_retriever", "tabby_cat", "fire_truck", "banana"]
    paths, labels = [], []
    for label, name in enumerate(names):
        for path in write_images(tmp_path / name, 3, seed=label, gray_first=label == 0):
            paths.append(path)
            labels.append(label)
    templates = zs.resolve_templates("openai")[1]
    weights = hand_classifier(loaded.model, [n.replace("_", " ") for n in names], templates)
    logits = hand_logits(loaded, paths, weights)
    expected_top1 = 100.0 * float((logits.argmax(1) == torch.tensor(labels)).sum()) / len(paths)

    result = zs.evaluate_zeroshot(loaded, "folder", tmp_path, batch_size=5, num_workers=0, templates="openai")
    assert result["n"] == len(paths) == 12
    assert result["top1"] == expected_top1
    assert result["top5"] == 100.0  # 4 classes: top-5 is top-4
    assert result["classes"] == 4 and result["skipped"] == 0
    assert result["templates"] == "openai" and result["prompts_per_class"] == 80
    assert result["arch"] == ARCH and result["source"] == "random"
    # the module's pieces are the hand ones: pixels exactly, classifier weights (D×C) up to rounding
    transform = zs.eval_transform(loaded)
    for path in paths:
        with Image.open(path) as image:
            assert torch.equal(transform(image), hand_preprocess(path, loaded.image))
    module_weights = zs.zeroshot_classifier(loaded, [n.replace("_", " ") for n in names], "openai", "cpu")
    torch.testing.assert_close(module_weights.T, weights, rtol=1e-5, atol=1e-6)


# --- (b) ImageNet-R: arg-max over the classes present --------------------------------------------------


def made_up_wnids(seed: int = 0) -> list[str]:
    numbers = np.random.default_rng(seed).choice(10**8, size=1000, replace=False)
    return sorted(f"n{n:08d}" for n in numbers)


PRESENT = [5, 421, 998]
SMALL_TEMPLATES = ["a photo of a {}.", "a rendition of the {}."]


def make_rendition(root: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for k, index in enumerate(PRESENT):
        for path in write_images(root / "imagenet-r" / wnids[index], 3, seed=10 + k):
            paths.append(path)
            labels.append(index)
    return paths, labels


@pytest.mark.parametrize("order_from", ["wnids-file", "imagenet-val"])
def test_imagenet_r_restricted_argmax(tmp_path, loaded, order_from):
    wnids = made_up_wnids()
    paths, labels = make_rendition(tmp_path, wnids)
    wnids_file = None
    if order_from == "wnids-file":
        wnids_file = tmp_path / "LOC_synset_mapping.txt"
        wnids_file.write_text("".join(f"{w} some class, other name\n" for w in wnids))
    else:
        for w in wnids:
            (tmp_path / "imagenet" / "val" / w).mkdir(parents=True)

    weights = hand_classifier(loaded.model, zs.imagenet_classnames(), SMALL_TEMPLATES)  # all 1000 classes
    logits = hand_logits(loaded, paths, weights)
    present = torch.tensor(PRESENT)
    predicted = present[logits[:, present].argmax(1)]
    expected_top1 = 100.0 * float((predicted == torch.tensor(labels)).sum()) / len(paths)

    result = zs.evaluate_zeroshot(loaded, "imagenet-r", tmp_path, num_workers=0, templates=SMALL_TEMPLATES,
                                  wnids=wnids_file)
    assert result["top1"] == expected_top1
    assert result["n"] == 9 and result["classes"] == 3
    data = zs.find_set("imagenet-r", tmp_path, wnids_file)
    assert data.class_indices == PRESENT
    assert data.classnames == [zs.imagenet_classnames()[i] for i in PRESENT]


def test_imagenet_r_without_class_order_says_what_to_give(tmp_path):
    make_rendition(tmp_path, made_up_wnids())
    with pytest.raises(GKLError, match="--wnids"):
        zs.find_set("imagenet-r", tmp_path)
    bad = tmp_path / "short.txt"
    bad.write_text("n00000001\nn00000002\n")
    with pytest.raises(GKLError, match="short.txt"):
        zs.find_set("imagenet-r", tmp_path, bad)


def test_sketch_order_from_its_own_folders(tmp_path):
    wnids = made_up_wnids(1)
    base = tmp_path / "imagenet-sketch" / "sketch"
    for w in wnids:
        (base / w).mkdir(parents=True)
    write_images(base / wnids[7], 2, seed=3)
    data = zs.find_set("imagenet-sketch", tmp_path)
    assert data.root == base and list(data.labels) == [7, 7] and len(data.classnames) == 1000


# --- (c) ImageNet-V2: folder number = class index ----------------------------------------------------


def test_imagenet_v2_numeric_folders(tmp_path, loaded):
    base = tmp_path / "imagenet-v2" / "imagenetv2-matched-frequency-format-val"
    paths, labels = [], []
    for k, index in enumerate([0, 7, 999]):
        for path in write_images(base / str(index), 2, seed=20 + k):
            paths.append(path)
            labels.append(index)
    data = zs.find_set("imagenet-v2", tmp_path)
    assert data.root == base
    assert list(data.labels) == labels and data.paths == [str(p) for p in paths]
    assert len(data.classnames) == 1000 and data.classnames[999] == "toilet paper"

    template = ["a photo of a {}."]
    weights = hand_classifier(loaded.model, zs.imagenet_classnames(), template)
    logits = hand_logits(loaded, paths, weights)
    y = torch.tensor(labels)
    top1 = 100.0 * float((logits.argmax(1) == y).sum()) / len(y)
    top5 = 100.0 * float((logits.topk(5, 1).indices == y[:, None]).any(1).sum()) / len(y)
    result = zs.evaluate_zeroshot(loaded, "imagenet-v2", tmp_path, num_workers=0, templates=template)
    assert (result["top1"], result["top5"], result["n"], result["classes"]) == (top1, top5, 6, 1000)

    (base / "extra").mkdir()
    with pytest.raises(GKLError, match="extra"):
        zs.find_set("imagenet-v2", tmp_path)


# --- (d) bad inputs and damaged files ----------------------------------------------------------------


def test_bad_inputs_name_the_path_or_value(tmp_path, loaded):
    missing = tmp_path / "nope"
    with pytest.raises(GKLError, match="nope"):
        zs.evaluate_zeroshot(loaded, "folder", missing, num_workers=0)
    with pytest.raises(GKLError, match=str(tmp_path / "imagenet" / "val")):
        zs.find_set("imagenet", tmp_path)
    with pytest.raises(GKLError, match="imagenet-r"):
        zs.find_set("imagenet-r", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GKLError, match="empty"):
        zs.find_set("folder", empty)
    (empty / "cat").mkdir()
    with pytest.raises(GKLError, match="no images"):
        zs.find_set("folder", empty)
    (tmp_path / "imagenet-r").mkdir()
    with pytest.raises(GKLError, match="imagenet-r"):
        zs.find_set("imagenet-r", tmp_path)
    with pytest.raises(GKLError, match="imagenet-a"):
        zs.find_set("imagenet-a", tmp_path)
    with pytest.raises(GKLError, match="fancy"):
        zs.resolve_templates("fancy")
    with pytest.raises(GKLError, match="imagenet-a"):  # refused before any model is loaded
        zs.zeroshot_command(ARCH, ["folder", "imagenet-a"], tmp_path, None, 4, 0, "cpu", "openai", None)


def test_corrupt_images_are_skipped_and_counted(tmp_path, loaded):
    write_images(tmp_path / "cat", 3, seed=1)
    write_images(tmp_path / "dog", 2, seed=2)
    (tmp_path / "dog" / "garbage.png").write_bytes(b"this is not an image")
    good = (tmp_path / "cat" / "img0.png").read_bytes()
    (tmp_path / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    result = zs.evaluate_zeroshot(loaded, "folder", tmp_path, batch_size=2, num_workers=0, templates="simple")
    assert (result["n"], result["skipped"], result["classes"]) == (5, 2, 2)
    assert result["prompts_per_class"] == 7

    for f in (tmp_path / "cat").iterdir():
        f.write_bytes(b"")
    for f in (tmp_path / "dog").iterdir():
        f.write_bytes(b"")
    with pytest.raises(GKLError, match="could be read"):
        zs.evaluate_zeroshot(loaded, "folder", tmp_path, num_workers=0, templates="simple")


def test_command_writes_results_json(tmp_path):
    data = tmp_path / "data"
    write_images(data / "red_fox", 3, seed=4)
    write_images(data / "sea_lion", 3, seed=5)
    (data / "sea_lion" / "broken.jpg").write_bytes(b"\xff\xd8broken")
    templates = tmp_path / "templates.txt"
    templates.write_text("# mine\na photo of a {}.\na drawing of a {}.\n")
    out = tmp_path / "out"
    results = zs.zeroshot_command(ARCH, ["folder"], data, out, 4, 1, "cpu", templates, 5)
    assert set(results) == {"folder"}
    row = results["folder"]
    assert row["n"] + row["skipped"] == 5 and row["limit"] == 5 and row["prompts_per_class"] == 2
    assert json.loads((out / "results.json").read_text()) == results
