"""`gkl export-robustbench`: leaderboard-ready files, verified against RobustBench's own classes.

Writes, under OUT/:

* ``models/<dataset>/<threat>/<ID>.pt`` — a plain float32 state dict whose keys load with
  ``strict=True`` into RobustBench's class for the architecture (no ``module.`` prefix, no mean/std
  entries), so ``robustbench.utils.load_model(ID, model_dir=OUT/models, …)`` reads it offline once
  the zoo entry exists (``<ID>.safetensors`` with ``--format safetensors``, read back into that class:
  load_model reads only .pt);
* ``model_info/<dataset>/<threat>/<ID>.json`` — the curated leaderboard schema (accuracies as strings
  with two decimals, ε as "8/255", field order of the curated files, no trailing newline);
* ``zoo_entry.py`` — the entry for ``robustbench/model_zoo/<dataset>.py``;
* ``SUBMISSION.md`` — the "New Model(s)" issue text the maintainers ask for.

Before finishing it rebuilds RobustBench's class, loads the file strictly, compares logits with the
source model, loads it again through ``robustbench.utils.load_model`` with a temporary in-process zoo
entry, and (with data) recomputes clean accuracy against the results file.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from gklcli.datasets import facts
from gklcli.errors import GKLError, show
from gklcli.names import MODEL_ID, check_name

MODEL_ID_RULE = "a RobustBench model ID, e.g. Cui2023Decoupled_WRN-34-10"
from gklcli.loading import LoadedModel, load_strict
from gklcli.checkpoint import atomic_save, atomic_write_bytes, atomic_write_text



@dataclass(frozen=True)
class RBArch:
    """How RobustBench represents one registry architecture."""

    module: str  # robustbench.model_zoo.architectures.<module>
    code: str  # constructor expression for the zoo entry; {C} = number of classes, {D} = CIFAR10/CIFAR100
    display: str  # the leaderboard's "architecture" field
    build: Callable[[Any, int, str], nn.Module]  # (architectures module, classes, dataset) → model
    normalises: bool  # mean/std inside RobustBench's class


def _dm(depth: int, width: int) -> Callable[[Any, int, str], nn.Module]:
    def build(m: Any, classes: int, dataset: str) -> nn.Module:
        stats = "CIFAR100" if dataset == "cifar100" else "CIFAR10"
        return m.DMWideResNet(num_classes=classes, depth=depth, width=width, activation_fn=nn.SiLU,
                              mean=getattr(m, f"{stats}_MEAN"), std=getattr(m, f"{stats}_STD"))
    return build


def _wrn(depth: int, width: int) -> Callable[[Any, int, str], nn.Module]:
    return lambda m, classes, dataset: m.WideResNet(depth=depth, num_classes=classes, widen_factor=width, sub_block1=False)


RB_ARCHS: dict[str, RBArch] = {
    **{
        f"wrn-{d}-{w}": RBArch("wide_resnet", f"WideResNet(depth={d}, widen_factor={w}, num_classes={{C}}, sub_block1=False)",
                               f"WideResNet-{d}-{w}", _wrn(d, w), False)
        for d, w in ((34, 10), (34, 20), (28, 10))
    },
    **{
        f"wrn-{d}-{w}-swish": RBArch(
            "dm_wide_resnet",
            f"DMWideResNet(num_classes={{C}}, depth={d}, width={w}, activation_fn=nn.SiLU, mean={{D}}_MEAN, std={{D}}_STD)",
            f"WideResNet-{d}-{w}", _dm(d, w), True)
        for d, w in ((28, 10), (70, 16))
    },
    "resnet-18": RBArch("resnet", "ResNet(BasicBlock, [2, 2, 2, 2], num_classes={C})", "ResNet-18",
                        lambda m, c, d: m.ResNet(m.BasicBlock, [2, 2, 2, 2], num_classes=c), False),
    "preact-resnet-18": RBArch(
        "resnet", "PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes={C}, bn_before_fc=True, out_shortcut=True)",
        "PreActResNet-18",
        lambda m, c, d: m.PreActResNet(m.PreActBlock, [2, 2, 2, 2], num_classes=c, bn_before_fc=True, out_shortcut=True), False),
}


def rb_arch(loaded: LoadedModel) -> RBArch:
    """RobustBench's representation, or a GKLError saying why there is none."""
    spec = RB_ARCHS.get(loaded.arch or "")
    if spec is None:
        supported = ", ".join(RB_ARCHS)
        raise GKLError(f"architecture {loaded.arch!r} has no RobustBench class; exportable: {supported}")
    return spec


