"""The publishing commands of the `gkl` command line: `gkl export-robustbench` and `gkl export-hub`.

They live beside cli.py, which registers `COMMANDS` on its app (this module imports nothing of cli.py, so
the two form no circle), to keep each module short; like every command they parse options and call the
library (`gklcli.export`, `gklcli.hub`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True, soft_wrap=True)

MODEL_HELP = "A gkl checkpoint, a .pt/.safetensors state dict (with --arch) or a Hub model hf://OWNER/NAME or hf://OWNER/NAME@REVISION."
ARCH_OPT = typer.Option(None, "--arch", help="Architecture for files that do not record it (see gkl models).")
CLASSES_OPT = typer.Option(None, "--num-classes", help="Class count when it cannot be read from the weights.")


def export_robustbench_cmd(
    ckpt: str = typer.Argument(..., help=MODEL_HELP),
    name: str = typer.Option(..., "--name", help="RobustBench model ID, e.g. Cui2023Decoupled_WRN-34-10."),
    dataset: str = typer.Option(..., "--dataset", help="cifar10 or cifar100."),
    threat_model: str = typer.Option("Linf", "--threat-model", help="Linf."),
    arch: Optional[str] = ARCH_OPT,
    num_classes: Optional[int] = CLASSES_OPT,
    results_file: Optional[str] = typer.Option(None, "--results", help="results.json from gkl eval-aa (fills the accuracy fields)."),
    paper_name: str = typer.Option("", "--paper-name", help="Paper title (the leaderboard's method name)."),
    paper_link: str = typer.Option("", "--paper-link", help="Paper URL."),
    authors: str = typer.Option("", "--authors", help='Comma-separated authors, "A, B, C".'),
    venue: str = typer.Option("", "--venue", help='e.g. "NeurIPS 2024" (empty: shown as Unpublished).'),
    additional_data: bool = typer.Option(False, "--additional-data/--no-additional-data", help="Trained with extra real data."),
    footnote: Optional[str] = typer.Option(None, "--footnote", help='e.g. "It uses additional 20M synthetic images in training."'),
    reported: Optional[float] = typer.Option(None, "--reported", help="Robust accuracy reported in the paper (default: the AA result)."),
    out_dir: str = typer.Option("robustbench_export", "--out", help="Output directory."),
    fmt: str = typer.Option("pt", "--format", help="pt (what RobustBench's load_model reads) or safetensors."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Dataset root for the clean-accuracy check (default ./data)."),
    batch_size: int = typer.Option(500, "--batch-size", min=1),
    n_ex: Optional[int] = typer.Option(None, "--n-ex", min=1, help="Images for the clean-accuracy check (default: the results' n_ex)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N."),
) -> None:
    """Write a RobustBench checkpoint, model_info JSON, zoo entry and SUBMISSION.md, verified against RobustBench."""
    from gklcli.distributed import pick_device
    from gklcli.export import MODEL_ID_RULE, export, read_results
    from gklcli.loading import load_model_file
    from gklcli.names import MODEL_ID, check_name

    check_name(name, "--name", MODEL_ID, MODEL_ID_RULE)
    dev = pick_device(device)
    loaded = load_model_file(ckpt, arch=arch, num_classes=num_classes, device=dev)
    results, data = read_results(results_file, loaded, dataset, data_dir, n_ex, note=lambda text: err.print(
        f"[yellow]note:[/yellow] {escape(text)}")) if results_file else (None, None)
    meta = {"paper_name": paper_name, "paper_link": paper_link, "authors": authors, "venue": venue,
            "additional_data": additional_data, "footnote": footnote, "reported": reported}
    report = export(loaded, model_id=name, dataset=dataset, threat_model=threat_model, out=Path(out_dir), results=results,
                    results_path=Path(results_file) if results_file else None, meta=meta, data=data, batch_size=batch_size,
                    device=dev, fmt=fmt)
    reread = "through robustbench.utils.load_model" if fmt == "pt" else "of the file read back"
    out.print(f"wrote {report['checkpoint']} (sha256 {report['sha256'][:16]}…), model_info, zoo_entry.py, SUBMISSION.md under {out_dir}")
    out.print(f"verified: strict load into RobustBench's class and {reread}, logits within "
              f"{max(v for k, v in report.items() if k.startswith('logit_max_diff')):.2g}"
              + (f", clean accuracy {report['clean_acc_recomputed']:.2f}% matches the results" if "clean_acc_recomputed" in report else ""))
    if results is None:
        out.print("[yellow]no --results: clean_acc, reported and autoattack_acc are null; run gkl eval-aa and export again with --results[/yellow]")


def export_hub_cmd(
    ckpt: str = typer.Argument(..., help=MODEL_HELP),
    repo_id: str = typer.Option(..., "--repo-id", help="The Hub repository, OWNER/NAME."),
    out_dir: str = typer.Option(..., "--out", help="The folder to write (model.safetensors, config.json, README.md); must not exist."),
    results_file: Optional[str] = typer.Option(None, "--results", help="results.json from gkl eval-aa (the model card's accuracies)."),
    push: bool = typer.Option(False, "--push", help="Upload the folder to the Hub (token: HF_TOKEN, `hf auth login` or `huggingface-cli login`)."),
    private: bool = typer.Option(False, "--private", help="With --push: a new repository is private."),
    arch: Optional[str] = ARCH_OPT,
    num_classes: Optional[int] = CLASSES_OPT,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="The training dataset, for files that do not record it."),
    license_id: str = typer.Option("mit", "--license", help="The model card's license id (the Hub's: mit, apache-2.0, …)."),
) -> None:
    """A Hugging Face Hub model folder (safetensors weights, config.json, model card), verified by reloading it; --push uploads it."""
    from gklcli.hub import export_hub

    report = export_hub(ckpt, repo_id=repo_id, out=out_dir, results_path=results_file, push=push, private=private, arch=arch,
                        num_classes=num_classes, dataset=dataset, license_id=license_id)
    out.print(f"wrote {out_dir} (model.safetensors sha256 {report['weights_sha256'][:16]}…, config.json, README.md); verified: "
              f"reloaded strictly from the folder, logits within {report['logit_max_diff']:.2g} of the checkpoint's")
    if push:
        out.print(f"pushed to https://huggingface.co/{repo_id}: {report['commit_url']}")
    else:
        out.print(f"load it: gkl eval-aa {out_dir}/model.safetensors, or after --push: gkl eval-aa hf://{repo_id}")


COMMANDS = {"export-robustbench": export_robustbench_cmd, "export-hub": export_hub_cmd}
