"""`gkl export-hub`: a Hugging Face Hub model folder, written, verified and (with --push) uploaded; and
`load_hub_model`, such a model back from the Hub in one call.

The folder (built beside --out, verified, then renamed into place, so a failed export leaves nothing):

* ``model.safetensors`` — the plain float32 state dict (no wrapper prefixes); safe to load by construction;
* ``config.json`` — what gkl needs to rebuild the model without flags (``"format": "gkl-hub-model"``: architecture,
  classes, input size, normalisation, dataset, threat model, ε, the recipe and its hash, the source checkpoint's
  sha256, gkl's version);
* ``README.md`` — the model card: the Hub's YAML metadata (license, tags, datasets, ``model-index`` with the clean and
  AutoAttack accuracies of a ``gkl eval-aa`` results.json), the recipe, how it was evaluated, a usage example.

Reading is `gklcli.hub_cache`'s: ``hf://OWNER/NAME[@REVISION][/PATH]`` specs through the Hugging Face cache and the
config.json beside the weights, wherever gkl takes a weight file (`loading.load_model_file`, teachers).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from gklcli import __version__
from gklcli.checkpoint import atomic_write_text, sha256_file
from gklcli.datasets import DATASETS
from gklcli.errors import GKLError, show
from gklcli.export import check_results_model, load_results, plain_state, write_safetensors
from gklcli.hub_cache import CONFIG, CONFIG_FORMAT, HUB_SCHEME, WEIGHTS, check_repo_id, hub_errors, is_hub_spec
from gklcli.loading import LoadedModel, load_model_file

CARD = "README.md"
CONFIG_VERSION = 1
TOLERANCE = 1e-6  # largest |logit difference| between the checkpoint's model and the reloaded folder (fp32, CPU)

_LICENSE = re.compile(r"[a-z0-9][a-z0-9.\-]{0,63}")
_DISPLAY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet-1k", "imagenet-lt": "ImageNet-LT",
            "digits": "scikit-learn digits"}
_HUB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet-1k"}  # dataset ids on the Hub


def load_hub_model(repo: str, *, revision: Optional[str] = None, device: str | torch.device = "cpu") -> nn.Module:
    """A model exported with `gkl export-hub`, from the Hub (or the cache), in eval mode; it takes [0, 1] images.

    `repo`: OWNER/NAME or a full hf:// spec."""
    spec = repo if is_hub_spec(repo) else f"{HUB_SCHEME}{repo}{f'@{revision}' if revision else ''}"
    return load_model_file(spec, device=device).module


# --------------------------------------------------------------------------- config.json


def model_config(loaded: LoadedModel, results: Optional[dict[str, Any]], dataset: Optional[str]) -> dict[str, Any]:
    """config.json: the checkpoint's facts, with the threat model and ε of the results (else of an AT recipe)."""
    recorded = loaded.dataset
    if dataset and recorded and dataset != recorded:
        raise GKLError(f"--dataset {dataset} contradicts the checkpoint's dataset {recorded}")
    found = str(results["dataset"]) if results else ""
    dataset = dataset or recorded or (None if found.startswith("npz:") else found or None)
    if dataset is None:
        raise GKLError(f"{loaded.path}: the checkpoint does not record its dataset; pass --dataset NAME (e.g. cifar10)")
    size = loaded.meta.get("image_size") or (DATASETS[dataset].image_size if dataset in DATASETS else None)
    if not size:
        raise GKLError(f"{loaded.path}: the input size of {dataset} images is unknown; export a gkl checkpoint, which records it")
    recipe = loaded.meta.get("recipe")
    if results:
        threat, eps = results["norm"], results["eps"]
    elif loaded.meta.get("kind") == "at" and recipe:
        from gklcli.evaluate import format_eps

        threat, eps = "Linf", format_eps(float(recipe["attack"]["eps"]))
    else:
        threat, eps = None, None
    return {
        "format": CONFIG_FORMAT, "format_version": CONFIG_VERSION, "library": "gkl", "gkl_version": __version__,
        "arch": loaded.arch, "num_classes": loaded.num_classes, "image_size": int(size), "input_norm": loaded.input_norm,
        "dataset": dataset, "threat_model": threat, "eps": eps, "kind": loaded.meta.get("kind"),
        "recipe_hash": loaded.meta.get("recipe_hash"), "source_sha256": loaded.sha256, "recipe": recipe,
    }


