"""Seconds per iteration of a CLIP GKL-KD step relative to a KL-KD step and a no-KD step, in one process.

All three run through the real engine (`Engine.train_step` with `ClipStep`: teacher forward under
inference_mode, student forward/backward, the contrastive loss, AdamW, the logit-scale clamp) with the
same teacher, the same student weights and the same batch; only the distillation term differs (GKL with
sample-wise weights at t = 8, Hinton's KL-KD at t = 8, none). Steps alternate so machine drift affects
all three. Target (issue 16): GKL-KD ≤ 1.05× the KL-KD time. It also times the teacher's forward alone,
the share of a step that a pre-computed teacher cache could save at best.

    python benchmarks/bench_clip_step.py                                   # CPU: gkl-tiny-clip(-teacher), 32 px, batch 128
    python benchmarks/bench_clip_step.py --device cuda --student ViT-B-16 --teacher ViT-L-14 --size 224 --batch 256 --amp bf16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _report import report

from gklcli.models.clip import create_clip
from gklcli.pairs import write_synthetic_shards
from gklcli.recipes import load_recipe, resolve_recipe_path
from gklcli.train.clip import ClipStep, ClipWorkload, load_clip_teacher
from gklcli.train.engine import Engine

ROWS = (("GKL-KD", "datacomp15m_vitl14_vitb16"), ("KL-KD", "datacomp15m_vitl14_vitb16_kd_t8"), ("no KD", "datacomp15m_vitb16_baseline"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="gkl-tiny-clip")
    parser.add_argument("--teacher", default="gkl-tiny-clip-teacher")
    parser.add_argument("--size", type=int, default=32, help="image size of the generated pairs (the towers' input)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--amp", default="none", choices=("none", "bf16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_shards(Path(tmp) / "pairs", shards=1, per_shard=args.batch, size=args.size, seed=0)
        torch.manual_seed(0)
        teacher_file = Path(tmp) / "teacher.pt"
        torch.save(create_clip(f"open_clip:{args.teacher}").state_dict(), teacher_file)
        engines = {}
        for name, row in ROWS:
            recipe = load_recipe(resolve_recipe_path(row), [
                f"model.arch=open_clip:{args.student}", f"teacher.arch=open_clip:{args.teacher}", f"teacher.checkpoint={teacher_file}",
                f"data.pairs={Path(tmp) / 'pairs'}", f"data.batch_size={args.batch}", f"data.samples_per_epoch={args.batch}",
                "data.num_workers=0", "data.shuffle_buffer=1", f"train.amp={args.amp}", "output.tensorboard=false"])
            engines[name] = Engine(recipe, lambda ctx, r=recipe: ClipStep(ctx, load_clip_teacher(r, ctx.module, ctx.env.device)),
                                   out_dir=Path(tmp) / name, quiet=True, device=args.device, make_workload=ClipWorkload)
        first = engines["GKL-KD"]
        for engine in engines.values():
            engine.module.load_state_dict(first.module.state_dict())
        batch = next(iter(first._train_loader(1, 0)))
        device = first.env.device
        teacher = first.step.teacher
        times: dict[str, list[float]] = {name: [] for name in [*engines, "teacher forward"]}
        for round_ in range(args.warmup + args.rounds):
            for name, engine in engines.items():
                _sync(device)
                start = time.perf_counter()
                engine.train_step(batch, 1, 1e-5)  # a tiny lr keeps the random student finite over many rounds
                _sync(device)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
            _sync(device)
            start = time.perf_counter()
            with torch.inference_mode(), first.context.autocast():
                teacher(batch["images"].to(device), batch["tokens"].to(device))
            _sync(device)
            if round_ >= args.warmup:
                times["teacher forward"].append(time.perf_counter() - start)
    base = statistics.median(times["KL-KD"])
    rows = [{"step": n, "s_per_iter": statistics.median(v), "img_s": args.batch / statistics.median(v),
             "ratio_to_kl_kd": statistics.median(v) / base} for n, v in times.items()]
    report(f"CLIP distillation step, {args.teacher} → {args.student}, {args.size}px, batch {args.batch}, amp {args.amp}, "
           f"{args.device} ({args.rounds} interleaved rounds)", ["step", "s/iter", "img/s", "× KL-KD"],
           [[r["step"], f"{r['s_per_iter']:.4f}", f"{r['img_s']:.1f}", f"{r['ratio_to_kl_kd']:.3f}"] for r in rows],
           args.json_path, {"args": vars(args), "rows": rows, "torch": torch.__version__})


if __name__ == "__main__":
    main()
