"""The `gkl` command line: a thin Typer app that parses options and calls into the library.

User mistakes arrive as `GKLError` and leave as one red line on stderr with exit code 2; `--debug`
shows the traceback as well. Heavy imports (torch) happen inside the commands so `gkl --help` is fast.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gklcli import __version__
from gklcli.cli_export import COMMANDS as EXPORT_COMMANDS
from gklcli.errors import GKLError, show

app = typer.Typer(
    name="gkl",
    help="Generalized KL (GKL/DKL/IKL) loss: adversarial training, distillation, AutoAttack, RobustBench export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"gkl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
) -> None:
    """gkl: the GKL loss of Cui et al. for robustness and distillation research."""


@app.command("models")
def models_cmd(
    family: Optional[str] = typer.Option(None, help="Only this family: at, kd-cifar or imagenet."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the model registry: name, parameters, input normalisation, matching RobustBench class."""
    from gklcli.models import count_params, get_spec, list_models

    names = list_models(family)
    if not names:
        raise GKLError(f"--family {family}: no such family (at, kd-cifar, imagenet)")
    rows = []
    for name in names:
        spec = get_spec(name)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "num_classes": spec.default_num_classes,
                "params": count_params(name),
                "input_norm": spec.input_norm,
                "robustbench": spec.robustbench,
                "aliases": list(spec.aliases),
                "description": spec.description,
            }
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="gkl model registry (params for the default class count: 10 at, 100 kd-cifar, 1000 imagenet)", header_style="bold")
    for column in ("name", "family", "params (M)"):
        table.add_column(column, no_wrap=True)
    table.add_column("input normalisation", overflow="fold")
    table.add_column("RobustBench class", overflow="fold")
    for row in rows:
        table.add_row(
            row["name"],
            row["family"],
            f"{row['params'] / 1e6:.2f}",
            row["input_norm"],
            row["robustbench"] or "-",
        )
    out.print(table)


@app.command("show-recipe")
def show_recipe_cmd(
    recipe: str = typer.Argument(..., help="A recipe file, or a name from recipes/ (e.g. cifar100_basic)."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a setting: --set loss.gamma=0.4 (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of YAML."),
) -> None:
    """Print the fully resolved recipe (extends merged, overrides applied, defaults filled)."""
    from gklcli.recipes import load_recipe, resolve_recipe_path

    resolved = load_recipe(resolve_recipe_path(recipe), overrides)
    if as_json:
        out.print_json(json.dumps(resolved.to_dict()))
    else:
        sys.stdout.write(resolved.to_yaml())


def _default_out(recipe_name: str) -> str:
    return f"runs/{recipe_name}"


RECIPE_OPT = typer.Option([], "--set", "-s", help="Override a setting: --set loss.gamma=0.4 (repeatable).")
OUT_OPT = typer.Option(None, "--out", help="Output directory (default: output.dir or runs/<recipe name>).")
DATA_OPT = typer.Option(None, "--data-dir", help="Dataset root (default: data.root or ./data).")
RESUME_OPT = typer.Option(False, "--resume", help="Continue from OUT/last.pt (a finished run is left as is).")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Start over in an output directory that holds a run.")
DRY_OPT = typer.Option(False, "--dry-run", help="Print the resolved recipe and a preview of the run, then exit.")
SEEDS_OPT = typer.Option(1, "--seeds", min=1, help="Run N seeds (train.seed, +1, …) into OUT/seed<k> and report mean ± std.")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="No progress bars; one line per epoch (for log files).")
DEVICE_OPT = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available).")


LAUNCHER_OPT = typer.Option("none", "--launcher", help="none (this process), local (submitit jobs on this machine) or slurm.")
GPUS_OPT = typer.Option(1, "--gpus-per-run", min=1, help="GPUs per training run (a DDP job: Slurm tasks, or torchrun locally).")
PARTITION_OPT = typer.Option(None, "--partition", help="Slurm partition.")
TIME_OPT = typer.Option(None, "--time", help="Slurm time limit per job: minutes, HH:MM:SS or D-HH (default 72 h).")
ACCOUNT_OPT = typer.Option(None, "--account", help="Slurm account.")
QOS_OPT = typer.Option(None, "--qos", help="Slurm QOS.")
CONSTRAINT_OPT = typer.Option(None, "--constraint", help="Slurm constraint, e.g. a100.")
MEM_OPT = typer.Option(None, "--mem", help="Slurm memory per node, e.g. 64G.")
SLURM_ARG_OPT = typer.Option([], "--slurm-arg", help="Any other sbatch option as key=value (repeatable).")


