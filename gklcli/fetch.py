"""`gkl fetch`: every dataset, DM-AT generated set, teacher and released model the recipes read,
downloaded to the place the recipes look for it.

Sources (see docs/data.md for sizes and licences):

* ``cifar10``, ``cifar100``: torchvision's archives and md5s, unpacked into DATA_DIR as torchvision
  lays them out (``cifar-10-batches-py/``).
* ``generated NAME`` (cifar10_1m, cifar10_5m, cifar10_10m, cifar10_20m, cifar10_50m, cifar100_1m,
  cifar100_50m): DM-AT's EDM images from the Hugging Face dataset repository P2333/DM-Improves-AT
  (URLs built by huggingface_hub). The 20M and 50M sets come in parts; they are joined as DM-AT's
  merge-data.py does (``image`` and ``label`` concatenated in part order) but streamed, without
  holding them in memory, into the one uncompressed, memory-mappable DATA_DIR/generated/NAME.npz
  that the generated-data recipes and `gkl reproduce` read.
* ``teachers cifar100``: mdistiller's release tarball (the CRD teachers), unpacked as
  DATA_DIR/cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth; ``teachers imagenet``: torchvision's
  ImageNet ResNet-34/50 weights into DATA_DIR/teachers/ (their sha256 prefix is in the file name);
  ``teachers imagenet-lt``: not released anywhere, so the command says how to make them;
  ``teachers clip``: OpenCLIP's ViT-L/14 trained on DataComp-1B (TABLE VII's teacher) from its Hugging Face
  repository into DATA_DIR/teachers/open_clip/.
  ``teachers seg``: APD's released PSPNet-R101 ADE20K teacher (DATA_DIR/teachers/apd/) and CSAIL's deep-stem
  ImageNet ResNet-18 the student starts from (DATA_DIR/pretrained/), TABLE XXIII.
* ``robustbench NAME``: RobustBench's own zoo download into MODEL_DIR/DATASET/THREAT/NAME.pt.
* ``imagenet``, ``imagenet-lt``: need a licence; the command prints what to get, and
  ``gkl data check`` verifies a folder.

DM-AT and mdistiller publish no checksums: their files are verified by content (the arrays' shape,
dtype and labels; each teacher loads as a state dict) instead.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gklcli.checkpoint import atomic_write_text, read_json
from gklcli.datasets import facts
from gklcli.download import ByteProgress, download, mirrored, safe_extract
from gklcli.errors import GKLError

HUB_REPO = "P2333/DM-Improves-AT"  # DM-AT's README: the CIFAR generated data is a dataset repository
CIFAR = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
}
GENERATED = {  # NAME (the recipe's name) → the parts on the Hub, in DM-AT's merge order
    "cifar10_1m": ["cifar10/1m.npz"],
    "cifar10_5m": ["cifar10/5m.npz"],
    "cifar10_10m": ["cifar10/10m.npz"],
    "cifar10_20m": [f"cifar10/20m_part{i}.npz" for i in (1, 2)],
    "cifar10_50m": [f"cifar10/50m_part{i}.npz" for i in (1, 2, 3, 4)],
    "cifar100_1m": ["cifar100/1m.npz"],
    "cifar100_50m": [f"cifar100/50m_part{i}.npz" for i in (1, 2, 3, 4)],
}
MDISTILLER_TEACHERS = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
CIFAR_TEACHERS = ("resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13")
# the teacher of TABLE VII: OpenCLIP's ViT-L-14 `datacomp_xl_s13b_b90k` (79.2 % zero-shot), where recipes/clip read it
CLIP_TEACHER = ("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", "open_clip_pytorch_model.bin",
                "teachers/open_clip/ViT-L-14-datacomp_xl_s13b_b90k.bin")
# TABLE XXIII (APD on ADE20K): the released PSPNet-R101 teacher and the student's ImageNet initialisation
# (CSAIL's deep-stem ResNet-18, APD's ./initmodel/resnet18-imagenet.pth), where recipes/seg read them
SEG_FILES = {
    "teachers/apd/pspnet101_fc_ade20k.pth": "https://github.com/akuxcw/APD/releases/download/v1.0/pspnet101_fc_ade20k.pth",
    "pretrained/resnet18-imagenet.pth": "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/resnet18-imagenet.pth",
}
IMAGENET_TEACHERS = {  # torchvision's IMAGENET1K_V1 weights; the hex in the name is the sha256 prefix it checks
    "resnet34-b627a593.pth": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50-0676ba61.pth": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}
LICENSED = {
    "imagenet": "ImageNet (ILSVRC-2012) needs a licence: register at https://image-net.org, download ILSVRC2012_img_train.tar "
                "and ILSVRC2012_img_val.tar, and unpack them as DATA_DIR/train/<wnid>/*.JPEG and DATA_DIR/val/<wnid>/*.JPEG "
                "(1,000 class folders each); then run: gkl data check imagenet --data-dir DATA_DIR",
    "imagenet-lt": "ImageNet-LT is ImageNet (licence: https://image-net.org) with the list files of Liu et al. (OLTR; also in the "
                   "official DKL repository): ImageNet_LT_train.txt, ImageNet_LT_val.txt and ImageNet_LT_test.txt in DATA_DIR, "
                   "their paths relative to DATA_DIR (train/<wnid>/…, val/<wnid>/…); then run: gkl data check imagenet-lt --data-dir DATA_DIR",
}
LT_VAL = 20000  # ImageNet-LT's validation list (20 images per class)


@dataclass
class Fetcher:
    """Where things go and how they come: the data root, a mirror, and a console for progress."""

    data_dir: Path
    mirror: Optional[str] = None
    console: Any = None

    def get(self, url: str, dest: Path, *, checksum: Optional[tuple[str, str]] = None, source: str = "",
            headers: Optional[dict[str, str]] = None) -> Path:
        if self.console is not None:
            self.console.print(f"{source}: {mirrored(url, self.mirror)} → {dest}")
        with ByteProgress(self.console, dest.name) as progress:
            return download(mirrored(url, self.mirror), dest, checksum=checksum, source=source, progress=progress,
                            headers=headers)

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)


def fetch_cifar(name: str, f: Fetcher) -> Path:
    """torchvision's CIFAR archive, md5-checked, unpacked into DATA_DIR (what `data.root` reads)."""
    url, md5, folder = CIFAR[name]
    archive = f.get(url, f.data_dir / Path(url).name, checksum=("md5", md5), source=name)
    if not (f.data_dir / folder).is_dir():
        safe_extract(archive, f.data_dir)
    if not (f.data_dir / folder).is_dir():
        raise GKLError(f"{archive}: does not hold {folder}/; delete it and fetch again")
    return f.data_dir / folder


