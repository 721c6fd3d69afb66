"""`gkl eval-aa` on a small trained model and synthetic data: equal to pyautoattack called directly,
shards + merge and resume equal to one-shot runs, guards refuse what they should, PGD/CW numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from gklcli.data import make_synthetic
from gklcli.errors import GKLError
from gklcli.attacks import cw_margin_loss
from gklcli.evaluate import run_guards
from gklcli.loading import load_model_file
from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.at import train_at
from tests_helpers import TINY_OVERRIDES, run_cli

AA = ["--version", "custom", "--attacks", "apgd-ce,apgd-t", "--batch-size", "16", "--n-ex", "48", "--eps", "2/255", "-q"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A resnet8 adversarially trained for two epochs on 10-class synthetic 8×8 data (gkl checkpoint)."""
    out = tmp_path_factory.mktemp("trained")
    recipe = load_recipe(RECIPES_DIR / "quickstart.yaml", [
        *TINY_OVERRIDES, "data.synthetic.num_classes=10", "data.synthetic.num_train=704", "data.synthetic.num_test=64",
        "data.batch_size=64", "schedule.epochs=4", "attack.eps=4/255", "eval.final_test=false", "ema.mode=none"])
    train_at(recipe, out_dir=out, quiet=True, device="cpu")  # the model the CPU assertions below were written for
    return out / "last.pt"


def synthetic_test(n=48):
    src = make_synthetic(64, 10, 8, 0, "test")
    x = (torch.from_numpy(src.images[:n]).permute(0, 3, 1, 2).float() / 255).contiguous()  # pyautoattack needs contiguous
    return x, torch.from_numpy(src.labels[:n]).long()


def results(path):
    return json.loads((path / "results.json").read_text())


def flags(path):
    return torch.load(path / "flags.pt", weights_only=True)


def test_eval_aa_equals_pyautoattack_called_directly(trained, tmp_path, capsys, device):
    """Both on the test device: bit-equal flags on a GPU need fp32 convolutions without TF32 and cuDNN's
    deterministic algorithms, which conftest sets for every test."""
    from pyautoattack import AutoAttack

    code, out, err = run_cli(capsys, "eval-aa", trained, "--dataset", "synthetic", "--out", tmp_path / "ev", "--device", str(device), *AA)
    assert code == 0, err
    ours = results(tmp_path / "ev")
    model = load_model_file(trained, device=device).module
    x, y = synthetic_test()
    adversary = AutoAttack(model, attacks=["apgd-ce", "apgd-t"], device=device, eps=2 / 255, norm="Linf", seed=0, version="custom")
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=16)
    direct = (y_adv.cpu() == y)
    assert torch.equal(flags(tmp_path / "ev")["robust"], direct)
    assert ours["robust_acc"] == pytest.approx(100 * direct.float().mean().item(), abs=1e-9)
    with torch.no_grad():
        assert ours["clean_acc"] == pytest.approx(100 * (model(x.to(device)).argmax(1).cpu() == y).float().mean().item(), abs=1e-9)
    # per-stage numbers: robust accuracy after each attack, ending at the final number
    assert [s["attack"] for s in ours["stages"]] == ["apgd-ce", "apgd-t"]
    assert ours["stages"][-1]["robust_acc"] == pytest.approx(ours["robust_acc"])
    assert ours["n_clean"] - sum(s["removed"] for s in ours["stages"]) == ours["n_robust"]
    assert 0 < ours["robust_acc"] < ours["clean_acc"]  # a meaningful model: attacks remove some points, not all
    assert ours["model_sha256"] and ours["versions"]["pyautoattack"] == "0.2.0" and ours["guards"] is True
    assert "AutoAttack" in (tmp_path / "ev" / "results.md").read_text()
    assert f"{ours['robust_acc']:.2f}%" in out


def test_shards_merge_and_resume_equal_one_shot(trained, tmp_path, capsys):
    base = ["eval-aa", trained, "--dataset", "synthetic", "--chunk-size", "16", *AA]
    assert run_cli(capsys, *base, "--out", tmp_path / "one")[0] == 0
    for i in range(2):
        code, out, _ = run_cli(capsys, *base, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}")
        assert code == 0
    assert "--merge" in out and not (tmp_path / "s1" / "results.json").exists()  # a shard alone is incomplete
    code, _, err = run_cli(capsys, "eval-aa", "--merge", tmp_path / "s0", "--merge", tmp_path / "s1", "--out", tmp_path / "merged")
    assert code == 0, err
    one, merged = results(tmp_path / "one"), results(tmp_path / "merged")
    for key in ("clean_acc", "robust_acc", "n_robust", "stages"):
        assert one[key] == merged[key], key
    assert torch.equal(flags(tmp_path / "one")["robust"], flags(tmp_path / "merged")["robust"])

    # an interrupted run: one chunk and the results are missing; --resume redoes only that chunk
    chunks = sorted((tmp_path / "one" / "chunks").glob("chunk_*.pt"))
    kept = {c: c.stat().st_mtime_ns for c in chunks[1:]}
    chunks[0].unlink()
    (tmp_path / "one" / "results.json").unlink()
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "one")
    assert code == 2 and "--resume" in err
    assert run_cli(capsys, *base, "--out", tmp_path / "one", "--resume")[0] == 0
    assert {c: c.stat().st_mtime_ns for c in chunks[1:]} == kept
    assert results(tmp_path / "one")["robust_acc"] == one["robust_acc"]
    # resuming with other settings is refused, naming them
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "one", "--resume", "--seed", "1")
    assert code == 2 and "seed" in err