def build_rb_model(spec: RBArch, num_classes: int, dataset: str) -> nn.Module:
    from gklcli.compat import import_robustbench

    import_robustbench()
    module = importlib.import_module(f"robustbench.model_zoo.architectures.{spec.module}")
    return spec.build(module, num_classes, dataset)


def check_normalisation(loaded: LoadedModel, spec: RBArch, rb_model: nn.Module) -> None:
    """The exported class must see the same inputs the model was trained on."""
    norm = loaded.input_norm
    if not spec.normalises:
        if norm is not None:
            raise GKLError(
                f"{loaded.arch}: the model normalises its inputs (mean {norm['mean']}), but RobustBench's "
                f"{spec.display} takes raw [0,1] images; it cannot be exported faithfully"
            )
        return
    theirs = {"mean": rb_model.mean.flatten().tolist(), "std": rb_model.std.flatten().tolist()}
    if norm is None or any(abs(a - b) > 1e-6 for key in ("mean", "std") for a, b in zip(norm[key], theirs[key])):
        raise GKLError(f"{loaded.arch}: input normalisation {norm} differs from RobustBench's {theirs} for this dataset")


def _max_logit_diff(a: nn.Module, b: nn.Module, x: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        la, lb = a.eval()(x).float(), b.eval()(x).float()
    return float((la - lb).abs().max()), 1.0 + float(la.abs().max())


def _pct(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:.2f}"


def model_info(*, results: Optional[dict[str, Any]], dataset: str, architecture: str, eps: str, paper_name: str,
               paper_link: str, authors: str, venue: str, additional_data: bool, footnote: Optional[str],
               reported: Optional[float]) -> dict[str, Any]:
    """The curated leaderboard JSON, fields in the curated files' order."""
    clean = results["clean_acc"] if results else None
    robust = results["robust_acc"] if results else None
    info = {
        "link": paper_link,
        "name": paper_name,
        "authors": authors,
        "additional_data": additional_data,
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": venue,
        "architecture": architecture,
        "eps": eps,
        "clean_acc": _pct(clean),
        "reported": _pct(reported if reported is not None else robust),
        "autoattack_acc": _pct(robust),
        "unreliable": False,
    }
    if footnote:
        info["footnote"] = footnote
    return info


def zoo_entry(model_id: str, spec: RBArch, num_classes: int, dataset: str, file_name: str) -> str:
    stats = "CIFAR100" if dataset == "cifar100" else "CIFAR10"
    code = spec.code.format(C=num_classes, D=stats)
    imports = {
        "wide_resnet": "from robustbench.model_zoo.architectures.wide_resnet import WideResNet",
        "dm_wide_resnet": f"from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet, {stats}_MEAN, {stats}_STD",
        "resnet": "from robustbench.model_zoo.architectures.resnet import BasicBlock, PreActBlock, PreActResNet, ResNet",
    }[spec.module]
    return (
        f"# robustbench/model_zoo/{dataset}.py — add to the `linf` OrderedDict (imports at the top of the file):\n"
        f"# {imports}\n"
        f"('{model_id}', {{\n"
        f"    'model': lambda: {code},\n"
        f"    'gdrive_id': 'GOOGLE_DRIVE_ID_OF_{model_id}.pt',  # upload models/{dataset}/Linf/{file_name} and paste its id\n"
        f"}}),\n"
    )


def submission_text(model_id: str, info: dict[str, Any], results: Optional[dict[str, Any]], sha256: str) -> str:
    """The RobustBench "New Model(s)" issue template, filled in."""
    evaluation = (
        f"AutoAttack {results['version']} (pyautoattack {results['versions']['pyautoattack']}) through `gkl eval-aa`, "
        f"first {results['n_ex']} test images, seed {results['seed']}, batch size {results['batch_size']}"
        if results else "NOT EVALUATED YET: run `gkl eval-aa` and export again with --results"
    )
    return "\n".join([
        f"# [New Model] {model_id}",
        "",
        f"**Paper Title**: {info['name']}",
        f"**Paper URL**: {info['link']}",
        f"**Paper authors**: {info['authors']}",
        "",
        "**Leaderboard Claim(s)**",
        "",
        f"Model 1 — `{model_id}`",
        f"- Architecture: {info['architecture']}",
        "- Threat Model: Linf",
        f"- eps: {info['eps']}",
        f"- Clean accuracy: {info['clean_acc'] or 'n/a'}",
        f"- Robust accuracy: {info['autoattack_acc'] or 'n/a'}",
        f"- Additional data: {str(info['additional_data']).lower()}",
        f"- Evaluation method: {evaluation}",
        f"- Checkpoint and code URLs: CHECKPOINT_URL (sha256 of the exported file: {sha256}), CODE_URL",
        f"- Dataset: {info['dataset']}",
        f"- Venue: {info['venue'] or 'n/a'}",
        *( [f"- Comments: {info['footnote']}"] if info.get("footnote") else [] ),
        "",
        "**Model Zoo:**",
        "- [x] I want to add my models to the Model Zoo (check if true)",
        "- [x] I use an architecture that is included among those here: "
        "https://github.com/RobustBench/robustbench/tree/master/robustbench/model_zoo/architectures (check if true)",
        "- [x] I agree to release my model(s) under MIT license (check if true) **OR** under a custom license, located here: (put the custom license URL here if a custom license is needed)",
        "",
        "The zoo entry is in `zoo_entry.py`; the model_info JSON in `model_info/`.",
        "",
    ])


def _register_and_load(model_id: str, spec: RBArch, classes: int, dataset: str, model_dir: Path) -> nn.Module:
    """`robustbench.utils.load_model` on the exported file, with a temporary in-process zoo entry."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel("Linf")]
    added = model_id not in zoo
    if added:
        # a placeholder id: the file already exists, so load_model reads it and downloads nothing
        zoo[model_id] = {"model": lambda: build_rb_model(spec, classes, dataset), "gdrive_id": "local-file-no-download"}
    try:
        return load_model(model_id, model_dir=str(model_dir), dataset=dataset, threat_model="Linf")
    finally:
        if added:
            del zoo[model_id]


def plain_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's weights as published: float32, contiguous, on the CPU (integer buffers kept as they are)."""
    return {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
            for k, v in module.state_dict().items()}


def write_safetensors(state: dict[str, Tensor], path: Path) -> None:
    """A state dict as a .safetensors file, atomically (tensors are copied: safetensors refuses shared storage)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.clone() for k, v in state.items()}, metadata={"format": "pt"}))


def _load_safetensors_into(spec: RBArch, classes: int, dataset: str, file: Path) -> nn.Module:
    """RobustBench's class with the exported .safetensors file loaded strictly (read back from disk)."""
    from gklcli.models.timm_models import read_state_dict

    model = build_rb_model(spec, classes, dataset)
    load_strict(model, read_state_dict(file), f"{file} (RobustBench {spec.display})")
    return model


def export(loaded: LoadedModel, *, model_id: str, dataset: str, threat_model: str, out: Path,
           results: Optional[dict[str, Any]], results_path: Optional[Path], meta: dict[str, Any],
           data: Optional[tuple[Tensor, Tensor]], batch_size: int, device: torch.device, fmt: str = "pt") -> dict[str, Any]:
    """Write and verify the RobustBench files (the weights as `fmt`: pt or safetensors); returns a report of what was checked."""
    if fmt not in ("pt", "safetensors"):
        raise GKLError(f"--format {fmt}: use pt (what RobustBench's load_model reads) or safetensors")
    if threat_model != "Linf":
        raise GKLError(f"--threat-model {threat_model}: gkl exports Linf models")
    if dataset not in ("cifar10", "cifar100"):
        raise GKLError(f"--dataset {dataset}: use cifar10 or cifar100")
    check_name(model_id, "--name", MODEL_ID, MODEL_ID_RULE)
    expected_classes = facts(dataset).classes
    if loaded.num_classes != expected_classes:
        raise GKLError(f"--dataset {dataset}: the model has {loaded.num_classes} classes, {dataset} has {expected_classes}")
    if results is not None:
        check_results_model(results, results_path, (loaded.sha256,))
        same_data = results.get("dataset") == dataset or str(results.get("dataset", "")).startswith("npz:")
        if not same_data or results.get("norm") != threat_model or results.get("version") != "standard":
            raise GKLError(f"{results_path}: the leaderboard needs AutoAttack standard, Linf on {dataset}; the results are "
                           f"{results.get('version')}, {results.get('norm')} on {results.get('dataset')}")
    spec = rb_arch(loaded)
    rb_model = build_rb_model(spec, loaded.num_classes, dataset)
    check_normalisation(loaded, spec, rb_model)
    state = plain_state(loaded.module)
    load_strict(rb_model, state, f"RobustBench {spec.display}")
    file = out / "models" / dataset / threat_model / f"{model_id}.{fmt}"
    (atomic_save if fmt == "pt" else write_safetensors)(state, file)
    from gklcli.checkpoint import sha256_file

    report: dict[str, Any] = {"checkpoint": str(file), "sha256": sha256_file(file)}
    source = loaded.module.to(device).eval()
    probe = data[0][: min(len(data[0]), 32)] if data is not None else torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # RobustBench's load_model reads only .pt files; a .safetensors file is read back into RobustBench's class instead
    reread = (("load_model", _register_and_load(model_id, spec, loaded.num_classes, dataset, out / "models")) if fmt == "pt"
              else ("file", _load_safetensors_into(spec, loaded.num_classes, dataset, file)))
    for name, model in (("class", rb_model), reread):
        diff, scale = _max_logit_diff(source, model.to(device), probe.to(device))
        if diff > 1e-4 * scale:
            raise GKLError(f"verification: RobustBench's {spec.display} ({name}) gives logits {diff:.3g} away from the source model")
        report[f"logit_max_diff_{name}"] = diff
    if data is not None and results is not None:
        from gklcli.evaluate import predict

        n = len(data[0])
        acc = 100.0 * float((predict(rb_model.to(device).eval(), data[0], batch_size, device) == data[1]).float().mean())
        if n == results["n_ex"] and abs(round(acc, 2) - round(results["clean_acc"], 2)) > 0.05:
            raise GKLError(f"verification: clean accuracy of the exported model is {acc:.2f}% on {n} images, the results file says {results['clean_acc']:.2f}%")
        flags_file = Path(results_path).parent / "flags.pt" if results_path else None
        if n < results["n_ex"] and flags_file is not None and flags_file.is_file():
            expected = 100.0 * float(torch.load(flags_file, weights_only=True)["clean"][:n].float().mean())
            if abs(acc - expected) > 1e-9:
                raise GKLError(f"verification: clean accuracy of the exported model is {acc:.2f}% on the first {n} images, "
                               f"the evaluation's per-example flags say {expected:.2f}%")
        report["clean_acc_recomputed"] = acc
    info = model_info(results=results, dataset=dataset, architecture=spec.display, eps=results["eps"] if results else "8/255", **meta)
    atomic_write_text(out / "model_info" / dataset / threat_model / f"{model_id}.json", json.dumps(info, indent=2))
    atomic_write_text(out / "zoo_entry.py", zoo_entry(model_id, spec, loaded.num_classes, dataset, file.name))
    atomic_write_text(out / "SUBMISSION.md", submission_text(model_id, info, results, report["sha256"]))
    report["model_info"] = info
    return report


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_eps(value: Any) -> bool:
    from gklcli.recipes import parse_number

    return isinstance(value, str) and parse_number(value) is not None


def _is_stages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(s, dict) and isinstance(s.get("attack"), str) and _is_number(s.get("robust_acc")) for s in value)


