"""`gkl distill`: every KD recipe runs, the teacher is frozen, the warm-up and the teacher prior are
what the official code computes, ImageNet-LT groups, mdistiller teachers, seeds, file datasets."""

from __future__ import annotations

import copy
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
from gklcli.losses import jsd
from gklcli.train.kd import DistillStep, evaluate_topk, load_teacher, shot_groups, train_distill, warmup_factor

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
        "model.arch=resnet8", "model.num_classes=null", "model.drop_path=0.0", "teacher.arch=resnet8", f"teacher.checkpoint={teacher_file}",
        "data.dataset=synthetic", "data.synthetic.num_classes=4", "data.synthetic.image_size=8", "data.synthetic.num_train=96",
        "data.synthetic.num_test=32", "data.val_size=16", "data.batch_size=16", "data.eval_batch_size=32", "data.num_workers=0",
        "train.amp=none", "output.tensorboard=false", "schedule.warmup_epochs=0", *extra,
    ]


@pytest.mark.parametrize("name", KD_RECIPES)
def test_every_kd_recipe_runs_three_steps(tmp_path, teacher_file, name):
    # ghost batches (ImageNet 64, ImageNet-LT 32 images) scaled to the tiny batch of 16
    sets = small(teacher_file, "schedule.epochs=1", "train.max_steps_per_epoch=3", "eval.final_test=false", "model.bn_group_size=8")
    recipe = load_recipe(RECIPES_DIR / name, sets)
    results = train_distill(recipe, out_dir=tmp_path, quiet=True, device="cpu")
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["train_state"]["global_step"] == 3 and state["kind"] == "kd"
    assert 0 <= results["last"]["val_top1"] <= results["last"]["val_top5"] <= 100


def make_engine(teacher_file, tmp_path, *extra, device="cpu"):
    """An engine on an explicit device: without one it would pick cuda wherever CUDA is visible."""
    recipe = load_recipe(RECIPES_DIR / "kd/cifar100_res32x4_res8x4.yaml", small(teacher_file, "schedule.epochs=30", *extra))

    def make_step(ctx):
        return DistillStep(ctx, load_teacher(recipe, ctx.num_classes, ctx.env.device, None))

    return Engine(recipe, make_step, out_dir=tmp_path, quiet=True, device=str(device))


def test_student_gets_gradient_and_the_teacher_none(teacher_file, tmp_path, device):
    engine = make_engine(teacher_file, tmp_path, device=device)
    batch = next(iter(engine._train_loader(1, 0)))
    engine.step.begin_epoch(25)
    result = engine.step.compute(batch, 25)
    result.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.module.parameters() if p.dim() > 1)
    assert all(p.grad is None and not p.requires_grad for p in engine.step.teacher.parameters())
    assert not engine.step.teacher.training


def test_warmup_scales_the_distillation_term(teacher_file, tmp_path, device):
    assert [warmup_factor(e, 20) for e in (1, 10, 20, 21)] == [0.05, 0.5, 1.0, 1.0] and warmup_factor(3, 0) == 1.0
    engine = make_engine(teacher_file, tmp_path, device=device)
    batch = next(iter(engine._train_loader(1, 0)))
    terms = {}
    for epoch in (1, 20):
        engine.step.begin_epoch(epoch)
        terms[epoch] = engine.step.compute(batch, epoch).metrics["kd"]
    assert float(terms[1]) == pytest.approx(float(terms[20]) / 20, rel=1e-5)


