"""`gkl export-hub` and `hf://` models, without a network: the folder reloads strictly with the checkpoint's
logits, its model card parses with huggingface_hub and carries the eval-aa numbers, `hf://` specs resolve from
a Hugging Face cache laid out as huggingface_hub lays it out (offline) in eval-aa, the README's usage example and
distillation teachers; and the refusals (token, repo id, corrupted export, foreign results)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gklcli.loading import load_model_file
from gklcli.models import create_model
from gklcli.recipes import RECIPES_DIR, load_recipe
from tests_helpers import TINY_OVERRIDES, run_cli

REPO = "gkl-tests/tiny-resnet8"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
AA = ["--version", "custom", "--attacks", "apgd-ce", "--n-ex", "16", "--batch-size", "16", "--eps", "2/255", "-q"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A gkl checkpoint (resnet8, 4 classes, synthetic 8×8, random weights) and its eval-aa results."""
    root = tmp_path_factory.mktemp("hub-source")
    recipe = load_recipe(RECIPES_DIR / "quickstart.yaml", TINY_OVERRIDES)
    torch.manual_seed(0)
    model = create_model("resnet8", 4)
    torch.save({"format": "gkl-checkpoint", "format_version": 1, "gkl_version": "0.1.0", "kind": "at", "arch": "resnet8",
                "num_classes": 4, "dataset": "synthetic", "image_size": 8, "input_norm": None, "recipe": recipe.to_dict(),
                "recipe_hash": recipe.content_hash(), "weights": "raw", "model": model.state_dict(), "epoch": 1,
                "train_state": {"optimizer": {"state": {}, "param_groups": []}}}, root / "last.pt")
    with pytest.raises(SystemExit) as info:
        from gklcli.cli import main

        main(["eval-aa", str(root / "last.pt"), "--dataset", "synthetic", "--out", str(root / "ev"), *AA])
    assert (info.value.code or 0) == 0
    return root


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """`gkl export-hub` of the source checkpoint with its results."""
    from gklcli.cli import main

    out = tmp_path_factory.mktemp("hub-export") / "folder"
    with pytest.raises(SystemExit) as info:
        main(["export-hub", str(source / "last.pt"), "--repo-id", REPO, "--out", str(out), "--results", str(source / "ev" / "results.json")])
    assert (info.value.code or 0) == 0
    return out


