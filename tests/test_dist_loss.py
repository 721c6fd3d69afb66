"""DIST (TABLE XIX's baseline) against a hand formula written out with loops, and through the registry."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from gklcli.losses import LossTerm, dist_loss, get_loss


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (den + 1e-8)


def _hand(s: torch.Tensor, t: torch.Tensor, beta: float, gamma: float, tau: float) -> float:
    ys, yt = torch.softmax(s / tau, 1).tolist(), torch.softmax(t / tau, 1).tolist()
    n, c = len(ys), len(ys[0])
    inter = 1 - sum(_pearson(ys[i], yt[i]) for i in range(n)) / n
    intra = 1 - sum(_pearson([ys[i][j] for i in range(n)], [yt[i][j] for i in range(n)]) for j in range(c)) / c
    return tau ** 2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0), (0.0, 1.0, 2.0)])
def test_dist_equals_the_hand_formula(beta, gamma, tau):
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert abs(float(dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau)) - _hand(s, t, beta, gamma, tau)) < 1e-12


def test_dist_is_zero_for_matching_predictions_and_has_a_gradient():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(8, 10, generator=g, dtype=torch.float64)
    assert float(dist_loss(t.clone(), t)) < 1e-5  # the 1e-8 in the correlation's denominator
    s = torch.randn(8, 10, generator=g, dtype=torch.float64, requires_grad=True)
    loss = dist_loss(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    assert float(loss) > 0 and float(grad.abs().sum()) > 0


def test_dist_through_the_registry_reads_its_settings():
    entry = get_loss("dist", "kd")
    assert entry.settings("kd") == ("dist_beta", "dist_gamma", "temperature", "kd_weight")
    c = SimpleNamespace(dist_beta=1.0, dist_gamma=2.0, temperature=1.0, kd_weight=2.0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    got = LossTerm("dist", "kd", c, 3)(s, t, None).total
    assert torch.allclose(got, 2.0 * dist_loss(s, t, beta=1.0, gamma=2.0))
