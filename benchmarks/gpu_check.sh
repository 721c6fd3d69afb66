#!/usr/bin/env bash
# The GPU check of gkl: one command, one GPU, under 8 minutes, one JSON and one markdown file.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine: every part on cuda
#   bash benchmarks/gpu_check.sh --cpu-smoke           # (or GKL_GPU_CHECK_DRY=1) every part on CPU at tiny sizes:
#                                                      #   proves the plumbing in about 3 minutes; its numbers mean nothing
#   OUT=dir bash benchmarks/gpu_check.sh               # output folder (default: gpu_check_out)
#   GKL_PYTHON=/path/python bash benchmarks/gpu_check.sh   # use this interpreter (it must import torch)
#   GKL_GPU_CHECK_NO_INSTALL=1 ...                     # never pip install (offline: saves the install's timeout)
#
# Writes $OUT/gpu_check.json and $OUT/gpu_check.md, and each part's log (and JSON) under $OUT/parts/.
# Parts, in order, each under its own `timeout` (a part that fails or hangs is recorded as failed or
# timeout with its last lines, and the script goes on):
#
#   part        budget  what
#   env           20 s  interpreter, torch/CUDA/cuDNN versions, GPU name and memory, nvidia-smi
#   tests         85 s  GKL_TEST_DEVICE=cuda pytest -m device: the device-sensitive part of the suite on the GPU
#   losses        25 s  benchmarks/bench_losses.py --device cuda: kl_div vs gkl_loss vs naive, time and peak memory
#   at_fp32       45 s  bench_train_step.py WRN-34-10, C=100, batch 128, fp32: GKL-AT, TRADES, official-style anchor
#   at_bf16_cl    35 s  the same in bf16 autocast + channels_last: GKL-AT and the (fp32) official-style anchor
#   kd            45 s  bench_distill_step.py ResNet-34 → ResNet-18, 1000 classes, 224², batch 256: GKL-KD vs KD
#   clip          40 s  bench_clip_step.py OpenCLIP ViT-L/14 → ViT-B/16, 224², batch 128, bf16: GKL-KD vs KL-KD vs no KD
#   seg           35 s  bench_seg_step.py PSPNet-R101 → PSPNet-R18, 473², batch 8, 150 classes: APD+GKL vs APD (KL), peak memory
#   eval          70 s  bench_eval.py: gkl eval-aa vs pyautoattack called directly, AutoAttack standard, 1,000 images
#   at_compile    50 s  bf16 + channels_last + torch.compile, GKL-AT only (compilation dominates: last on purpose)
#                ----
#                450 s  + environment detection and the report: under 8 minutes. A global deadline
#                       (GKL_GPU_CHECK_DEADLINE, 465 s) caps each part at the time left, so a slow set-up
#                       (a pip install) shortens or skips the last parts instead of overrunning.
#
# Data: no download is possible on the GPU machine, so nothing uses CIFAR or ImageNet. The AT and KD
# benchmarks train randomly initialised networks on seeded synthetic images; the evaluation uses
# AutoAttack's example CIFAR-10 ResNet-18 checkpoint shipped inside the pyautoattack package, on seeded
# random images labelled with its own predictions. Speeds are real; accuracies are meaningless.
#
# Environment: the first interpreter that imports torch (with CUDA, unless --cpu-smoke) among
# $GKL_PYTHON, ./.venv, ./.venv-gpu-check, python3, python. If gkl's dependencies are missing, it
# creates a venv (--system-site-packages, so an installed CUDA torch is reused) and runs
# pip install -e ".[test]"; without internet that fails, which is printed and recorded, and the
# parts that need the missing modules fail on their own.

set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DRY=${GKL_GPU_CHECK_DRY:-0}
for arg in "$@"; do
  case $arg in
    --cpu-smoke | --dry) DRY=1 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
