"""Seconds per iteration and memory of an APD+GKL segmentation step relative to APD (pixel KL), in one process.

Both run through the real engine (`Engine.train_step` with `SegStep`: the frozen teacher's forward, the
student's forward/backward, the pixel term on every pixel at the crop size, APD's prototype terms and the
teacher adapter's Adam step, SGD) with the same teacher, the same student weights and the same batch; only
the pixel term differs (GKL with class-wise weights, pixels as samples, vs APD's KL). Steps alternate so
machine drift affects both. Targets (issue 18): APD+GKL ≤ 1.05× the APD step time, and no pixels×C×C
tensor. Memory: on CUDA the peak allocated bytes of a step (`torch.cuda.max_memory_allocated`); on any
device the bytes the pixel term keeps for its backward (autograd's saved tensors), beside the size a
pixels×C×C tensor would have. A third line, "no KD", is the student alone (the baseline row).

    python benchmarks/bench_seg_step.py                          # CPU: pspnet-r18 ← pspnet-r101 at 97², batch 2, 150 classes
    python benchmarks/bench_seg_step.py --device cuda --size 473 --batch 8 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _report import interleaved, report

from gklcli.losses import LossTerm
from gklcli.models import create_model
from gklcli.recipes import load_recipe, resolve_recipe_path
from gklcli.seg_data import write_synthetic_ade20k
from gklcli.seg_losses import pixel_distillation
from gklcli.train.engine import Engine
from gklcli.train.seg import SegStep, SegWorkload, load_seg_teacher, uses_teacher

ROWS = (("APD (KL)", "seg/ade20k_psp101_psp18_apd"), ("APD+GKL", "seg/ade20k_psp101_psp18_apd_gkl"),
        ("no KD", "seg/ade20k_psp18_baseline"))


def saved_bytes(name: str, recipe, pixels: int, classes: int, device: torch.device) -> int:
    """Bytes autograd keeps for the backward of the pixel term on `pixels` pixels (1/8-resolution inputs)."""
    term = LossTerm(name, "seg", recipe.loss, classes, device)
    side = int(pixels ** 0.5)
    s = torch.randn(1, classes, side // 8 + 1, side // 8 + 1, device=device, requires_grad=True)
    t = torch.randn(1, classes, side // 8 + 1, side // 8 + 1, device=device)
    y = torch.randint(0, classes, (1, side, side), device=device)
    total = [0]

    def pack(x: torch.Tensor) -> torch.Tensor:
        total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = pixel_distillation(term, s, t, y, recipe.seg.kd_reduction)
    loss.backward()
    return total[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="pspnet-r18")
    parser.add_argument("--teacher", default="pspnet-r101")
    parser.add_argument("--size", type=int, default=97, help="crop size ((size − 1) % 8 == 0 as APD's 473)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_ade20k(Path(tmp), num_train=args.batch, num_val=1, size=args.size * 5 // 4, num_classes=args.classes)
        torch.manual_seed(0)
        teacher_file = Path(tmp) / "teacher.pth"
        torch.save({"state_dict": create_model(args.teacher, args.classes).state_dict()}, teacher_file)
        engines = {}
        for name, row in ROWS:
            recipe = load_recipe(resolve_recipe_path(row), [
                f"data.root={tmp}", f"model.arch={args.student}", "model.pretrained=null", f"teacher.arch={args.teacher}",
                f"teacher.checkpoint={teacher_file}", f"seg.num_classes={args.classes}", f"seg.crop_size={args.size}",
                f"data.batch_size={args.batch}", "data.num_workers=0", "output.tensorboard=false", "output.plots=false"])
            engines[name] = Engine(recipe, lambda ctx, r=recipe: SegStep(
                ctx, load_seg_teacher(r, args.classes, ctx.env.device, None) if uses_teacher(r) else None),
                out_dir=Path(tmp) / name.replace(" ", "_"), quiet=True, device=args.device, make_workload=SegWorkload)
        first = engines["APD+GKL"]
        for engine in engines.values():
            engine.module.load_state_dict(first.module.state_dict(), strict=engine.module.kd_adapter is not None)  # no KD: no adapter
        batch = next(iter(first._train_loader(1, 0)))
        device = first.env.device
        times, peaks = interleaved({name: lambda e=engine: e.train_step(batch, 1, 1e-5) for name, engine in engines.items()},
                                   args.rounds, args.warmup, device)
        pixels = args.batch * args.size * args.size
        saved = {name: saved_bytes(engine.recipe.loss.name, engine.recipe, pixels, args.classes, device)
                 for name, engine in engines.items() if name != "no KD"}
    base = statistics.median(times["APD (KL)"])
    rows = [{"step": n, "s_per_iter": statistics.median(v), "img_s": args.batch / statistics.median(v),
             "ratio_to_apd": statistics.median(v) / base, "peak_bytes": peaks.get(n), "pixel_term_saved_bytes": saved.get(n)}
            for n, v in times.items()]
    naive = pixels * args.classes * args.classes * 4

    def mib(x):
        return f"{x / 2**20:.1f}" if x else "-"

    report(f"Segmentation distillation step, {args.teacher} → {args.student}, {args.size}² crops × {args.batch}, {args.classes} classes, "
           f"{args.device} ({args.rounds} interleaved rounds); a pixels×C×C fp32 tensor would be {naive / 2**30:.1f} GiB",
           ["step", "s/iter", "img/s", "× APD (KL)", "peak MiB (CUDA)", "pixel term saved MiB"],
           [[r["step"], f"{r['s_per_iter']:.4f}", f"{r['img_s']:.2f}", f"{r['ratio_to_apd']:.3f}", mib(r["peak_bytes"]),
             mib(r["pixel_term_saved_bytes"])] for r in rows],
           args.json_path, {"args": vars(args), "rows": rows, "naive_pixels_c_c_bytes": naive, "torch": torch.__version__})


if __name__ == "__main__":
    main()