def _launch(launcher: str, gpus: int, partition: Optional[str], time: Optional[str], account: Optional[str], qos: Optional[str],
            constraint: Optional[str], mem: Optional[str], slurm_args: List[str], **more) -> "LaunchOptions":
    from gklcli.launch import LaunchOptions, parse_slurm_args

    return LaunchOptions(launcher=launcher, gpus_per_run=gpus, partition=partition, time=time, account=account, qos=qos,
                         constraint=constraint, mem=mem, slurm_args=parse_slurm_args(slurm_args), **more).check()


def _train_command(kind: str, recipe: str, overrides: List[str], output: Optional[str], data_dir: Optional[str], resume: bool,
                   overwrite: bool, dry_run: bool, seeds: int, quiet: bool, device: Optional[str], launch: Any = None) -> None:
    """The shared body of `gkl train-at` and `gkl distill`: resolve, preview or run (per seed), report."""
    from gklcli.recipes import load_recipe, resolve_recipe_path

    command = {"at": "train-at", "kd": "distill", "semi": "train-semi"}[kind]
    resolved = load_recipe(resolve_recipe_path(recipe), overrides)
    kinds = ("kd", "clip-kd", "seg-kd") if kind == "kd" else (kind,)  # gkl distill: classification, CLIP or segmentation
    if resolved.kind not in kinds:
        raise GKLError(f"{recipe}: kind is {resolved.kind!r}; `gkl {command}` needs a recipe with kind: {' or '.join(kinds)}")
    if overwrite:
        resolved.output.overwrite = True
    if dry_run:
        if kind == "semi":  # its own preview: no data read
            from gklcli.train.semi import print_semi_preview as print_preview, semi_preview as run_preview
        elif resolved.kind == "seg-kd":  # ADE20K's split sizes: no data read
            from gklcli.train.seg import print_seg_preview as print_preview, seg_preview as run_preview
        else:
            from gklcli.train.preview import run_preview, print_preview
        sys.stdout.write(resolved.to_yaml())
        print_preview(run_preview(resolved), resolved, out)
        return
    from gklcli.train.engine import Interrupted
    from gklcli.train.seeds import run_seeds

    out_dir = output or resolved.output.dir or _default_out(resolved.meta.name)
    if launch is not None and launch.active:
        from pathlib import Path

        from gklcli.launch import launch_run

        if seeds > 1:
            raise GKLError("--seeds with --launcher: use gkl reproduce TABLE --seeds N --launcher …, which submits each seed")
        if launch_run(resolved, Path(out_dir), data_dir, resume, launch, out) is not None:
            out.print(f"results: {out_dir}/results.json, summary: {out_dir}/summary.md")
        return
    try:
        results = run_seeds(resolved, seeds, out_dir=out_dir, data_dir=data_dir, resume=resume, quiet=quiet, device=device, console=out)
    except Interrupted as stop:
        err.print(f"[yellow]interrupted:[/yellow] {escape(str(stop))}")
        raise typer.Exit(3)
    if os.environ.get("RANK", "0") != "0":
        return
    if seeds > 1:
        out.print(f"{seeds} seeds: {out_dir}/seeds.md")
        for key, stats in results["summary"].items():
            out.print(f"{key}: {stats['mean']:.2f} ± {stats['std']:.2f}")
        return
    out.print(f"results: {out_dir}/results.json, summary: {out_dir}/summary.md")
    for name in ("last", "best"):
        row = results.get(name) or {}
        if row:
            out.print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)))
    if results.get("top1_best") is not None:  # eval.test_every_epochs: mdistiller's best-over-epochs protocol
        out.print(f"test top-1 over epochs: best {results['top1_best']:.2f} (epoch {results['top1_best_epoch']}), "
                  f"last {results['top1_last']:.2f}")


