"""The paper's runs as the official code and DM-AT make them: DM-AT's sampler, attack start, forward
order, BatchNorm handling and optimizer groups; ghost batches as nn.DataParallel; the paper recipes'
protocol defaults. Each reference is written out here from the official source, not from gkl."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gklcli.data import TrainView, _SeededTransform, make_synthetic
from gklcli.sampling import EpochBatchSampler
from gklcli.errors import GKLError
from gklcli.models import GhostBatchNorm2d, bn_momentum, create_model, use_ghost_batch_norm
from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.at import AdversarialStep, train_at
from gklcli.train.build import parameter_groups
from gklcli.train.engine import Engine, Interrupted
from gklcli.train.preview import run_preview
from tests_helpers import TINY_OVERRIDES, run_cli


def _batches(sampler: EpochBatchSampler) -> list[list[int]]:
    return [[i for _, i in batch] for batch in sampler]


def dm_at_batch_structure(num_sup: int, batch_size: int, unsup_fraction: float, dataset_size: int) -> list[int]:
    """Real images per batch of DM-AT's `SemiSupervisedSampler` (core/data/semisup.py), transcribed:
    `num_batches = ceil(dataset_size / batch_size)`, real chunks of `B − int(B·fraction)` from a
    permutation that restarts when used up, the rest generated."""
    sup_batch_size = batch_size - int(batch_size * unsup_fraction)
    num_batches = int(np.ceil(dataset_size / batch_size))
    counts, batch_counter = [], 0
    while batch_counter < num_batches:
        for sup_k in range(0, num_sup, sup_batch_size):
            if batch_counter == num_batches:
                break
            counts.append(len(range(num_sup)[sup_k : sup_k + sup_batch_size]))
            batch_counter += 1
    return counts


@pytest.mark.parametrize(("num_real", "holdout", "batch", "fraction"), [(50, 10, 20, 0.7), (976, 24, 64, 0.7), (300, 0, 32, 0.5)])
def test_dmat_sampler_has_dm_at_epoch_length_and_batch_composition(num_real, holdout, batch, fraction):
    s = EpochBatchSampler(num_real, batch, seed=3, num_generated=5000, generated_fraction=fraction,
                          generated_sampler="dmat", epoch_images=num_real + holdout)
    s.set_epoch(4)
    batches = _batches(s)
    reference = dm_at_batch_structure(num_real, batch, fraction, num_real + holdout)
    assert [sum(i < num_real for i in b) for b in batches] == reference
    assert all(len(b) == batch for b in batches)  # a short real chunk is topped up with generated images
    # the real images of each permutation are distinct and, when one is used up, a fresh one starts
    chunks = -(-num_real // reference[0])
    for p in range(0, len(batches), chunks):
        real = [i for b in batches[p : p + chunks] for i in b if i < num_real]
        assert len(real) == len(set(real))
    s.set_epoch(4, start=2)
    assert _batches(s) == batches[2:]  # resumes mid-epoch exactly


def test_dmat_epoch_is_ceil_n_over_b_not_a_pass_over_the_real_images():
    """The flagship 50M row: B = 2048, 70% generated, CIFAR-100 with 1,024 held out."""
    kwargs = dict(seed=0, num_generated=50_000_000, generated_fraction=0.7, epoch_images=50_000)
    dmat = EpochBatchSampler(48_976, 2048, generated_sampler="dmat", **kwargs)
    old = EpochBatchSampler(48_976, 2048, generated_sampler="real-pass", **kwargs)
    assert dmat.batches_per_epoch() == 25 and (dmat.n_real, dmat.n_gen) == (615, 1433)
    assert old.batches_per_epoch() == 80  # 3.2× the steps: what gkl did before


def test_dmat_sampler_splits_each_shuffled_global_batch_over_ranks():
    kwargs = dict(seed=1, num_generated=400, generated_fraction=0.7, generated_sampler="dmat", epoch_images=64)
    whole = EpochBatchSampler(60, 16, **kwargs)
    ranks = [EpochBatchSampler(60, 16, rank=r, world_size=4, **kwargs) for r in range(4)]
    for s in (whole, *ranks):
        s.set_epoch(2)
    for batch, *parts in zip(_batches(whole), *map(_batches, ranks)):
        assert sum(parts, []) == batch and {len(p) for p in parts} == {4}
    mixed = [sum(i < 60 for i in p) for p in _batches(ranks[0])]
    assert len(set(mixed)) > 1  # shuffled within the batch (DM-AT's np.random.shuffle), not real-first


def _generated_npz(path, n=64, size=8, classes=4):
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), label=np.arange(n) % classes)
    return path


def _dmat_tiny(tmp_path, *extra: str):
    gen = _generated_npz(tmp_path / "gen.npz")
    sets = [*TINY_OVERRIDES, "model.bn_group_size=null", "data.batch_size=20", "schedule.epochs=3",
            "schedule.warmup_epochs=2", f"data.generated.path={gen}", *extra]
    return load_recipe(RECIPES_DIR / "cifar100_1m.yaml", sets)


def test_dry_run_plan_and_the_run_take_the_same_number_of_steps(tmp_path, capsys):
    recipe = _dmat_tiny(tmp_path)
    engine = Engine(recipe, AdversarialStep, out_dir=tmp_path / "run", quiet=True, device="cpu")
    engine.workload.sampler.set_epoch(1)
    ran = len(list(engine.workload.sampler))
    plan = run_preview(recipe)
    assert plan["steps_per_epoch"] == engine.steps_per_epoch == ran == 6  # ceil(112 / 20): the whole base set
    assert (plan["real_per_batch"], plan["generated_per_batch"]) == (6, 14)
    sets = sum((["--set", s] for s in [*TINY_OVERRIDES, "model.bn_group_size=null", "data.batch_size=20", "schedule.epochs=3",
                                       "schedule.warmup_epochs=2", f"data.generated.path={tmp_path / 'gen.npz'}"]), [])
    code, out, _ = run_cli(capsys, "train-at", "cifar100_1m", "--dry-run", *sets)
    assert code == 0 and "3 epochs × 6 steps" in out and "6 real + 14 generated (dmat sampler" in out
    # without the (required) generated file the plan is still the run the recipe will make
    code, out, _ = run_cli(capsys, "train-at", "cifar100_50m", "--dry-run")
    assert code == 0 and "2400 epochs × 25 steps" in out


def test_dmat_recipe_resumes_bit_identically(tmp_path):
    """DM-AT's sampler, step EMA with warm-up, OneCycle lr/momentum and first-step BN statistics."""
    recipe = _dmat_tiny(tmp_path, "train.save_every_steps=4", "model.bn_group_size=10")
    cpu = {"quiet": True, "device": "cpu"}
    train_at(recipe, out_dir=tmp_path / "a", **cpu)
    with pytest.raises(Interrupted):
        train_at(recipe, out_dir=tmp_path / "b", interrupt_after_steps=7, **cpu)
    train_at(recipe, out_dir=tmp_path / "b", resume=True, **cpu)
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in "ab")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip = lambda rec: {k: v for k, v in rec.items() if k not in ("img_s", "seconds", "s_iter")}  # noqa: E731
    logs = [[strip(json.loads(x)) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert logs[0] == logs[1] and logs[0][0]["lr"] == pytest.approx(0.2 / 25)


def _step_and_batch(tmp_path, *extra: str):
    recipe = load_recipe(RECIPES_DIR / "quickstart.yaml", [*TINY_OVERRIDES, "awp.enabled=false", *extra])
    engine = Engine(recipe, AdversarialStep, out_dir=tmp_path, quiet=True, device="cpu")
    engine.step.begin_epoch(recipe.schedule.epochs)
    return engine, next(iter(engine._train_loader(1, 0)))


@pytest.mark.parametrize("order", ["adv-first", "clean-first"])
def test_training_forwards_run_in_the_recipe_order(tmp_path, order):
    engine, batch = _step_and_batch(tmp_path, f"loss.forward_order={order}")
    seen = []
    engine.module.register_forward_pre_hook(lambda m, inputs: seen.append((m.training, inputs[0].detach().clone())))
    engine.step.compute(batch, engine.recipe.schedule.epochs)
    x = batch[0].float() / 255
    (_, first), (_, second) = [s for s in seen if s[0]][-2:]  # the two train-mode forwards of the loss
    clean, adv = (first, second) if order == "clean-first" else (second, first)
    assert torch.equal(clean, x) and not torch.equal(adv, x)


def test_attack_init_reaches_the_inner_maximisation(tmp_path, monkeypatch):
    import gklcli.train.at as at

    engine, batch = _step_and_batch(tmp_path, "attack.init=uniform")
    calls = []
    monkeypatch.setattr(at, "pgd_linf", lambda *a, **k: calls.append(k["init"]) or a[1].clone())
    engine.step.compute(batch, engine.recipe.schedule.epochs)
    assert calls == ["uniform"]


def test_uniform_start_fills_the_eps_ball():
    """DM-AT: x_adv = clamp(x + U(−ε, ε), 0, 1) before the first step."""
    from gklcli.attacks import pgd_linf

    torch.manual_seed(0)
    x = torch.full((64, 3, 8, 8), 0.5)
    flat = lambda logits_adv, logits_nat, y: logits_adv.sum() * 0.0  # noqa: E731 — zero gradient: sign(0) = 0, no move
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    delta = pgd_linf(model, x, torch.zeros(64, dtype=torch.long), flat, eps=8 / 255, step_size=2 / 255, steps=1, init="uniform") - x
    assert delta.abs().max() <= 8 / 255 + 1e-7 and delta.abs().max() > 7.5 / 255
    assert abs(float(delta.mean())) < 0.2 / 255 and float(delta.std()) == pytest.approx(8 / 255 / 3**0.5, rel=0.05)


def dataparallel_batchnorm(bn: nn.BatchNorm2d, x: torch.Tensor, gpus: int) -> tuple[torch.Tensor, nn.BatchNorm2d]:
    """What nn.DataParallel computes: scatter with `chunk`, one replica per chunk (each normalises
    its own chunk), replica 0's buffers are the module's; the others' updates are discarded."""
    outs = []
    for k, chunk in enumerate(x.chunk(gpus)):
        replica = bn
        if k:
            replica = copy.deepcopy(bn)  # own buffers; the parameters are the module's (gradients flow back)
            replica.weight, replica.bias = bn.weight, bn.bias
        outs.append(replica(chunk))
    return torch.cat(outs), bn


@pytest.mark.parametrize("batch", [128, 80, 5])
def test_ghost_batch_norm_is_what_dataparallel_computes(batch):
    torch.manual_seed(0)
    x = torch.randn(batch, 6, 5, 5) * 3 + 1
    ref_bn = nn.BatchNorm2d(6, momentum=0.1)
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 2)
        ref_bn.bias.uniform_(-1, 1)
    ghost = GhostBatchNorm2d(6, 4, momentum=0.1)
    ghost.load_state_dict(ref_bn.state_dict())
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected, ref_bn = dataparallel_batchnorm(ref_bn, x1, 4)
    out = ghost(x2)
    torch.testing.assert_close(out, expected)
    (expected * torch.arange(expected.numel()).view_as(expected).sin()).sum().backward()
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(ghost.weight.grad, ref_bn.weight.grad)
    for key, value in ref_bn.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value)  # running statistics of the first chunk only
    assert not torch.allclose(out, F.batch_norm(x, None, None, ghost.weight, ghost.bias, True))  # not whole-batch BN
    ghost.eval()
    torch.testing.assert_close(ghost(x), ref_bn.eval()(x))


