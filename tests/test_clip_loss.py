"""CLIP distillation losses (TABLE VII) against naive formulas, and the gathered-DDP logits and gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gklcli.losses import LossTerm, clip_contrastive, clip_logits, get_loss
from gklcli.train.clip import local_labels, similarity_logits


def _features(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1))


def _settings(**kw):
    base = dict(alpha=0.5, beta=1.0, gamma=0.6, temperature=8.0, weight_temperature=1.0, normalization="weights",
                kd_weight=1.0, weights="sample", ce_weight=1.0, across_ranks=True)
    return SimpleNamespace(**(base | kw))


def naive_kl_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """t²·mean_rows Σ_j p_j (log p_j − log q_j), p = softmax(T/t), q = softmax(S/t), written out."""
    p = torch.exp(t / temp) / torch.exp(t / temp).sum(1, keepdim=True)
    q = torch.exp(s / temp) / torch.exp(s / temp).sum(1, keepdim=True)
    return temp ** 2 * (p * (torch.log(p) - torch.log(q))).sum(1).mean()


def naive_gkl(s: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
    """Eq. 13 with φ* = √(S(w_m)^γ), w_m^jk = s_m^j s_m^k from the teacher's row (B×C×C, no shortcuts)."""
    sm = torch.softmax(t / c.weight_temperature, 1).detach()
    w = (sm[:, :, None] * sm[:, None, :]) ** c.gamma
    dm = t[:, :, None] - t[:, None, :]
    dn = s[:, :, None] - s[:, None, :]
    wmse = c.alpha / 4 * (w * (dm - dn) ** 2).sum() / w.sum()
    p = torch.softmax(t / c.temperature, 1).detach()
    ce = -(p * torch.log_softmax(s / c.temperature, 1)).sum(1).mean()
    return wmse + c.beta * ce


@pytest.mark.parametrize("name,settings", [
    ("kd", _settings(temperature=1.0)), ("kd", _settings(temperature=4.0)),
    ("gkl", _settings()), ("gkl", _settings(gamma=1.0, temperature=1.0)),
])
def test_clip_distillation_equals_naive_formula_both_directions(name, settings):
    img, txt = _features(12, 16, 0)
    t_img, t_txt = _features(12, 24, 1)
    img.requires_grad_(True)
    scale, t_scale = torch.tensor(14.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)
    student = clip_logits(img, txt, img, txt, scale)
    teacher = clip_logits(t_img, t_txt, t_img, t_txt, t_scale)
    labels = torch.arange(12)
    term = LossTerm(name, "clip", settings, 1)
    got = term.both_directions(student, teacher, labels).total
    naive = naive_kl_kd if name == "kd" else naive_gkl
    arg = settings.temperature if name == "kd" else settings
    i2t = naive(scale * img @ txt.T, t_scale * t_img @ t_txt.T, arg)
    t2i = naive(scale * txt @ img.T, t_scale * t_txt @ t_img.T, arg)
    want = (i2t + t2i) / 2
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, img, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, img)
    assert torch.allclose(g_got, g_want, rtol=1e-7, atol=1e-10)
    # the two directions differ (the matrices are not symmetric), so averaging both is not one direction twice
    assert not torch.allclose(i2t, t2i)


def test_contrastive_is_openclip_clip_loss():
    from open_clip.loss import ClipLoss

    img, txt = _features(10, 8, 3)
    scale = torch.tensor(20.0, dtype=torch.float64)
    ours = clip_contrastive(*clip_logits(img, txt, img, txt, scale), torch.arange(10))
    theirs = ClipLoss()(img.float(), txt.float(), scale.float())
    assert abs(float(ours) - float(theirs)) < 1e-5


def test_clip_loss_registry_refuses_class_weights_and_unknown_names():
    assert get_loss("gkl", "clip").settings("clip", "sample")[-1] == "weight_temperature"
    with pytest.raises(ValueError, match="CLIP-distillation loss 'dkd'"):
        get_loss("dkd", "clip")


def _gather_worker(rank: int, world: int, init_file: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    img, txt = _features(8, 6, 7)
    t_img, t_txt = _features(8, 10, 8)
    n = len(img) // world
    mine = slice(rank * n, (rank + 1) * n)
    li, lt = img[mine].clone().requires_grad_(True), txt[mine].clone().requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64)
    student = similarity_logits(li, lt, scale, with_grad=True)
    teacher = similarity_logits(t_img[mine], t_txt[mine], torch.tensor(50.0, dtype=torch.float64), with_grad=False)
    labels = local_labels(n, li.device)
    term = LossTerm("gkl", "clip", _settings(), 1)
    loss = clip_contrastive(*student, labels) + term.both_directions(student, teacher, labels).total
    loss.backward()
    queue.put((rank, [x.detach().numpy().copy() for x in (*student, *teacher, labels, li.grad, lt.grad)]))
    torch.distributed.destroy_process_group()


def test_gathered_ddp_logits_and_gradients_equal_single_process(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    img, txt = _features(8, 6, 7)
    t_img, t_txt = _features(8, 10, 8)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64)
    student = clip_logits(img, txt, img, txt, scale)
    teacher = clip_logits(t_img, t_txt, t_img, t_txt, torch.tensor(50.0, dtype=torch.float64))
    labels = torch.arange(8)
    term = LossTerm("gkl", "clip", _settings(), 1)
    loss = clip_contrastive(*student, labels) + term.both_directions(student, teacher, labels).total
    loss.backward()
    for rank in range(2):
        si, st, ti, tt, lab, gi, gt = (torch.from_numpy(a) for a in results[rank])
        rows = slice(rank * 4, rank * 4 + 4)
        assert torch.allclose(si, student[0][rows].detach()) and torch.allclose(st, student[1][rows].detach())
        assert torch.allclose(ti, teacher[0][rows]) and torch.allclose(tt, teacher[1][rows])
        assert torch.equal(lab, labels[rows])
        # DDP averages the ranks' gradients: each rank's local-loss gradient is world × the global mean's
        assert torch.allclose(gi, 2 * img.grad[rows], atol=1e-10) and torch.allclose(gt, 2 * txt.grad[rows], atol=1e-10)