# every results.json key an export reads: (required, is it well-formed, what a gkl results.json holds there)
RESULT_CHECKS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "n_ex": (True, _is_int, "an integer"),
    "dataset": (True, lambda v: isinstance(v, str), "a string"),
    "clean_acc": (True, _is_number, "a number"),
    "robust_acc": (True, _is_number, "a number"),
    "eps": (True, _is_eps, "a string such as 8/255 or 0.5"),
    "version": (True, lambda v: isinstance(v, str), "a string"),
    "norm": (True, lambda v: isinstance(v, str), "a string"),
    "seed": (True, _is_int, "an integer"),
    "batch_size": (True, _is_int, "an integer"),
    "versions": (True, lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                 "a mapping of package names to version strings"),
    "guards": (False, lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "model_sha256": (False, lambda v: v is None or isinstance(v, str), "a hex string or null"),
    "attacks": (False, lambda v: v is None or (isinstance(v, list) and all(isinstance(a, str) for a in v)),
                "a list of attack names or null"),
    "stages": (False, _is_stages, "a list of {attack, robust_acc} entries"),
}
RESULT_KEYS = tuple(k for k, (required, _, _) in RESULT_CHECKS.items() if required)


def load_results(path: str | Path) -> dict[str, Any]:
    """A gkl eval-aa results.json with every key the exports read present (the optional ones may be absent) and of
    the right type: checked here, once, so that a hand-edited file is one line rather than a crash mid-export."""
    from gklcli.checkpoint import read_json

    results = read_json(path, "--results")
    missing = [k for k in RESULT_KEYS if k not in results] if isinstance(results, dict) else ["all"]
    if missing:
        raise GKLError(f"--results {path}: not a gkl eval-aa results.json (missing {', '.join(missing)})")
    for key, (_, valid, what) in RESULT_CHECKS.items():
        if key in results and not valid(results[key]):
            raise GKLError(f"--results {path}: {key} is {show(results[key])}; a gkl eval-aa results.json records it as {what}")
    return results


