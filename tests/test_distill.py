"""`gkl distill`: every KD recipe runs, the teacher is frozen, the warm-up and the teacher prior are
what the official code computes, ImageNet-LT groups, mdistiller teachers, seeds, file datasets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests_helpers import run_cli

from gklcli.errors import GKLError
from gklcli.models import create_model
from gklcli.recipes import RECIPES_DIR, bundled_recipes, load_recipe
from gklcli.train.engine import Engine
from gklcli.train.kd import DistillStep, evaluate_topk, jsd, load_teacher, shot_groups, train_distill, warmup_factor

KD_RECIPES = [p.relative_to(RECIPES_DIR).as_posix() for p in bundled_recipes() if load_recipe(p).kind == "kd"]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A small teacher in mdistiller's released format: {"model": state_dict, ...}."""
    path = tmp_path_factory.mktemp("teacher") / "ckpt_epoch_240.pth"
    torch.manual_seed(1)
    torch.save({"model": create_model("resnet8", 4).state_dict(), "epoch": 240, "best_acc": 0.0}, path)
    return path


def small(teacher_file, *extra):
    return [
        "model.arch=resnet8", "model.num_classes=null", "teacher.arch=resnet8", f"teacher.checkpoint={teacher_file}",
        "data.dataset=synthetic", "data.synthetic.num_classes=4", "data.synthetic.image_size=8", "data.synthetic.num_train=96",
        "data.synthetic.num_test=32", "data.val_size=16", "data.batch_size=16", "data.eval_batch_size=32", "data.num_workers=0",
        "train.amp=none", "output.tensorboard=false", "schedule.warmup_epochs=0", *extra,
    ]


@pytest.mark.parametrize("name", KD_RECIPES)
def test_every_kd_recipe_runs_three_steps(tmp_path, teacher_file, name):
    recipe = load_recipe(RECIPES_DIR / name, small(teacher_file, "schedule.epochs=1", "train.max_steps_per_epoch=3", "eval.final_test=false"))
    results = train_distill(recipe, out_dir=tmp_path, quiet=True)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["train_state"]["global_step"] == 3 and state["kind"] == "kd"
    assert 0 <= results["last"]["val_top1"] <= results["last"]["val_top5"] <= 100


def make_engine(teacher_file, tmp_path, *extra):
    recipe = load_recipe(RECIPES_DIR / "kd/cifar100_res32x4_res8x4.yaml", small(teacher_file, "schedule.epochs=30", *extra))

    def make_step(ctx):
        return DistillStep(ctx, load_teacher(recipe, ctx.num_classes, ctx.env.device, None))

    return Engine(recipe, make_step, out_dir=tmp_path, quiet=True)


def test_student_gets_gradient_and_the_teacher_none(teacher_file, tmp_path):
    engine = make_engine(teacher_file, tmp_path)
    batch = next(iter(engine._train_loader(1, 0)))
    engine.step.begin_epoch(25)
    result = engine.step.compute(batch, 25)
    result.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.module.parameters() if p.dim() > 1)
    assert all(p.grad is None and not p.requires_grad for p in engine.step.teacher.parameters())
    assert not engine.step.teacher.training


def test_warmup_scales_the_distillation_term(teacher_file, tmp_path):
    assert [warmup_factor(e, 20) for e in (1, 10, 20, 21)] == [0.05, 0.5, 1.0, 1.0] and warmup_factor(3, 0) == 1.0
    engine = make_engine(teacher_file, tmp_path)
    batch = next(iter(engine._train_loader(1, 0)))
    terms = {}
    for epoch in (1, 20):
        engine.step.begin_epoch(epoch)
        terms[epoch] = engine.step.compute(batch, epoch).metrics["kd"]
    assert float(terms[1]) == pytest.approx(float(terms[20]) / 20, rel=1e-5)


def test_teacher_prior_equals_a_hand_computation(teacher_file, tmp_path):
    engine = make_engine(teacher_file, tmp_path)
    step = engine.step
    batches = [b for b, _ in zip(engine._train_loader(1, 0), range(3))]
    step.begin_epoch(1)
    for b in batches:
        step.compute(b, 1)
    step.end_epoch(1)
    sums = torch.zeros(4, 4, dtype=torch.float64)
    with torch.no_grad():
        for images, y in batches:
            probs = F.softmax(step.teacher(images.float() / 255) / 4.0, dim=1)  # T2 = 4
            sums.index_add_(0, y, probs.double())
    expected = sums / sums.sum(1, keepdim=True)
    torch.testing.assert_close(step.prior.prior.double(), expected, rtol=1e-5, atol=1e-6)


