"""The pieces of GKL-AT against independent references: ε/step schedules, PGD constraints, AWP
(against the official proxy-model computation), weight averaging (against swa.py's formula) and the
learning-rate schedules (against the official expressions)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gklcli.attacks import epoch_attack, bn_mode, ce_attack_loss, pgd_linf
from gklcli.recipes import AttackCfg, OptimCfg, ScheduleCfg
from gklcli.train.averaging import EpochAverage, StepEMA
from gklcli.train.awp import AWP
from gklcli.train.schedule import learning_rate, momentum

EPS = 8 / 255


def small_net(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, num_classes),
    )


# ------------------------------------------------------------------------------ ε / step schedules


def official_if_chain(epoch: int, epochs: int):
    """The official code, transcribed with its plain `if`s."""
    varepsilon = EPS * (epoch / epochs)
    scale = epochs / 200.0
    if epoch <= int(50 * scale):
        step, iters = varepsilon, 2
    if epoch <= int(100 * scale):
        step, iters = 2 * varepsilon / 3, 3
    if epoch <= int(150 * scale):
        step, iters = varepsilon / 2, 4
    if epoch <= int(200 * scale):
        step, iters = varepsilon / 2, 5
    return varepsilon, iters, step


@pytest.mark.parametrize("epochs", [200, 100, 37])
def test_official_schedule_is_what_the_if_chain_executes(epochs):
    cfg = AttackCfg(schedule="official")
    for epoch in range(1, epochs + 1):
        plan = epoch_attack(cfg, epoch, epochs)
        eps, iters, step = official_if_chain(epoch, epochs)
        assert plan.steps == iters == 5
        assert plan.eps == pytest.approx(eps, rel=1e-15) and plan.step_size == pytest.approx(step, rel=1e-15)


def test_staged_schedule_boundaries():
    cfg = AttackCfg(schedule="staged")
    expect = {1: (2, 1.0), 50: (2, 1.0), 51: (3, 2 / 3), 100: (3, 2 / 3), 101: (4, 0.5), 150: (4, 0.5), 151: (5, 0.5), 200: (5, 0.5)}
    for epoch, (steps, frac) in expect.items():
        plan = epoch_attack(cfg, epoch, 200)
        assert plan.steps == steps
        assert plan.eps == pytest.approx(EPS * epoch / 200) and plan.step_size == pytest.approx(frac * EPS * epoch / 200)
    assert epoch_attack(cfg, 25, 100).steps == 2 and epoch_attack(cfg, 26, 100).steps == 3  # scaled by epochs/200


def test_fixed_schedule_without_ramp():
    plan = epoch_attack(AttackCfg(schedule="fixed", steps=10, step_size=2 / 255, eps_ramp=False), 3, 400)
    assert (plan.eps, plan.steps, plan.step_size) == (EPS, 10, 2 / 255)


# ------------------------------------------------------------------------------------------- PGD


def test_pgd_stays_in_the_eps_ball_and_the_unit_box_and_increases_the_loss():
    model = small_net()
    x = torch.rand(16, 3, 8, 8)
    x[:, :, 0, 0] = 0.0  # pixels at the box boundary
    x[:, :, 1, 1] = 1.0
    y = torch.randint(0, 5, (16,))
    x_adv = pgd_linf(model, x, y, ce_attack_loss, eps=EPS, step_size=EPS / 2, steps=5)
    assert (x_adv - x).abs().max() <= EPS + 1e-7
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    assert all(p.grad is None for p in model.parameters())  # input gradients only


def test_bn_modes_never_touch_running_stats_and_restore_flags():
    model = small_net()
    model.train()
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 5, (8,))
    for mode in ("eval", "train"):
        pgd_linf(model, x, y, ce_attack_loss, eps=EPS, step_size=EPS / 4, steps=3, mode=mode)
        assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
        assert torch.equal(bn.num_batches_tracked, before[2])
        assert model.training and bn.track_running_stats
    with bn_mode(model, "train"):
        out_train = model(x)
    model.eval()
    assert not torch.allclose(out_train, model(x))  # train mode really used batch statistics


# ------------------------------------------------------------------------------------------- AWP


def official_awp_diff(model: nn.Module, loss_fn, lr: float = 0.2) -> dict:
    """utils_awp.TradesAWP.calc_awp + diff_in_weights, transcribed: proxy model, SGD step on −loss."""
    proxy = copy.deepcopy(model)
    proxy.train()
    opt = torch.optim.SGD(proxy.parameters(), lr=lr)
    loss = -1.0 * loss_fn(proxy)
    opt.zero_grad()
    loss.backward()
    opt.step()
    diff = {}
    for (k, old), (_, new) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if old.dim() <= 1 or "weight" not in k:
            continue
        d = new - old
        diff[k] = old.norm() / (d.norm() + 1e-20) * d
    return diff


def test_awp_direction_matches_the_official_proxy_and_leaves_bn_alone():
    model = small_net().double()
    model.train()
    x, y = torch.rand(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (16,))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    reference = official_awp_diff(model, lambda m: F.cross_entropy(m(x), y))
    awp = AWP(model, gamma=0.005)
    diff = awp.direction(lambda forward: F.cross_entropy(forward(x), y))
    assert set(diff) == set(reference) == {"0.weight", "5.weight"}
    for k in diff:
        torch.testing.assert_close(diff[k], reference[k], rtol=1e-9, atol=1e-12)
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v)
    assert all(p.grad is None for p in model.parameters())


def test_awp_exact_restore_is_bit_exact_and_subtract_is_the_official_order():
    model = small_net()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 5, (8,))
    awp = AWP(model, gamma=0.005)
    diff = awp.direction(lambda forward: F.cross_entropy(forward(x), y))
    awp.perturb(diff)
    w = model[0].weight
    torch.testing.assert_close(w - original["0.weight"], 0.005 * diff["0.weight"])
    awp.restore_exact()
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    awp.perturb(diff)
    awp.restore_subtract(diff)
    torch.testing.assert_close(model[0].weight, original["0.weight"], rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------- weight averaging


def official_swa(states: list[dict], tau: float, start: int) -> dict:
    """swa.py, transcribed: epochs 1..end, start epoch copied, later ones (1−τ)·value + τ·avg."""
    new = {}
    for i, state in enumerate(states, start=1):
        if i == start:
            new = {k: v.clone() for k, v in state.items()}
        elif i > start:
            new = {k: (1 - tau) * v + tau * new[k] for k, v in state.items()}
    return new


@pytest.mark.parametrize("start", [1, 3])
def test_epoch_average_equals_swa_py_including_bn_buffers(start):
    model = small_net()
    avg = EpochAverage(0.9, start)
    states = []
    for epoch in range(1, 7):
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.add_(torch.randn_like(t))
                else:
                    t.add_(3)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        avg.update_epoch(model, epoch)
    ref = official_swa(states, 0.9, start)
    for k, v in avg.state.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(v, states[-1][k])  # num_batches_tracked: the latest count
    assert "1.running_mean" in avg.state


def dm_at_ema_update(wa_model, model, global_step, decay_rate, warmup_steps):
    """DM-AT's `ema_update` (gowal21uncovering/utils/watrain.py, dynamic_decay=True), transcribed."""
    factor = int(global_step >= warmup_steps)
    delta = global_step - warmup_steps
    decay = min(decay_rate, (1.0 + delta) / (10.0 + delta)) if 10.0 + delta != 0 else decay_rate
    decay *= factor
    for p_swa, p_model in zip(wa_model.parameters(), model.parameters()):
        p_swa.data *= decay
        p_swa.data += p_model.data * (1 - decay)