def check_results_model(results: dict[str, Any], path: Optional[Path], sha256s: tuple[Optional[str], ...]) -> None:
    """Refuse results measured on other weights than `sha256s` (results without a model_sha256 pass)."""
    found = results.get("model_sha256")
    if found is not None and found not in sha256s:
        raise GKLError(f"{path}: these results are for another checkpoint (sha256 {str(found)[:12]}… ≠ {str(sha256s[0])[:12]}…)")


def read_results(path: str | Path, loaded: LoadedModel, dataset: str, data_dir: Optional[str], n_ex: Optional[int],
                 note: Any = print) -> tuple[dict[str, Any], Optional[tuple[Tensor, Tensor]]]:
    """`--results`: a gkl eval-aa results.json, checked, and the images to recompute its clean accuracy on.

    The images are None (with a `note`) when they cannot be loaded here; `export` then skips that check."""
    from gklcli.evaluate import load_eval_data

    results = load_results(path)
    if n_ex is not None and n_ex > results["n_ex"]:
        raise GKLError(f"--n-ex {n_ex}: the results cover only {results['n_ex']} images")
    try:
        x, y, _ = load_eval_data(results.get("dataset"), loaded, data_dir, n_ex or results["n_ex"])
    except GKLError as error:
        note(f"clean accuracy not recomputed: {error}")
        return results, None
    if str(results.get("dataset")).startswith("npz:"):
        note(f"the results were computed on {results['dataset']}; it must be the {dataset} test set in canonical order")
    return results, (x, y)