# --------------------------------------------------------------------------- the model card


def _eval_results(config: dict[str, Any], results: dict[str, Any]) -> list[Any]:
    """model-index entries: clean and AutoAttack robust accuracy on the test split, with the attack's settings."""
    from huggingface_hub import EvalResult

    dataset = config["dataset"]
    common = {"task_type": "image-classification", "task_name": "Image Classification",
              "dataset_type": _HUB_DATASETS.get(dataset, dataset), "dataset_name": _DISPLAY.get(dataset, dataset),
              "dataset_split": "test"}
    attack = {"eps": results["eps"], "norm": results["norm"], "version": results["version"], "n_ex": results["n_ex"],
              "seed": results["seed"], "pyautoattack": _version(results, "pyautoattack")}
    if results.get("attacks"):
        attack["attacks"] = list(results["attacks"])
    return [
        EvalResult(**common, metric_type="accuracy", metric_name="Clean accuracy", metric_value=round(results["clean_acc"], 2),
                   metric_args={"n_ex": results["n_ex"]}),
        EvalResult(**common, metric_type="robust_accuracy", metric_name="AutoAttack robust accuracy",
                   metric_value=round(results["robust_acc"], 2), metric_config=f"{results['norm']} eps={results['eps']}",
                   metric_args=attack),
    ]


def _version(results: dict[str, Any], package: str) -> str:
    """A package's version in results.json (`load_results` checked they are strings; older files may lack one)."""
    return results["versions"].get(package, "unrecorded")


def _guards(results: dict[str, Any]) -> str:
    guards = results.get("guards")
    return "unrecorded" if guards is None else "on" if guards else "OFF (--no-guards)"


def _evaluation_section(results: Optional[dict[str, Any]]) -> list[str]:
    """The card's Evaluation section, from a results.json `load_results` checked (optional keys may be absent)."""
    if results is None:
        return ["Not evaluated yet: run `gkl eval-aa` and export again with `--results results.json`."]
    r = results
    attacks = f" ({', '.join(r['attacks'])})" if r.get("attacks") else ""
    sha = f"`{r['model_sha256']}`" if r.get("model_sha256") else "unrecorded"
    lines = [
        f"AutoAttack {r['version']}{attacks}, {r['norm']}, ε = {r['eps']}, through `gkl eval-aa` (the official "
        f"pyautoattack {_version(r, 'pyautoattack')}, torch {_version(r, 'torch')}, gkl {_version(r, 'gkl')}): the first "
        f"{r['n_ex']} test images of {r['dataset']}, seed {r['seed']}, batch size {r['batch_size']}, guards "
        f"{_guards(r)}; evaluated weights sha256 {sha}.",
        "",
        "| | accuracy (%) |",
        "|---|---:|",
        f"| clean | {r['clean_acc']:.2f} |",
        *(f"| after {s['attack']} | {s['robust_acc']:.2f} |" for s in r.get("stages", [])),
        f"| **AutoAttack** | **{r['robust_acc']:.2f}** |",
    ]
    return lines


def eval_command(repo_id: str, config: dict[str, Any], results: Optional[dict[str, Any]]) -> str:
    """The card's `gkl eval-aa` line, at the card's threat model, ε and AutoAttack version (eval-aa's defaults are
    Linf, 8/255, standard: without them a reader would re-evaluate another setting)."""
    words = ["gkl", "eval-aa", f"{HUB_SCHEME}{repo_id}", "--n-ex", "10000"]
    if config["threat_model"]:
        words += ["--eps", str(config["eps"])] + (["--norm", config["threat_model"]] if config["threat_model"] != "Linf" else [])
    version = results["version"] if results else "standard"
    if version != "standard":
        words += ["--version", version] + (["--attacks", ",".join(results["attacks"])] if results.get("attacks") else [])
    return " ".join(words)


