"""`gkl analyze`: Eq. (14) margins, class-wise scores and t-SNE, against hand computations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests_helpers import run_cli

from gklcli.analyze import class_margins, class_mean_scores, penultimate_features
from gklcli.loading import load_model_file
from gklcli.models import create_model


def test_class_margins_is_eq14():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.1, 0.5, 0.4]], dtype=torch.float64)
    # margin_y = s̄_y[y] − max_{k≠y} s̄_y[k]
    assert class_margins(scores).tolist() == pytest.approx([0.7 - 0.2, 0.3 - 0.4, 0.4 - 0.5])


def test_class_mean_scores_against_a_loop():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=4).eval()
    x, y = torch.rand(24, 3, 8, 8), torch.arange(24) % 4
    loaded = type("L", (), {"module": model, "num_classes": 4})()
    scores, counts = class_mean_scores(loaded, iter([(x[:10], y[:10]), (x[10:], y[10:])]), torch.device("cpu"))
    with torch.no_grad():
        p = F.softmax(model(x), dim=1).double()
    for c in range(4):
        torch.testing.assert_close(scores[c], p[y == c].mean(0))
    assert counts.tolist() == [6.0] * 4


def test_penultimate_features_are_what_the_classifier_sees():
    model = create_model("resnet8", num_classes=4).eval()
    x = torch.rand(5, 3, 8, 8)
    feats = penultimate_features(model, x)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        torch.testing.assert_close(F.linear(feats, linear.weight, linear.bias), model(x))


def _two_checkpoints(smoke_out: Path) -> tuple[str, str]:
    record = json.loads((smoke_out / "smoke" / "table1.json").read_text())
    rows = {r["labels"]["Index"]: r for r in record["tables"][0]["rows"]}
    return (str(Path(rows["(e)"]["cells"][1]["runs"][0]) / "last.pt"), str(Path(rows["(a)"]["cells"][1]["runs"][0]) / "last.pt"))


def test_analyze_commands_write_png_and_numbers(smoke_out, tmp_path, capsys):
    a, b = _two_checkpoints(smoke_out)
    code, text, err = run_cli(capsys, "analyze", "margins", a, b, "--out", str(tmp_path / "m"), "--device", "cpu")
    assert code == 0, err
    result = json.loads((tmp_path / "m" / "margins.json").read_text())
    assert (tmp_path / "m" / "margins.png").stat().st_size > 1000 and "positive for" in text
    # the margins of A, recomputed here from its test predictions (synthetic test split of its recipe)
    loaded = load_model_file(a, device=torch.device("cpu"))
    from gklcli.evaluate import load_eval_data

    x, y, _ = load_eval_data(None, loaded, None, 10000)
    with torch.no_grad():
        p = F.softmax(loaded.module.eval()(x), dim=1).double()
    s = torch.stack([p[y == c].mean(0) for c in range(loaded.num_classes)])
    assert result["margin_a"] == pytest.approx(class_margins(s).tolist(), abs=1e-9)
    code, text, _ = run_cli(capsys, "analyze", "scores", a, "--out", str(tmp_path / "s.png"), "--device", "cpu")
    assert code == 0 and (tmp_path / "s.png").is_file()
    assert json.loads((tmp_path / "s.json").read_text())["score"] == pytest.approx(s.diagonal().tolist(), abs=1e-9)
    code, text, err = run_cli(capsys, "analyze", "tsne", a, "--classes", "4", "--out", str(tmp_path / "t"), "--device", "cpu")
    assert code == 0, err
    emb = json.loads((tmp_path / "t" / "tsne.json").read_text())
    assert len(emb["embedding"]) == emb["images"] == int((y < 4).sum()) and len(emb["embedding"][0]) == 2


def test_tsne_without_scikit_learn_is_a_clear_error(smoke_out, capsys, monkeypatch):
    a, _ = _two_checkpoints(smoke_out)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import fails as if not installed
    code, _, err = run_cli(capsys, "analyze", "tsne", a, "--device", "cpu")
    assert code == 2 and "scikit-learn" in err and "Traceback" not in err


def test_plain_state_dicts_need_arch_and_a_dataset(tmp_path, capsys):
    model = create_model("resnet8", num_classes=10)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    code, _, err = run_cli(capsys, "analyze", "scores", str(tmp_path / "plain.pt"), "--device", "cpu")
    assert code == 2 and "--arch" in err
    code, _, err = run_cli(capsys, "analyze", "scores", str(tmp_path / "plain.pt"), "--arch", "resnet8", "--device", "cpu")
    assert code == 2 and "--dataset is needed" in err