@pytest.mark.parametrize("warmup_fraction", [0.0, 0.025, 0.3])
def test_step_ema_is_dm_at_ema_update_from_the_initial_weights(warmup_fraction):
    model = small_net()
    wa_model = copy.deepcopy(model)  # DM-AT: WATrainer deep-copies the model before training
    ema = StepEMA(0.995, model, warmup_fraction)
    epochs, update_steps = 8, 5
    total = epochs * update_steps
    for g in range(1, total + 1):  # DM-AT: global_step = (epoch − 1)·update_steps + update_iter, after the step
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(0.3 * g)
            model[1].running_mean.add_(2.0)
        ema.update_step(model, g, total)
        dm_at_ema_update(wa_model, model, g, 0.995, warmup_fraction * epochs * update_steps)
        params = dict(wa_model.named_parameters())
        for k, v in ema.state.items():
            if k in params:
                torch.testing.assert_close(v, params[k].detach(), rtol=1e-6, atol=1e-6)
            else:  # DM-AT's update_bn copies the model's BN buffers into the average
                assert torch.equal(v, model.state_dict()[k])
    if warmup_fraction == 0.3:  # during the warm-up the average is the model itself
        assert ema.decay(int(0.3 * total) - 1, total) == 0.0


# ------------------------------------------------------------------------------------- lr schedule


