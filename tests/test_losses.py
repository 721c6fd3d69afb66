"""The loss core against independent references: autograd on the naive B×C×C formulas of the paper
(Algorithm 1 / official code), finite differences, and hand-computed class means."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gklcli.losses import ClassPrior, dkl_loss, gkl_loss, gkl_terms, ikl_loss, kl_div

torch.set_default_dtype(torch.float32)


def _logits(b: int, c: int, seed: int, dtype=torch.float64, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, c, generator=g, dtype=dtype) * scale).requires_grad_()
    t = (torch.randn(b, c, generator=g, dtype=dtype) * scale).requires_grad_()
    return s, t


def _random_prior(c: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(c, c, generator=g, dtype=dtype) ** 3 + 1e-3
    return p / p.sum(1, keepdim=True)


def naive_gkl(s, t, *, alpha, beta, gamma=1.0, temperature=1.0, targets=None, prior=None, t2=1.0, by_batch=False):
    """Algorithm 1 of the paper (official v2 `dkl_loss`), B×C×C tensors and all, paper names."""
    c = s.shape[1]
    with torch.no_grad():
        scores = prior[targets] if prior is not None else F.softmax(t / t2, dim=1)
        scores = scores.pow(gamma)
        w = scores.view(-1, c, 1) @ scores.view(-1, 1, c)
    delta_t = t.view(-1, c, 1) - t.view(-1, 1, c)
    delta_s = s.view(-1, c, 1) - s.view(-1, 1, c)
    total = ((delta_t - delta_s) ** 2 * w).sum()
    wmse = 0.25 * total / (s.shape[0] if by_batch else w.sum())
    ce = -(F.softmax(t / temperature, dim=1).detach() * F.log_softmax(s / temperature, dim=1)).sum(1).mean()
    return alpha * wmse + beta * ce


def naive_dkl(s, t, alpha=1.0, beta=1.0):
    """Eq. 5 with explicit stop-gradients: α/4 Σ S(w_t)(Δt − S(Δs))² − β S(s_t)ᵀ log s_s."""
    c = s.shape[1]
    p = F.softmax(t, dim=1).detach()
    w = p.view(-1, c, 1) * p.view(-1, 1, c)
    delta_t = t.view(-1, c, 1) - t.view(-1, 1, c)
    delta_s = (s.view(-1, c, 1) - s.view(-1, 1, c)).detach()
    wmse = 0.25 * ((delta_t - delta_s) ** 2 * w).sum((1, 2)).mean()
    return alpha * wmse - beta * (p * F.log_softmax(s, dim=1)).sum(1).mean()


def _grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


@pytest.mark.parametrize("b,c", [(16, 2), (32, 10), (8, 100), (4, 1000)])
def test_theorem1_dkl_gradients_equal_kl_for_both_inputs(b, c):
    s, t = _logits(b, c, seed=c)
    g_dkl = _grads(dkl_loss(s, t), s, t)
    g_kl = _grads(kl_div(s, t), s, t)
    for ours, ref in zip(g_dkl, g_kl):
        assert ours.abs().max() > 1e-6  # both inputs really get gradient
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_dkl_matches_naive_eq5_value_and_gradients():
    s, t = _logits(8, 12, seed=1)
    ours, ref = dkl_loss(s, t, alpha=2.5, beta=0.7), naive_dkl(s, t, 2.5, 0.7)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(_grads(ours, s, t), _grads(ref, s, t)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_kl_div_matches_textbook_formula_with_temperature():
    s, t = _logits(6, 7, seed=2)
    p, q = F.softmax(t / 3, 1), F.softmax(s / 3, 1)
    torch.testing.assert_close(kl_div(s, t, temperature=3.0), (p * (p.log() - q.log())).sum(1).mean())


@pytest.mark.parametrize("gamma", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("classwise", [True, False])
@pytest.mark.parametrize("c", [10, 100])
def test_gkl_equals_naive_algorithm1(gamma, temperature, classwise, c):
    s, t = _logits(12, c, seed=int(gamma * 10) + c)
    targets = torch.randint(0, c, (12,), generator=torch.Generator().manual_seed(3))
    prior = _random_prior(c, seed=4) if classwise else None
    kw = dict(alpha=20.0, beta=5.0, gamma=gamma, temperature=temperature)
    ours = gkl_loss(s, t, targets=targets, class_prior=prior, weight_temperature=2.0, **kw)
    ref = naive_gkl(s, t, targets=targets, prior=prior, t2=2.0, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(ours, s, t), _grads(ref, s, t)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_ikl_equals_conference_formula_normalised_by_batch():
    s, t = _logits(10, 20, seed=5)
    targets = torch.randint(0, 20, (10,), generator=torch.Generator().manual_seed(6))
    prior = _random_prior(20, seed=7)
    ours = ikl_loss(s, t, alpha=20.0, beta=4.0, targets=targets, class_prior=prior)
    ref = naive_gkl(s, t, alpha=20.0, beta=4.0, targets=targets, prior=prior, by_batch=True)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # sample-wise at T2 = 100, the v1 KD default
    ours = ikl_loss(s, t, alpha=1.0, beta=8.0, weight_temperature=100.0)
    ref = naive_gkl(s, t, alpha=1.0, beta=8.0, t2=100.0, by_batch=True)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_with_detached_teacher_dkl_wmse_gives_no_student_gradient_but_gkl_does():
    s, t = _logits(8, 10, seed=8)
    teacher = t.detach()
    dkl_grad = _grads(dkl_loss(s, teacher, alpha=1.0, beta=0.0), s)[0]
    gkl_grad = _grads(gkl_loss(s, teacher, alpha=1.0, beta=0.0), s)[0]
    assert dkl_grad is None or dkl_grad.abs().max() == 0
    assert gkl_grad.abs().max() > 1e-3


def test_gkl_gradient_reaches_undetached_teacher_through_wmse_only():
    s, t = _logits(8, 10, seed=9)
    # the cross-entropy term's target is detached: β alone sends nothing to the teacher
    ce_only = _grads(gkl_loss(s, t, alpha=0.0, beta=1.0), t)[0]
    assert ce_only is None or ce_only.abs().max() == 0
    g_s, g_t = _grads(gkl_loss(s, t, alpha=1.0, beta=0.0), s, t)
    torch.testing.assert_close(g_t, -g_s)  # wMSE depends on t − s only


def test_gkl_finite_differences():
    s, t = _logits(4, 6, seed=10)
    targets = torch.tensor([0, 3, 5, 3])
    prior = _random_prior(6, seed=11)
    torch.autograd.gradcheck(
        lambda x: gkl_loss(x, t.detach(), alpha=3.0, beta=2.0, gamma=0.4, targets=targets, class_prior=prior), (s,)
    )
    # teacher side: the class-wise wMSE has no stop-gradient path through t
    torch.autograd.gradcheck(lambda y: gkl_loss(s.detach(), y, alpha=3.0, beta=0.0, gamma=0.4, targets=targets, class_prior=prior), (t,))
    torch.autograd.gradcheck(lambda x: gkl_loss(x, t.detach(), alpha=2.0, beta=1.0, gamma=0.5, weight_temperature=3.0), (s,))


def test_terms_sum_to_loss_and_weights_normalisation_differs_from_batch_when_gamma_not_one():
    s, t = _logits(6, 9, seed=12)
    terms = gkl_terms(s, t, alpha=4.0, beta=2.0, gamma=0.3)
    torch.testing.assert_close(terms.total, gkl_loss(s, t, alpha=4.0, beta=2.0, gamma=0.3))
    by_batch = gkl_terms(s, t, alpha=4.0, beta=2.0, gamma=0.3, normalization="batch")
    assert not torch.allclose(terms.wmse, by_batch.wmse)
    torch.testing.assert_close(terms.ce, by_batch.ce)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_fp32(dtype):
    s, t = _logits(16, 100, seed=13, dtype=torch.float32)
    s_h, t_h = s.detach().to(dtype).requires_grad_(), t.detach().to(dtype).requires_grad_()
    loss = gkl_loss(s_h, t_h, alpha=20.0, beta=5.0, gamma=0.4)
    assert loss.dtype == torch.float32
    ref = naive_gkl(s_h.detach().double(), t_h.detach().double(), alpha=20.0, beta=5.0, gamma=0.4)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    g_s, g_t = _grads(loss, s_h, t_h)
    assert g_s.dtype == dtype and g_t.dtype == dtype and torch.isfinite(g_s.float()).all()


def test_fp32_closed_form_stays_accurate_with_large_logit_offsets():
    s, t = _logits(8, 1000, seed=14, dtype=torch.float64)
    t64 = (t.detach() + 3e3)  # a shared offset: the expanded Σv·d² − (Σv·d)² would cancel catastrophically
    ref = naive_gkl(s.detach(), t64, alpha=20.0, beta=0.0, gamma=0.0)
    ours = gkl_loss(s.detach().float(), t64.float(), alpha=20.0, beta=0.0, gamma=0.0)
    torch.testing.assert_close(ours.double(), ref, rtol=2e-3, atol=0.0)


def test_no_bxcxc_tensor_is_built():
    # a naive implementation would need 8·20000² floats = 12.8 GB here
    s, t = _logits(8, 20_000, seed=15, dtype=torch.float32)
    loss = gkl_loss(s, t, alpha=1.0, beta=1.0, gamma=0.5)
    loss.backward()
    assert torch.isfinite(loss) and s.grad.shape == (8, 20_000)


def test_bad_inputs_raise():
    s, t = _logits(4, 5, seed=16)
    with pytest.raises(ValueError, match="same shape"):
        gkl_loss(s, t[:, :4], alpha=1.0, beta=1.0)
    with pytest.raises(ValueError, match="targets"):
        gkl_loss(s, t, alpha=1.0, beta=1.0, class_prior=_random_prior(5, 0))
    with pytest.raises(ValueError, match="normalization"):
        gkl_loss(s, t, alpha=1.0, beta=1.0, normalization="mean")


# --------------------------------------------------------------------------------------- ClassPrior


def test_class_prior_is_uniform_then_equals_per_class_means_by_hand():
    prior = ClassPrior(num_classes=4, temperature=2.0)
    torch.testing.assert_close(prior.prior, torch.full((4, 4), 0.25))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 4, generator=g) * 3, torch.tensor([0, 1, 1, 2, 0, 1])) for _ in range(3)]
    for logits, y in batches:
        prior.update(logits, y)
    torch.testing.assert_close(prior.prior, torch.full((4, 4), 0.25))  # unchanged until the epoch ends
    prior.end_epoch()
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    for c in range(3):
        members = [F.softmax(logits[i] / 2.0, dim=0) for i in range(len(labels)) if labels[i] == c]
        torch.testing.assert_close(prior.prior[c], torch.stack(members).mean(0))
    torch.testing.assert_close(prior.prior[3], torch.full((4,), 0.25))  # unseen class keeps its row
    torch.testing.assert_close(prior.rows(torch.tensor([2, 0])), prior.prior[[2, 0]])


def test_class_prior_next_epoch_replaces_not_averages():
    prior = ClassPrior(num_classes=3)
    prior.update(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([0]))
    prior.end_epoch()
    prior.update(torch.tensor([[0.0, 5.0, 0.0]]), torch.tensor([0]))
    prior.end_epoch()
    torch.testing.assert_close(prior.prior[0], F.softmax(torch.tensor([0.0, 5.0, 0.0]), 0))


def test_class_prior_state_dict_round_trip_mid_epoch():
    a = ClassPrior(num_classes=5, temperature=4.0)
    a.update(torch.randn(10, 5), torch.arange(10) % 5)
    a.end_epoch()
    a.update(torch.randn(7, 5), torch.arange(7) % 5)
    b = ClassPrior(num_classes=5)
    b.load_state_dict(a.state_dict())
    extra = torch.randn(3, 5), torch.tensor([1, 2, 3])
    a.update(*extra)
    b.update(*extra)
    a.end_epoch()
    b.end_epoch()
    torch.testing.assert_close(a.prior, b.prior)
    assert b.temperature == 4.0
    with pytest.raises(ValueError, match="classes"):
        ClassPrior(num_classes=6).load_state_dict(a.state_dict())


def _ddp_worker(rank: int, world: int, init_file: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(100)
    logits, labels = torch.randn(40, 5, generator=g), torch.arange(40) % 5
    prior = ClassPrior(num_classes=5, temperature=2.0)
    prior.update(logits[rank::world], labels[rank::world])  # each rank sees its shard
    prior.end_epoch()
    # a numpy copy pickles by value; a tensor would travel as a shared-memory fd that dies with this process
    queue.put((rank, prior.prior.numpy().copy()))
    torch.distributed.destroy_process_group()


def test_class_prior_all_reduces_across_ddp_ranks(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    g = torch.Generator().manual_seed(100)
    logits, labels = torch.randn(40, 5, generator=g), torch.arange(40) % 5
    single = ClassPrior(num_classes=5, temperature=2.0)
    single.update(logits, labels)
    single.end_epoch()
    for rank in range(2):
        torch.testing.assert_close(torch.from_numpy(results[rank]), single.prior)


def test_powered_prior_cache_follows_in_place_prior_updates():
    """gkl_loss caches prior**γ; ClassPrior.end_epoch changes the prior in place and must invalidate it."""
    s, t = _logits(6, 4, seed=17)
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    cp = ClassPrior(num_classes=4)
    prior = cp.prior.double()
    first = gkl_loss(s, t, alpha=2.0, beta=0.0, gamma=0.5, targets=targets, class_prior=prior)
    torch.testing.assert_close(first, naive_gkl(s, t, alpha=2.0, beta=0.0, gamma=0.5, targets=targets, prior=prior))
    prior[0] = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)  # in place, same object
    second = gkl_loss(s, t, alpha=2.0, beta=0.0, gamma=0.5, targets=targets, class_prior=prior)
    torch.testing.assert_close(second, naive_gkl(s, t, alpha=2.0, beta=0.0, gamma=0.5, targets=targets, prior=prior))
    assert not torch.allclose(first, second)
    # a different γ on the same prior is not served from the cache either
    third = gkl_loss(s, t, alpha=2.0, beta=0.0, gamma=0.2, targets=targets, class_prior=prior)
    torch.testing.assert_close(third, naive_gkl(s, t, alpha=2.0, beta=0.0, gamma=0.2, targets=targets, prior=prior))
    # and the ClassPrior's own tensor, updated by end_epoch, is seen fresh
    cp.update(torch.randn(8, 4), torch.arange(8) % 4)
    before = gkl_loss(s, t, alpha=2.0, beta=0.0, gamma=0.5, targets=targets, class_prior=cp.prior)
    cp.update(torch.randn(8, 4) * 5, torch.arange(8) % 4)
    cp.end_epoch()
    after = gkl_loss(s, t, alpha=2.0, beta=0.0, gamma=0.5, targets=targets, class_prior=cp.prior)
    ref = naive_gkl(s.float(), t.float(), alpha=2.0, beta=0.0, gamma=0.5, targets=targets, prior=cp.prior)
    torch.testing.assert_close(after.float(), ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after)


def test_gkl_loss_and_class_prior_on_the_test_device(device):
    """fp32 gkl_loss with the class-wise prior, and its gradients, on GKL_TEST_DEVICE (cpu by default)
    against Algorithm 1 in float64 on the CPU; the prior is accumulated on that device too."""
    s, t = _logits(128, 100, seed=21, dtype=torch.float64)
    targets = torch.arange(128) % 100
    prior = ClassPrior(100, 4.0, device)
    prior.update(t.detach().float().to(device), targets.to(device))
    prior.end_epoch()
    assert prior.prior.device == device
    s_d, t_d = (v.detach().float().to(device).requires_grad_() for v in (s, t))
    loss = gkl_loss(s_d, t_d, alpha=20.0, beta=5.0, gamma=0.4, targets=targets.to(device), class_prior=prior.prior)
    ref = naive_gkl(s, t, alpha=20.0, beta=5.0, gamma=0.4, targets=targets, prior=prior.prior.cpu().double())
    assert loss.device == device and loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach().double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(_grads(loss, s_d, t_d), _grads(ref, s, t)):
        torch.testing.assert_close(ours.double().cpu(), theirs, rtol=1e-4, atol=1e-7)