def hub_url(filename: str) -> str:
    """The download URL of a file of DM-AT's dataset repository, as huggingface_hub builds it
    (HF_ENDPOINT, --mirror and GKL_MIRROR apply)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(HUB_REPO, filename, repo_type="dataset")


def _hub_headers() -> dict[str, str]:
    from huggingface_hub import get_token

    token = get_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def fetch_generated(name: str, f: Fetcher) -> Path:
    """DM-AT's generated set NAME as one uncompressed npz at DATA_DIR/generated/NAME.npz."""
    if name not in GENERATED:
        known = ", ".join(GENERATED)
        raise GKLError(f"generated {name}: unknown set; DM-AT releases {known} (CIFAR-100 5M/10M/20M are not released: "
                       "take a random subset of cifar100_50m)")
    dest = f.data_dir / "generated" / f"{name}.npz"
    classes = facts(name.split("_")[0]).classes
    if dest.is_file():
        f.note(f"{dest}: already there ({check_generated(dest, classes):,} images)")
        return dest
    parts = [f.get(hub_url(file), f.data_dir / "generated" / "parts" / file.replace("/", "_"), source=f"generated {name}",
                   headers=_hub_headers()) for file in GENERATED[name]]
    counts = [check_generated(part, classes) for part in parts]
    if len(parts) == 1:
        os.replace(parts[0], dest)
    else:
        join_npz(parts, dest)
        for part in parts:  # the joined file holds everything; the parts would double the disk used
            part.unlink()
    count = check_generated(dest, classes) if len(parts) > 1 else counts[0]
    f.note(f"{dest}: {count:,} generated images of {classes} classes")
    return dest


