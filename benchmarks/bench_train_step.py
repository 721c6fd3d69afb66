"""Time of one GKL-AT training step relative to one TRADES-KL step, measured in the same process.

Both steps go through the real engine (`Engine.train_step`: attack, AWP, outer loss, backward,
optimizer, averaging) with the same model weights, the same batch and the same attack (5 steps);
only the losses differ: GKL (α=20, β=5, γ=0.4, class prior) with the official GKL attack loss vs
TRADES (β=6) with the KL attack loss. Steps alternate between the two so drifts in machine speed
hit both equally. Target (issue 3): GKL-AT ≤ 1.05× the TRADES time.

    python benchmarks/bench_train_step.py                          # CPU, resnet20, C=100, batch 128
    python benchmarks/bench_train_step.py --device cuda --arch wrn-34-10 --batch 128
    python benchmarks/bench_train_step.py --device cuda --arch wrn-34-10 --amp bf16 --channels-last
    python benchmarks/bench_train_step.py --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _report import report

from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.at import AdversarialStep
from gklcli.train.engine import Engine


def make_engine(loss: list[str], args: argparse.Namespace, out: str) -> Engine:
    overrides = [
        f"model.arch={args.arch}",
        f"model.channels_last={str(args.channels_last).lower()}",
        f"train.amp={args.amp}",
        "data.dataset=synthetic",
        f"data.synthetic.num_classes={args.num_classes}",
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        engines = {
            "GKL-AT": make_engine(["loss.name=gkl", "attack.loss=gkl"], args, out),
            "TRADES": make_engine(["loss.name=trades", "loss.trades_beta=6", "attack.loss=kl"], args, out),
        }
        reference = engines["GKL-AT"].module.state_dict()
        engines["TRADES"].module.load_state_dict(reference)
        batch = next(iter(engines["GKL-AT"]._train_loader(100, 0)))
        for engine in engines.values():
            engine.step.begin_epoch(100)  # mid-training: ε_t = 4/255, 5 attack steps, AWP on
            engine.model.train()
        times: dict[str, list[float]] = {name: [] for name in engines}
        device = engines["GKL-AT"].env.device
        for round_ in range(args.warmup + args.rounds):
            for name, engine in engines.items():
                sync(device)
                start = time.perf_counter()
                engine.train_step(batch, 100, 0.1)
                sync(device)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["TRADES"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"step": name, "median_s": median, "img_s": args.batch / median, "ratio_to_trades": median / base})
    report(f"train step, {args.arch}, C={args.num_classes}, batch {args.batch}, {args.device}, amp {args.amp}"
           f"{', channels_last' if args.channels_last else ''} ({args.rounds} interleaved rounds)",
           ["step", "median s/step", "img/s", "× TRADES"],
           [[r["step"], f"{r['median_s']:.4f}", f"{r['img_s']:.1f}", f"{r['ratio_to_trades']:.3f}"] for r in rows],
           args.json_path, {"args": vars(args), "rows": rows, "torch": torch.__version__})


if __name__ == "__main__":
    main()
