"""Seconds per iteration of a semi-supervised step with the GKL consistency relative to the table's baseline step.

Both steps of a pair run through the real engine (`Engine.train_step`: the FixMatch forward over labelled +
weak + strong images, or Mean-Teacher's EMA-teacher forward and student forward, backward, AdamW with USB's
layer decay, the EMA update) with the same weights, the same batch and the same recipe; only the consistency
loss differs: FixMatch GKL vs FixMatch hard CE (TABLE XXII's row 1), Mean-Teacher GKL vs Mean-Teacher MSE
(row 4). Steps alternate so machine drift affects both. Target: GKL ≤ 1.05× the baseline.

    python benchmarks/bench_semi_step.py                                   # CPU: gkl-tiny-vit on 8×8, C = 100, 8 + 8 + 8
    python benchmarks/bench_semi_step.py --arch vit-small-patch2-32 --size 32 --rounds 5    # USB's ViT-S/2 (slow on a CPU)
    python benchmarks/bench_semi_step.py --device cuda --arch vit-small-patch2-32 --size 32 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _report import report

from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.engine import Engine
from gklcli.train.semi import SemiStep, SemiWorkload

PAIRS = {  # algorithm: (baseline row, GKL row)
    "FixMatch": ("cifar100_200_fixmatch_hard", "cifar100_200_fixmatch_gkl"),
    "Mean-Teacher": ("cifar100_200_meanteacher_mse", "cifar100_200_meanteacher_gkl"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gkl-tiny-vit")
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8, help="labelled images per step (unlabelled: the same, uratio 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm, pair in PAIRS.items():
            engines = {}
            for row in pair:
                recipe = load_recipe(RECIPES_DIR / "semi" / f"{row}.yaml", [
                    f"model.arch={args.arch}", "model.pretrained=null", "model.num_classes=null", "data.dataset=synthetic",
                    f"data.synthetic.num_classes={args.classes}", f"data.synthetic.image_size={args.size}",
                    f"data.synthetic.num_train={4 * args.classes}", "data.synthetic.num_test=16",
                    f"semi.num_labels={2 * args.classes}", f"data.batch_size={args.batch}", "data.num_workers=0",
                    "schedule.warmup_steps=0", "output.tensorboard=false"])
                engines[row] = Engine(recipe, SemiStep, out_dir=Path(tmp) / row, quiet=True, device=args.device,
                                      make_workload=SemiWorkload)
            base, gkl = (engines[row] for row in pair)
            gkl.module.load_state_dict(base.module.state_dict())
            if base.averager is not None:
                gkl.averager.load_state_dict(base.averager.state_dict())
            batch = next(iter(base._train_loader(1, 0)))
            device = base.env.device
            times: dict[str, list[float]] = {row: [] for row in pair}
            for round_ in range(args.warmup + args.rounds):
                for row, engine in engines.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    engine.train_step(batch, 1, 1e-5)  # a tiny lr keeps the weights (and the masks) alike over the rounds
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if round_ >= args.warmup:
                        times[row].append(time.perf_counter() - start)
            reference = statistics.median(times[pair[0]])
            for row in pair:
                median = statistics.median(times[row])
                rows.append({"algorithm": algorithm, "step": row, "loss": engines[row].recipe.loss.name,
                             "s_per_iter": median, "ratio_to_baseline": median / reference})
    report(f"semi-supervised step, {args.arch}, C={args.classes}, {args.size}px, {args.batch} labelled + {args.batch} "
           f"unlabelled, {args.device} ({args.rounds} interleaved rounds)", ["algorithm", "recipe", "loss", "s/iter", "× baseline"],
           [[r["algorithm"], r["step"], r["loss"], f"{r['s_per_iter']:.4f}", f"{r['ratio_to_baseline']:.3f}"] for r in rows],
           args.json_path, {"args": vars(args), "rows": rows, "torch": torch.__version__})


if __name__ == "__main__":
    main()