def test_cosine_official_matches_adjust_learning_rate_cosine():
    optim, sched = OptimCfg(lr=0.2), ScheduleCfg(epochs=200, lr_schedule="cosine-official")
    for epoch in (1, 2, 100, 199, 200):
        official = 0.2 * 0.5 * (1.0 + math.cos(math.pi * (epoch - 0) / (200 - 0 + 1)))
        for step in (0, 50):
            assert learning_rate(optim, sched, epoch, step, 391) == pytest.approx(official, rel=1e-15)


def test_multistep_matches_mdistiller_and_warmup_is_linear():
    optim = OptimCfg(lr=0.05)
    sched = ScheduleCfg(epochs=240, lr_schedule="multistep", milestones=[150, 180, 210], lr_decay=0.1)
    for epoch, lr in ((1, 0.05), (150, 0.05), (151, 0.005), (181, 0.0005), (240, 0.00005)):
        assert learning_rate(optim, sched, epoch, 0, 100) == pytest.approx(lr)
    warm = ScheduleCfg(epochs=10, lr_schedule="cosine", warmup_epochs=2)
    lrs = [learning_rate(optim, warm, 1 + s // 4, s % 4, 4) for s in range(8)]
    assert lrs == pytest.approx([0.05 * (s + 1) / 8 for s in range(8)])
    assert learning_rate(optim, warm, 10, 3, 4) < 1e-3


@pytest.mark.parametrize(("epochs", "warmup"), [(400, 10), (2400, 60), (20, 3)])
def test_onecycle_is_torch_onecycle_stepped_per_epoch_with_its_momentum(epochs, warmup):
    """DM-AT's `cosinew`: OneCycleLR(max_lr=lr, pct_start=0.025, total_steps=epochs), `step()` after
    every epoch, on SGD(momentum=0.9, nesterov): torch's own scheduler is the reference."""
    optim = OptimCfg(lr=0.2, momentum=0.9, nesterov=True)
    sched = ScheduleCfg(epochs=epochs, lr_schedule="onecycle", warmup_epochs=warmup)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2, momentum=0.9, nesterov=True)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, pct_start=warmup / epochs, total_steps=epochs)
    for epoch in range(1, epochs + 1):
        group = opt.param_groups[0]
        for step in (0, 7):  # constant within an epoch
            assert learning_rate(optim, sched, epoch, step, 25) == pytest.approx(group["lr"], rel=1e-12, abs=1e-18)
        assert momentum(optim, sched, epoch) == pytest.approx(group["momentum"], rel=1e-12)
        opt.step()
        ref.step()
    assert learning_rate(optim, sched, 1, 0, 25) == pytest.approx(0.2 / 25)
    assert momentum(OptimCfg(momentum=0.9), ScheduleCfg(lr_schedule="cosine"), 5) == 0.9


def test_cosine_trades_is_the_official_trades_formula():
    """train_trades_cifar.py: lr·0.5·(1 + cos((epoch − 1)/epochs·π)), epochs counted from 1."""
    optim, sched = OptimCfg(lr=0.2), ScheduleCfg(epochs=200, lr_schedule="cosine-trades")
    for epoch in (1, 2, 100, 200):
        official = 0.2 * 0.5 * (1 + math.cos((epoch - 1) / 200 * math.pi))
        assert learning_rate(optim, sched, epoch, 3, 390) == pytest.approx(official, rel=1e-15)
    assert learning_rate(optim, sched, 1, 0, 390) == 0.2


def test_imagenet_lt_schedule_is_the_official_adjust_learning_rate():
    """Imbalanced_KD-dkl's adjust_learning_rate (0-based epoch e0, --cos, warm-up 10, 90 epochs)."""
    def official(e0: int, lr=0.05, warmup=10, epochs=90):
        if e0 < warmup:
            return lr / warmup * (e0 + 1)
        return lr * 0.5 * (1.0 + math.cos(math.pi * (e0 - warmup + 1) / (epochs - warmup + 1)))

    optim = OptimCfg(lr=0.05)
    sched = ScheduleCfg(epochs=90, lr_schedule="cosine-official", warmup_epochs=10, warmup_mode="epoch")
    for e0 in range(90):
        for step in (0, 450, 904):  # constant within the epoch
            assert learning_rate(optim, sched, e0 + 1, step, 905) == pytest.approx(official(e0), rel=1e-14)
