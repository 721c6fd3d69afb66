"""One home for every concept: the loss registry against the formulas it names, settings a loss
does not read refused, and the defects the structure review found (each reproduced here)."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gklcli.losses import LOSSES, LossTerm, dist_loss, get_loss, gkl_loss, ikl_loss, kl_div, loss_names
from tests_helpers import TINY_OVERRIDES, run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "gklcli"


def _settings(**changes):
    base = dict(alpha=3.0, beta=2.0, gamma=0.5, temperature=2.0, weight_temperature=1.5, prior_temperature=4.0,
                normalization="weights", weights="sample", trades_beta=6.0, kd_weight=0.7, dist_beta=1.5, dist_gamma=0.5)
    return SimpleNamespace(**(base | changes))


def _naive_kl(s, t, temperature=1.0):
    p = F.softmax(t / temperature, 1)
    return (p * (p.log() - F.log_softmax(s / temperature, 1))).sum(1).mean()


def test_every_registry_loss_computes_the_formula_it_names():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    c = _settings()
    value = {name: e.compute(s, t, y, None, c).total for name, e in LOSSES.items()}
    torch.testing.assert_close(value["gkl"], gkl_loss(s, t, alpha=3, beta=2, gamma=0.5, temperature=2, weight_temperature=1.5))
    torch.testing.assert_close(value["ikl"], ikl_loss(s, t, alpha=3, beta=2, temperature=2, weight_temperature=1.5))
    torch.testing.assert_close(value["trades"], 6.0 * _naive_kl(s, t))
    torch.testing.assert_close(value["kd"], 0.7 * 4.0 * _naive_kl(s, t, 2.0))
    p, q = F.softmax(t / 2, 1), F.softmax(s / 2, 1)
    m = (p + q) / 2
    naive_jsd = 0.5 * ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1)).mean()
    torch.testing.assert_close(value["jsd"], 0.7 * naive_jsd)
    torch.testing.assert_close(value["ce"], F.cross_entropy(s.float(), y))  # fp32, as the attack loss always was
    torch.testing.assert_close(value["kl"], kl_div(s, t))
    torch.testing.assert_close(value["dist"], 0.7 * dist_loss(s, t, beta=1.5, gamma=0.5, temperature=2.0))  # naive: test_dist_loss.py
    assert loss_names("at") == ("gkl", "ikl", "dkl", "trades")
    assert loss_names("kd") == ("gkl", "ikl", "kd", "jsd", "dkd", "dist", "ce")
    with pytest.raises(ValueError, match="unknown distillation loss 'trades'; use one of gkl, ikl, kd, jsd, dkd, dist, ce"):
        get_loss("trades", "kd")


def test_a_loss_term_owns_its_class_prior_and_carries_it_across_a_resume():
    torch.manual_seed(1)
    term = LossTerm("gkl", "at", _settings(weights="class"), 4)
    assert term.prior is not None and term.prior.temperature == 4.0  # AT: the prior at τ
    assert LossTerm("gkl", "kd", _settings(weights="class"), 4).prior.temperature == 1.5  # KD: at T2, as officially
    assert LossTerm("gkl", "at", _settings(weights="sample"), 4).prior is None
    logits, y = torch.randn(16, 4), torch.randint(0, 4, (16,))
    term.update(logits, y)
    term.end_epoch()
    again = LossTerm("gkl", "at", _settings(weights="class"), 4)
    again.load_state_dict(json.loads(json.dumps({"prior": None})) | term.state_dict())
    torch.testing.assert_close(again.matrix, term.matrix)
    s, t = torch.randn(16, 4), torch.randn(16, 4)
    torch.testing.assert_close(again(s, t, y).total, term(s, t, y).total)
    # the attack loss shares the training prior (official GKL-AT): α = β = γ = 1 with that prior
    attack = term.attack("gkl")
    torch.testing.assert_close(attack(s, t, y), gkl_loss(s, t, alpha=1, beta=1, targets=y, class_prior=term.matrix))


def _sets(*extra):
    return sum((["--set", s] for s in [*TINY_OVERRIDES, "schedule.epochs=1", *extra]), [])


def test_a_setting_the_loss_does_not_read_is_refused_naming_it(capsys):
    kd = "recipes/kd/cifar100_res56_res20.yaml"
    code, _, err = run_cli(capsys, "distill", kd, "--dry-run", "--set", "loss.prior_temperature=2")
    assert code == 2 and "loss.prior_temperature: does nothing for the distillation loss 'gkl'" in err
    assert "weight_temperature" in err  # it names what the loss does read
    code, _, err = run_cli(capsys, "distill", kd, "--dry-run", "--set", "loss.name=kd", "--set", "loss.gamma=0.3")
    assert code == 2 and "loss.gamma: does nothing for the distillation loss 'kd'" in err
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--dry-run", "--set", "loss.trades_beta=3")
    assert code == 2 and "loss.trades_beta: does nothing for the adversarial-training loss 'gkl'" in err
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--dry-run", "--set", "loss.name=kd")
    assert code == 2 and "unknown adversarial-training loss 'kd'; use one of gkl, ikl, dkl, trades" in err
    # settings a loss reads pass, and a KD row that extends a GKL recipe (inheriting its γ) is fine
    assert run_cli(capsys, "train-at", "quickstart", "--dry-run", "--set", "loss.prior_temperature=2")[0] == 0
    assert run_cli(capsys, "distill", "recipes/kd/cifar100_res32x4_shuv2_kd.yaml", "--dry-run")[0] == 0


def test_the_preview_and_the_report_describe_only_what_the_loss_reads(capsys):
    code, text, _ = run_cli(capsys, "train-at", "quickstart", "--dry-run", "--set", "loss.name=trades")
    text = " ".join(text.split())
    assert code == 0 and "loss CE ×1 + TRADES (β_TRADES=6)" in text and "α=" not in text.split("averaging")[0].split("loss CE")[1]
    code, text, _ = run_cli(capsys, "distill", "recipes/kd/cifar100_res56_res20.yaml", "--dry-run")
    text = " ".join(text.split())
    assert code == 0 and "τ=" not in text.split("warm-up")[0].split("teacher")[-1]  # KD has no prior temperature


def test_a_table_level_metric_fills_every_numeric_column(tmp_path):
    from gklcli.tables import parse_table

    path = tmp_path / "tablem.yaml"
    path.write_text("name: tablem\npaper: gkl\ntitle: T\ncolumns: [Method, Student A, Student B]\nmetric: top1\nrows:\n"
                    "  - {labels: [GKL-KD], paper: [70.1, 71.2], recipe: cifar100_res32x4_res8x4}\n")
    (row,) = parse_table(path).rows
    assert [(c.column, c.metric) for c in row.cells] == [("Student A", "top1"), ("Student B", "top1")]


def test_the_waiting_lock_serialises_parallel_smoke_set_up(tmp_path):
    from gklcli.checkpoint import waiting_lock

    lock = tmp_path / ".smoke-inputs.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from gklcli.checkpoint import waiting_lock
with waiting_lock({str(lock)!r}):
    print("held", flush=True)
    time.sleep(1.5)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.perf_counter()
    with waiting_lock(lock):
        waited = time.perf_counter() - start
    holder.wait(timeout=30)
    assert waited > 0.8  # it waited for the holder instead of building the same inputs at the same time


def test_the_perturbation_check_accepts_an_empty_input():
    from gklcli.evaluate import perturbation_size

    empty = torch.zeros(0, 3, 4, 4)
    assert perturbation_size(empty, empty, "Linf") == 0.0 and perturbation_size(empty, empty, "L2") == 0.0
    x = torch.zeros(2, 3, 4, 4)
    assert perturbation_size(x + 0.01, x, "Linf") == pytest.approx(0.01)


def _counter_after(lines: list[str], n: int = 8):
    from gklcli.aalog import StageCounter

    counter = StageCounter(n)
    for line in lines:
        counter.emit(logging.LogRecord("auto-attack", logging.DEBUG, __file__, 0, line, (), None))
    return counter


def test_per_attack_counts_read_from_the_log_must_add_up_or_the_evaluation_stops():
    from gklcli.errors import GKLError

    good = ["using custom version including apgd-ce, apgd-t.", "initial accuracy: 62.50%", "running apgd-ce",
            "apgd-ce - 1/1 - 2 out of 5 successfully perturbed", "robust accuracy after APGD-CE: 37.50% (total time 0.3 s)",
            "running apgd-t", "apgd-t - 1/1 - 1 out of 3 successfully perturbed", "robust accuracy after APGD-T: 25.00% (total time 0.6 s)"]
    counter = _counter_after(good)
    counter.verify(2)
    assert counter.removed == {"apgd-ce": 2, "apgd-t": 1}
    # another wording of the per-batch line: nothing is counted, and the sum no longer matches the result
    changed = [line.replace("successfully perturbed", "perturbed") for line in good]
    with pytest.raises(GKLError, match="do not add up to its result"):
        _counter_after(changed).verify(2)
    with pytest.raises(GKLError, match="no longer reports 'initial accuracy"):
        _counter_after([line for line in good if not line.startswith("initial")]).verify(2)


def test_overwrite_removes_the_old_runs_tensorboard_curves(tmp_path, capsys):
    out = tmp_path / "run"
    sets = _sets("output.tensorboard=true")
    assert run_cli(capsys, "train-at", "quickstart", "--out", out, "-q", "--device", "cpu", *sets)[0] == 0
    first = sorted(p.name for p in (out / "tensorboard").rglob("events.*"))
    assert first
    time.sleep(1.1)  # event files are named by the second
    assert run_cli(capsys, "train-at", "quickstart", "--out", out, "-q", "--overwrite", "--device", "cpu", *sets)[0] == 0
    second = sorted(p.name for p in (out / "tensorboard").rglob("events.*"))
    assert len(second) == 1 and second != first  # only the new run's curves


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_evaluation_export_analysis_and_loading_do_not_import_training():
    for name in ("evaluate.py", "export.py", "analyze.py", "loading.py", "checkpoint.py", "distributed.py", "losses.py", "datasets.py"):
        path = PACKAGE / name
        if path.is_file():
            assert not {m for m in _imports(path) if m.startswith("gklcli.train")}, name


def test_no_module_imports_a_private_name_of_another_and_none_is_over_650_lines():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gklcli"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.relative_to(PACKAGE)} imports {private} from {node.module}"
        assert len(path.read_text().splitlines()) <= 650, path
