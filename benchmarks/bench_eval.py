"""Throughput of `gkl eval-aa` against pyautoattack called directly, and the speed-up of 2 shards.

Model: AutoAttack's own example CIFAR-10 ResNet-18 (`pyautoattack/examples/model_test.pt`, loaded
into gkl's `resnet-18`). Data: seeded random images labelled with the model's clean predictions, so
every point starts robust and the attacks do real work. Both paths run the same AutoAttack version,
ε, seed and batch size; they alternate for `--rounds` rounds and the medians are compared
(target: gkl ≥ 0.97× the direct images/s). Then the same evaluation runs as one process and as two
`gkl eval-aa --shard i/2` processes at once (each with half the CPU threads), and a merge.

    python benchmarks/bench_eval.py                       # CPU, 32 images, AutoAttack standard
    python benchmarks/bench_eval.py --device cuda --n 1000 --batch-size 500
    python benchmarks/bench_eval.py --device cuda --n 1000 --batch-size 500 --rounds 1 --no-shards   # gkl vs direct only
    python benchmarks/bench_eval.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import report

from gklcli.evaluate import EvalConfig, run_evaluation
from gklcli.loading import load_model_file


def example_model(root: Path) -> Path:
    """AutoAttack's example checkpoint as a plain state dict file."""
    import pyautoattack

    src = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    state = torch.load(src, map_location="cpu", weights_only=True)
    torch.save(state, root / "model.pt")
    return root / "model.pt"


def make_data(model: torch.nn.Module, n: int, root: Path) -> tuple[torch.Tensor, torch.Tensor, Path]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=gen)
    x = (x * 255).round() / 255  # exactly representable as uint8, so the npz round-trips
    with torch.no_grad():
        y = model(x).argmax(1)
    path = root / "data.npz"
    np.savez(path, image=(x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), label=y.numpy())
    return x.contiguous(), y, path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cli(args: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "gklcli", "eval-aa", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--version", default="standard")
    parser.add_argument("--attacks", help="with --version custom: comma-separated attacks, e.g. apgd-ce (a quick CPU check)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-shards", action="store_true", help="skip the CLI part (one process vs two shards + merge)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    attacks = [a.strip() for a in args.attacks.split(",")] if args.attacks else None
    if (args.version == "custom") != bool(attacks):
        parser.error("--attacks goes with --version custom, and --version custom needs --attacks")
    from pyautoattack import AutoAttack

    device = torch.device(args.device)
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = example_model(root)
        loaded = load_model_file(ckpt, arch="resnet-18", device=device)
        x, y, npz = make_data(loaded.module.cpu(), args.n, root)
        loaded.module.to(device)
        cfg = EvalConfig(dataset=f"npz:{npz}", n_ex=args.n, batch_size=args.batch_size, version=args.version, attacks=attacks)
        extra = {"attacks": attacks} if attacks else {}

        def direct() -> None:
            AutoAttack(loaded.module, device=device, eps=8 / 255, norm="Linf", seed=0, version=args.version, **extra).run_standard_evaluation(
                x, y, batch_size=args.batch_size)

        def ours(i: int) -> None:
            run_evaluation(loaded, x, y, cfg, root / f"gkl{i}", device=device, overwrite=True)

        times = {"pyautoattack direct": [], "gkl eval-aa": []}
        for i in range(args.rounds):
            times["pyautoattack direct"].append(timed(direct))
            times["gkl eval-aa"].append(timed(lambda: ours(i)))
        base = statistics.median(times["pyautoattack direct"])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append({"run": name, "seconds": median, "img_s": args.n / median, "ratio": base / median})

        same = None
        if not args.no_shards:  # the CLI as one process vs two shards at once, then --merge
            common = [str(ckpt), "--arch", "resnet-18", "--dataset", f"npz:{npz}", "--n-ex", str(args.n), "--batch-size",
                      str(args.batch_size), "--version", args.version, "--chunk-size", str((args.n + 1) // 2), "-q", "--device", args.device]
            if attacks:
                common += ["--attacks", ",".join(attacks)]
            one = timed(lambda: cli([*common, "--out", str(root / "one")], threads).wait())
            start = time.perf_counter()
            procs = [cli([*common, "--shard", f"{i}/2", "--out", str(root / f"s{i}")], max(1, threads // 2)) for i in range(2)]
            codes = [p.wait() for p in procs]
            two = time.perf_counter() - start
            if any(codes):
                raise SystemExit(f"a shard failed: {[p.stderr.read().decode()[-500:] for p in procs]}")
            subprocess.run([sys.executable, "-m", "gklcli", "eval-aa", "--merge", str(root / "s0"), "--merge", str(root / "s1"),
                            "--out", str(root / "merged")], check=True, stdout=subprocess.DEVNULL)
            same = json.loads((root / "one" / "results.json").read_text())["robust_acc"] == json.loads(
                (root / "merged" / "results.json").read_text())["robust_acc"]
            rows.append({"run": "1 process (CLI)", "seconds": one, "img_s": args.n / one, "ratio": 1.0})
            rows.append({"run": "2 shards in parallel (CLI)", "seconds": two, "img_s": args.n / two, "ratio": one / two})
    report(f"AutoAttack {args.version}, ResNet-18, {args.n} images, batch {args.batch_size}, {args.device} "
           f"({threads} threads)" + (f"; merged shards equal one process: {same}" if same is not None else ""), ["run", "seconds", "img/s", "ratio"],
           [[r["run"], f"{r['seconds']:.1f}", f"{r['img_s']:.2f}", f"{r['ratio']:.3f}"] for r in rows],
           args.json_path, {"args": vars(args), "rows": rows, "merged_equals_one": same})


if __name__ == "__main__":
    main()
