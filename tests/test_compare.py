"""`gkl compare` on two tiny runs made through the real CLI that differ in one recipe key: the metrics
table, exactly that key, the figure, compare.json; bad input is one line naming the path."""

from __future__ import annotations

import json
import shutil

import pytest

from gklcli.cli import main
from tests_helpers import TINY_OVERRIDES, run_cli


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """`gkl train-at quickstart` twice (2 epochs, 6 steps each), the second with loss.gamma=0.3."""
    root = tmp_path_factory.mktemp("compare")
    sets = sum((["--set", s] for s in [*TINY_OVERRIDES, "schedule.epochs=2", "output.plots=false"]), [])
    for name, extra in (("gamma04", []), ("gamma03", ["--set", "loss.gamma=0.3"])):
        with pytest.raises(SystemExit) as exit_info:
            main(["train-at", "quickstart", "--out", str(root / name), "-q", "--device", "cpu", *sets, *extra])
        assert (exit_info.value.code or 0) == 0
    return root


def test_compare_lists_the_metrics_the_differing_key_and_draws_the_curves(two_runs, capsys):
    out = two_runs / "report"
    code, stdout, stderr = run_cli(capsys, "compare", two_runs / "gamma04", two_runs / "gamma03", "--out", out)
    assert code == 0, stderr
    report = json.loads((out / "compare.json").read_text())
    assert report["recipe_differences"] == {"loss.gamma": {"gamma04": 0.4, "gamma03": 0.3}}
    assert [r["label"] for r in report["runs"]] == ["gamma04", "gamma03"] and all(r["finished"] for r in report["runs"])
    for run in ("gamma04", "gamma03"):
        records = [json.loads(x) for x in (two_runs / run / "metrics.jsonl").read_text().splitlines()]
        results = json.loads((two_runs / run / "results.json").read_text())
        metrics = {k: v[run] for k, v in report["metrics"].items()}
        assert metrics["final.val_pgd"] == records[-1]["val_pgd"]
        assert metrics["max.val_clean"] == max(r["val_clean"] for r in records)
        assert metrics["last.test_pgd"] == results["last"]["test_pgd"] and metrics["best.epoch"] == results["best"]["epoch"]
        assert metrics["mean.s_iter"] == pytest.approx(sum(r["s_iter"] for r in records) / len(records))
    assert report["curves"] == ["train_loss", "val_clean", "val_pgd"]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "compare.md").read_text()
    assert "| loss.gamma | 0.4 | 0.3 |" in text and "| final.val_pgd |" in text and "![curves](compare.png)" in text
    assert "loss.gamma" in stdout and "compare.md" in stdout


def test_compare_reads_autoattack_results_under_the_run(two_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_runs / "gamma04", run)
    aa = {"clean_acc": 50.0, "robust_acc": 25.0, "n_ex": 32}
    (run / "eval" / "best-aa").mkdir(parents=True)
    (run / "eval" / "best-aa" / "results.json").write_text(json.dumps(aa))
    code, _, stderr = run_cli(capsys, "compare", run, two_runs / "gamma03", "--out", tmp_path / "c")
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "c" / "compare.json").read_text())["metrics"]
    assert metrics["aa.best.robust_acc"] == {"run": 25.0, "gamma03": None} and metrics["aa.best.clean_acc"]["run"] == 50.0


@pytest.mark.parametrize("damage, message", [
    (lambda run: shutil.rmtree(run), "not a run folder (no such directory)"),
    (lambda run: (run / "metrics.jsonl").unlink(), "not a run folder with finished epochs (no metrics.jsonl)"),
    (lambda run: (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo'), "metrics.jsonl: line 2 is not a JSON record"),
    (lambda run: (run / "results.json").write_text("{"), "results.json: unreadable"),
    (lambda run: (run / "recipe.yaml").write_text("a: [1"), "recipe.yaml: line"),
])
def test_bad_input_is_one_line_naming_the_path(two_runs, tmp_path, capsys, damage, message):
    run = tmp_path / "run"
    shutil.copytree(two_runs / "gamma04", run)
    damage(run)
    code, _, stderr = run_cli(capsys, "compare", run, two_runs / "gamma03", "--out", tmp_path / "c")
    assert code == 2 and message in stderr and str(run) in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_a_run_given_twice_is_refused(two_runs, tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "compare", two_runs / "gamma04", two_runs / "gamma04", "--out", tmp_path / "c")
    assert code == 2 and "given twice" in stderr


def test_compare_ignores_an_evaluation_with_a_non_numeric_n_ex(two_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_runs / "gamma04", run)
    for name, n_ex in (("best-aa", 32), ("best-edited", "many")):
        (run / "eval" / name).mkdir(parents=True)
        (run / "eval" / name / "results.json").write_text(json.dumps({"clean_acc": 50.0, "robust_acc": 25.0, "n_ex": n_ex}))
    code, _, stderr = run_cli(capsys, "compare", run, two_runs / "gamma03", "--out", tmp_path / "c")
    assert code == 0 and "Traceback" not in stderr, stderr
    metrics = json.loads((tmp_path / "c" / "compare.json").read_text())["metrics"]
    assert metrics["aa.best.robust_acc"]["run"] == 25.0