def card_tags(config: dict[str, Any]) -> list[str]:
    """The Hub tags; `robustbench` only where RobustBench has a leaderboard gkl exports to (CIFAR-10/100, Linf)."""
    tags = ["gkl", "image-classification", "pytorch", "safetensors"]
    tags += ["adversarial-robustness"] if config["threat_model"] else []
    tags += ["robustbench"] if config["threat_model"] == "Linf" and config["dataset"] in ("cifar10", "cifar100") else []
    tags += ["knowledge-distillation"] if config["kind"] == "kd" else []
    return tags


def card_text(repo_id: str, config: dict[str, Any], results: Optional[dict[str, Any]], weights_sha256: str) -> str:
    """The Markdown below the card's metadata: what the model is, how to use it, how it was evaluated, the recipe."""
    size, dataset = config["image_size"], config["dataset"]
    threat = f", {config['threat_model']} ε = {config['eps']}" if config["threat_model"] else ""
    how = f"a gkl {config['kind']} recipe with loss `{config['recipe']['loss']['name']}`" if config["recipe"] else "gkl"
    recipe = (["```yaml", yaml.safe_dump(config["recipe"], sort_keys=False, allow_unicode=True).rstrip(), "```"]
              if config["recipe"] else ["Not recorded: exported from a plain state dict."])
    return "\n".join([
        f"# {repo_id}",
        "",
        f"`{config['arch']}` ({config['num_classes']} classes, {size}×{size} inputs in [0, 1], "
        f"{'normalisation inside the model' if config['input_norm'] else 'no input normalisation'}) trained on {_DISPLAY.get(dataset, dataset)}{threat} with {how} (gkl: the Generalized KL loss of "
        "[Cui et al.](https://arxiv.org/abs/2305.13948) for robustness and distillation).",
        "",
        "## Usage",
        "",
        "With gkl (the `gklcli` package) installed:",
        "",
        "```python",
        "import torch",
        "from gklcli.hub import load_hub_model",
        "",
        f'model = load_hub_model("{repo_id}")  # eval mode; takes [0, 1] images',
        f"print(model(torch.rand(2, 3, {size}, {size})).argmax(1))  # predicted classes",
        "```",
        "",
        f"AutoAttack it on the {dataset} test set (read from config.json): `{eval_command(repo_id, config, results)}`.",
        "",
        "## Evaluation",
        "",
        *_evaluation_section(results),
        "",
        "## Training recipe",
        "",
        f"gkl {config['gkl_version']}, recipe hash `{config['recipe_hash'] or 'n/a'}`:",
        "",
        *recipe,
        "",
        "## Files",
        "",
        f"* `{WEIGHTS}` (sha256 `{weights_sha256}`): the float32 state dict;",
        f"* `{CONFIG}`: architecture, classes, input size, normalisation, dataset, threat model, recipe;",
        f"* exported by `gkl export-hub` from a checkpoint with sha256 `{config['source_sha256']}`.",
        "",
    ])


def model_card(repo_id: str, config: dict[str, Any], results: Optional[dict[str, Any]], license_id: str,
               weights_sha256: str) -> Any:
    """The README.md: the Hub's metadata block (ModelCardData, model-index from `results`) and `card_text`."""
    from huggingface_hub import ModelCard, ModelCardData

    dataset = config["dataset"]
    data = ModelCardData(
        license=license_id, library_name="gkl", tags=card_tags(config), pipeline_tag="image-classification",
        datasets=[_HUB_DATASETS[dataset]] if dataset in _HUB_DATASETS else None, metrics=["accuracy"],
        model_name=repo_id.split("/")[1], eval_results=_eval_results(config, results) if results else None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_text(repo_id, config, results, weights_sha256)}")


# --------------------------------------------------------------------------- export, verify, push