[[ $DRY == 0 ]] || DRY=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT/parts" || exit 2
OUT=$(cd "$OUT" && pwd)
PARTS=$OUT/parts
rm -f "$PARTS"/* "$OUT/gpu_check.json" "$OUT/gpu_check.md"
STATUS=$PARTS/status.tsv
: > "$STATUS"
DEADLINE=${GKL_GPU_CHECK_DEADLINE:-465}
RESERVE=15 # seconds kept for the report
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
SECONDS=0
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" # gkl from this checkout, installed or not
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

log() { printf '[gpu_check %3ds] %s\n' "$SECONDS" "$*"; }

# run_part NAME BUDGET_S COMMAND... : run under `timeout`, log to parts/NAME.log, one line in status.tsv
run_part() {
  local name=$1 budget=$2
  shift 2
  local left=$((DEADLINE - RESERVE - SECONDS))
  if ((left < 10)); then
    log "$name: skipped, ${left}s left before the deadline"
    echo "skipped: out of time (${left}s left of the ${DEADLINE}s deadline)" > "$PARTS/$name.log"
    printf '%s\tskipped\t-\t0\t%s\n' "$name" "$budget" >> "$STATUS"
    return 0
  fi
  ((budget > left)) && budget=$left
  log "$name (timeout ${budget}s): $*"
  local start=$SECONDS rc status=passed
  {
    echo "\$ $*"
    timeout -k 5 "$budget" "$@"
  } > "$PARTS/$name.log" 2>&1
  rc=$?
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
  log "$name: $status (exit $rc, $((SECONDS - start))s)"
  if ((rc != 0)); then tail -n 6 "$PARTS/$name.log" | sed 's/^/      | /'; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$budget" >> "$STATUS"
  return 0
}

# ------------------------------------------------------------------------------ the environment
NEED_CUDA=$((1 - DRY))
SETUP=$PARTS/setup.log
: > "$SETUP"
note() { echo "$*" >> "$SETUP" && echo "$*" >&2; } # stderr: find_python's stdout is its answer

has_torch() { # has_torch PYTHON: imports torch (and sees a GPU unless --cpu-smoke)
  timeout 60 "$1" -c "import sys, torch; sys.exit(0 if $NEED_CUDA == 0 or torch.cuda.is_available() else 3)" > /dev/null 2>&1
}
deps_ok() { # gklcli first: its compat shim lets robustbench import (robustbench 1.1.1 imports `autoattack`)
  timeout 60 "$1" -c "from gklcli.compat import import_robustbench; import torch, torchvision, typer, rich, yaml, numpy, matplotlib, \
pyautoattack, pytest; import_robustbench()" > /dev/null 2> "$TMPD/deps.err" && return 0
  note "setup: $1: $(grep -E 'Error|error' "$TMPD/deps.err" | tail -n 1)"
  return 1
}
find_python() {
  local cand
  for cand in "${GKL_PYTHON:-}" "$ROOT/.venv/bin/python" "$ROOT/.venv-gpu-check/bin/python" python3 python; do
    [[ -n $cand ]] && command -v "$cand" > /dev/null 2>&1 || continue
    if has_torch "$cand"; then
      command -v "$cand"
      return 0
    fi
    note "setup: $cand: no torch$( ((NEED_CUDA)) && echo ' with CUDA')"
  done
  return 1
}

PY=$(find_python) || PY=""
if [[ -n $PY ]] && deps_ok "$PY"; then
  note "setup: using $PY (torch and every gkl dependency import)"
else
  if [[ -n $PY ]]; then note "setup: $PY imports torch but not every gkl dependency"; else note "setup: no interpreter imports torch$( ((NEED_CUDA)) && echo ' with CUDA')"; fi
  BASE=${PY:-$(command -v python3 || command -v python || true)}
  VENV_PY=""
  if [[ -z $BASE ]]; then
    note "setup: FAILED: no python3 on PATH"
  elif [[ -n $PY ]] && "$PY" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
    VENV_PY=$PY # already a virtual environment: complete it
  else
    VENV=$ROOT/.venv
    [[ -e $VENV ]] && VENV=$ROOT/.venv-gpu-check
    note "setup: $BASE -m venv --system-site-packages $VENV"
    if "$BASE" -m venv --system-site-packages "$VENV" >> "$SETUP" 2>&1; then VENV_PY=$VENV/bin/python; else note "setup: FAILED: python -m venv (is python3-venv installed?)"; fi
  fi
  if [[ -n $VENV_PY && ${GKL_GPU_CHECK_NO_INSTALL:-0} != 0 ]]; then
    note "setup: GKL_GPU_CHECK_NO_INSTALL is set: no pip install"
  elif [[ -n $VENV_PY ]]; then
    note "setup: $VENV_PY -m pip install -e '.[test]' (timeout 200 s)"
    start=$SECONDS
    if timeout 200 "$VENV_PY" -m pip install --disable-pip-version-check --progress-bar off --retries 1 --timeout 15 \
      -e "$ROOT[test]" > "$PARTS/install.log" 2>&1; then
      note "setup: pip install done ($((SECONDS - start)) s)"
    else
      note "setup: FAILED: pip install -e '.[test]' ($((SECONDS - start)) s; no internet or no package index?). Its last lines:"
      tail -n 8 "$PARTS/install.log" | sed 's/^/      | /' | tee -a "$SETUP" >&2
    fi
    if has_torch "$VENV_PY"; then PY=$VENV_PY; fi
    if [[ -n $PY ]] && ! deps_ok "$PY"; then note "setup: still missing (see the import error above); the parts that need them will fail"; fi
  fi
fi
if [[ -z $PY ]]; then
  note "setup: FAILED: no interpreter imports torch$( ((NEED_CUDA)) && echo ' with CUDA'); every part will fail"
  PY=$(command -v python3 || command -v python || echo python3)
fi
REPORT_PY=$PY
"$REPORT_PY" -c "pass" > /dev/null 2>&1 || REPORT_PY=python3

cat > "$TMPD/env.py" << 'EOF'
"""The machine: interpreter, torch, CUDA, cuDNN, GPU; JSON on stdout's last line."""
import json, os, platform, shutil, subprocess, sys
from importlib import metadata

info = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(), "cpu_count": os.cpu_count()}
for dist in ("torch", "torchvision", "pyautoattack", "robustbench", "gklcli", "pytest"):
    try:
        info[f"{dist}_version"] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        info[f"{dist}_version"] = None
try:
    import torch
except Exception as exc:  # recorded, so the report says why every other part failed
    info["torch_error"] = f"{type(exc).__name__}: {exc}"
    print("ENV_JSON " + json.dumps(info))
    sys.exit(1)

info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available(),
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            tf32_defaults={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn_conv": torch.backends.cudnn.allow_tf32})
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                gpu_memory_gib=round(p.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported())
    torch.ones(1, device="cuda").sum().item()  # a kernel runs
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_mode", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=15)
    info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
print(json.dumps(info, indent=2))
print("ENV_JSON " + json.dumps(info))
EOF

# ------------------------------------------------------------------------------ the parts
if ((DRY)); then
  MODE=cpu-smoke
  TEST_DEVICE=cpu
  LOSSES=(--device cpu --repeats 3)
  AT=(--device cpu --arch resnet8 --num-classes 10 --batch 32 --size 8 --rounds 1 --warmup 0)
  KD=(--device cpu --teacher resnet8 --student resnet8 --classes 10 --size 8 --batch 16 --rounds 1 --warmup 0)
  CLIP=(--device cpu --batch 16 --rounds 1 --warmup 0)
  SEG=(--device cpu --student pspnet-tiny --teacher pspnet-tiny --size 33 --batch 2 --classes 8 --rounds 1 --warmup 0)
  EVAL=(--device cpu --n 1 --batch-size 1 --rounds 1 --no-shards --version custom --attacks apgd-ce)
  # compile: inductor's C++ build takes longer than 20 s on a small CPU; the smoke run then shows the timeout path
  B_TESTS=60 B_LOSSES=25 B_AT32=45 B_AT16=45 B_KD=45 B_CLIP=30 B_SEG=20 B_EVAL=60 B_COMPILE=20 DEADLINE=${GKL_GPU_CHECK_DEADLINE:-205}
  # three device-aware tests (the selection, the fixture, the report's test counts), not the whole part
  TEST_SELECT=(-m device -k "test_gkl_loss_and_class_prior_on_the_test_device or hand_computation or prior_is_fed")
else
  MODE=gpu
  TEST_DEVICE=cuda
  LOSSES=(--device cuda --naive-limit-gb 40) # the naive B×C×C formula at C = 1000 too (~16 GB)
  AT=(--device cuda --arch wrn-34-10 --num-classes 100 --batch 128 --rounds 8 --warmup 2)
  KD=(--device cuda --teacher resnet34 --student resnet18 --classes 1000 --size 224 --batch 256 --rounds 10 --warmup 3)
  CLIP=(--device cuda --student ViT-B-16 --teacher ViT-L-14 --size 224 --batch 128 --amp bf16 --rounds 8 --warmup 2)
  SEG=(--device cuda --size 473 --batch 8 --classes 150 --rounds 6 --warmup 2)
  EVAL=(--device cuda --n 1000 --batch-size 500 --rounds 1 --no-shards)
  B_TESTS=85 B_LOSSES=25 B_AT32=45 B_AT16=35 B_KD=45 B_CLIP=40 B_SEG=35 B_EVAL=70 B_COMPILE=50 # the budget table at the top
  TEST_SELECT=(-m device)
fi
log "mode $MODE, python $PY, output $OUT, deadline ${DEADLINE}s"

run_part env 20 "$PY" "$TMPD/env.py"
run_part tests "$B_TESTS" env GKL_TEST_DEVICE="$TEST_DEVICE" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
  --junitxml="$PARTS/tests.xml" "${TEST_SELECT[@]}" tests
run_part losses "$B_LOSSES" "$PY" benchmarks/bench_losses.py "${LOSSES[@]}" --json "$PARTS/losses.json"
run_part at_fp32 "$B_AT32" "$PY" benchmarks/bench_train_step.py "${AT[@]}" --steps gkl,trades,official --json "$PARTS/at_fp32.json"
run_part at_bf16_cl "$B_AT16" "$PY" benchmarks/bench_train_step.py "${AT[@]}" --amp bf16 --channels-last --steps gkl,official \
  --json "$PARTS/at_bf16_cl.json"
run_part kd "$B_KD" "$PY" benchmarks/bench_distill_step.py "${KD[@]}" --json "$PARTS/kd.json"
run_part clip "$B_CLIP" "$PY" benchmarks/bench_clip_step.py "${CLIP[@]}" --json "$PARTS/clip.json"
run_part seg "$B_SEG" "$PY" benchmarks/bench_seg_step.py "${SEG[@]}" --json "$PARTS/seg.json"
run_part eval "$B_EVAL" "$PY" benchmarks/bench_eval.py "${EVAL[@]}" --json "$PARTS/eval.json"
run_part at_compile "$B_COMPILE" "$PY" benchmarks/bench_train_step.py "${AT[@]}" --amp bf16 --channels-last --compile \
  --steps gkl --json "$PARTS/at_compile.json"

# ------------------------------------------------------------------------------ the report
cat > "$TMPD/report.py" << 'EOF'
"""gpu_check.json and gpu_check.md from parts/ (standard library only: it must work when torch does not)."""
import datetime, json, subprocess, sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, root, mode, seconds, deadline, python = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
parts_dir = out / "parts"
TITLES = {"env": "environment", "tests": "test suite (device-aware part, GKL_TEST_DEVICE)", "losses": "loss benchmark",
          "at_fp32": "AT step, fp32 (+ TRADES, official-style anchor)", "at_bf16_cl": "AT step, bf16 + channels_last",
          "kd": "KD step", "clip": "CLIP distillation step", "seg": "segmentation distillation step", "eval": "gkl eval-aa vs pyautoattack direct", "at_compile": "AT step, bf16 + channels_last + torch.compile"}


def tail(path, n=15):
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def git(*args):
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


parts = []
for line in (parts_dir / "status.tsv").read_text().splitlines():
    name, status, rc, took, budget = line.split("\t")
    part = {"name": name, "title": TITLES.get(name, name), "status": status, "exit_code": None if rc == "-" else int(rc),
            "seconds": int(took), "timeout_s": int(budget), "log": f"parts/{name}.log"}
    result = parts_dir / f"{name}.json"
    if result.is_file():
        try:
            part["result"] = json.loads(result.read_text())
        except ValueError:
            pass
    if status != "passed":
        part["last_lines"] = tail(parts_dir / f"{name}.log")
    parts.append(part)
by_name = {p["name"]: p for p in parts}

env = {}
for line in tail(parts_dir / "env.log", 200):
    if line.startswith("ENV_JSON "):
        env = json.loads(line[len("ENV_JSON "):])
if "env" in by_name:
    by_name["env"]["result"] = env

tests = None
xml = parts_dir / "tests.xml"
if xml.is_file():
    try:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        failed = []
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "message": (bad.get("message") or "")[:300]})
        tests = {"collected": n, "passed": n - failures - errors - skipped, "failed": failures, "errors": errors,
                 "skipped": skipped, "seconds": float(suite.get("time", 0)), "failures": failed}
        by_name["tests"]["result"] = tests
    except Exception as exc:  # a truncated file after a timeout
        tests = {"error": f"tests.xml unreadable: {exc}"}

summary = {
    "mode": mode,
    "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    "python": python, "total_seconds": seconds, "deadline_s": deadline,
    "gpu": env.get("gpu"), "torch": env.get("torch"), "cuda": env.get("cuda_build"), "cudnn": env.get("cudnn"),
    "counts": {s: sum(p["status"] == s for p in parts) for s in ("passed", "failed", "timeout", "skipped")},
    "setup": tail(parts_dir / "setup.log", 40),
    "data": "synthetic images and random initialisations (AT, KD); AutoAttack's example ResNet-18 checkpoint from the "
            "pyautoattack package on seeded random images labelled by its predictions (eval). No CIFAR/ImageNet: "
            "nothing can be downloaded there. Speeds are real, accuracies meaningless.",
    "tests": tests, "parts": parts,
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "—"


md = [f"# gkl GPU check ({mode})", ""]
if mode != "gpu":
    md += ["**CPU smoke run**: every part on the CPU at toy sizes to prove the plumbing; the numbers mean nothing.", ""]
md += [f"{summary['date_utc']} UTC, commit `{summary['git_commit'][:12] or '?'}`{' (+ local changes)' if summary['git_dirty'] else ''}, "
       f"{seconds} s in all (deadline {deadline} s).", "",
       f"* GPU: {env.get('gpu') or 'none'}" + (f" ({env.get('gpu_memory_gib')} GiB, sm {env.get('capability')}, {env.get('gpu_count')} visible)" if env.get("gpu") else ""),
       f"* torch {env.get('torch') or '?'}, CUDA {env.get('cuda_build') or '—'}, cuDNN {env.get('cudnn') or '—'}, "
       f"Python {env.get('python') or '?'}, {env.get('cpu_count') or '?'} CPUs; pyautoattack {env.get('pyautoattack_version') or '—'}",
       f"* nvidia-smi: {env.get('nvidia_smi') or '—'}", f"* interpreter: `{python}`"
       + (f" — **{env['torch_error']}**" if env.get("torch_error") else ""), f"* data: {summary['data']}", "",
       "| part | status | seconds | timeout |", "|---|---|---:|---:|"]
md += [f"| {p['title']} | **{p['status']}** | {p['seconds']} | {p['timeout_s']} |" for p in parts]
md.append("")
if tests and "collected" in tests:
    md += ["## Tests", "", f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
           f"of {tests['collected']} ({tests['seconds']:.0f} s).", ""]
    md += [f"* FAILED `{f['test']}`: {f['message'].splitlines()[0] if f['message'] else ''}" for f in tests["failures"]]
    md.append("")


def rows(name):
    return ((by_name.get(name) or {}).get("result") or {}).get("rows") or []


if rows("losses"):
    md += ["## Loss (`bench_losses.py`)", "", "| B | C | method | ms | × kl_div | peak MB | memory × kl_div |", "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows("losses"):
        if "skipped" in r:
            md.append(f"| {r['B']} | {r['C']} | {r['method']} | skipped: {r['skipped']} | | | |")
            continue
        md.append(f"| {r['B']} | {r['C']} | {r['method']} | {fmt(r.get('ms'), '.3f')} | "
                  f"{fmt(r.get('time_ratio'), '.2f')} | {fmt(r.get('peak_mb'), '.2f')} | {fmt(r.get('mem_ratio'), '.2f')} |")
    md.append("")
at = [(n, r) for n in ("at_fp32", "at_bf16_cl", "at_compile") for r in rows(n)]
if at:
    anchor = next((r["median_s"] for n, r in at if n == "at_fp32" and r.get("key") == "official"), None)
    md += ["## Adversarial-training step (`bench_train_step.py`)", "",
           "The official-style step is the anchor: the released loop in plain PyTorch, fp32, contiguous. fp32 means "
           f"PyTorch's defaults: TF32 allowed in cuDNN convolutions {(env.get('tf32_defaults') or {}).get('cudnn_conv')}, "
           f"in matmuls {(env.get('tf32_defaults') or {}).get('matmul')}.", "",
           "| run | step | s/step | img/s | × TRADES | × official (same run) | speed-up vs fp32 official | peak GiB |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for n, r in at:
        md.append(f"| {TITLES[n].removeprefix('AT step, ')} | {r['step']} | {fmt(r['median_s'], '.4f')} | {fmt(r['img_s'], '.1f')} | "
                  f"{fmt(r.get('ratio_to_trades'), '.3f')} | {fmt(r.get('speedup_vs_official'), '.2f')} | "
                  f"{fmt(anchor / r['median_s'] if anchor else None, '.2f')} | {fmt(r.get('peak_gib'), '.1f')} |")
    md.append("")
if rows("kd"):
    a = by_name["kd"]["result"].get("args", {})
    md += [f"## Distillation step (`bench_distill_step.py`): {a.get('teacher')} → {a.get('student')}, {a.get('size')}², batch {a.get('batch')}, "
           f"{a.get('classes')} classes", "", "| step | s/iter | img/s | × KD |", "|---|---:|---:|---:|"]
    md += [f"| {r['step']} | {fmt(r['s_per_iter'], '.4f')} | {fmt(r['img_s'], '.1f')} | {fmt(r['ratio_to_kd'], '.3f')} |" for r in rows("kd")]
    md.append("")
if rows("clip"):
    a = by_name["clip"]["result"].get("args", {})
    md += [f"## CLIP distillation step (`bench_clip_step.py`): {a.get('teacher')} → {a.get('student')}, {a.get('size')}², "
           f"batch {a.get('batch')}, amp {a.get('amp')}", "", "| step | s/iter | img/s | × KL-KD |", "|---|---:|---:|---:|"]
    md += [f"| {r['step']} | {fmt(r['s_per_iter'], '.4f')} | {fmt(r['img_s'], '.1f')} | {fmt(r['ratio_to_kl_kd'], '.3f')} |" for r in rows("clip")]
    md.append("")
if rows("seg"):
    a = by_name["seg"]["result"].get("args", {})
    md += [f"## Segmentation distillation step (`bench_seg_step.py`): {a.get('teacher')} → {a.get('student')}, {a.get('size')}², "
           f"batch {a.get('batch')}, {a.get('classes')} classes", "", "| step | s/iter | img/s | × APD (KL) | peak GiB |", "|---|---:|---:|---:|---:|"]
    md += [f"| {r['step']} | {fmt(r['s_per_iter'], '.4f')} | {fmt(r['img_s'], '.2f')} | {fmt(r['ratio_to_apd'], '.3f')} | "
           f"{fmt(r['peak_bytes'] / 2**30 if r.get('peak_bytes') else None, '.1f')} |" for r in rows("seg")]
    md.append("")
if rows("eval"):
    a = by_name["eval"]["result"].get("args", {})
    md += [f"## AutoAttack (`bench_eval.py`): {a.get('version')}, {a.get('n')} images, batch {a.get('batch_size')}", "",
           "| run | seconds | img/s | ratio |", "|---|---:|---:|---:|"]
    md += [f"| {r['run']} | {fmt(r['seconds'], '.1f')} | {fmt(r['img_s'], '.2f')} | {fmt(r['ratio'], '.3f')} |" for r in rows("eval")]
    md.append("")
bad = [p for p in parts if p["status"] != "passed"]
if bad:
    md += ["## Parts that did not pass", ""]
    for p in bad:
        md += [f"### {p['title']}: {p['status']} (exit {p['exit_code']}, {p['seconds']} s of {p['timeout_s']} s)", "", "```", *p.get("last_lines", []), "```", ""]
md += ["## Set-up", "", "```", *summary["setup"], "```", ""]
(out / "gpu_check.md").write_text("\n".join(md))
print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}: " + ", ".join(f"{v} {k}" for k, v in summary["counts"].items()))
EOF

log "report"
if ! "$REPORT_PY" "$TMPD/report.py" "$OUT" "$ROOT" "$MODE" "$SECONDS" "$DEADLINE" "$PY"; then
  echo "gpu_check.sh: the report failed; the raw results are in $PARTS" >&2
  exit 1
fi
log "done"