def test_ghost_batch_norm_keeps_the_state_dict_and_the_engine_builds_it(tmp_path):
    model = create_model("resnet8", 4)
    plain = copy.deepcopy(model.state_dict())
    assert use_ghost_batch_norm(model, 4) > 0
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    create_model("resnet8", 4).load_state_dict(model.state_dict(), strict=True)
    assert model.state_dict().keys() == plain.keys()
    engine, _ = _step_and_batch(tmp_path, "model.bn_group_size=4")  # batch 16 in groups of 4
    assert {m.groups for m in engine.module.modules() if isinstance(m, GhostBatchNorm2d)} == {4}
    with pytest.raises(GKLError, match="model.bn_group_size: 6 does not divide the 16 images"):
        load_recipe(RECIPES_DIR / "quickstart.yaml", [*TINY_OVERRIDES, "model.bn_group_size=6"])


def test_first_step_runs_batchnorm_at_momentum_one(tmp_path):
    recipe = load_recipe(RECIPES_DIR / "quickstart.yaml", [*TINY_OVERRIDES, "model.bn_first_batch_stats=true", "model.bn_group_size=null"])
    engine = Engine(recipe, AdversarialStep, out_dir=tmp_path, quiet=True, device="cpu")
    norms = [m for m in engine.module.modules() if isinstance(m, nn.BatchNorm2d)]
    seen, compute = [], engine.step.compute
    engine.step.compute = lambda batch, epoch: seen.append({m.momentum for m in norms}) or compute(batch, epoch)
    engine.step.begin_epoch(1)
    loader = iter(engine._train_loader(1, 0))
    for _ in range(2):
        engine.train_step(next(loader), 1, 0.1)
        engine.global_step += 1
    assert seen == [{1.0}, {0.1}] and {m.momentum for m in norms} == {0.1}
    with bn_momentum(engine.module, 0.5):
        assert {m.momentum for m in norms} == {0.5}