def test_many_medium_few_split_and_accuracy_by_hand():
    counts = torch.tensor([150, 101, 100, 50, 20, 19, 1])
    groups = shot_groups(counts)
    assert groups["many"].tolist() == [True, True, False, False, False, False, False]
    assert groups["medium"].tolist() == [False, False, True, True, True, False, False]
    assert groups["few"].tolist() == [False, False, False, False, False, True, True]

    class Fixed(torch.nn.Module):  # predicts class = first pixel value × 10 (rounded)
        def forward(self, x):
            return F.one_hot((x[:, 0, 0, 0] * 10).round().long().clamp(0, 6), 7).float()

    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 6])
    preds = torch.tensor([0, 1, 1, 2, 0, 4, 5, 6, 0])  # right: 0,1,2,4,5,6 | wrong: 0→1, 3→0, 6→0
    images = (preds.float() / 10).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    loader = [((images * 255).round().to(torch.uint8), labels)]
    from types import SimpleNamespace
    import contextlib

    ctx = SimpleNamespace(num_classes=7, channels_last=False, autocast=contextlib.nullcontext)
    out = evaluate_topk(Fixed(), loader, "val", torch.device("cpu"), ctx, counts)
    assert out["val_top1"] == pytest.approx(100 * 6 / 9)
    assert out["val_many"] == pytest.approx(100 * 2 / 3)  # classes 0, 1: labels 0, 0, 1 → 2 right
    assert out["val_medium"] == pytest.approx(100 * 2 / 3)  # classes 2, 3, 4: 2 ✓, 3 ✗, 4 ✓
    assert out["val_few"] == pytest.approx(100 * 2 / 3)  # classes 5, 6: 5 ✓, 6 ✓, 6 ✗