@pytest.fixture
def hub_cache(exported, tmp_path, monkeypatch):
    """A Hugging Face cache holding the exported folder as REPO at COMMIT (refs/main → COMMIT), offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in exported.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def logits(model, size=8):
    x = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def reference(source):
    return load_model_file(source / "last.pt").module


def test_exported_folder_reloads_strictly_with_the_checkpoints_logits(source, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left beside it
    state = load_file(str(exported / "model.safetensors"))
    assert not any(k.startswith(("module.", "model.")) for k in state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    independent = create_model("resnet8", 4)
    independent.load_state_dict(state, strict=True)
    assert torch.equal(logits(independent), logits(reference(source)))
    # the loader users use: no --arch, everything from config.json
    loaded = load_model_file(exported / "model.safetensors")
    assert (loaded.arch, loaded.num_classes, loaded.dataset, loaded.source) == ("resnet8", 4, "synthetic", "safetensors")
    assert torch.equal(logits(loaded.module), logits(reference(source)))
    config = json.loads((exported / "config.json").read_text())
    ckpt = torch.load(source / "last.pt", weights_only=True)
    canonical = json.dumps(ckpt["recipe"], sort_keys=True, separators=(",", ":"))
    assert config["recipe_hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert config["source_sha256"] == hashlib.sha256((source / "last.pt").read_bytes()).hexdigest()
    assert (config["image_size"], config["threat_model"], config["eps"], config["dataset"]) == (8, "Linf", "2/255", "synthetic")
    assert config["input_norm"] == loaded.input_norm and config["gkl_version"] == "0.1.0"


def test_model_card_parses_and_carries_the_eval_aa_numbers(source, exported):
    from huggingface_hub import ModelCard

    results = json.loads((source / "ev" / "results.json").read_text())
    card = ModelCard.load(exported / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "gkl"
    assert {"gkl", "adversarial-robustness", "image-classification"} <= set(card.data.tags)
    assert "robustbench" not in card.data.tags  # synthetic data: no RobustBench leaderboard
    found = {e.metric_name: e for e in card.data.eval_results}
    assert found["Clean accuracy"].metric_value == round(results["clean_acc"], 2)
    robust = found["AutoAttack robust accuracy"]
    assert robust.metric_value == round(results["robust_acc"], 2) and robust.dataset_split == "test"
    assert robust.metric_args["eps"] == "2/255" and robust.metric_args["version"] == "custom"
    assert robust.metric_args["pyautoattack"] == results["versions"]["pyautoattack"]
    assert card.data.to_dict()["model-index"][0]["name"] == REPO.split("/")[1]
    text = (exported / "README.md").read_text()
    recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    assert recipe == torch.load(source / "last.pt", weights_only=True)["recipe"]
    assert "guards on" in text and "the first 16 test images" in text
    # the card's command re-evaluates at the card's ε and AutoAttack version, not eval-aa's defaults
    assert f"`gkl eval-aa hf://{REPO} --n-ex 10000 --eps 2/255 --version custom --attacks apgd-ce`" in text


@pytest.mark.parametrize("dataset, threat, robustbench", [("cifar10", "Linf", True), ("cifar100", "Linf", True),
                                                          ("cifar10", "L2", False), ("imagenet", "Linf", False),
                                                          ("cifar10", None, False)])
def test_the_robustbench_tag_is_only_for_cifar_linf(dataset, threat, robustbench):
    from gklcli.hub import card_tags

    assert ("robustbench" in card_tags({"dataset": dataset, "threat_model": threat, "kind": "at"})) == robustbench


def test_hf_spec_through_eval_aa_equals_the_checkpoint(source, hub_cache, tmp_path, capsys):
    want = json.loads((source / "ev" / "results.json").read_text())
    code, _, err = run_cli(capsys, "eval-aa", f"hf://{REPO}", "--out", tmp_path / "ev", *AA)  # dataset, input size: config.json
    assert code == 0, err
    got = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert (got["clean_acc"], got["robust_acc"], got["dataset"]) == (want["clean_acc"], want["robust_acc"], "synthetic")
    cached = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / "model.safetensors"
    assert got["model_sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()
    for spec in (f"hf://{REPO}@{COMMIT}", f"hf://{REPO}@{COMMIT}/model.safetensors", f"hf://models/{REPO}@main"):
        loaded = load_model_file(spec)
        assert loaded.path == cached and loaded.meta["hub"] == spec
        assert torch.equal(logits(loaded.module), logits(reference(source)))
    code, _, err = run_cli(capsys, "eval-aa", "hf://gkl-tests/absent", "--out", tmp_path / "absent", *AA)
    assert code == 2 and "not in the Hugging Face cache" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "eval-aa", "hf://not a/repo", "--out", tmp_path / "bad", *AA)
    assert code == 2 and "must be a Hugging Face Hub repository id" in err


def test_the_model_cards_usage_example_runs(source, exported, hub_cache, capsys):
    code = re.search(r"```python\n(.*?)```", (exported / "README.md").read_text(), re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert re.fullmatch(r"tensor\(\[\d, \d\]\)\n", capsys.readouterr().out)
    from gklcli.hub import load_hub_model

    assert torch.equal(logits(load_hub_model(REPO, revision=COMMIT)), logits(reference(source)))


def test_hf_spec_as_a_distillation_teacher(source, hub_cache):
    from gklcli.train.kd import load_teacher

    recipe = load_recipe(RECIPES_DIR / "kd/cifar100_res32x4_res8x4.yaml", [
        "model.arch=resnet8", "model.num_classes=null", "teacher.arch=resnet8", f"teacher.checkpoint=hf://{REPO}",
        "data.dataset=synthetic", "data.synthetic.num_classes=4", "data.synthetic.image_size=8"])
    teacher = load_teacher(recipe, 4, torch.device("cpu"), None)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(logits(teacher), logits(reference(source)))


def test_a_fresh_process_reads_the_cache_with_hf_hub_offline(source, hub_cache, tmp_path):
    """The documented environment (HF_HUB_CACHE, HF_HUB_OFFLINE=1) in a new `python -m gklcli` process."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "gklcli", "eval-aa", f"hf://{REPO}", "--out", str(tmp_path / "ev"), *AA],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = json.loads((source / "ev" / "results.json").read_text())
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["robust_acc"] == want["robust_acc"]