def test_teacher_prior_equals_a_hand_computation(teacher_file, tmp_path, device):
    engine = make_engine(teacher_file, tmp_path, device=device)
    step = engine.step
    batches = [b for b, _ in zip(engine._train_loader(1, 0), range(3))]
    step.begin_epoch(1)
    for b in batches:
        step.compute(b, 1)
    step.end_epoch(1)
    # by hand: the same teacher in float64 on the CPU (the batches are CPU tensors), whatever the engine's
    # device; fp32 on a GPU agrees to ~1e-6 only without TF32 convolutions (conftest turns TF32 off)
    teacher = copy.deepcopy(step.teacher).to("cpu", torch.float64)
    sums = torch.zeros(4, 4, dtype=torch.float64)
    with torch.no_grad():
        for images, y in batches:
            probs = F.softmax(teacher(images.double() / 255) / 4.0, dim=1)  # T2 = 4
            sums.index_add_(0, y, probs)
    expected = sums / sums.sum(1, keepdim=True)
    assert step.term.matrix.device == engine.env.device
    torch.testing.assert_close(step.term.matrix.double().cpu(), expected, rtol=1e-5, atol=1e-6)


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
    code, out, err = run_cli(capsys, "distill", "cifar100_res56_res20", "--out", tmp_path / "s", "--seeds", "2", "-q", "--device", "cpu", *sets)
    assert code == 0, err
    seeds = json.loads((tmp_path / "s" / "seeds.json").read_text())
    assert seeds["seeds"] == [0, 1] and (tmp_path / "s" / "seed1" / "last.pt").is_file()
    values = [seeds["runs"][k]["last"]["test_top1"] for k in ("0", "1")]  # JSON keys are strings
    summary = seeds["summary"]["last.test_top1"]
    assert summary["mean"] == pytest.approx(sum(values) / 2)
    assert summary["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert "±" in out and "±" in (tmp_path / "s" / "seeds.md").read_text()
    code, out, _ = run_cli(capsys, "distill", "cifar100_res56_res20", "--teacher-only", "--device", "cpu", *sets)
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


def test_ce_baseline_trains_the_student_alone_without_a_teacher_file(tmp_path, device):
    """The tables' "Student"/"Baseline" rows: loss.name=ce needs no teacher weights and equals plain CE training."""
    recipe = load_recipe(RECIPES_DIR / "kd/cifar100_res56_res20_kd.yaml",
                         small(tmp_path / "missing.pth", "loss.name=ce", "loss.ce_weight=1.0", "schedule.epochs=1",
                               "train.max_steps_per_epoch=2", "eval.final_test=false"))
    engine = Engine(recipe, lambda ctx: DistillStep(ctx, None), out_dir=tmp_path / "a", quiet=True, device=str(device))
    batch = next(iter(engine._train_loader(1, 0)))
    step = engine.step.compute(batch, 1)
    images, y = (t.to(device) for t in batch)
    with torch.no_grad():
        expected = F.cross_entropy(engine.model(images.float() / 255), y)
    assert float(step.loss.detach()) == pytest.approx(float(expected), rel=1e-5) and float(step.metrics["kd"]) == 0.0
    results = train_distill(recipe, out_dir=tmp_path / "b", quiet=True, device=str(device))
    assert "val_top1" in results["last"]


def test_best_and_last_test_top1_over_epochs_survive_resume_and_leave_training_alone(teacher_file, tmp_path, monkeypatch):
    """mdistiller's protocol (eval.test_every_epochs): top1_best = max over the per-epoch test top-1, its epoch,
    top1_last = the last epoch's; an interrupted + resumed run ends with the same numbers; the evaluations do
    not change the training (same weights as with the per-epoch test evaluation off)."""
    from gklcli.train.engine import Interrupted

    path = RECIPES_DIR / "kd/cifar100_res32x4_res8x4.yaml"
    assert load_recipe(path).eval.test_every_epochs == 1  # the bundled CIFAR-100 recipes test every epoch
    sets = small(teacher_file, "schedule.epochs=3", "data.val_size=0", "optim.lr=0.1", "output.plots=false")  # 6 steps/epoch
    recipe = load_recipe(path, sets)
    a = train_distill(recipe, out_dir=tmp_path / "a", quiet=True)
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [rec["test_top1"] for rec in log]
    assert len(per_epoch) == 3 and "test_top1" in (tmp_path / "a" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert a["top1_best"] == max(per_epoch) and a["top1_best_epoch"] == per_epoch.index(max(per_epoch)) + 1
    assert a["top1_last"] == per_epoch[-1] == a["last"]["test_top1"]
    assert a["test_best"]["epoch"] == a["top1_best_epoch"] and a["test_best"]["test_top5"] == log[a["top1_best_epoch"] - 1]["test_top5"]
    assert "best test epoch" in (tmp_path / "a" / "summary.md").read_text()

    # interrupted at an epoch's end (before its evaluation) and mid-epoch, resumed each time
    with pytest.raises(Interrupted):
        train_distill(recipe, out_dir=tmp_path / "b", quiet=True, interrupt_after_steps=6)
    with pytest.raises(Interrupted):
        train_distill(recipe, out_dir=tmp_path / "b", quiet=True, resume=True, interrupt_after_steps=8)
    b = train_distill(recipe, out_dir=tmp_path / "b", quiet=True, resume=True)
    keys = ("top1_last", "top1_best", "top1_best_epoch", "test_best", "last")
    assert {k: b[k] for k in keys} == {k: a[k] for k in keys}
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert {k: saved[k] for k in keys} == {k: a[k] for k in keys}
    strip = lambda rec: {k: v for k, v in rec.items() if k not in ("img_s", "seconds", "s_iter")}  # noqa: E731
    assert [strip(json.loads(x)) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [strip(r) for r in log]

    # off: no per-epoch test numbers, no best, and bit-identical training
    off = train_distill(load_recipe(path, [*sets, "eval.test_every_epochs=0"]), out_dir=tmp_path / "c", quiet=True)
    assert off["top1_best"] is None and off["top1_best_epoch"] is None and off["top1_last"] == a["top1_last"]
    model_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    model_c = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(model_a[k], model_c[k]) for k in model_a)

    # the selection itself, on scripted test accuracies 40, 60, 50 (the final evaluation: epoch 3's weights)
    scripted = {1: 40.0, 2: 60.0, 3: 50.0}

    def fake_evaluate(self, source, n, prefix, state=None):
        return {f"{prefix}_top1": scripted[min(self.epoch, 3)], f"{prefix}_top5": 100.0}

    monkeypatch.setattr(Engine, "_evaluate", fake_evaluate)
    d = train_distill(load_recipe(path, [*sets, "train.max_steps_per_epoch=1"]), out_dir=tmp_path / "d", quiet=True)
    assert (d["top1_best"], d["top1_best_epoch"], d["top1_last"]) == (60.0, 2, 50.0)


def test_kd_recipes_use_the_official_protocol_imagenet_full_train_set_fp32():
    """ImageNet KD: the full training set (val_size 0) in fp32 with the per-epoch test evaluation (mdistiller);
    CIFAR-100 tests every epoch; ImageNet-LT keeps the last epoch; bf16 / a hold-out are one --set away."""
    imagenet = [n for n in KD_RECIPES if n.startswith("kd/imagenet_") and not n.startswith(("kd/imagenet_lt_", "kd/imagenet_strong_"))]
    assert len(imagenet) == 8  # (TABLE XIX's strong scheme, kd/imagenet_strong_*, is Hao et al.'s: bf16, its own batch)
    for name in imagenet:
        r = load_recipe(RECIPES_DIR / name)
        assert (r.data.val_size, r.train.amp, r.eval.test_every_epochs) == (0, "none", 1), name
    for name in (n for n in KD_RECIPES if not n.startswith("kd/imagenet_strong_")):
        r = load_recipe(RECIPES_DIR / name)
        expected = 0 if name.startswith("kd/imagenet_lt_") else 1
        assert r.eval.test_every_epochs == expected, name
        # BatchNorm per official GPU: ImageNet 512 on 8 GPUs, ImageNet-LT 128 on 4, CIFAR-100 one GPU
        group = 32 if name.startswith("kd/imagenet_lt_") else 64 if name.startswith("kd/imagenet_") else None
        assert r.model.bn_group_size == group, name
        if name.startswith("kd/imagenet_lt_"):  # the official per-epoch warm-up and cosine
            assert (r.schedule.lr_schedule, r.schedule.warmup_mode, r.schedule.warmup_epochs) == ("cosine-official", "epoch", 10)
    fast = load_recipe(RECIPES_DIR / "kd/imagenet_r34_r18.yaml", ["train.amp=bf16", "data.val_size=10000"])
    assert (fast.train.amp, fast.data.val_size) == ("bf16", 10000)