def test_bn_parameters_without_weight_decay_are_dm_at_group_weight():
    """DM-AT's `group_weight`: no decay for parameters whose name contains 'batchnorm'."""
    model = create_model("wrn-28-10-swish", 10)
    recipe = load_recipe(RECIPES_DIR / "cifar10_20m.yaml")
    decay, no_decay = parameter_groups(model, recipe.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n in names.values() if "batchnorm" in n}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    (everything,) = parameter_groups(model, load_recipe(RECIPES_DIR / "cifar100_basic.yaml").optim)
    assert len(everything["params"]) == len(list(model.parameters()))


def test_rotation_and_autoaugment_fill():
    src = make_synthetic(4, 2, 16, 0, "train")
    rot = TrainView(src, None, "basic-rot15", seed=2)
    basic = TrainView(src, None, "basic", seed=2)
    a, _ = rot[(1, 3)]
    assert torch.equal(a, rot[(1, 3)][0]) and a.shape == (3, 16, 16)
    assert any(not torch.equal(rot[(e, 3)][0], basic[(e, 3)][0]) for e in range(1, 6))
    # AutoAugment with the same seed draws the same operations; where the fill shows (rotations,
    # shears, translations) the two outputs differ, and there the official grey 128 shows
    img = torch.full((3, 16, 16), 200, dtype=torch.uint8)
    grey = black = differ = 0
    for seed in range(100):
        out0, out128 = (_SeededTransform("autoaug", fill=fill)(img, seed) for fill in (0, 128))
        mask = out0 != out128
        differ += int(mask.sum())
        grey += int((out128[mask] == 128).sum())
        black += int((out0[mask] == 0).sum())
    assert differ > 0 and grey > 0.8 * differ and black > 0.8 * differ


