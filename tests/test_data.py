"""Datasets and batch order: memory-mapped npz, validation split, seeded resumable sampler, views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gklcli.data import TrainView, load_npz, make_synthetic, split_validation
from gklcli.errors import GKLError
from gklcli.sampling import EpochBatchSampler, sample_seed


def _write_npz(path, n=50, compressed=False, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), "label": np.arange(n) % 5}
    arrays.update(overrides)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


def test_npz_is_memory_mapped_and_round_trips(tmp_path):
    arrays = _write_npz(tmp_path / "g.npz")
    src = load_npz(tmp_path / "g.npz", 5)
    assert isinstance(src.images, np.memmap)  # never read whole
    np.testing.assert_array_equal(np.asarray(src.images), arrays["image"])
    np.testing.assert_array_equal(src.labels, arrays["label"])
    img, label = src.get(7)
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8 and label == 2
    assert torch.equal(img, torch.from_numpy(arrays["image"][7]).permute(2, 0, 1))


def test_compressed_npz_loads_small_and_refuses_huge(tmp_path):
    arrays = _write_npz(tmp_path / "c.npz", compressed=True)
    src = load_npz(tmp_path / "c.npz")
    np.testing.assert_array_equal(np.asarray(src.images), arrays["image"])
    with pytest.raises(GKLError, match="compressed.*np.savez"):
        load_npz(tmp_path / "c.npz", max_in_memory_gb=1e-9)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image": np.zeros((4, 8, 8, 3), dtype=np.float32), "label": np.zeros(4, dtype=np.int64)}, "uint8"),
        ({"label": np.zeros(50)}, "must hold integers, got dtype float64"),
        ({"label": np.arange(50) + 10}, r"labels must lie in \[0, 4\]"),
        ({"label": np.arange(3)}, "label"),
    ],
)
def test_bad_npz_contents_are_named(tmp_path, overrides, message):
    _write_npz(tmp_path / "b.npz", **overrides)
    with pytest.raises(GKLError, match=message):
        load_npz(tmp_path / "b.npz", 5)


def test_npz_missing_key_and_file(tmp_path):
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(GKLError, match="missing key.*image"):
        load_npz(tmp_path / "k.npz")
    with pytest.raises(GKLError, match="not found"):
        load_npz(tmp_path / "nope.npz")


def test_validation_split_is_fixed_disjoint_and_complete():
    src = make_synthetic(200, 10, 8, 0, "train")
    train, val = split_validation(src, 30)
    train2, val2 = split_validation(src, 30)
    assert len(train) == 170 and len(val) == 30
    np.testing.assert_array_equal(val.images.indices, val2.images.indices)
    both = np.concatenate([train.images.indices, val.images.indices])
    assert sorted(both.tolist()) == list(range(200))
    assert torch.equal(val.get(0)[0], src.get(int(val.images.indices[0]))[0])
    with pytest.raises(GKLError, match="val_size"):
        split_validation(src, 200)


def test_synthetic_is_deterministic_and_balanced():
    a, b = make_synthetic(100, 10, 16, 3, "train"), make_synthetic(100, 10, 16, 3, "train")
    np.testing.assert_array_equal(a.images, b.images)
    assert np.bincount(a.labels).tolist() == [10] * 10
    test = make_synthetic(100, 10, 16, 3, "test")
    assert not np.array_equal(test.images, a.images)


def _batches(sampler):
    return [[i for _, i in batch] for batch in sampler]


def test_sampler_is_a_seeded_permutation_and_resumes_mid_epoch():
    s = EpochBatchSampler(103, 10, seed=1)
    s.set_epoch(2)
    full = _batches(s)
    assert len(full) == 11 and sorted(sum(full, [])) == list(range(103))
    s.set_epoch(2, start=4)
    assert _batches(s) == full[4:]
    s.set_epoch(3)
    assert _batches(s) != full
    s.set_epoch(2)
    assert {e for batch in s for e, _ in batch} == {2}  # workers learn the epoch from the index


def test_sampler_ranks_split_each_global_batch():
    single = EpochBatchSampler(64, 16, seed=0)
    ranks = [EpochBatchSampler(64, 16, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(5)
    for whole, a, b in zip(_batches(single), *(_batches(r) for r in ranks)):
        assert a + b == whole and len(a) == len(b) == 8
    with pytest.raises(GKLError, match="divisible"):
        EpochBatchSampler(64, 15, seed=0, world_size=2)


def test_real_pass_sampler_mixes_generated_data_by_fraction():
    s = EpochBatchSampler(100, 20, seed=0, num_generated=1000, generated_fraction=0.7, generated_sampler="real-pass")
    batches = _batches(s)
    assert len(batches) == 17  # an epoch is one pass over the 100 real images, 6 per batch
    for batch in batches[:-1]:
        assert sum(i >= 100 for i in batch) == 14 and len(batch) == 20
    real = [i for batch in batches for i in batch if i < 100]
    assert sorted(real) == list(range(100))


def test_train_view_is_reproducible_per_sample_and_epoch():
    src = make_synthetic(8, 2, 16, 0, "train")
    view = TrainView(src, None, "basic", seed=3)
    a, la = view[(1, 5)]
    b, lb = view[(1, 5)]
    assert torch.equal(a, b) and la == lb == src.labels[5]
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert sample_seed(3, 1, 5) != sample_seed(3, 2, 5)
    assert any(not torch.equal(a, view[(e, 5)][0]) for e in range(2, 6))  # a fresh crop/flip per epoch


def test_autoaug_view_returns_basic_and_augmented():
    src = make_synthetic(4, 2, 32, 0, "train")
    view = TrainView(src, None, "autoaug", seed=0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    basic, aug, label = view[(1, 2)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    basic2, aug2, _ = view[(1, 2)]
    assert torch.equal(basic, basic2) and torch.equal(aug, aug2)
    assert basic.shape == aug.shape == (3, 32, 32) and label == src.labels[2]


def test_batches_do_not_depend_on_the_number_of_workers():
    from gklcli.data import make_train_loader

    src = make_synthetic(40, 4, 8, 0, "train")
    view = TrainView(src, None, "basic", seed=5)

    def batches(workers):
        sampler = EpochBatchSampler(40, 8, seed=5)
        sampler.set_epoch(3)
        return [b for b in make_train_loader(view, sampler, workers, pin_memory=False)]

    for (x0, y0), (x2, y2) in zip(batches(0), batches(2)):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_long_tailed_synthetic_follows_the_exponential_profile():
    from gklcli.data import long_tail_counts

    counts = long_tail_counts(400, 10, 20.0)
    assert sum(counts) == 400 and counts == sorted(counts, reverse=True)
    # n_c ∝ 20^(−c/9): the first over the last is the imbalance, up to rounding
    assert counts[0] / counts[-1] == pytest.approx(20.0, rel=0.2)
    src = make_synthetic(400, 10, 8, 0, "train", imbalance=20.0)
    assert np.bincount(src.labels, minlength=10).tolist() == counts
    assert np.bincount(make_synthetic(400, 10, 8, 0, "train").labels).tolist() == [40] * 10
    # every split name draws its own images from the same class templates
    assert not np.array_equal(make_synthetic(32, 10, 8, 0, "test").images, make_synthetic(32, 10, 8, 0, "ood1").images)


def test_dataset_facts_are_one_table_read_by_the_models_and_plans():
    import subprocess
    import sys

    from gklcli.datasets import DATASETS, facts
    from gklcli.models.registry import CIFAR10_STATS, CIFAR100_STATS, IMAGENET_STATS, MDISTILLER_CIFAR100_STATS

    assert {n: (f.classes, f.train, f.test, f.image_size) for n, f in DATASETS.items()} == {
        "cifar10": (10, 50000, 10000, 32), "cifar100": (100, 50000, 10000, 32), "imagenet": (1000, 1281167, 50000, 224),
        "imagenet-lt": (1000, 115846, 50000, 224), "digits": (10, 1397, 400, 16)}
    assert (CIFAR10_STATS, CIFAR100_STATS, IMAGENET_STATS) == tuple(facts(n).stats for n in ("cifar10", "cifar100", "imagenet"))
    assert MDISTILLER_CIFAR100_STATS != CIFAR100_STATS and facts("digits").stats is None
    with pytest.raises(GKLError, match=r"'npz'.*known: cifar10, cifar100, imagenet, imagenet-lt, digits"):
        facts("npz")
    code = "import sys, gklcli.datasets; sys.exit('torch' in sys.modules)"  # the recipe/plan layer imports it
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_load_test_set_is_what_training_and_eval_aa_read(tmp_path):
    from gklcli.data import build_data, load_test_set
    from gklcli.evaluate import load_eval_data
    from gklcli.loading import LoadedModel
    from gklcli.recipes import DataCfg, SyntheticCfg

    syn = SyntheticCfg(num_train=64, num_test=24, num_classes=4, image_size=8, seed=3)
    cfg = DataCfg(dataset="synthetic", synthetic=syn, val_size=8)
    source = load_test_set(cfg)
    assert np.array_equal(source.images, build_data(cfg).test.images) and len(source) == 24
    loaded = LoadedModel(torch.nn.Identity(), None, 4, "gkl", None, None, "synthetic", None,
                         {"recipe": {"data": {"synthetic": vars(syn)}}, "image_size": 8})
    x, y, name = load_eval_data(None, loaded, None, 10)
    assert name == "synthetic" and torch.equal(y, torch.from_numpy(source.labels[:10]))
    assert torch.equal(x, torch.from_numpy(source.images[:10]).permute(0, 3, 1, 2).float() / 255)
    arrays = _write_npz(tmp_path / "t.npz", n=12)
    npz = DataCfg(dataset="npz", path=str(tmp_path / "t.npz"), test_path=str(tmp_path / "t.npz"))
    np.testing.assert_array_equal(load_test_set(npz, num_classes=5).labels, arrays["label"])
    assert load_test_set(DataCfg(dataset="npz", path=str(tmp_path / "t.npz"))) is None  # no data.test_path
    with pytest.raises(GKLError, match="holds 0 test images"):
        load_eval_data("npz:", loaded, None, 10)