@pytest.mark.parametrize("repo_id", ["bad id", "owner/name/extra", "owner", "-owner/name", "owner/name.", "ow--ner/name",
                                     "owner/na..me", "owner/name\n", "o/" + "n" * 95])
def test_bad_repo_ids_are_refused(source, tmp_path, capsys, repo_id):
    code, _, err = run_cli(capsys, "export-hub", source / "last.pt", "--repo-id", repo_id, "--out", tmp_path / "x")
    assert code == 2 and "must be a Hugging Face Hub repository id" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_push_without_a_token_or_a_reachable_hub_is_one_line(source, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    args = ["export-hub", source / "last.pt", "--repo-id", REPO, "--push"]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "a")
    assert code == 2 and "no Hugging Face token; set HF_TOKEN" in err and len(err.strip().splitlines()) == 1
    assert "`hf auth login` or `huggingface-cli login`" in err  # huggingface_hub < 1.0 has only the second
    assert not (tmp_path / "a").exists()
    # a token, but no Hub at the endpoint (a closed local port): the folder is written, the upload is one line
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "b", "--private")
    assert code == 2 and f"--push {REPO}: the Hub cannot be reached" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "b" / "model.safetensors").is_file()
    # a re-run would refuse the kept folder: the line says it was verified and how to upload it
    assert f"{tmp_path / 'b'} was written and verified" in err
    assert f"`huggingface-cli upload {REPO} {tmp_path / 'b'} . --private`" in err
    code, _, err = run_cli(capsys, "export-hub", source / "last.pt", "--repo-id", REPO, "--out", tmp_path / "c", "--private")
    assert code == 2 and "--private goes with --push" in err


def test_verification_refuses_a_corrupted_export_and_leaves_nothing(source, tmp_path, capsys, monkeypatch):
    from gklcli import hub

    def corrupted(module):
        state = {k: v.clone() for k, v in module.state_dict().items()}
        state["fc.bias"] += 1e-3
        return state

    monkeypatch.setattr(hub, "plain_state", corrupted)
    code, _, err = run_cli(capsys, "export-hub", source / "last.pt", "--repo-id", REPO, "--out", tmp_path / "out")
    assert code == 2 and "verification: the exported model's logits differ" in err and "nothing was written" in err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


