"""Adversarial weight perturbation (Wu et al. 2020) as used by the official GKL-AT code.

The official `TradesAWP` copies the model into a proxy, takes one SGD step *up* the training loss
on the proxy, and perturbs every multi-dimensional ``weight`` by γ·‖w‖/‖Δw‖·Δw. With plain SGD,
Δw = lr·∇L, so the direction is ‖w‖·∇L/‖∇L‖ and the proxy's lr cancels. Here the gradient is taken
with `torch.func.functional_call` on cloned buffers instead of a proxy model: same numbers, no
second model in memory, and the BatchNorm running statistics stay untouched as with the proxy.
Under DDP the gradients are averaged over ranks so every rank applies the same perturbation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from gklcli.distributed import is_distributed

_EPS = 1e-20  # the official EPS in ‖w‖ / (‖Δw‖ + EPS)

Forward = Callable[[Tensor], Tensor]


class AWP:
    def __init__(self, module: nn.Module, gamma: float):
        self.module, self.gamma = module, gamma
        self.names = [n for n, p in module.named_parameters() if p.dim() > 1 and "weight" in n]
        self._saved: dict[str, Tensor] = {}

    def direction(self, loss_fn: Callable[[Forward], Tensor]) -> dict[str, Tensor]:
        """‖w‖·g/‖g‖ per perturbed weight, g = ∇ of `loss_fn(forward)` at the current weights.

        `loss_fn` receives a forward function and returns the training loss (the proxy loss of
        the official code is the training loss itself).
        """
        params = {n: p.detach().requires_grad_(n in self.names) for n, p in self.module.named_parameters()}
        buffers = {n: b.clone() for n, b in self.module.named_buffers()}

        def forward(x: Tensor) -> Tensor:
            return functional_call(self.module, (params, buffers), (x,))

        loss = loss_fn(forward)
        grads = torch.autograd.grad(loss, [params[n] for n in self.names], allow_unused=True)
        grads = [torch.zeros_like(params[n]) if g is None else g for n, g in zip(self.names, grads)]
        if is_distributed():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            grads = list(torch.split(flat, [g.numel() for g in grads]))
            grads = [g.view_as(params[n]) for g, n in zip(grads, self.names)]
        return {n: params[n].norm() / (g.norm() + _EPS) * g for n, g in zip(self.names, grads)}

    @torch.no_grad()
    def perturb(self, diff: dict[str, Tensor]) -> None:
        """w ← w + γ·diff, remembering w for an exact restore."""
        params = dict(self.module.named_parameters())
        self._saved = {n: params[n].detach().clone() for n in diff}
        for n, d in diff.items():
            params[n].add_(d, alpha=self.gamma)

    @torch.no_grad()
    def restore_exact(self) -> None:
        """Put back the unperturbed weights bit for bit (call before the optimizer step)."""
        params = dict(self.module.named_parameters())
        for n, w in self._saved.items():
            params[n].copy_(w)
        self._saved = {}

    @torch.no_grad()
    def restore_subtract(self, diff: dict[str, Tensor]) -> None:
        """The official restore: w ← w − γ·diff after the optimizer step on the perturbed weights."""
        params = dict(self.module.named_parameters())
        for n, d in diff.items():
            params[n].sub_(d, alpha=self.gamma)
        self._saved = {}