@app.command("train-at")
def train_at_cmd(
    recipe: str = typer.Argument(..., help="An AT recipe file or name (e.g. cifar100_basic, quickstart)."),
    overrides: List[str] = RECIPE_OPT, output: Optional[str] = OUT_OPT, data_dir: Optional[str] = DATA_OPT,
    resume: bool = RESUME_OPT, overwrite: bool = OVERWRITE_OPT, dry_run: bool = DRY_OPT, seeds: int = SEEDS_OPT,
    quiet: bool = QUIET_OPT, device: Optional[str] = DEVICE_OPT, launcher: str = LAUNCHER_OPT, gpus: int = GPUS_OPT,
    partition: Optional[str] = PARTITION_OPT, time: Optional[str] = TIME_OPT, account: Optional[str] = ACCOUNT_OPT,
    qos: Optional[str] = QOS_OPT, constraint: Optional[str] = CONSTRAINT_OPT, mem: Optional[str] = MEM_OPT,
    slurm_args: List[str] = SLURM_ARG_OPT,
) -> None:
    """Adversarial training with GKL (or IKL, DKL, TRADES); runs under torchrun for multi-GPU DDP."""
    _train_command("at", recipe, overrides, output, data_dir, resume, overwrite, dry_run, seeds, quiet, device,
                   _launch(launcher, gpus, partition, time, account, qos, constraint, mem, slurm_args))


@app.command("distill")
def distill_cmd(
    recipe: str = typer.Argument(..., help="A distillation recipe file or name (e.g. cifar100_res32x4_res8x4)."),
    overrides: List[str] = RECIPE_OPT, output: Optional[str] = OUT_OPT, data_dir: Optional[str] = DATA_OPT,
    resume: bool = RESUME_OPT, overwrite: bool = OVERWRITE_OPT, dry_run: bool = DRY_OPT, seeds: int = SEEDS_OPT,
    teacher_only: bool = typer.Option(False, "--teacher-only", help="Only report the teacher's accuracy, then exit."),
    quiet: bool = QUIET_OPT, device: Optional[str] = DEVICE_OPT, launcher: str = LAUNCHER_OPT, gpus: int = GPUS_OPT,
    partition: Optional[str] = PARTITION_OPT, time: Optional[str] = TIME_OPT, account: Optional[str] = ACCOUNT_OPT,
    qos: Optional[str] = QOS_OPT, constraint: Optional[str] = CONSTRAINT_OPT, mem: Optional[str] = MEM_OPT,
    slurm_args: List[str] = SLURM_ARG_OPT,
) -> None:
    """Knowledge distillation with GKL-KD (or IKL-KD, KD, JSD) from a frozen teacher, of classifiers (kind kd),
    CLIP models (kind clip-kd, OpenCLIP) or segmentation models (kind seg-kd, APD); torchrun for DDP."""
    if teacher_only:
        from gklcli.recipes import load_recipe, resolve_recipe_path
        from gklcli.train import teacher_reporter

        resolved = load_recipe(resolve_recipe_path(recipe), overrides)
        if resolved.kind == "clip-kd":
            raise GKLError(f"{recipe}: --teacher-only is for classification teachers; a CLIP teacher's number is its zero-shot "
                           f"accuracy: gkl eval-zeroshot {resolved.teacher.arch}:{resolved.teacher.checkpoint} --dataset imagenet "
                           f"--data-dir {data_dir or 'data'}")
        report = teacher_reporter(resolved.kind)(resolved, data_dir=data_dir, device=device)
        out.print_json(json.dumps(report))
        return
    _train_command("kd", recipe, overrides, output, data_dir, resume, overwrite, dry_run, seeds, quiet, device,
                   _launch(launcher, gpus, partition, time, account, qos, constraint, mem, slurm_args))


