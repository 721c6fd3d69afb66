"""Seconds per iteration of a GKL-KD step relative to a KD step, measured in the same process.

Both steps run through the real engine (`Engine.train_step`: teacher forward under inference_mode,
student forward/backward, SGD) with the same teacher, the same student weights and the same batch;
only the distillation loss differs (GKL with the class prior vs Hinton's KD). Steps alternate so
machine drift affects both. Target (issue 5): GKL-KD ≤ 1.05× the KD time. The paper's Table V
compares s/iter the same way (0.197 s/iter for both IKL-KD and GKL-KD, ResNet34 → ResNet18).

`--losses` picks the steps (GKL-KD, KD, DKD, DIST: TABLE XIX's methods; ratios are to KD) and
`--mixup` adds the strong scheme's device-side path (timm Mixup/CutMix, BCE labels, argmax classes).

    python benchmarks/bench_distill_step.py                       # CPU: resnet32x4 → resnet8x4, C = 100, batch 64
    python benchmarks/bench_distill_step.py --losses gkl,kd,dkd,dist --mixup
    python benchmarks/bench_distill_step.py --device cuda --teacher resnet34 --student resnet18 --classes 1000 --size 224 --batch 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _report import report

from gklcli.models import create_model
from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.engine import Engine
from gklcli.train.kd import DistillStep, load_teacher


# --losses: the step's name and its settings on top of the CIFAR-100 GKL recipe (α 16, β 1, γ 0.05, T = T2 = 4)
LOSSES = {
    "gkl": ("GKL-KD", ["loss.name=gkl"]),
    "kd": ("KD", ["loss.name=kd", "loss.ce_weight=0.1", "loss.kd_weight=0.9"]),
    "dkd": ("DKD", ["loss.name=dkd", "loss.alpha=1", "loss.beta=8"]),
    "dist": ("DIST", ["loss.name=dist", "loss.dist_beta=1", "loss.dist_gamma=1", "loss.kd_weight=1"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--losses", default="gkl,kd", help=f"comma-separated, of {', '.join(LOSSES)} (KD is always timed)")
    parser.add_argument("--mixup", action="store_true", help="Mixup 0.1 / CutMix 1.0 and BCE labels (Hao et al.'s A2)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    names = list(dict.fromkeys([*(n.strip() for n in args.losses.split(",") if n.strip()), "kd"]))
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        parser.error(f"--losses: unknown {', '.join(unknown)}; use {', '.join(LOSSES)}")
    strong = ["data.mixup=0.1", "data.cutmix=1.0", "loss.label_loss=bce"] if args.mixup else []
    with tempfile.TemporaryDirectory() as tmp:
        teacher_file = Path(tmp) / "teacher.pth"
        torch.manual_seed(0)
        teacher = create_model(args.teacher, args.classes).to(args.device).train()
        with torch.no_grad():  # calibrate BatchNorm statistics: a random deep net's eval logits explode otherwise
            for _ in range(4):  # on the benchmark's device: ResNet-34 at 224² and batch 256 takes minutes on a CPU
                teacher(torch.rand(args.batch, 3, args.size, args.size, device=args.device))
        torch.save({"model": {k: v.cpu() for k, v in teacher.state_dict().items()}}, teacher_file)
        del teacher
        engines = {}
        for key in names:
            name, loss = LOSSES[key]
            recipe = load_recipe(RECIPES_DIR / "kd" / "cifar100_res32x4_res8x4.yaml", [
                f"model.arch={args.student}", f"teacher.arch={args.teacher}", f"teacher.checkpoint={teacher_file}",
                "data.dataset=synthetic", f"data.synthetic.num_classes={args.classes}", f"data.synthetic.image_size={args.size}",
                f"data.synthetic.num_train={args.batch * 2}", "data.synthetic.num_test=16", f"data.batch_size={args.batch}",
                "data.num_workers=0", "output.tensorboard=false", *loss, *strong])
            engines[name] = Engine(recipe, lambda ctx, r=recipe: DistillStep(ctx, load_teacher(r, ctx.num_classes, ctx.env.device, None)),
                                   out_dir=Path(tmp) / name, quiet=True, device=args.device)
        first = next(iter(engines.values()))
        for engine in engines.values():
            engine.module.load_state_dict(first.module.state_dict())
        batch = next(iter(first._train_loader(30, 0)))
        device = first.env.device
        times: dict[str, list[float]] = {name: [] for name in engines}
        for engine in engines.values():
            engine.step.begin_epoch(30)  # after the warm-up: the full distillation term
        for round_ in range(args.warmup + args.rounds):
            for name, engine in engines.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                engine.train_step(batch, 30, 1e-4)  # a tiny lr keeps the random student finite over many rounds
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["KD"])
    rows = [{"step": n, "s_per_iter": statistics.median(v), "img_s": args.batch / statistics.median(v),
             "ratio_to_kd": statistics.median(v) / base} for n, v in times.items()]
    report(f"distillation step, {args.teacher} → {args.student}, C={args.classes}, {args.size}px, batch {args.batch}, "
           f"{args.device}{', Mixup/CutMix + BCE' if args.mixup else ''} ({args.rounds} interleaved rounds)", ["step", "s/iter", "img/s", "× KD"],
           [[r["step"], f"{r['s_per_iter']:.4f}", f"{r['img_s']:.1f}", f"{r['ratio_to_kd']:.3f}"] for r in rows],
           args.json_path, {"args": vars(args), "rows": rows, "torch": torch.__version__})


if __name__ == "__main__":
    main()