# ---------------------------------------------------------------------------- the paper recipes


def _recipe(name: str):
    return load_recipe(RECIPES_DIR / f"{name}.yaml")


@pytest.mark.parametrize("name", ["cifar100_1m", "cifar100_50m", "cifar10_1m", "cifar10_20m"])
def test_generated_rows_follow_dm_at_train_wa(name):
    r = _recipe(name)
    assert (r.data.generated.sampler, r.data.generated.fraction, r.data.val_size) == ("dmat", 0.7, 1024)
    assert (r.attack.init, r.attack.bn_mode, r.attack.steps, r.attack.eps_ramp) == ("uniform", "train", 10, False)
    assert r.loss.forward_order == "clean-first" and r.loss.label_smoothing == 0.1
    assert (r.schedule.lr_schedule, r.optim.lr, r.optim.nesterov, r.optim.bn_weight_decay) == ("onecycle", 0.2, True, False)
    assert r.schedule.warmup_epochs == 0.025 * r.schedule.epochs  # OneCycleLR pct_start 0.025
    assert (r.ema.mode, r.ema.tau, r.ema.warmup_fraction) == ("step", 0.995, 0.025)
    assert r.model.bn_first_batch_stats and r.model.bn_group_size is None and not r.awp.enabled
    assert r.data.augment == ("basic-rot15" if r.data.dataset == "cifar100" else "basic")
    if name == "cifar10_1m":  # DM-AT's README command for this row: --batch-size 512 --num-adv-epochs 400
        assert (r.data.batch_size, r.schedule.epochs) == (512, 400)


@pytest.mark.parametrize(("name", "group"), [("cifar100_basic", 32), ("cifar10_basic", 32), ("cifar100_trades", 32),
                                             ("cifar100_autoaug", 64), ("cifar10_autoaug", 64)])
def test_official_at_rows_use_the_official_protocol(name, group):
    r = _recipe(name)
    assert r.model.bn_group_size == group  # nn.DataParallel on 4 GPUs
    assert r.awp.restore == "subtract" and r.attack.init == "normal" and r.loss.forward_order == "adv-first"
    assert r.schedule.lr_schedule == ("cosine-trades" if "trades" in name else "cosine-official")
    if r.data.augment == "autoaug":
        assert r.data.autoaug_fill == 128
