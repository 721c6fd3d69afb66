"""`gkl analyze`: the paper's figures from checkpoints.

- margins A B: Eq. (14) class margins Margin_y = s̄_y[y] − max_{k≠y} s̄_y[k], with s̄_y the mean
  softmax over the test images of class y; the PNG shows Margin(A) − Margin(B) per class, sorted
  (Fig. 4c: GKL-AT minus TRADES).
- scores: the class-wise mean predicted score s̄_y[y], sorted (Fig. 3).
- tsne: a t-SNE of the penultimate features of a few classes (Fig. 4a/b; needs scikit-learn).

Every command writes a PNG and a JSON with the numbers behind it. Images are the first `n` test
images of the checkpoint's dataset (from its recipe), or `--dataset` for plain state dicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gklcli.errors import GKLError
from gklcli.checkpoint import atomic_save_figure, atomic_write_text


class AnalysisUnavailable(GKLError):
    """An optional dependency is missing (a clear message, exit code 2)."""


def _loaded(ckpt: str, device: torch.device, arch: Optional[str] = None) -> Any:
    from gklcli.loading import load_model_file

    loaded = load_model_file(ckpt, arch=arch, device=device)
    loaded.module.eval()
    return loaded


def eval_batches(loaded: Any, *, dataset: Optional[str], data_dir: Optional[str], n: int,
                 batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
    """Float [0,1] test images and labels: the checkpoint recipe's test split (any dataset gkl trains
    on), or `dataset` (cifar10, cifar100, npz:PATH) for checkpoints without a recipe."""
    recipe = (loaded.meta or {}).get("recipe")
    if dataset is None and recipe is not None and recipe["data"]["dataset"] in ("imagenet", "imagenet-lt"):
        from gklcli.data import load_test_set, make_eval_loader
        from gklcli.recipes import DataCfg, build_section

        source = load_test_set(build_section(DataCfg, recipe["data"], {}), data_dir, loaded.num_classes)
        for images, y in make_eval_loader(source, n, batch_size, recipe["data"]["num_workers"]):
            yield images.float().div_(255.0), y
        return
    from gklcli.evaluate import load_eval_data

    x, y, _ = load_eval_data(dataset, loaded, data_dir, n)
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def _pgd(model: nn.Module, x: Tensor, y: Tensor, steps: int, eps: float) -> Tensor:
    from gklcli.attacks import ce_attack_loss, pgd_linf

    if steps <= 0:
        return x
    return pgd_linf(model, x, y, ce_attack_loss, eps=eps, step_size=eps / 4, steps=steps, init="uniform", mode="eval")


def class_mean_scores(loaded: Any, batches: Iterator[tuple[Tensor, Tensor]], device: torch.device, *, pgd_steps: int = 0,
                      eps: float = 8 / 255) -> tuple[Tensor, Tensor]:
    """S (C×C): row y is the mean softmax over the images of class y; and the images per class."""
    c = loaded.num_classes
    sums = torch.zeros(c, c, dtype=torch.float64)
    counts = torch.zeros(c, dtype=torch.float64)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        x = _pgd(loaded.module, x, y, pgd_steps, eps)
        with torch.no_grad():
            p = F.softmax(loaded.module(x).float(), dim=1).double().cpu()
        sums.index_add_(0, y.cpu(), p)
        counts.index_add_(0, y.cpu(), torch.ones(len(y), dtype=torch.float64))
    return sums / counts.clamp_min(1)[:, None], counts


def class_margins(scores: Tensor) -> Tensor:
    """Eq. (14): s̄_y[y] − max_{k≠y} s̄_y[k] for every class y."""
    true = scores.diagonal()
    others = scores.masked_fill(torch.eye(len(scores), dtype=torch.bool), float("-inf")).amax(1)
    return true - others


def _plot(path: Path, draw: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    draw(ax)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def margins(ckpt_a: str, ckpt_b: str, out: Path, *, dataset: Optional[str] = None, data_dir: Optional[str] = None,
            n: int = 10000, pgd_steps: int = 0, arch: Optional[str] = None, device: torch.device) -> dict[str, Any]:
    """Margin(A) − Margin(B) per class (Fig. 4c); PNG + JSON."""
    per_model = []
    for ckpt in (ckpt_a, ckpt_b):
        loaded = _loaded(ckpt, device, arch)
        scores, counts = class_mean_scores(loaded, eval_batches(loaded, dataset=dataset, data_dir=data_dir, n=n), device,
                                           pgd_steps=pgd_steps)
        per_model.append((class_margins(scores), counts))
    (ma, counts), (mb, _) = per_model
    if len(ma) != len(mb):
        raise GKLError(f"{ckpt_a} has {len(ma)} classes but {ckpt_b} has {len(mb)}")
    present = counts > 0
    diff = (ma - mb)[present]
    order = torch.argsort(diff, descending=True)
    result = {"a": ckpt_a, "b": ckpt_b, "images": int(counts.sum()), "classes": int(present.sum()), "pgd_steps": pgd_steps,
              "margin_a": ma.tolist(), "margin_b": mb.tolist(), "mean_difference": float(diff.mean()),
              "positive_fraction": float((diff > 0).double().mean())}

    def draw(ax: Any) -> None:
        ax.bar(range(len(diff)), diff[order].numpy(), color=["tab:blue" if v > 0 else "tab:red" for v in diff[order]])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("class (sorted)")
        ax.set_ylabel("margin difference")
        ax.set_title(f"Class margin (Eq. 14): A − B\nA = {Path(ckpt_a).parent.name}, B = {Path(ckpt_b).parent.name}", fontsize=8)

    return _save(out, "margins", result, draw)


def scores(ckpt: str, out: Path, *, dataset: Optional[str] = None, data_dir: Optional[str] = None, n: int = 10000,
           arch: Optional[str] = None, device: torch.device) -> dict[str, Any]:
    """The class-wise mean predicted score of the true class, sorted (Fig. 3); PNG + JSON."""
    loaded = _loaded(ckpt, device, arch)
    s, counts = class_mean_scores(loaded, eval_batches(loaded, dataset=dataset, data_dir=data_dir, n=n), device)
    present = counts > 0
    true = s.diagonal()[present]
    ordered = torch.sort(true, descending=True).values
    result = {"checkpoint": ckpt, "images": int(counts.sum()), "classes": int(present.sum()), "score": s.diagonal().tolist(),
              "max": float(true.max()), "min": float(true.min()), "ratio_max_min": float(true.max() / true.min().clamp_min(1e-12))}

    def draw(ax: Any) -> None:
        ax.plot(range(len(ordered)), ordered.numpy())
        ax.set_xlabel("class (sorted by score)")
        ax.set_ylabel("mean predicted score")
        ax.set_title(f"Class-wise mean predicted score: {Path(ckpt).parent.name}", fontsize=8)

    return _save(out, "scores", result, draw)


def penultimate_features(model: nn.Module, x: Tensor) -> Tensor:
    """The input of the model's last Linear layer (the features the classifier sees)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise GKLError("the model has no Linear classifier to take features from")
    grabbed: list[Tensor] = []
    handle = linear[-1].register_forward_hook(lambda _m, inputs, _o: grabbed.append(inputs[0].detach().flatten(1)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return grabbed[0]


def tsne(ckpt: str, out: Path, *, dataset: Optional[str] = None, data_dir: Optional[str] = None, n: int = 10000,
         classes: int = 20, seed: int = 0, arch: Optional[str] = None, device: torch.device) -> dict[str, Any]:
    """t-SNE of penultimate features of the first `classes` classes (Fig. 4a/b); PNG + JSON."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise AnalysisUnavailable("gkl analyze tsne needs scikit-learn: pip install 'gklcli[analysis]'") from None
    loaded = _loaded(ckpt, device, arch)
    feats, labels = [], []
    for x, y in eval_batches(loaded, dataset=dataset, data_dir=data_dir, n=n):
        keep = y < classes
        if keep.any():
            feats.append(penultimate_features(loaded.module, x[keep].to(device)).cpu())
            labels.append(y[keep])
    if not feats:
        raise GKLError(f"no test images of the first {classes} classes")
    f, y = torch.cat(feats).double().numpy(), torch.cat(labels)
    perplexity = float(min(30, max(2, (len(y) - 1) // 3)))
    emb = torch.from_numpy(TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(f))
    result = {"checkpoint": ckpt, "images": len(y), "classes": int(y.unique().numel()), "perplexity": perplexity,
              "embedding": emb.tolist(), "labels": y.tolist()}

    def draw(ax: Any) -> None:
        ax.scatter(emb[:, 0].numpy(), emb[:, 1].numpy(), c=y.numpy(), cmap="tab20", s=4)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t-SNE of penultimate features: {Path(ckpt).parent.name}", fontsize=8)

    return _save(out, "tsne", result, draw)


def _save(out: Path, kind: str, result: dict[str, Any], draw: Any) -> dict[str, Any]:
    png = out if out.suffix == ".png" else out / f"{kind}.png"
    _plot(png, draw)
    atomic_write_text(png.with_suffix(".json"), json.dumps(result) + "\n")
    return result | {"png": str(png)}


def figure_for(kind: str, ckpts: list[str], png: Path, *, data_dir: Optional[str], device: Optional[str]) -> dict[str, Any]:
    """A report's figure (used by `gkl reproduce`)."""
    from gklcli.distributed import pick_device

    dev = pick_device(device)
    if kind == "margins":
        return margins(ckpts[0], ckpts[1], png, data_dir=data_dir, device=dev)
    if kind == "scores":
        return scores(ckpts[0], png, data_dir=data_dir, device=dev)
    return tsne(ckpts[0], png, data_dir=data_dir, device=dev)