def test_incomplete_merge_and_bad_shard_are_refused(trained, tmp_path, capsys):
    base = ["eval-aa", trained, "--dataset", "synthetic", "--chunk-size", "16", *AA]
    assert run_cli(capsys, *base, "--shard", "0/3", "--out", tmp_path / "a")[0] == 0
    code, _, err = run_cli(capsys, "eval-aa", "--merge", tmp_path / "a", "--out", tmp_path / "m")
    assert code == 2 and "2 of 3 chunks are not finished" in err
    code, _, err = run_cli(capsys, "eval-aa", trained, "--dataset", "synthetic", "--shard", "0/2", "--out", tmp_path / "b", *AA)
    assert code == 2 and "--chunk-size" in err
    code, _, err = run_cli(capsys, *base, "--shard", "2/2", "--out", tmp_path / "c")
    assert code == 2 and "0 <= i < n" in err


def test_pgd_cw_eps_sweep_and_no_guards_are_recorded(trained, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval-aa", trained, "--dataset", "synthetic", "--out", tmp_path / "e", "--pgd", "5",
                             "--cw", "5", "--eps-list", "1/255,2/255", "--no-guards", "--version", "custom",
                             "--attacks", "apgd-ce", "--n-ex", "32", "--batch-size", "32", "-q")
    assert code == 0, err
    r = results(tmp_path / "e")
    assert set(r["other_attacks"]) == {"pgd-5", "cw-5"} and r["guards"] is False
    assert [e["eps"] for e in r["eps_sweep"]] == ["8/255", "1/255", "2/255"]
    assert r["eps_sweep"][1]["robust_acc"] >= r["eps_sweep"][2]["robust_acc"] >= r["robust_acc"]  # smaller balls
    assert r["worst_case_acc"] <= min(r["robust_acc"], *r["other_attacks"].values())
    assert r["other_attacks"]["pgd-5"] <= r["clean_acc"] and "PGD-5" in out


def test_cw_margin_loss_matches_a_per_sample_formula():
    z = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    naive = sum(max(z[i, j] for j in range(5) if j != y[i]) - z[i, y[i]] for i in range(6))
    assert cw_margin_loss(z, z, y) == pytest.approx(float(naive), rel=1e-6)


class _Noisy(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] + torch.randn(len(x), 10)


class _BatchDependent(nn.Module):
    def forward(self, x):
        x = x.flatten(1)[:, :10]
        return x - x.mean(0, keepdim=True)


class _StaysTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(10)

    def train(self, mode=True):
        return super().train(True)

    def forward(self, x):
        return self.bn(x.flatten(1)[:, :10])


class _ExpectsNormalised(nn.Module):
    """Predicts class 0 when the (normalised) red channel is above its mean, else class 1."""

    def forward(self, x):
        score = x[:, 0].mean((1, 2))
        return torch.stack([score, -score], 1)


def test_each_guard_refuses_what_it_should():
    x = torch.rand(64, 3, 8, 8)
    y = torch.randint(0, 10, (64,))
    cpu = torch.device("cpu")
    with pytest.raises(GKLError, match="not deterministic"):
        run_guards(_Noisy().eval(), x, y, 10, "cifar10", cpu)
    with pytest.raises(GKLError, match="depend on the batch"):
        run_guards(_BatchDependent().eval(), x, y, 10, "cifar10", cpu)
    with pytest.raises(GKLError, match="training mode"):
        run_guards(_StaysTraining().eval(), x, y, 10, "cifar10", cpu)
    with pytest.raises(GKLError, match="data has 5 classes"):
        run_guards(_BatchDependent().eval(), x, y % 5, 5, "cifar10", cpu)
    mean = 0.4914
    y2 = ((x[:, 0].mean((1, 2)) - mean) < 0).long()  # the label a normalised input would give
    with pytest.raises(GKLError, match="expect normalised inputs"):
        run_guards(_ExpectsNormalised().eval(), x, y2, 2, "cifar10", cpu)
    info = run_guards(_ExpectsNormalised().eval(), (x - mean) * 0.25 + 0.5, y2, 2, "cifar10", cpu)
    assert info["repeat_max_diff"] == 0.0


