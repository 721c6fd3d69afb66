"""Time of one GKL-AT training step relative to one TRADES-KL step, measured in the same process.

Both steps go through the real engine (`Engine.train_step`: attack, AWP, outer loss, backward,
optimizer, averaging) with the same model weights, the same batch and the same attack (5 steps);
only the losses differ: GKL (α=20, β=5, γ=0.4, class prior) with the official GKL attack loss vs
TRADES (β=6) with the KL attack loss. Steps alternate between the two so drifts in machine speed
hit both equally. Target (issue 3): GKL-AT ≤ 1.05× the TRADES time.

`--steps` picks the steps (default gkl,trades). `official` is the anchor: the released GKL-AT
`train()` loop body written out in plain PyTorch as the official code does it — `perturb_input`
recomputing the clean logits at every attack step, `TradesAWP` with a proxy model and its own SGD
step, CE + GKL, SGD, restore — on a copy of the same weights, always fp32 and contiguous (the
official code has no autocast, channels_last or compile), so "× official" is the speed-up of gkl's
step at these settings over the official step on this machine.

    python benchmarks/bench_train_step.py                          # CPU, resnet20, C=100, batch 128
    python benchmarks/bench_train_step.py --device cuda --arch wrn-34-10 --batch 128 --steps gkl,trades,official
    python benchmarks/bench_train_step.py --device cuda --arch wrn-34-10 --amp bf16 --channels-last --steps gkl,official
    python benchmarks/bench_train_step.py --device cuda --arch wrn-34-10 --amp bf16 --channels-last --compile --steps gkl
    python benchmarks/bench_train_step.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from _report import interleaved, report

from gklcli.attacks import epoch_attack
from gklcli.losses import ClassPrior, gkl_loss
from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.at import AdversarialStep
from gklcli.train.engine import Engine

STEPS = {"gkl": "GKL-AT", "trades": "TRADES", "official": "official-style GKL-AT"}


def make_engine(loss: list[str], args: argparse.Namespace, out: str) -> Engine:
    overrides = [
        f"model.arch={args.arch}",
        f"model.channels_last={str(args.channels_last).lower()}",
        f"train.amp={args.amp}",
        f"train.compile={str(args.compile).lower()}",
        "data.dataset=synthetic",
        f"data.synthetic.num_classes={args.num_classes}",
        f"data.synthetic.image_size={args.size}",
        f"data.synthetic.num_train={args.batch * 2}",
        "data.synthetic.num_test=16",
        "data.val_size=0",
        f"data.batch_size={args.batch}",
        "data.num_workers=0",
        "schedule.epochs=200",
        "awp.warmup_epochs=1",
        "output.tensorboard=false",
        *loss,
    ]
    recipe = load_recipe(RECIPES_DIR / "cifar100_basic.yaml", overrides)
    return Engine(recipe, AdversarialStep, out_dir=out, quiet=True, device=args.device)


class OfficialStep:
    """One step of the official GKL-AT loop (DKL `train()` with `perturb_input` and `TradesAWP`), fp32.

    Same losses as the gkl step: the attack maximises GKL(α=β=1, class prior), the training loss is
    CE + GKL(α, β, γ, class prior); the prior is fed by the clean logits.
    """

    def __init__(self, engine: Engine, epoch: int):
        r = engine.recipe
        self.device, self.loss_cfg = engine.env.device, r.loss
        self.model = copy.deepcopy(engine.module).to(memory_format=torch.contiguous_format)
        self.proxy = copy.deepcopy(self.model)  # TradesAWP's proxy model and optimizer
        self.proxy_optim = torch.optim.SGD(self.proxy.parameters(), lr=0.01)
        o = r.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        self.prior = ClassPrior(engine.num_classes, r.loss.prior_temperature, self.device)
        self.plan, self.gamma = epoch_attack(r.attack, epoch, r.schedule.epochs), r.awp.gamma
        self.awp_on = r.awp.enabled and epoch >= r.awp.warmup_epochs

    def _loss(self, model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> Any:
        c = self.loss_cfg
        logits_adv, logits_nat = model(x_adv), model(x)
        robust = gkl_loss(logits_adv, logits_nat, alpha=c.alpha, beta=c.beta, gamma=c.gamma, targets=y, class_prior=self.prior.prior)
        return F.cross_entropy(logits_nat, y) + robust, logits_nat

    def _perturb_input(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model, p = self.model, self.plan
        model.eval()
        x_adv = x.detach() + 0.001 * torch.randn_like(x)
        for _ in range(p.steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss = gkl_loss(model(x_adv), model(x), alpha=1.0, beta=1.0, targets=y, class_prior=self.prior.prior)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() + p.step_size * torch.sign(grad.detach())
            x_adv = torch.clamp(torch.min(torch.max(x_adv, x - p.eps), x + p.eps), 0.0, 1.0)
        return x_adv

    def _awp(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss = -self._loss(self.proxy, x, x_adv, y)[0]
        self.proxy_optim.zero_grad()
        loss.backward()
        self.proxy_optim.step()
        diff = {}
        for (name, old), new in zip(self.model.state_dict().items(), self.proxy.state_dict().values()):
            if old.dim() > 1 and "weight" in name:
                d = new - old
                diff[name] = old.norm() / (d.norm() + 1e-20) * d
        return diff

    def _add(self, diff: dict[str, torch.Tensor], coeff: float) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in diff:
                    param.add_(coeff * diff[name])

    def __call__(self, batch: Any, lr: float) -> None:
        images, y = batch
        x, y = images.to(self.device).float() / 255, y.to(self.device)
        x_adv = self._perturb_input(x, y)
        self.model.train()
        diff = self._awp(x, x_adv, y) if self.awp_on else {}
        self._add(diff, self.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()
        loss, logits_nat = self._loss(self.model, x, x_adv, y)
        loss.backward()
        self.optimizer.step()
        self._add(diff, -self.gamma)
        self.prior.update(logits_nat.detach(), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="synthetic image size (CIFAR: 32; smaller for a quick CPU check)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="train.compile=true for the gkl and trades steps")
    parser.add_argument("--steps", default="gkl,trades", help=f"comma-separated, of {', '.join(STEPS)} (official: the anchor)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not wanted or any(s not in STEPS for s in wanted):
        parser.error(f"--steps {args.steps}: expected a comma-separated list of {', '.join(STEPS)}")
    torch.manual_seed(0)
    losses = {"gkl": ["loss.name=gkl", "attack.loss=gkl"], "trades": ["loss.name=trades", "loss.trades_beta=6", "attack.loss=kl"]}
    with tempfile.TemporaryDirectory() as out:
        # the gkl engine always exists: it holds the weights, the batch and the recipe every step shares
        gkl = make_engine(losses["gkl"], args, out)
        engines = {"gkl": gkl} | {k: make_engine(losses[k], args, out) for k in wanted if k == "trades"}
        reference = gkl.module.state_dict()
        for engine in engines.values():
            engine.module.load_state_dict(reference)
            engine.step.begin_epoch(100)  # mid-training: ε_t = 4/255, 5 attack steps, AWP on
            engine.model.train()
        batch = next(iter(gkl._train_loader(100, 0)))
        steps = {k: (lambda e=engines[k]: e.train_step(batch, 100, 0.1)) for k in wanted if k in engines}
        if "official" in wanted:
            official = OfficialStep(gkl, 100)
            steps["official"] = lambda: official(batch, 0.1)
        steps = {k: steps[k] for k in wanted}
        device = gkl.env.device
        times, peak_bytes = interleaved(steps, args.rounds, args.warmup, device)
        peak = {name: value / 2**30 for name, value in peak_bytes.items()}
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name, median in medians.items():
        row = {"step": STEPS[name], "key": name, "median_s": median, "img_s": args.batch / median}
        if "trades" in medians:
            row["ratio_to_trades"] = median / medians["trades"]
        if "official" in medians:
            row["speedup_vs_official"] = medians["official"] / median
        if device.type == "cuda":
            row["peak_gib"] = peak[name]
        rows.append(row)
    columns = ["step", "median s/step", "img/s"] + (["× TRADES"] if "trades" in medians else []) \
        + (["speed-up vs official"] if "official" in medians else []) + (["peak GiB"] if device.type == "cuda" else [])
    cells = [[r["step"], f"{r['median_s']:.4f}", f"{r['img_s']:.1f}"]
             + ([f"{r['ratio_to_trades']:.3f}"] if "trades" in medians else [])
             + ([f"{r['speedup_vs_official']:.2f}"] if "official" in medians else [])
             + ([f"{r['peak_gib']:.1f}"] if device.type == "cuda" else []) for r in rows]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    report(f"train step, {args.arch}, C={args.num_classes}, batch {args.batch}, {args.size}px, {name}, amp {args.amp}"
           f"{', channels_last' if args.channels_last else ''}{', compile' if args.compile else ''} "
           f"({args.rounds} interleaved rounds; official-style: fp32, contiguous)",
           columns, cells, args.json_path, {"args": vars(args), "rows": rows, "device": name, "torch": torch.__version__})


if __name__ == "__main__":
    main()
