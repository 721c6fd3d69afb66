"""`gkl export-robustbench`: files that round-trip through RobustBench's own classes and
`robustbench.utils.load_model`, the curated model_info schema, and the refusals."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from tests_helpers import run_cli

from gklcli.cli import main
from gklcli.compat import import_robustbench
from gklcli.export import RB_ARCHS
from gklcli.models import create_model

CURATED_ORDER = ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                 "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "unreliable", "footnote"]


@pytest.mark.parametrize("arch", list(RB_ARCHS))
def test_export_round_trips_through_robustbench(tmp_path, capsys, arch):
    dataset = "cifar100" if arch in ("wrn-34-10", "wrn-28-10-swish") else "cifar10"
    classes = 100 if dataset == "cifar100" else 10
    torch.manual_seed(0)
    model = create_model(arch, classes)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong buffer mapping would show
        for name, buf in model.named_buffers():
            if "running_mean" in name:
                buf.normal_(0, 0.1)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "plain.pt")
    model_id = f"Test2026Export_{arch.replace('-', '_')}"
    code, out, err = run_cli(capsys, "export-robustbench", tmp_path / "plain.pt", "--arch", arch, "--name", model_id,
                             "--dataset", dataset, "--out", tmp_path / "rb", "--paper-name", "A paper", "--venue", "ICML 2026")
    assert code == 0, err
    assert "verified" in out and "null" in out  # no --results: accuracies are null and the command says so
    file = tmp_path / "rb" / "models" / dataset / "Linf" / f"{model_id}.pt"
    state = torch.load(file, weights_only=True)
    assert not any(k.startswith("module.") or k in ("mean", "std") for k in state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    # independent check: RobustBench's class loads it strictly and gives the source model's logits
    import_robustbench()
    spec = RB_ARCHS[arch]
    theirs = spec.build(importlib.import_module(f"robustbench.model_zoo.architectures.{spec.module}"), classes, dataset)
    theirs.load_state_dict(state, strict=True)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    info = json.loads((tmp_path / "rb" / "model_info" / dataset / "Linf" / f"{model_id}.json").read_text())
    assert list(info) == CURATED_ORDER[:-1]
    assert info["clean_acc"] is None and info["eps"] == "8/255" and info["architecture"] == spec.display
    zoo = (tmp_path / "rb" / "zoo_entry.py").read_text()
    assert f"('{model_id}'" in zoo and f"num_classes={classes}" in zoo
    assert f"[New Model] {model_id}" in (tmp_path / "rb" / "SUBMISSION.md").read_text()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A ResNet-18 gkl-format checkpoint and its eval-aa results on 8 npz test images."""
    root = tmp_path_factory.mktemp("evaluated")
    torch.manual_seed(0)
    model = create_model("resnet-18", 10)
    torch.save(model.state_dict(), root / "r18.pt")
    rng = np.random.default_rng(0)
    np.savez(root / "test.npz", image=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), label=np.arange(8) % 10)
    with pytest.raises(SystemExit) as info:
        main(["eval-aa", str(root / "r18.pt"), "--arch", "resnet-18", "--dataset", f"npz:{root / 'test.npz'}",
              "--out", str(root / "ev"), "-q"])
    assert info.value.code in (0, None)
    return root


def test_export_with_results_fills_accuracies_and_rechecks_clean_accuracy(evaluated, tmp_path, capsys):
    results = json.loads((evaluated / "ev" / "results.json").read_text())
    (tmp_path / "res.json").write_text(json.dumps(results))  # computed on an npz standing in for the CIFAR-10 test set
    (tmp_path / "flags.pt").write_bytes((evaluated / "ev" / "flags.pt").read_bytes())
    args = ["export-robustbench", evaluated / "r18.pt", "--arch", "resnet-18", "--name", "Test2026Export_R18",
            "--dataset", "cifar10", "--results", tmp_path / "res.json", "--out", tmp_path / "rb",
            "--footnote", "It uses AutoAugment.", "--reported", "50.5"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "clean accuracy" in out and "matches the results" in out and "must be the cifar10 test set" in err
    info = json.loads((tmp_path / "rb" / "model_info" / "cifar10" / "Linf" / "Test2026Export_R18.json").read_text())
    assert list(info) == CURATED_ORDER
    assert info["clean_acc"] == f"{results['clean_acc']:.2f}" and info["autoattack_acc"] == f"{results['robust_acc']:.2f}"
    assert info["reported"] == "50.50" and info["footnote"] == "It uses AutoAugment."
    assert not (tmp_path / "rb" / "model_info" / "cifar10" / "Linf" / "Test2026Export_R18.json").read_text().endswith("\n")
    # a partial check on the first 4 images compares against the evaluation's per-example flags
    code, out, err = run_cli(capsys, *args, "--n-ex", "4")
    assert code == 0 and "matches the results" in out, err
    code, _, err = run_cli(capsys, *args, "--n-ex", "9")
    assert code == 2 and "cover only 8 images" in err
    # results that do not belong to the checkpoint are refused
    results["model_sha256"] = "0" * 64
    (tmp_path / "res.json").write_text(json.dumps(results))
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "another checkpoint" in err
    # a clean accuracy that the exported model does not reproduce is refused
    results = json.loads((evaluated / "ev" / "results.json").read_text())
    results["clean_acc"] += 12.5
    (tmp_path / "res.json").write_text(json.dumps(results))
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "verification: clean accuracy of the exported model" in err


@pytest.mark.parametrize(
    "arch, dataset, message",
    [
        ("resnet8", "cifar10", "has no RobustBench class"),
        ("wrn-34-10", "cifar100", "the model has 10 classes"),
    ],
)
def test_export_refusals(tmp_path, capsys, arch, dataset, message):
    torch.save(create_model(arch, 10).state_dict(), tmp_path / "m.pt")
    code, _, err = run_cli(capsys, "export-robustbench", tmp_path / "m.pt", "--arch", arch, "--name", "X2026Y",
                           "--dataset", dataset, "--out", tmp_path / "rb")
    assert code == 2 and message in err and "Traceback" not in err


def test_export_refuses_foreign_normalisation_and_bad_names(tmp_path, capsys):
    model = create_model("wrn-28-10-swish", 10)
    ckpt = {"format": "gkl-checkpoint", "format_version": 1, "arch": "wrn-28-10-swish", "num_classes": 10, "dataset": "cifar10",
            "input_norm": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, "model": model.state_dict()}
    torch.save(ckpt, tmp_path / "g.pt")
    code, _, err = run_cli(capsys, "export-robustbench", tmp_path / "g.pt", "--name", "X2026Y", "--dataset", "cifar10", "--out", tmp_path / "rb")
    assert code == 2 and "normalisation" in err
    code, _, err = run_cli(capsys, "export-robustbench", tmp_path / "g.pt", "--name", "bad name", "--dataset", "cifar10", "--out", tmp_path / "rb")
    assert code == 2 and "--name 'bad name': must be a letter" in err