def test_plain_state_dict_needs_arch_and_loads_strict(tmp_path, capsys):
    from gklcli.models import create_model

    model = create_model("resnet8", 10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "rb.pt")
    code, _, err = run_cli(capsys, "eval-aa", tmp_path / "rb.pt", "--dataset", "cifar10", "--out", tmp_path / "x")
    assert code == 2 and "--arch" in err
    loaded = load_model_file(tmp_path / "rb.pt", arch="resnet8")
    assert loaded.num_classes == 10 and loaded.source == "state_dict"
    with pytest.raises(GKLError, match="do not fit"):
        load_model_file(tmp_path / "rb.pt", arch="resnet20")
    np.savez(tmp_path / "d.npz", image=np.zeros((4, 8, 8, 3), np.uint8), label=np.array([0, 1, 2, 30]))
    code, _, err = run_cli(capsys, "eval-aa", tmp_path / "rb.pt", "--arch", "resnet8", "--dataset", f"npz:{tmp_path / 'd.npz'}",
                           "--out", tmp_path / "y")
    assert code == 2 and "labels must lie in [0, 9]" in err


def test_robustbench_zoo_model_from_a_local_models_directory(tmp_path, capsys):
    from gklcli.models import create_model

    torch.manual_seed(0)
    model = create_model("wrn-34-10", 10)
    (tmp_path / "models" / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(model.state_dict(), tmp_path / "models" / "cifar10" / "Linf" / "Cui2023Decoupled_WRN-34-10.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "t.npz", image=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), label=np.arange(4))
    args = ["eval-aa", "--robustbench-model", "Cui2023Decoupled_WRN-34-10", "--model-dir", tmp_path / "models",
            "--zoo-dataset", "cifar10", "--dataset", f"npz:{tmp_path / 't.npz'}", "--version", "custom", "--attacks", "apgd-ce",
            "--n-ex", "4", "--out", tmp_path / "ev", "-q"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    r = results(tmp_path / "ev")
    with torch.no_grad():
        x = torch.from_numpy(np.load(tmp_path / "t.npz")["image"]).permute(0, 3, 1, 2).float() / 255
        expected = 100 * (model.eval()(x).argmax(1) == torch.arange(4)).float().mean().item()
    assert r["clean_acc"] == pytest.approx(expected) and r["model"]["robustbench_name"] == "Cui2023Decoupled_WRN-34-10"
    code, _, err = run_cli(capsys, *[a if a != "Cui2023Decoupled_WRN-34-10" else "Cui2023Decoupled_WRN-28-10" for a in args])
    assert code == 2 and "not found" in err


def test_individual_attacks_and_cw_pgd_stay_in_the_ball(trained, tmp_path, capsys):
    from gklcli.evaluate import EvalConfig, pgd_flags

    code, _, err = run_cli(capsys, "eval-aa", trained, "--dataset", "synthetic", "--out", tmp_path / "i", "--individual", *AA)
    assert code == 0, err
    r = results(tmp_path / "i")
    assert set(r["individual"]) == {"apgd-ce", "apgd-t"}
    assert all(r["robust_acc"] <= acc <= r["clean_acc"] for acc in r["individual"].values())  # each alone is weaker than both
    model = load_model_file(trained).module
    x, y = synthetic_test(16)
    from gklcli.attacks import pgd_linf

    x_adv = pgd_linf(model, x, y, cw_margin_loss, eps=2 / 255, step_size=1 / 255, steps=5, init="uniform")
    assert (x_adv - x).abs().max() <= 2 / 255 + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():  # the CW attack does not lower the margin loss it maximises
        assert cw_margin_loss(model(x_adv), None, y) >= cw_margin_loss(model(x), None, y)
    cfg = EvalConfig(dataset="synthetic", batch_size=8, eps=2 / 255)
    assert pgd_flags(model, x, y, "cw", 5, cfg, torch.device("cpu")).shape == (16,)


def test_shards_can_share_one_output_directory(trained, tmp_path, capsys):
    base = ["eval-aa", trained, "--dataset", "synthetic", "--chunk-size", "24", *AA, "--out", tmp_path / "shared"]
    code, out, _ = run_cli(capsys, *base, "--shard", "0/2")
    assert code == 0 and "--merge" in out
    code, out, err = run_cli(capsys, *base, "--shard", "1/2")  # the last shard completes the set and merges
    assert code == 0, err
    assert results(tmp_path / "shared")["n_ex"] == 48 and "merged from" not in (tmp_path / "shared" / "results.md").read_text()
