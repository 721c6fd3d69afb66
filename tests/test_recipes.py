"""Recipes: inheritance, overrides, typing and validation messages that name file, key and value."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gklcli.errors import GKLError
from gklcli.recipes import RECIPES_DIR, bundled_recipes, load_recipe, parse_override, resolve_recipe_path


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_bundled_recipe_merges_its_base_and_uses_paper_values():
    r = load_recipe(RECIPES_DIR / "cifar100_basic.yaml")
    assert (r.loss.alpha, r.loss.beta, r.loss.gamma, r.loss.prior_temperature) == (20.0, 5.0, 0.4, 4.0)
    assert r.data.dataset == "cifar100" and r.model.arch == "wrn-34-10"  # from base/at_cifar.yaml
    assert r.attack.eps == pytest.approx(8 / 255) and r.eval.pgd_step_size == pytest.approx(2 / 255)
    assert (r.optim.lr, r.optim.weight_decay, r.schedule.epochs, r.ema.tau) == (0.2, 5e-4, 200, 0.9)
    assert r.meta.name == "cifar100_basic" and r.meta.table == "table3"


def test_every_bundled_recipe_validates():
    files = bundled_recipes()
    assert len(files) > 60
    for path in files:
        load_recipe(path)
    used = {b.resolve() for p in files for b in [p.parent / e for e in _extends(p)]}
    used |= {b.resolve() for p in RECIPES_DIR.glob("base/*.yaml") for b in [p.parent / e for e in _extends(p)]}
    assert set(RECIPES_DIR.glob("base/*.yaml")) <= {u for u in used}, "a base recipe nobody extends"


def _extends(path) -> list:
    import yaml

    value = yaml.safe_load(path.read_text()).get("extends", [])
    return [value] if isinstance(value, str) else value


def test_overrides_are_yaml_typed_and_fractions_become_floats():
    r = load_recipe(RECIPES_DIR / "cifar100_basic.yaml", ["attack.eps=4/255", "loss.gamma=0.3", "awp.enabled=false", "schedule.milestones=[3, 5]"])
    assert r.attack.eps == pytest.approx(4 / 255)
    assert r.loss.gamma == 0.3 and r.awp.enabled is False and r.schedule.milestones == [3, 5]
    assert parse_override("a.b.c= 1e-3 ") == (["a", "b", "c"], "1e-3")


def test_deep_merge_replaces_lists_and_keeps_sibling_keys(tmp_path):
    _write(tmp_path, "base.yaml", """
        schedule: {epochs: 10, lr_schedule: multistep, milestones: [2, 4, 6]}
        data: {dataset: synthetic, synthetic: {num_train: 64, num_classes: 3}}
    """)
    child = _write(tmp_path, "sub/child.yaml", """
        extends: ../base.yaml
        schedule: {milestones: [5]}
        data: {synthetic: {num_test: 16}}
    """)
    r = load_recipe(child)
    assert r.schedule.milestones == [5] and r.schedule.epochs == 10
    assert (r.data.synthetic.num_train, r.data.synthetic.num_test, r.data.synthetic.num_classes) == (64, 16, 3)


def test_multiple_bases_apply_in_order(tmp_path):
    _write(tmp_path, "a.yaml", "loss: {alpha: 1, beta: 1}\n")
    _write(tmp_path, "b.yaml", "loss: {beta: 2}\n")
    child = _write(tmp_path, "c.yaml", "extends: [a.yaml, b.yaml]\nloss: {gamma: 0.5}\n")
    r = load_recipe(child)
    assert (r.loss.alpha, r.loss.beta, r.loss.gamma) == (1.0, 2.0, 0.5)


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("loss: {gama: 1}\n", r"x\.yaml: loss\.gama: unknown key; allowed keys in loss: name, alpha, beta, gamma"),
        ("colour: red\n", r"x\.yaml: colour: unknown key; allowed keys: kind, meta, model"),
        ("loss: {gamma: 1.5}\n", r"x\.yaml: loss\.gamma: must be <= 1\.0, got 1\.5"),
        ("loss: {prior_temperature: 0}\n", r"loss\.prior_temperature: must be > 0\.0, got 0\.0"),
        ("data: {batch_size: 12.5}\n", r"data\.batch_size: expected an integer, got 12\.5"),
        ("data: {batch_size: true}\n", r"data\.batch_size: expected an integer, got True"),
        ("attack: {eps: eight}\n", r"attack\.eps: expected a number \(such as 0\.5 or 8/255\), got 'eight'"),
        ("attack: {eps: 8/0}\n", r"attack\.eps: division by zero in '8/0'"),
        ("attack: {schedule: fast}\n", r"attack\.schedule: must be one of 'official', 'staged', 'fixed', got 'fast'"),
        ("awp: {enabled: yes please}\n", r"awp\.enabled: expected true or false"),
        ("loss: 3\n", r"loss: expected a mapping of settings, got 3"),
        ("schedule: {milestones: 5}\n", r"schedule\.milestones: expected a list, got 5"),
        ("model: {arch: wrn-34-11}\n", r"model\.arch: unknown model 'wrn-34-11' \(did you mean wrn-34-10"),
        ("data: {dataset: npz}\n", r"data\.path: dataset 'npz' needs data\.path"),
        ("schedule: {lr_schedule: multistep}\n", r"schedule\.milestones: 'multistep' needs milestones"),
        ("kind: kd\n", r"teacher\.arch: kind 'kd' needs a teacher architecture"),
        ("loss: {name: kd}\n", r"loss\.name: unknown adversarial-training loss 'kd'; use one of gkl, ikl, dkl, trades"),
        ("- a\n- b\n", r"x\.yaml: a recipe must be a YAML mapping, got list"),
        ("loss: {alpha: [1\n", r"x\.yaml: line \d+: invalid YAML"),
        ("a: !!python/object/apply:os.system ['true']\n", r"x\.yaml:.*invalid YAML"),
    ],
)
def test_invalid_recipes_name_file_key_and_value(tmp_path, text, pattern):
    path = _write(tmp_path, "x.yaml", text)
    with pytest.raises(GKLError, match=pattern):
        load_recipe(path)


def test_errors_name_the_file_that_set_the_key(tmp_path):
    _write(tmp_path, "base.yaml", "loss: {gamma: 2}\n")
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\nloss: {alpha: 3}\n")
    with pytest.raises(GKLError, match=r"base\.yaml: loss\.gamma: must be <= 1\.0"):
        load_recipe(child)
    with pytest.raises(GKLError, match=r"^--set loss\.beta=-1: loss\.beta: must be >= 0\.0, got -1\.0$"):
        load_recipe(child, ["loss.gamma=0.5", "loss.beta=-1"])


def test_extends_errors(tmp_path):
    a = _write(tmp_path, "a.yaml", "extends: b.yaml\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(GKLError, match="extends: cycle"):
        load_recipe(a)
    missing = _write(tmp_path, "m.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(GKLError, match=r"m\.yaml: recipe file not found: .*nowhere\.yaml"):
        load_recipe(missing)
    bad = _write(tmp_path, "bad.yaml", "extends: {x: 1}\n")
    with pytest.raises(GKLError, match="extends: must be a path or a list of paths"):
        load_recipe(bad)


@pytest.mark.parametrize("text", ["loss.gamma", "=3", "loss..gamma=1", ".x=1"])
def test_malformed_overrides(text):
    with pytest.raises(GKLError, match="expected KEY=VALUE"):
        load_recipe(RECIPES_DIR / "cifar100_basic.yaml", [text])


def test_content_hash_is_stable_and_sensitive():
    a = load_recipe(RECIPES_DIR / "cifar100_basic.yaml")
    b = load_recipe(RECIPES_DIR / "cifar100_basic.yaml")
    c = load_recipe(RECIPES_DIR / "cifar100_basic.yaml", ["train.seed=1"])
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_resolve_recipe_by_name_and_path(tmp_path, monkeypatch):
    assert resolve_recipe_path("cifar100_basic").resolve() == RECIPES_DIR / "cifar100_basic.yaml"
    local = _write(tmp_path, "mine.yaml", "loss: {gamma: 0.2}\n")
    assert resolve_recipe_path(str(local)) == local
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "recipes/local.yaml", "{}\n")
    assert resolve_recipe_path("local") == Path("recipes/local.yaml")
    with pytest.raises(GKLError, match="recipe not found: nope"):
        resolve_recipe_path("nope")
