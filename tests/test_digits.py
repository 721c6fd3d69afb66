"""The built-in real dataset (scikit-learn's handwritten digits): the loader and its fixed split, and
real training on it through the real code: natural training vs GKL-AT (GKL-AT must be far more
robust at the same ε), then `gkl eval-aa` on the GKL-AT checkpoint through the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from gklcli.data import build_data, digits_split, load_digits, train_set_sizes
from gklcli.datasets import facts
from gklcli.errors import GKLError
from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.at import train_at
from tests_helpers import run_cli

EPS = "32/255"
SIZE = 12  # upsampled from 8×8; at 8×8 a natural model keeps ~45% at ε = 32/255


def test_loader_shapes_channels_labels_and_fixed_disjoint_split():
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    train_idx, test_idx = digits_split(raw.target)
    assert (len(train_idx), len(test_idx)) == (facts("digits").train, facts("digits").test) == (1397, 400)
    assert not set(train_idx) & set(test_idx) and len(train_idx) + len(test_idx) == len(raw.target) == 1797
    again = digits_split(raw.target)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], test_idx)
    assert np.bincount(raw.target[test_idx]).tolist() == [40] * 10  # stratified

    for size in (8, 12):
        train, test = load_digits("train", size), load_digits("test", size)
        for src, idx in ((train, train_idx), (test, test_idx)):
            assert src.images.shape == (len(idx), size, size, 3) and src.images.dtype == np.uint8
            assert src.labels.dtype == np.int64 and src.labels.min() == 0 and src.labels.max() == 9
            assert np.array_equal(src.labels, raw.target[idx])
            assert np.array_equal(src.images[..., 0], src.images[..., 1]) and np.array_equal(src.images[..., 0], src.images[..., 2])
            assert src.images.max() == 255 and src.images.min() == 0
        again = load_digits("test", size)
        assert np.array_equal(again.images, test.images) and np.array_equal(again.labels, test.labels)
    # at 8×8 the pixels are the dataset's values scaled 0..16 → 0..255, in the split's order
    expected = np.round(raw.images[test_idx] * 255 / 16).astype(np.uint8)
    assert np.array_equal(load_digits("test", 8).images[..., 0], expected)
    # get() hands the model C×H×W: every channel is the digit itself, not a reshuffle of H×W×C
    img, label = load_digits("test", 8).get(3)
    assert img.shape == (3, 8, 8) and label == int(raw.target[test_idx[3]])
    for c in range(3):
        assert torch.equal(img[c], torch.from_numpy(expected[3]))


def test_build_data_holds_validation_out_of_the_train_split():
    recipe = load_recipe(RECIPES_DIR / "quickstart.yaml", ["data.val_size=97", "data.digits.image_size=12"])
    data = build_data(recipe.data)
    assert data.num_classes == 10 and data.dataset == "digits"
    assert (len(data.train), len(data.val), len(data.test)) == (1300, 97, 400)
    assert data.train.image_size == 12
    assert train_set_sizes(recipe.data) == (1300, 0)
    with pytest.raises(GKLError, match="does not match dataset digits"):
        build_data(recipe.data, num_classes=4)


def test_missing_scikit_learn_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # `import sklearn.datasets` now raises ImportError
    with pytest.raises(GKLError, match=r"^data.dataset: 'digits' needs scikit-learn \(pip install scikit-learn\)$"):
        load_digits("train")
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--out", tmp_path / "x")
    assert code == 2 and "needs scikit-learn" in err and "Traceback" not in err


def _train(out, natural: bool, seed: int = 0) -> dict:
    """resnet8 on digits at SIZE×SIZE, 5 epochs: GKL-AT at ε = 32/255 (official 5-step attack, class prior),
    or natural training (attack ε = 0 and the robust term's α = β = 0: plain cross-entropy)."""
    sets = [
        "model.arch=resnet8", "data.dataset=digits", f"data.digits.image_size={SIZE}", "data.augment=none",
        "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=400", "data.num_workers=0",
        "optim.lr=0.1", "schedule.epochs=5", "awp.enabled=false", "ema.mode=none", f"train.seed={seed}",
        f"attack.eps={EPS}", f"eval.eps={EPS}", "eval.pgd_steps=5", "eval.pgd_step_size=8/255",
        "output.tensorboard=false", "output.plots=false",
    ]
    if natural:
        sets += ["attack.eps=0", "loss.alpha=0", "loss.beta=0"]
    recipe = load_recipe(RECIPES_DIR / "base" / "at_cifar.yaml", sets)
    return train_at(recipe, out_dir=out, quiet=True)["last"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    natural = _train(root / "natural", natural=True)
    robust = _train(root / "gkl", natural=False)
    print(f"\ndigits {SIZE}px, ε {EPS}: natural test clean/PGD {natural['test_clean']:.1f}/{natural['test_pgd']:.1f}, "
          f"GKL-AT {robust['test_clean']:.1f}/{robust['test_pgd']:.1f}")
    return root, natural, robust


def test_gkl_at_is_far_more_robust_than_natural_training(trained):
    _, natural, robust = trained
    # measured, seeds 0/1/2: natural clean 99.5/98.75/98.5, PGD 3.0/2.0/1.75;
    # GKL-AT clean 95.25/95.25/95.0, PGD 75.25/75.25/77.0
    assert natural["test_clean"] >= 90.0  # a real dataset, learnt: the pixels reach the model the right way
    assert natural["test_pgd"] <= 20.0  # the evaluation attack works: a natural model breaks at ε = 32/255
    assert robust["test_clean"] >= 85.0
    assert robust["test_pgd"] >= 50.0 and robust["test_pgd"] >= natural["test_pgd"] + 40.0  # training attack + loss work


def test_eval_aa_on_a_digits_checkpoint(trained, tmp_path, capsys):
    root, _, _ = trained
    ckpt = root / "gkl" / "last.pt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["dataset"] == "digits"
    code, out, err = run_cli(capsys, "eval-aa", ckpt, "--version", "custom", "--attacks", "apgd-ce", "--n-ex", "24",
                             "--batch-size", "24", "--eps", EPS, "--out", tmp_path / "ev", "-q")
    assert code == 0, err
    r = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert r["dataset"] == "digits" and r["n_ex"] == 24 and r["eps"] == EPS and r["guards"] is True
    assert 0.0 <= r["robust_acc"] <= r["clean_acc"] <= 100.0
    assert r["n_robust"] <= r["n_clean"] <= 24 and r["max_perturbation"] <= 32 / 255 + 1e-6
    assert r["clean_acc"] == pytest.approx(100 * r["n_clean"] / 24) and r["robust_acc"] == pytest.approx(100 * r["n_robust"] / 24)
    assert r["clean_acc"] >= 75.0 and r["robust_acc"] >= 25.0  # the GKL-AT model, on the digits test split