def join_npz(parts: list[Path], dest: Path, rows: int = 65536) -> None:
    """Concatenate the `image` and `label` arrays of `parts` along axis 0 (DM-AT's merge order) into
    one uncompressed npz, streaming `rows` images at a time from the memory-mapped parts (the 50M set
    is ~150 GB), written to a temporary file and renamed."""
    from gklcli.data import load_npz

    sources = [load_npz(p, max_in_memory_gb=0.0) for p in parts]  # memory-mapped, never read whole
    shapes = {tuple(s.images.shape[1:]) for s in sources} | {str(s.images.dtype) for s in sources}
    if len(shapes) > 2:
        raise GKLError(f"generated parts disagree on the image shape or dtype ({sorted(map(str, shapes))}); cannot join")
    images = [s.images for s in sources]
    arrays = {"image": (images, images[0].dtype, (sum(len(i) for i in images), *images[0].shape[1:])),
              "label": ([s.labels for s in sources], np.dtype(np.int64), (sum(len(s.labels) for s in sources),))}
    tmp = dest.with_name(f".{dest.name}.join.tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as out:
            for key, (chunks, dtype, shape) in arrays.items():
                with out.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(member, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                                  "fortran_order": False, "shape": shape})
                    for array in chunks:
                        for start in range(0, len(array), rows):
                            member.write(np.ascontiguousarray(array[start:start + rows], dtype=dtype).tobytes())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_generated(path: Path, classes: int) -> int:
    """A generated set as the recipes read it: uint8 N×32×32×3 images, integer labels in [0, classes)."""
    from gklcli.data import load_npz

    source = load_npz(path, classes)
    if source.images.dtype != np.uint8 or tuple(source.images.shape[1:]) != (32, 32, 3):
        raise GKLError(f"{path}: expected uint8 images of 32×32×3, got {source.images.dtype} {tuple(source.images.shape[1:])}")
    return len(source)


def fetch_teachers(which: str, f: Fetcher) -> list[Path]:
    """The teachers the KD recipes read, where they read them (relative to DATA_DIR)."""
    if which == "clip":  # OpenCLIP's ViT-L/14 on DataComp-1B (TABLE VII's teacher), from its Hugging Face repository
        from huggingface_hub import hf_hub_url

        repo, filename, dest = CLIP_TEACHER
        files = [f.get(hf_hub_url(repo, filename), f.data_dir / dest, source="teachers clip", headers=_hub_headers())]
        for path in files:
            _check_teacher(path)
        return files
    if which == "cifar100":
        archive = f.get(MDISTILLER_TEACHERS, f.data_dir / "cifar_teachers.tar", source="teachers cifar100")
        files = [f.data_dir / "cifar_teachers" / f"{arch}_vanilla" / "ckpt_epoch_240.pth" for arch in CIFAR_TEACHERS]
        if not all(p.is_file() for p in files):
            safe_extract(archive, f.data_dir)
    elif which == "imagenet":
        files = [f.get(url, f.data_dir / "teachers" / name, checksum=("sha256", name.split("-")[1].split(".")[0]),
                       source="teachers imagenet") for name, url in IMAGENET_TEACHERS.items()]
    elif which == "seg":
        files = [f.get(url, f.data_dir / dest, source="teachers seg") for dest, url in SEG_FILES.items()]
    elif which == "imagenet-lt":
        raise GKLError("teachers imagenet-lt: the paper's ImageNet-LT teachers (ResNeXt-101 32x4d, ResNet-50) are not released "
                       "by the authors or elsewhere; train them with the official DKL repository's ImageNetLT_train_X101_baseline.sh "
                       "and put them at DATA_DIR/teachers/imagenet_lt_resnext101-32x4d.pth and DATA_DIR/teachers/imagenet_lt_resnet50.pth")
    else:
        raise GKLError(f"teachers {which}: use cifar100, imagenet, imagenet-lt, clip or seg")
    for path in files:
        _check_teacher(path)
    return files


def _check_teacher(path: Path) -> None:
    from gklcli.checkpoint import load_file
    from gklcli.loading import extract_state_dict

    if not path.is_file():
        raise GKLError(f"{path}: missing after unpacking; the archive is not mdistiller's teacher release")
    extract_state_dict(load_file(path), path)  # weights only, and a state dict (under "model" in mdistiller's files)


