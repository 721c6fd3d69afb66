"""The real `gkl` entry point: in-process through `gklcli.cli.main`, and once as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from gklcli import __version__
from gklcli.cli import main
from gklcli.recipes import RECIPES_DIR, load_recipe


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_version_and_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"gkl {__version__}"
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "models" in out and "show-recipe" in out


def test_models_json_lists_registry_with_robustbench_classes(capsys):
    code, out, _ = run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["wrn-34-10"]["params"] == 46_160_474
    assert rows["wrn-34-10"]["robustbench"].startswith("WideResNet(depth=34, widen_factor=10")
    assert rows["wrn-28-10-swish"]["robustbench"].startswith("DMWideResNet(")
    assert rows["resnet32x4"]["family"] == "kd-cifar" and rows["resnet18"]["num_classes"] == 1000


def test_models_table(capsys):
    code, out, _ = run(capsys, "models", "--family", "at")
    assert code == 0 and "wrn-70-16-swish" in out and "resnet8x4" not in out


def test_show_recipe_prints_the_resolved_recipe(capsys):
    code, out, _ = run(capsys, "show-recipe", "cifar100_basic", "--set", "loss.gamma=0.3", "-s", "attack.eps=4/255")
    assert code == 0
    shown = yaml.safe_load(out)
    expected = load_recipe(RECIPES_DIR / "cifar100_basic.yaml", ["loss.gamma=0.3", "attack.eps=4/255"]).to_dict()
    assert shown == expected and shown["loss"]["gamma"] == 0.3
    code, out, _ = run(capsys, "show-recipe", "cifar100_basic", "--json")
    assert json.loads(out)["data"]["dataset"] == "cifar100"


@pytest.mark.parametrize(
    "args,message",
    [
        (["show-recipe", "cifar100_basic", "--set", "loss.gama=1"], "loss.gama: unknown key"),
        (["show-recipe", "cifar100_basic", "--set", "loss.gamma=-1"], "loss.gamma: must be >= 0.0, got -1.0"),
        (["show-recipe", "no_such_recipe"], "recipe not found: no_such_recipe"),
        (["models", "--family", "rnn"], "--family rnn: no such family"),
    ],
)
def test_user_errors_are_one_line_exit_2_without_traceback(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(capsys):
    code, _, err = run(capsys, "--debug", "show-recipe", "no_such_recipe")
    assert code == 2 and "Traceback" in err and "GKLError" in err


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys, "show-recipe")
    assert code == 2 and "Missing argument" in err


def test_console_script_subprocess(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {gamma: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "gklcli", "show-recipe", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: loss.gamma: must be <= 1.0, got 3.0"