def verify_folder(loaded: LoadedModel, folder: Path, image_size: int) -> float:
    """Reload `folder` as users will (strictly, config.json only) and compare its logits with the checkpoint's model
    on a fixed random batch; refuses a difference above TOLERANCE. Returns the largest difference."""
    reloaded = load_model_file(folder / WEIGHTS).module
    x = torch.rand(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((reloaded(x).float() - loaded.module.cpu().eval()(x).float()).abs().max())
    if not diff <= TOLERANCE:  # also refuses NaN
        raise GKLError(f"verification: the exported model's logits differ from the checkpoint's by {diff:.3g} "
                       f"(allowed {TOLERANCE:g}); nothing was written")
    return diff


def _check_results(results: dict[str, Any], path: Path, config: dict[str, Any], sha256s: tuple[str, ...]) -> None:
    """The results must belong to these weights and be on the model's dataset."""
    check_results_model(results, path, sha256s)
    found = str(results["dataset"])
    if not found.startswith("npz:") and found != config["dataset"]:
        raise GKLError(f"--results {path}: computed on {found}, but the model is a {config['dataset']} model")


def hub_token() -> str:
    """The Hub token (HF_TOKEN, or the one `hf auth login` / `huggingface-cli login` stored), or one line saying how
    to give one (both commands: huggingface_hub < 1.0 has only the second)."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise GKLError("--push: no Hugging Face token; set HF_TOKEN or run `hf auth login` or `huggingface-cli login` (nothing was written)")
    return token


def push_folder(folder: Path, repo_id: str, private: bool, token: str) -> str:
    """create_repo(exist_ok) + upload_folder; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with hub_errors(f"--push {repo_id}"):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   commit_message=f"gkl export-hub (gkl {__version__})")
    return str(getattr(commit, "commit_url", commit))


def _refuse_existing(out: Path) -> None:
    """An export never replaces a folder that holds something (remove it, or choose another --out)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise GKLError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise GKLError(f"{out}: folder exists and is not empty; remove it or choose another --out")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place: one rename, which fails if `out` was filled meanwhile."""
    try:
        tmp.rename(out)
    except OSError as error:
        raise GKLError(f"{out}: cannot put the export there ({error.strerror}); remove it or choose another --out") from None


def export_hub(ckpt: str, *, repo_id: str, out: str | Path, results_path: Optional[str | Path] = None, push: bool = False,
               private: bool = False, arch: Optional[str] = None, num_classes: Optional[int] = None,
               dataset: Optional[str] = None, license_id: str = "mit") -> dict[str, Any]:
    """Write the Hub folder for `ckpt` to `out` (built in a folder beside it, verified, renamed into place), then with
    `push` upload it. What can be refused (repo id, license, token, results) is refused before anything is written."""
    check_repo_id(repo_id)
    if not _LICENSE.fullmatch(license_id):
        raise GKLError(f"--license {show(license_id)}: must be a Hub license id such as mit, apache-2.0, cc-by-4.0")
    if private and not push:
        raise GKLError("--private goes with --push (it makes the Hub repository private)")
    token = hub_token() if push else ""
    out = Path(out).absolute()
    _refuse_existing(out)
    loaded = load_model_file(ckpt, arch=arch, num_classes=num_classes)
    results = load_results(results_path) if results_path else None
    config = model_config(loaded, results, dataset)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # (the permissions of a plain mkdir)
    try:
        write_safetensors(plain_state(loaded.module), tmp / WEIGHTS)
        weights_sha256 = sha256_file(tmp / WEIGHTS)
        if results is not None:
            _check_results(results, Path(results_path), config, (loaded.sha256, weights_sha256))
        atomic_write_text(tmp / CONFIG, json.dumps(config, indent=2) + "\n")
        atomic_write_text(tmp / CARD, str(model_card(repo_id, config, results, license_id, weights_sha256)))
        diff = verify_folder(loaded, tmp, config["image_size"])
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = {"out": str(out), "weights_sha256": weights_sha256, "logit_max_diff": diff, "config": config}
    if push:
        report["commit_url"] = _push_written(out, repo_id, private, token)
    return report


def _push_written(out: Path, repo_id: str, private: bool, token: str) -> str:
    """`push_folder` of the published folder; a failure says the folder is kept and how to upload it (a re-run of
    export-hub would refuse the now non-empty --out)."""
    try:
        return push_folder(out, repo_id, private, token)
    except GKLError as error:
        upload = f"huggingface-cli upload {repo_id} {shlex.quote(str(out))} .{' --private' if private else ''}"
        raise GKLError(f"{error}; {out} was written and verified: upload it with `{upload}`") from error