@app.command("train-semi")
def train_semi_cmd(
    recipe: str = typer.Argument(..., help="A semi-supervised recipe file or name (e.g. cifar100_200_fixmatch_gkl)."),
    overrides: List[str] = RECIPE_OPT, output: Optional[str] = OUT_OPT, data_dir: Optional[str] = DATA_OPT,
    resume: bool = RESUME_OPT, overwrite: bool = OVERWRITE_OPT, dry_run: bool = DRY_OPT, seeds: int = SEEDS_OPT,
    quiet: bool = QUIET_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """Semi-supervised learning (USB's FixMatch / Mean-Teacher) with a GKL, CE, soft-CE or MSE consistency (TABLE XXII)."""
    _train_command("semi", recipe, overrides, output, data_dir, resume, overwrite, dry_run, seeds, quiet, device)


def _parse_list(text: Optional[str], what: str, convert) -> list:
    if not text:
        return []
    try:
        return [convert(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise GKLError(f"{what} {show(text)}: expected a comma-separated list, e.g. 10,20") from None


def _eps(text: str, option: str = "--eps") -> float:
    from gklcli.recipes import parse_number

    value = parse_number(text)
    if value is None or not 0 < value <= 1:  # inputs live in [0, 1]: an ε beyond 1 (or nan) is a typo, not a threat model
        raise GKLError(f"{option} {show(text)}: must be a number in (0, 1] such as 8/255 (inputs are in [0, 1])")
    if value > 16 / 255 + 1e-12:
        Console(stderr=True).print(f"[yellow]warning:[/] {option} {text} is above 16/255, far beyond the usual L∞ threat models")
    return value


@app.command("eval-aa")
def eval_aa_cmd(
    ckpt: Optional[str] = typer.Argument(None, help="A gkl checkpoint, a RobustBench-format file, a .pt/.safetensors state dict or hf://OWNER/NAME."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture for files that do not record it (see gkl models)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Class count when it cannot be read from the weights."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="cifar10, cifar100, npz:PATH, synthetic or digits (default: the checkpoint's)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Dataset root (default ./data)."),
    n_ex: int = typer.Option(10000, "--n-ex", min=1, help="Evaluate the first N test images (canonical order, as RobustBench)."),
    batch_size: int = typer.Option(500, "--batch-size", min=1, help="AutoAttack batch size."),
    eps: str = typer.Option("8/255", "--eps", help="Perturbation size, e.g. 8/255 or 0.5."),
    norm: str = typer.Option("Linf", "--norm", help="Linf or L2."),
    version: str = typer.Option("standard", "--version", help="standard, plus, rand or custom."),
    attacks: Optional[str] = typer.Option(None, "--attacks", help="With --version custom: e.g. apgd-ce,apgd-t."),
    seed: int = typer.Option(0, "--seed", help="AutoAttack seed (and PGD/CW starts)."),
    chunk_size: int = typer.Option(0, "--chunk-size", min=0, help="Images per resumable chunk (0: one pyautoattack call for all)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: evaluate every n-th chunk starting at i (needs --chunk-size)."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Output directory (default evals/<checkpoint or model name>)."),
    resume: bool = typer.Option(False, "--resume", help="Skip chunks already finished in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard an existing evaluation in --out."),
    merge_dirs: List[str] = typer.Option([], "--merge", help="Combine finished shard directories into --out (repeatable)."),
    eps_list: Optional[str] = typer.Option(None, "--eps-list", help="Also run AutoAttack at these ε, e.g. 2/255,4/255,6/255."),
    pgd: Optional[str] = typer.Option(None, "--pgd", help="Also PGD with these step counts, e.g. 10,20 (CE, step 2/255)."),
    cw: Optional[str] = typer.Option(None, "--cw", help="Also CW (margin loss) PGD with these step counts, e.g. 10,20."),
    individual: bool = typer.Option(False, "--individual", help="Also each attack alone on all points (per-attack robustness)."),
    robustbench_model: Optional[str] = typer.Option(None, "--robustbench-model", help="Evaluate a RobustBench zoo model from --model-dir."),
    model_dir: str = typer.Option("models", "--model-dir", help="RobustBench models directory (<dir>/<dataset>/<threat>/<name>.pt)."),
    zoo_dataset: Optional[str] = typer.Option(None, "--zoo-dataset", help="The zoo of --robustbench-model (default: --dataset)."),
    no_guards: bool = typer.Option(False, "--no-guards", help="Skip the pre-evaluation guards (recorded in the results)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    launcher: str = LAUNCHER_OPT,
    aa_shards: int = typer.Option(1, "--aa-shards", min=1, help="With --launcher: K shard jobs (a Slurm array) and a merge job."),
    partition: Optional[str] = PARTITION_OPT, time: Optional[str] = TIME_OPT, account: Optional[str] = ACCOUNT_OPT,
    qos: Optional[str] = QOS_OPT, constraint: Optional[str] = CONSTRAINT_OPT, mem: Optional[str] = MEM_OPT,
    slurm_args: List[str] = SLURM_ARG_OPT,
) -> None:
    """AutoAttack (pyautoattack) robustness with guards, resumable chunks and shards; also PGD/CW and ε sweeps."""
    from pathlib import Path

    from gklcli.evaluate import EvalConfig, ModelRef, evaluate_checkpoint

    if merge_dirs:
        from gklcli.evaluate import write_results

        target = Path(out_dir or merge_dirs[0])
        results = write_results(target, [Path(d) for d in merge_dirs], {"merged_from": merge_dirs})
    else:
        cfg = EvalConfig(dataset=dataset, n_ex=n_ex, batch_size=batch_size, eps=_eps(eps), norm=norm, version=version,
                         attacks=_parse_list(attacks, "--attacks", str) or None, seed=seed, chunk_size=chunk_size,
                         eps_list=_parse_list(eps_list, "--eps-list", lambda t: _eps(t, "--eps-list")),
                         pgd=_parse_list(pgd, "--pgd", int), cw=_parse_list(cw, "--cw", int), individual=individual,
                         guards=not no_guards, data_dir=data_dir)
        model = ModelRef(path=ckpt, arch=arch, num_classes=num_classes, robustbench=robustbench_model, model_dir=model_dir,
                         zoo_dataset=zoo_dataset)
        launch = _launch(launcher, 1, partition, time, account, qos, constraint, mem, slurm_args, aa_shards=aa_shards)
        if launch.active:
            from gklcli.launch import launch_eval

            if out_dir is None or shard or overwrite:
                raise GKLError("--launcher: give --out (the jobs write there); --aa-shards replaces --shard, and --overwrite is not for jobs")
            results = launch_eval(model, cfg.check(), Path(out_dir), launch, err)
            if results is None:
                return
        else:
            results = evaluate_checkpoint(model, cfg, out_dir, shard=shard, resume=resume, overwrite=overwrite, device=device,
                                          console=err, quiet=quiet)
        if results is None:
            out.print("this shard is done; combine the shards with: gkl eval-aa --merge DIR [--merge DIR ...] --out DIR")
            return
    line = f"clean {results['clean_acc']:.2f}% | AutoAttack ({results['version']}, ε {results['eps']}) {results['robust_acc']:.2f}%"
    out.print(line + f" on {results['n_ex']} images")
    for name, acc in results["other_attacks"].items():
        out.print(f"{name.upper()}: {acc:.2f}%")


@app.command("eval-zeroshot")
def eval_zeroshot_cmd(
    ckpt: str = typer.Argument(..., help="A gkl CLIP checkpoint (runs/…/last.pt) or open_clip:NAME:TAG_OR_FILE "
                                         "(e.g. open_clip:ViT-L-14:datacomp_xl_s13b_b90k)."),
    datasets: List[str] = typer.Option(["imagenet"], "--dataset", help="imagenet, imagenet-v2, imagenet-sketch, "
                                       "imagenet-r or folder (an ImageFolder named by class); repeatable."),
    data_dir: str = typer.Option("data", "--data-dir", help="The root holding imagenet/val, imagenet-v2, imagenet-sketch, imagenet-r."),
    templates: str = typer.Option("openai", "--templates", help="openai (80 prompts, OpenCLIP's), simple (7), or a file of {} lines."),
    wnids: Optional[str] = typer.Option(None, "--wnids", help="ImageNet's 1000 WordNet ids in class order (LOC_synset_mapping.txt), "
                                        "when no ImageNet folder under --data-dir gives it (ImageNet-R alone)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    num_workers: int = typer.Option(4, "--workers", min=0),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate this many images per dataset, spread over classes."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Write results.json here."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda if available)."),
) -> None:
    """Zero-shot top-1/top-5 of a CLIP model with OpenCLIP's class names and prompts (TABLE VII)."""
    from pathlib import Path

    from gklcli.distributed import pick_device
    from gklcli.zeroshot import zeroshot_command

    results = zeroshot_command(ckpt, list(datasets), data_dir, Path(out_dir) if out_dir else None, batch_size, num_workers,
                               pick_device(device), templates, limit, wnids=Path(wnids) if wnids else None)
    for name, row in results.items():
        skipped = f", {row['skipped']} unreadable image(s) skipped" if row.get("skipped") else ""
        out.print(f"{name}: top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}% on {row['n']:,} images, {row['classes']} classes{skipped}")
    if out_dir:
        out.print(f"results: {out_dir}/results.json")


@app.command("export-vision-tower")
def export_vision_tower_cmd(
    ckpt: str = typer.Argument(..., help="A gkl CLIP checkpoint or open_clip:NAME:TAG_OR_FILE."),
    out_dir: str = typer.Option(..., "--out", help="The folder to write (LLaVA's --vision_tower)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing folder."),
) -> None:
    """The image tower as the transformers CLIPVisionModel folder LLaVA loads (TABLE VIII), verified by loading it back."""
    from gklcli.models.clip import resolve_clip
    from gklcli.vision_export import export_vision_tower

    loaded = resolve_clip(ckpt)
    report = export_vision_tower(loaded.model, loaded.image, out_dir, source=loaded.source, arch=loaded.arch, overwrite=overwrite)
    out.print(f"wrote {out_dir} (config.json, model.safetensors, preprocessor_config.json, gkl_export.json); transformers "
              f"image features within {report['max_abs_diff']:.2g} of OpenCLIP's")
    out.print(f"LLaVA: {escape(report['llava_command_line'])}")


@app.command("reproduce")
def reproduce_cmd(
    table: Optional[str] = typer.Argument(None, help="A registry table (table1 … table24, ikl-table1 …); see --list."),
    list_tables: bool = typer.Option(False, "--list", help="List every table: rows, runs, estimated GPU-hours."),
    rows: Optional[str] = typer.Option(None, "--rows", help="Only these rows: numbers (5,7) or text of their labels (GKL-AT)."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Seeds per run (the paper averages 3); cells show mean ± std."),
    output: str = typer.Option("reproduce", "--out", help="Runs, evaluations and reports go here (smoke: OUT/smoke)."),
    data_dir: Optional[str] = DATA_OPT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (rows, paper values, runs, commands, paths) and exit."),
    smoke: bool = typer.Option(False, "--smoke", help="Every runnable row at toy scale on synthetic data (pipeline check)."),
    resume: bool = typer.Option(False, "--resume", help="Continue unfinished runs (finished ones are always reused)."),
    report_only: bool = typer.Option(False, "--report-only", help="Rebuild OUT/TABLE.md/.json from finished runs; train nothing."),
    checkpoint: str = typer.Option("last", "--checkpoint", help="last (final weights, the paper's protocol) or best (on validation)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: this process takes every n-th job (one process per GPU)."),
    launcher: str = LAUNCHER_OPT, gpus: int = GPUS_OPT,
    max_parallel: int = typer.Option(2, "--max-parallel", min=1, help="--launcher local: jobs running at once."),
    aa_shards: int = typer.Option(1, "--aa-shards", min=1, help="Split each AutoAttack evaluation into K jobs (a Slurm array) + a merge."),
    partition: Optional[str] = PARTITION_OPT, time: Optional[str] = TIME_OPT, account: Optional[str] = ACCOUNT_OPT,
    qos: Optional[str] = QOS_OPT, constraint: Optional[str] = CONSTRAINT_OPT, mem: Optional[str] = MEM_OPT,
    slurm_args: List[str] = SLURM_ARG_OPT,
    status: bool = typer.Option(False, "--status", help="Print every run and evaluation with its state (OUT/jobs.json), then exit."),
    fetch: bool = typer.Option(False, "--fetch", help="First download what the runs need and --data-dir lacks (generated data, teachers)."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="With --fetch: replace every source's origin by this URL (env GKL_MIRROR)."),
    quiet: bool = QUIET_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """Reproduce a table of the paper: runs (content-addressed, reused), evaluations, and a markdown report."""
    from pathlib import Path

    from gklcli import reproduce as rp
    from gklcli.evaluate import parse_shard

    if list_tables:
        rp.print_list(rp.list_tables(seeds), out, seeds)
        return
    if table is None:
        raise GKLError("give a table (e.g. gkl reproduce table3) or --list")
    shard_spec = parse_shard(shard)
    launch = _launch(launcher, gpus, partition, time, account, qos, constraint, mem, slurm_args, max_parallel=max_parallel,
                     aa_shards=aa_shards)
    if status:
        from gklcli.reproduce.submit import print_status

        print_status(rp.plan_for(table, rows=rows, seeds=seeds, out=Path(output), smoke=smoke, checkpoint=checkpoint,
                                 data_dir=data_dir), out)
        return
    if dry_run:
        plan = rp.plan_for(table, rows=rows, seeds=seeds, out=Path(output), smoke=smoke, checkpoint=checkpoint, data_dir=data_dir)
        rp.print_dry_run(plan, out)
        return
    from gklcli.train.engine import Interrupted

    try:
        rp.reproduce(table, rows=rows, seeds=seeds, out=Path(output), data_dir=data_dir, smoke=smoke, resume=resume,
                     report_only=report_only, checkpoint=checkpoint, shard=shard_spec, device=device, quiet=quiet,
                     console=out, fetch=fetch, mirror=mirror, launch=launch)
    except Interrupted as stop:
        err.print(f"[yellow]interrupted:[/yellow] {escape(str(stop))}; rerun with --resume to continue")
        raise typer.Exit(3)


FETCH_WHAT = "cifar10, cifar100, generated NAME, teachers cifar100|imagenet|imagenet-lt|clip, robustbench NAME, imagenet, imagenet-lt"


@app.command("fetch")
def fetch_cmd(
    what: str = typer.Argument(..., help=f"What to fetch: {FETCH_WHAT}."),
    name: Optional[str] = typer.Argument(None, help="The set (generated), the teachers' dataset (teachers) or the model (robustbench)."),
    data_dir: str = typer.Option("data", "--data-dir", help="Dataset root, where the recipes read (default ./data)."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Replace every source's origin (scheme://host) by this URL (env GKL_MIRROR)."),
    model_dir: str = typer.Option("models", "--model-dir", help="RobustBench models directory (robustbench NAME)."),
    dataset: str = typer.Option("cifar10", "--dataset", help="The zoo of robustbench NAME: cifar10, cifar100 or imagenet."),
    threat_model: str = typer.Option("Linf", "--threat-model", help="The threat model of robustbench NAME: Linf, L2, corruptions."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Download a dataset, DM-AT generated set, teachers or a RobustBench model to where gkl reads it (resumable, verified)."""
    from pathlib import Path

    from gklcli import fetch as fx

    f = fx.Fetcher(Path(data_dir), mirror, None if quiet else err)
    if what in fx.CIFAR:
        files = [fx.fetch_cifar(what, f)]
    elif what in fx.LICENSED:  # nothing to download: say what to get, and exit 2 (nothing was fetched)
        out.print(fx.LICENSED[what])
        raise typer.Exit(2)
    elif name is None and what in ("generated", "teachers", "robustbench"):
        raise GKLError(f"gkl fetch {what} needs a NAME, e.g. gkl fetch {what} "
                       + {"generated": "cifar10_1m", "teachers": "cifar100", "robustbench": "Cui2023Decoupled_WRN-34-10"}[what])
    elif what == "generated":
        files = [fx.fetch_generated(name, f)]
    elif what == "teachers":
        files = fx.fetch_teachers(name, f)
    elif what == "robustbench":
        files = [fx.fetch_robustbench(name, Path(model_dir), dataset, threat_model)]
    else:
        raise GKLError(f"gkl fetch {what}: use one of {FETCH_WHAT}")
    if what != "robustbench":
        fx.write_manifest(f, what if name is None else f"{what} {name}", files)
    for file in files:
        out.print(f"ready: {file}")


data_app = typer.Typer(help="Check dataset folders that cannot be downloaded (ImageNet, ImageNet-LT).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check_cmd(
    dataset: str = typer.Argument(..., help="imagenet, imagenet-lt or ade20k."),
    data_dir: str = typer.Option("data", "--data-dir", help="Dataset root (default ./data)."),
) -> None:
    """Verify an ImageNet / ImageNet-LT folder (layout, class count, image counts, list files) or ADE20K (pairs,
    every mask's values and size)."""
    from pathlib import Path

    from gklcli.fetch import check_imagenet
    from gklcli.seg_data import check_ade20k

    rows = check_ade20k(Path(data_dir)) if dataset == "ade20k" else check_imagenet(dataset, Path(data_dir))
    table = Table(title=f"{dataset} in {data_dir}", header_style="bold")
    for column in ("split", "images", "expected"):
        table.add_column(column)
    for split, found, expected in rows:
        table.add_row(split, f"{found:,}", f"{expected:,}")
    out.print(table)
    out.print(f"{dataset}: complete")


analyze_app = typer.Typer(help="The paper's figures from checkpoints: class margins, class scores, t-SNE.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
N_OPT = typer.Option(10000, "--n-ex", min=1, help="The first N test images.")
DATASET_OPT = typer.Option(None, "--dataset", help="cifar10, cifar100 or npz:PATH (default: the checkpoint's recipe).")
ANALYZE_OUT = typer.Option("analysis", "--out", help="A folder (or a .png path) for the PNG and its JSON.")
ARCH_OPT = typer.Option(None, "--arch", help="Architecture for files that do not record it (plain state dicts; see gkl models).")


def _analysis_done(result: dict) -> None:
    out.print(f"figure: {result['png']} (numbers: {result['png'][:-4]}.json)")


@analyze_app.command("margins")
def analyze_margins_cmd(
    ckpt_a: str = typer.Argument(..., help="Model A (e.g. GKL-AT)."), ckpt_b: str = typer.Argument(..., help="Model B (e.g. TRADES)."),
    n_ex: int = N_OPT, dataset: Optional[str] = DATASET_OPT, data_dir: Optional[str] = DATA_OPT, output: str = ANALYZE_OUT,
    pgd_steps: int = typer.Option(0, "--pgd-steps", min=0, help="Measure on PGD-k adversarial images (ε 8/255) instead of clean ones."),
    arch: Optional[str] = ARCH_OPT, device: Optional[str] = DEVICE_OPT,
) -> None:
    """Eq. (14) class margins of A minus those of B, per class, sorted (Fig. 4c)."""
    from pathlib import Path

    from gklcli import analyze
    from gklcli.distributed import pick_device

    result = analyze.margins(ckpt_a, ckpt_b, Path(output), dataset=dataset, data_dir=data_dir, n=n_ex, pgd_steps=pgd_steps,
                             arch=arch, device=pick_device(device))
    out.print(f"margin(A) − margin(B): mean {result['mean_difference']:+.4f}, positive for "
              f"{100 * result['positive_fraction']:.1f}% of {result['classes']} classes")
    _analysis_done(result)


@analyze_app.command("scores")
def analyze_scores_cmd(
    ckpt: str = typer.Argument(..., help="A checkpoint."), n_ex: int = N_OPT, dataset: Optional[str] = DATASET_OPT,
    data_dir: Optional[str] = DATA_OPT, output: str = ANALYZE_OUT, arch: Optional[str] = ARCH_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Class-wise mean predicted score of the true class, sorted (Fig. 3)."""
    from pathlib import Path

    from gklcli import analyze
    from gklcli.distributed import pick_device

    result = analyze.scores(ckpt, Path(output), dataset=dataset, data_dir=data_dir, n=n_ex, arch=arch, device=pick_device(device))
    out.print(f"class mean score: max {result['max']:.4f}, min {result['min']:.4f} (ratio {result['ratio_max_min']:.1f}) "
              f"over {result['classes']} classes")
    _analysis_done(result)


@analyze_app.command("tsne")
def analyze_tsne_cmd(
    ckpt: str = typer.Argument(..., help="A checkpoint."), n_ex: int = N_OPT, dataset: Optional[str] = DATASET_OPT,
    data_dir: Optional[str] = DATA_OPT, output: str = ANALYZE_OUT,
    classes: int = typer.Option(20, "--classes", min=2, help="Embed the images of the first K classes (the paper: 20)."),
    seed: int = typer.Option(0, "--seed", help="t-SNE random state."), arch: Optional[str] = ARCH_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """t-SNE of penultimate-layer features (Fig. 4a/b); needs scikit-learn (pip install 'gklcli[analysis]')."""
    from pathlib import Path

    from gklcli import analyze
    from gklcli.distributed import pick_device

    result = analyze.tsne(ckpt, Path(output), dataset=dataset, data_dir=data_dir, n=n_ex, classes=classes, seed=seed,
                          arch=arch, device=pick_device(device))
    out.print(f"t-SNE of {result['images']} images from {result['classes']} classes")
    _analysis_done(result)


@app.command("compare")
def compare_cmd(
    runs: List[str] = typer.Argument(..., help="Run folders (OUT of gkl train-at, distill or train-semi)."),
    output: str = typer.Option("compare", "--out", help="A folder for compare.md, compare.json and compare.png."),
) -> None:
    """Runs side by side: final and best metrics, the recipe keys that differ, their curves overlaid."""
    from pathlib import Path

    from rich.markdown import Markdown

    from gklcli.compare import compare

    report, text = compare([Path(run) for run in runs], Path(output))
    out.print(Markdown(text))
    out.print(f"wrote {output}/compare.md, compare.json" + (", compare.png" if report["figure"] else ""))


for _name, _command in EXPORT_COMMANDS.items():  # export-robustbench, export-hub (gklcli/cli_export.py)
    app.command(_name)(_command)


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point. Typer handles usage errors itself (exit 2, with the usage);
    a `GKLError` raised by a command becomes one red line and exit code 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=args, prog_name="gkl")
    except GKLError as error:
        if "--debug" in args:
            err.print_exception()
        err.print(f"[bold red]error:[/bold red] {escape(str(error))}")
        sys.exit(2)
