""".safetensors wherever gkl reads weights: plain state dicts through eval-aa (with --arch, or gkl's config.json
beside them) with the same numbers as the .pt file, export-robustbench --format pt|safetensors, and one-line
refusals for damaged files and configs."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gklcli.compat import import_robustbench
from gklcli.export import RB_ARCHS
from gklcli.models import create_model
from tests_helpers import run_cli

AA = ["--version", "custom", "--attacks", "apgd-ce", "--batch-size", "16", "--eps", "2/255", "-q"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The same resnet8 (4 classes) as a .pt and a .safetensors state dict (both with DDP's `module.` prefix),
    and 16 npz test images of 8×8."""
    root = tmp_path_factory.mktemp("safetensors")
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in create_model("resnet8", 4).state_dict().items()}
    torch.save(state, root / "w.pt")
    save_file(state, str(root / "w.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(root / "test.npz", image=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), label=np.arange(16) % 4)
    return root


def test_plain_safetensors_through_eval_aa_equals_the_pt_file(weights, capsys):
    data = ["--dataset", f"npz:{weights / 'test.npz'}", *AA]
    for name in ("w.pt", "w.safetensors"):
        code, _, err = run_cli(capsys, "eval-aa", weights / name, "--arch", "resnet8", "--out", weights / f"ev-{name}", *data)
        assert code == 0, err
    pt, st = (json.loads((weights / f"ev-{n}" / "results.json").read_text()) for n in ("w.pt", "w.safetensors"))
    assert (st["clean_acc"], st["robust_acc"]) == (pt["clean_acc"], pt["robust_acc"]) and st["model"]["source"] == "state_dict"
    flags = [torch.load(weights / f"ev-{n}" / "flags.pt", weights_only=True)["robust"] for n in ("w.pt", "w.safetensors")]
    assert torch.equal(*flags)
    code, _, err = run_cli(capsys, "eval-aa", weights / "w.safetensors", "--out", weights / "ev-none", *data)
    assert code == 2 and "pass --arch NAME" in err


def test_config_json_beside_a_safetensors_file(weights, tmp_path, capsys):
    """Only gkl's config.json (format gkl-hub-model) is read; another library's is ignored, a damaged one refused."""
    from gklcli.loading import load_model_file

    (tmp_path / "model.safetensors").write_bytes((weights / "w.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": 1000}))  # timm's
    with pytest.raises(Exception, match="pass --arch NAME"):
        load_model_file(tmp_path / "model.safetensors")
    config = {"format": "gkl-hub-model", "arch": "resnet8", "num_classes": 4, "image_size": 8, "dataset": None, "recipe": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_model_file(tmp_path / "model.safetensors").arch == "resnet8"
    args = ["eval-aa", tmp_path / "model.safetensors", "--dataset", f"npz:{weights / 'test.npz'}", "--out", tmp_path / "ev", *AA]
    for bad, message in (({"num_classes": "four"}, "num_classes is 'four'"), ({"arch": "resnet9000"}, "unknown model 'resnet9000'")):
        (tmp_path / "config.json").write_text(json.dumps(config | bad))
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and message in err and "Traceback" not in err
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, *args, "--arch", "resnet20")
    assert code == 2 and "--arch resnet20 contradicts the checkpoint's architecture resnet8" in err
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "config.json (config.json): unreadable" in err
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, _, err = run_cli(capsys, "eval-aa", tmp_path / "broken.safetensors", "--arch", "resnet8", "--out", tmp_path / "ev2", *AA)
    assert code == 2 and "not a readable safetensors file" in err


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_export_robustbench_from_safetensors_in_either_format(tmp_path, capsys, fmt):
    torch.manual_seed(0)
    model = create_model("resnet-18", 10)
    save_file(model.state_dict(), str(tmp_path / "r18.safetensors"))
    code, out, err = run_cli(capsys, "export-robustbench", tmp_path / "r18.safetensors", "--arch", "resnet-18", "--name",
                             "Test2026St_R18", "--dataset", "cifar10", "--out", tmp_path / "rb", "--format", fmt)
    assert code == 0, err
    file = tmp_path / "rb" / "models" / "cifar10" / "Linf" / f"Test2026St_R18.{fmt}"
    assert ("load_model" if fmt == "pt" else "read back") in out
    state = torch.load(file, weights_only=True) if fmt == "pt" else load_file(str(file))
    import_robustbench()
    spec = RB_ARCHS["resnet-18"]
    theirs = spec.build(importlib.import_module(f"robustbench.model_zoo.architectures.{spec.module}"), 10, "cifar10")
    theirs.load_state_dict(state, strict=True)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    assert f"Linf/Test2026St_R18.{fmt}" in (tmp_path / "rb" / "zoo_entry.py").read_text()


def test_export_robustbench_refuses_an_unknown_format(tmp_path, capsys):
    save_file(create_model("resnet-18", 10).state_dict(), str(tmp_path / "r18.safetensors"))
    code, _, err = run_cli(capsys, "export-robustbench", tmp_path / "r18.safetensors", "--arch", "resnet-18", "--name", "X2026Y",
                           "--dataset", "cifar10", "--out", tmp_path / "rb", "--format", "onnx")
    assert code == 2 and "--format onnx: use pt" in err and not (tmp_path / "rb").exists()