def test_jsd_matches_the_definition():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    p, q = F.softmax(t, 1), F.softmax(s, 1)
    m = (p + q) / 2
    naive = 0.5 * (p * (p / m).log()).sum(1) + 0.5 * (q * (q / m).log()).sum(1)
    assert float(jsd(s, t)) == pytest.approx(float(naive.mean()), rel=1e-5)
    assert float(jsd(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_mdistiller_teacher_loads_strict_and_a_wrong_one_is_refused(teacher_file, tmp_path):
    recipe = load_recipe(RECIPES_DIR / "kd/cifar100_res32x4_res8x4.yaml", small(teacher_file))
    teacher = load_teacher(recipe, 4, torch.device("cpu"), None)
    reference = create_model("resnet8", 4)
    reference.load_state_dict(torch.load(teacher_file, weights_only=True)["model"], strict=True)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference.eval()(x))
    wrong = load_recipe(RECIPES_DIR / "kd/cifar100_res32x4_res8x4.yaml", small(teacher_file, "teacher.arch=resnet20"))
    with pytest.raises(GKLError, match="do not fit"):
        load_teacher(wrong, 4, torch.device("cpu"), None)
    missing = load_recipe(RECIPES_DIR / "kd/cifar100_res32x4_res8x4.yaml", small(teacher_file, "teacher.checkpoint=nope.pth"))
    with pytest.raises(GKLError, match="nope.pth not found.*mdistiller"):
        load_teacher(missing, 4, torch.device("cpu"), None)


def test_cli_seeds_teacher_only_and_dry_run(teacher_file, tmp_path, capsys):
    sets = sum((["--set", s] for s in small(teacher_file, "schedule.epochs=1", "train.max_steps_per_epoch=2")), [])
    code, out, err = run_cli(capsys, "distill", "cifar100_res56_res20", "--out", tmp_path / "s", "--seeds", "2", "-q", *sets)
    assert code == 0, err
    seeds = json.loads((tmp_path / "s" / "seeds.json").read_text())
    assert seeds["seeds"] == [0, 1] and (tmp_path / "s" / "seed1" / "last.pt").is_file()
    values = [seeds["runs"][k]["last"]["test_top1"] for k in ("0", "1")]  # JSON keys are strings
    summary = seeds["summary"]["last.test_top1"]
    assert summary["mean"] == pytest.approx(sum(values) / 2)
    assert summary["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert "±" in out and "±" in (tmp_path / "s" / "seeds.md").read_text()
    code, out, _ = run_cli(capsys, "distill", "cifar100_res56_res20", "--teacher-only", *sets)
    assert code == 0 and '"test_top1"' in out and '"val_top1"' in out
    code, out, _ = run_cli(capsys, "distill", "kd/imagenet_r34_r18", "--dry-run")
    assert code == 0 and "teacher resnet34" in out and "100 epochs" in out
    code, _, err = run_cli(capsys, "distill", "quickstart")
    assert code == 2 and "kind: kd" in err


def test_imagenet_folder_and_lt_lists(tmp_path):
    from PIL import Image

    from gklcli.data import TrainView, build_data

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    recipe = load_recipe(RECIPES_DIR / "kd/imagenet_r34_r18.yaml", ["data.val_size=2", "data.image_size=32"])
    data = build_data(recipe.data, str(tmp_path))
    assert data.num_classes == 2 and len(data.train) == 4 and len(data.val) == 2 and len(data.test) == 6
    img, label = TrainView(data.train, None, "imagenet", seed=0)[(1, 0)]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
    assert data.test.eval_get(0)[0].shape == (3, 32, 32)
    (tmp_path / "ImageNet_LT_train.txt").write_text("train/n01/0.png 0\ntrain/n02/1.png 1\n")
    (tmp_path / "ImageNet_LT_val.txt").write_text("val/n01/0.png 0\n")
    (tmp_path / "ImageNet_LT_test.txt").write_text("val/n02/2.png 1\nbroken line\n")
    lt = load_recipe(RECIPES_DIR / "kd/imagenet_lt_x101_r18.yaml", ["data.image_size=32"])
    with pytest.raises(GKLError, match=r"ImageNet_LT_test.txt:2: expected 'relative/path.jpg label'"):
        build_data(lt.data, str(tmp_path), 1000)


def test_dkd_matches_its_paper_definition():
    from gklcli.losses import dkd_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 3, 5, 3])
    T, a, b = 4.0, 1.0, 8.0
    total = 0.0
    for i in range(4):
        p, q = F.softmax(t[i] / T, 0), F.softmax(s[i] / T, 0)
        bt, bs = torch.stack([p[y[i]], 1 - p[y[i]]]), torch.stack([q[y[i]], 1 - q[y[i]]])
        keep = torch.arange(6) != y[i]
        ph, qh = p[keep] / (1 - p[y[i]]), q[keep] / (1 - q[y[i]])
        total += T * T * (a * (bt * (bt / bs).log()).sum() + b * (ph * (ph / qh).log()).sum())
    assert float(dkd_loss(s, t, y, alpha=a, beta=b, temperature=T)) == pytest.approx(float(total) / 4, rel=1e-4)


def test_ce_baseline_trains_the_student_alone_without_a_teacher_file(tmp_path):
    """The tables' "Student"/"Baseline" rows: loss.name=ce needs no teacher weights and equals plain CE training."""
    recipe = load_recipe(RECIPES_DIR / "kd/cifar100_res56_res20_kd.yaml",
                         small(tmp_path / "missing.pth", "loss.name=ce", "loss.ce_weight=1.0", "schedule.epochs=1",
                               "train.max_steps_per_epoch=2", "eval.final_test=false"))
    engine = Engine(recipe, lambda ctx: DistillStep(ctx, None), out_dir=tmp_path / "a", quiet=True)
    batch = next(iter(engine._train_loader(1, 0)))
    step = engine.step.compute(batch, 1)
    images, y = batch
    with torch.no_grad():
        expected = F.cross_entropy(engine.model(images.float() / 255), y)
    assert float(step.loss.detach()) == pytest.approx(float(expected), rel=1e-5) and float(step.metrics["kd"]) == 0.0
    results = train_distill(recipe, out_dir=tmp_path / "b", quiet=True)
    assert "val_top1" in results["last"]