def test_foreign_results_and_an_occupied_folder_are_refused(source, tmp_path, capsys):
    results = json.loads((source / "ev" / "results.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps(results | {"model_sha256": "0" * 64}))
    code, _, err = run_cli(capsys, "export-hub", source / "last.pt", "--repo-id", REPO, "--out", tmp_path / "a",
                           "--results", tmp_path / "other.json")
    assert code == 2 and "these results are for another checkpoint" in err and not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export-hub", source / "last.pt", "--repo-id", REPO, "--out", tmp_path / "b")
    assert code == 2 and "not empty" in err and (tmp_path / "b" / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "export-hub", source / "last.pt", "--repo-id", REPO, "--out", tmp_path / "c", "--license", "MIT!")
    assert code == 2 and "--license 'MIT!'" in err


@pytest.mark.parametrize("text, expected", [
    ("hf://o/n", ("o/n", None, "model.safetensors")),
    ("hf://models/o/n@v1.0", ("o/n", "v1.0", "model.safetensors")),
    ("hf://o/n@refs/pr/3/sub/w.safetensors", ("o/n", "refs/pr/3", "sub/w.safetensors")),
    ("hf://o/n/sub/w.pt", ("o/n", None, "sub/w.pt")),
])
def test_hub_specs_parse(text, expected):
    from gklcli.hub_cache import parse_hub_spec

    spec = parse_hub_spec(text)
    assert (spec.repo_id, spec.revision, spec.filename) == expected


@pytest.mark.parametrize("text", ["hf://o", "hf://o/n/", "hf://o/n/../x.safetensors", "hf://o/n@", "hf://o/n@a b", "hf://o/n/*.bin"])
def test_malformed_hub_specs_are_one_line(text):
    from gklcli.errors import GKLError
    from gklcli.hub_cache import parse_hub_spec

    with pytest.raises(GKLError, match="not a Hub model; use hf://OWNER/NAME"):
        parse_hub_spec(text)


def _break(data, change):
    """`change` applied to a copy of `data`: ("del", dotted key) or (dotted key, value)."""
    data = json.loads(json.dumps(data))
    *head, last = change[1 if change[0] == "del" else 0].split(".")
    parent = data
    for part in head:
        parent = parent[part]
    if change[0] == "del":
        del parent[last]
    else:
        parent[last] = change[1]
    return data


def _one_line_refusal(err):
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("change, says", [
    (("del", "eps"), "missing eps"), (("del", "versions"), "missing versions"), (("versions", "x"), "versions is 'x'"),
    (("clean_acc", "35"), "clean_acc is '35'"), (("attacks", 5), "attacks is 5"), (("n_ex", True), "n_ex is True"),
    (("eps", "eight"), "eps is 'eight'"), (("stages", [{"attack": "apgd-ce"}]), "stages is"),
    (("guards", "yes"), "guards is 'yes'"),
])
def test_malformed_results_are_one_line(source, tmp_path, capsys, change, says):
    results = json.loads((source / "ev" / "results.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps(_break(results, change)))
    code, _, err = run_cli(capsys, "export-hub", source / "last.pt", "--repo-id", REPO, "--out", tmp_path / "out",
                           "--results", tmp_path / "r.json")
    assert code == 2 and _one_line_refusal(err) and f"--results {tmp_path / 'r.json'}: " in err and says in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [("del", "guards"), ("del", "model_sha256"), ("del", "attacks"), ("del", "stages"),
                                    ("del", "versions.torch"), ("del", "versions.pyautoattack")])
def test_results_without_optional_keys_export(source, tmp_path, capsys, change):
    results = json.loads((source / "ev" / "results.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps(_break(results, change)))
    code, _, err = run_cli(capsys, "export-hub", source / "last.pt", "--repo-id", REPO, "--out", tmp_path / "out",
                           "--results", tmp_path / "r.json")
    assert code == 0, err
    assert "unrecorded" in (tmp_path / "out" / "README.md").read_text() or change[1] in ("attacks", "stages")


@pytest.mark.parametrize("change, says", [
    (("recipe.data", 5), "recipe.data is 5"), (("del", "recipe.loss"), "recipe.loss is None"),
    (("recipe.data.synthetic", 5), "recipe.data.synthetic is 5"), (("recipe.attack.eps", "8/255"), "recipe.attack.eps"),
    (("image_size", 200000), "image_size is 200000; a gkl config.json records it as an integer from 1 to 4096"),
    (("kind", 3), "kind is 3"), (("eps", 0.03), "eps is 0.03"), (("threat_model", []), "threat_model is []"),
    (("recipe_hash", 1), "recipe_hash is 1"),
])
def test_malformed_config_json_is_one_line(exported, tmp_path, capsys, change, says):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    config = json.loads((exported / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(_break(config, change)))
    for args in (["export-hub", folder / "model.safetensors", "--repo-id", REPO, "--out", tmp_path / "out"],
                 ["eval-aa", folder / "model.safetensors", "--out", tmp_path / "ev", *AA]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and _one_line_refusal(err) and f"config.json: {says}" in err, err