def fetch_robustbench(name: str, model_dir: Path, dataset: str, threat_model: str) -> Path:
    """A RobustBench leaderboard model through RobustBench's own zoo download."""
    from gklcli.compat import import_robustbench

    import_robustbench()
    from robustbench.utils import load_model

    try:
        load_model(model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except Exception as error:  # robustbench raises many kinds (KeyError for an unknown name, gdown errors offline)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GKLError(f"robustbench {name}: {first[:200]} (model dir {model_dir}/{dataset}/{threat_model})") from None
    return model_dir / dataset / threat_model / f"{name}.pt"


def write_manifest(f: Fetcher, what: str, files: list[Path]) -> None:
    """DATA_DIR/fetched.json: what was fetched where, for the record."""
    import json

    path = f.data_dir / "fetched.json"
    record = read_json(path) if path.is_file() else {}
    record[what] = [str(p) for p in files]
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def check_imagenet(name: str, data_dir: Path) -> list[tuple[str, int, int]]:
    """Verify an ImageNet or ImageNet-LT folder before any run: every split's (name, found, expected)
    images, classes and files; a GKLError listing what is wrong."""
    from gklcli.data import image_folder, image_list
    from gklcli.recipes import DataCfg

    cfg, expected = DataCfg(), facts(name)
    if name == "imagenet":
        splits = {"train": (lambda: image_folder(data_dir / "train", 224, "imagenet train"), expected.train),
                  "val": (lambda: image_folder(data_dir / "val", 224, "imagenet val"), expected.test)}
    elif name == "imagenet-lt":
        splits = {split: ((lambda f=file: image_list(data_dir, f, 224, f"imagenet-lt {split}")), count) for split, file, count in (
            ("train", cfg.lt_train_list, expected.train), ("val", cfg.lt_val_list, LT_VAL), ("test", cfg.lt_test_list, expected.test))}
    else:
        raise GKLError(f"data check {name}: use imagenet, imagenet-lt or ade20k (CIFAR and digits are checked as they load)")
    rows, problems = [], []
    for split, (load, count) in splits.items():
        source = load()
        missing = [p for p in source.paths if not os.path.isfile(p)] if name == "imagenet-lt" else []  # a folder lists what exists
        classes = len(set(source.labels.tolist()))
        rows.append((split, len(source), count))
        if len(source) != count:
            problems.append(f"{split}: {len(source):,} images, expected {count:,}")
        if classes != expected.classes or source.labels.min() < 0 or source.labels.max() >= expected.classes:
            problems.append(f"{split}: labels cover {classes} classes in [{source.labels.min()}, {source.labels.max()}], expected {expected.classes}")
        if missing:
            problems.append(f"{split}: {len(missing):,} listed files are missing (first: {missing[0]})")
    if problems:
        raise GKLError(f"{data_dir}: not a complete {name} folder: " + "; ".join(problems[:4]))
    return rows


def fetch_command(kind: str, recipe: Any) -> Optional[str]:
    """The `gkl fetch` command that provides a recipe's generated data ("generated") or teacher
    ("teacher"), for the refusals that name a missing file; None where nothing can fetch it."""
    if kind == "generated":
        return f"gkl fetch generated {recipe.meta.name} --data-dir DATA_DIR" if recipe.meta.name in GENERATED else None
    from gklcli.models.timm_models import is_timm

    if is_timm(recipe.teacher.arch):  # timm teachers come from the Hugging Face hub; the refusal names the command
        return None
    dataset = {"clip-kd": "clip", "seg-kd": "seg"}.get(recipe.kind, recipe.data.dataset)
    return f"gkl fetch teachers {dataset} --data-dir DATA_DIR" if dataset in ("cifar100", "imagenet", "clip", "seg") else None


def fetch_for(recipes: list[Any], f: Fetcher) -> list[Path]:
    """What these runs read and the data root lacks: their DM-AT generated sets and their teachers
    (`gkl reproduce TABLE --fetch`). What cannot be fetched is left to the refusal that names it."""
    from gklcli.train.kd import resolve_teacher_path

    fetched: list[Path] = []
    for name in sorted({r.meta.name for r in recipes if r.data.generated.required} & set(GENERATED)):
        if not (f.data_dir / "generated" / f"{name}.npz").is_file():
            fetched.append(fetch_generated(name, f))
    for dataset in sorted({r.data.dataset for r in recipes if r.kind == "kd" and r.teacher.checkpoint} & {"cifar100", "imagenet"}):
        from gklcli.models.timm_models import is_timm

        wanted = [r.teacher.checkpoint for r in recipes if r.kind == "kd" and r.data.dataset == dataset and not is_timm(r.teacher.arch)]
        try:
            for checkpoint in wanted:
                resolve_teacher_path(checkpoint, str(f.data_dir))
        except GKLError:
            fetched += fetch_teachers(dataset, f)
    clip = [r for r in recipes if r.kind == "clip-kd" and r.teacher.checkpoint == CLIP_TEACHER[2]]
    if clip and not (f.data_dir / CLIP_TEACHER[2]).is_file():
        fetched += fetch_teachers("clip", f)
    seg = {r.teacher.checkpoint for r in recipes if r.kind == "seg-kd"} | {r.model.pretrained for r in recipes if r.kind == "seg-kd"}
    if any(name in SEG_FILES and not (f.data_dir / name).is_file() for name in seg):
        fetched += fetch_teachers("seg", f)
    return fetched
