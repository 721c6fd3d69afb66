"""TABLE XIX's strong scheme (Hao et al.'s A2): Mixup/CutMix shared by teacher and student, BCE labels,
timm's seeded training transform and evaluation crop, repeated augmentation, the timm/NAME models and
their weight files, bit-exact resume with Mixup on, and `gkl distill` / `gkl reproduce table19 --smoke`."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests_helpers import run_cli

from gklcli.data import ArraySource, FileSource, TimmTransform, TrainView, make_train_loader, timm_eval_view
from gklcli.errors import GKLError
from gklcli.models import count_params, create_model
from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.sampling import EpochBatchSampler, repeated_epoch_images, seeded_rngs
from gklcli.train.kd import BatchAugment, DistillStep, DistillWorkload, load_teacher, train_distill

STRONG = {row: RECIPES_DIR / f"kd/imagenet_strong_beitv2l_r50_{row}.yaml" for row in ("kd", "dkd", "dist", "gkl")}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.manual_seed(1)
    torch.save(create_model("resnet8", 4).state_dict(), path)
    return path


def toy(teacher_file, *extra):
    """The strong recipes at toy scale: resnet8 pair, synthetic 8×8 images, batch 16 (Mixup, repeats, BCE, LAMB stay on)."""
    return [
        "model.arch=resnet8", "model.num_classes=null", "model.drop_path=0.0", "model.bn_group_size=8", "teacher.arch=resnet8",
        f"teacher.checkpoint={teacher_file}", "data.dataset=synthetic", "data.synthetic.num_classes=4",
        "data.synthetic.image_size=8", "data.synthetic.num_train=96", "data.synthetic.num_test=32", "data.val_size=16",
        "data.batch_size=16", "data.eval_batch_size=32", "data.num_workers=0", "data.image_size=8", "train.amp=none",
        "output.tensorboard=false", "output.plots=false", "schedule.epochs=2", "schedule.warmup_epochs=1", *extra,
    ]


# ------------------------------------------------------------------------------ Mixup, CutMix, labels


def _augment(**data):
    cfg = SimpleNamespace(**({"mixup": 0.1, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "re_prob": 0.0} | data))
    return BatchAugment(cfg, 8, 0.0, torch.device("cpu"), create_model("resnet8", 8))


def test_mixed_targets_and_images_are_timms_batch_mixup_or_cutmix():
    augment = _augment()
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)  # y differs from its flip everywhere
    kinds = set()
    for seed in range(12):
        mixed, target = augment(x.clone(), y, seed)
        lam = float(target[0, 0])
        torch.testing.assert_close(target, lam * F.one_hot(y, 8) + (1 - lam) * F.one_hot(y.flip(0), 8))
        if torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6):
            kinds.add("mixup")
        else:  # CutMix: a box of the flipped batch, its area the flipped share (timm's corrected λ)
            pasted = (mixed != x).any(1)
            assert torch.equal(mixed[:, :, pasted[0]], x.flip(0)[:, :, pasted[0]])
            assert pasted[0].float().mean().item() == pytest.approx(1 - lam, abs=1 / 256)
            kinds.add("cutmix")
        again, target_again = augment(x.clone(), y, seed)
        assert torch.equal(again, mixed) and torch.equal(target_again, target)  # the seed alone decides
    assert kinds == {"mixup", "cutmix"}
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    augment(x.clone(), y, 3)
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])  # the training RNG streams are untouched
    with pytest.raises(GKLError, match="data.batch_size: Mixup/CutMix .* even batch per process, got 7"):
        augment(x[:7].clone(), y[:7], 0)


def test_random_erasing_draws_in_the_normalised_space_and_is_seeded():
    augment = _augment(mixup=0.0, cutmix=0.0, re_prob=1.0)
    x = torch.rand(4, 3, 16, 16)
    out, target = augment(x.clone(), torch.arange(4), 5)
    assert target is None and not torch.equal(out, x)
    assert torch.equal(out, augment(x.clone(), torch.arange(4), 5)[0])


def _step(label_loss="bce", smoothing=0.0, **data):
    r = load_recipe(STRONG["kd"], [f"loss.label_loss={label_loss}", f"loss.label_smoothing={smoothing}",
                                   *[f"data.{k}={v}" for k, v in data.items()]])
    ctx = SimpleNamespace(recipe=r, env=SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1), num_classes=8,
                          module=create_model("resnet8", 8))
    return DistillStep(ctx, None)


def test_label_losses_are_timms_bce_and_soft_target_ce():
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

    torch.manual_seed(0)
    s, y = torch.randn(6, 8), torch.randint(0, 8, (6,))
    target = 0.7 * F.one_hot(y, 8) + 0.3 * F.one_hot(y.flip(0), 8)
    bce = _step("bce")
    by_hand = -(target * F.logsigmoid(s) + (1 - target) * F.logsigmoid(-s)).mean()
    torch.testing.assert_close(bce.label_loss(s, y, target), by_hand)
    torch.testing.assert_close(bce.label_loss(s, y, target), BinaryCrossEntropy(target_threshold=None)(s, target))
    torch.testing.assert_close(_step("bce", 0.1).label_loss(s, y, None), BinaryCrossEntropy(smoothing=0.1)(s, y))
    ce = _step("ce")
    torch.testing.assert_close(ce.label_loss(s, y, target), SoftTargetCrossEntropy()(s, target))
    torch.testing.assert_close(ce.label_loss(s, y, None), F.cross_entropy(s, y))


def _engine(tmp_path, sets, device="cpu"):
    from gklcli.train.engine import Engine

    recipe = load_recipe(STRONG["gkl"], sets)
    return Engine(recipe, lambda ctx: DistillStep(ctx, load_teacher(recipe, ctx.num_classes, ctx.env.device, None)),
                  out_dir=tmp_path, quiet=True, device=device, make_workload=DistillWorkload)


def test_teacher_and_student_see_the_same_mixed_images_and_class_wise_weights_use_the_argmax(teacher_file, tmp_path):
    engine = _engine(tmp_path, toy(teacher_file))
    step = engine.step
    seen = {}
    step.teacher.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", args[0].clone()))
    engine.module.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0].clone()))
    images, y = next(iter(engine._train_loader(1, 0)))
    labels = []
    step.term.update = lambda t, hard: labels.append(hard)  # the classes the prior (and the GKL weights) get
    step.begin_epoch(1)
    step.compute((images, y), 1)
    assert torch.equal(seen["teacher"], seen["student"])
    assert not torch.equal(seen["student"], images.float() / 255)  # mixed
    expected, target = step.augment(images.float() / 255, y, _seed(step, 1, 0))
    assert torch.equal(seen["student"], expected) and torch.equal(labels[0], target.argmax(1))


def _seed(step, epoch, done):
    from gklcli.sampling import sample_seed

    return sample_seed(step.ctx.recipe.train.seed ^ 0x6D6978, epoch, done)


# ------------------------------------------------------------------------------ data: transform, repeats


def test_timm_transform_is_seeded_per_sample_and_leaves_the_rngs_alone():
    t = TimmTransform(16, "rand-m7-mstd0.5", "random")
    img = torch.randint(0, 256, (3, 24, 30), dtype=torch.uint8)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a, b, c = t(img, 7), t(img, 7), t(img, 8)
    assert a.dtype == torch.uint8 and a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    source = ArraySource(np.random.RandomState(0).randint(0, 256, (40, 16, 16, 3), dtype=np.uint8), np.zeros(40, dtype=np.int64), "toy")
    view = TrainView(source, None, "timm", 3, timm=t)
    assert torch.equal(view[(2, 5)][0], view[(2, 5)][0]) and not torch.equal(view[(2, 5)][0], view[(3, 5)][0])
    assert torch.equal(view[(2, 5, 0)][0], view[(2, 5)][0]) and not torch.equal(view[(2, 5, 1)][0], view[(2, 5)][0])
    sampler = EpochBatchSampler(40, 8, seed=0, repeats=3)
    batches = {w: [b[0] for b in make_train_loader(view, sampler, w, False)] for w in (0, 2)}
    assert all(torch.equal(p, q) for p, q in zip(batches[0], batches[2]))  # workers hold no RNG state
    with pytest.raises(GKLError, match="data.rand_augment: 'rand-m7-xyz' is not a RandAugment string timm takes"):
        TimmTransform(16, "rand-m7-xyz", "random")
    with pytest.raises(GKLError, match="data.rand_augment: 'rand-m7-tfoo'"):  # timm would fall back to its default ops
        TimmTransform(16, "rand-m7-tfoo", "random")
    TimmTransform(16, "rand-m7-t3a", "random")  # an op set timm knows
    with pytest.raises(GKLError, match="data.augment: 'timm' needs its settings"):
        TrainView(source, None, "timm", 3)[(1, 0)]


def test_eval_crop_is_timms_bicubic_crop_pct(tmp_path):
    from PIL import Image
    from timm.data import create_transform

    pixels = np.random.RandomState(1).randint(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    source = FileSource([str(tmp_path / "a.png")], np.zeros(1, dtype=np.int64), "x", 32, 0.95, "bicubic")
    expected = create_transform(32, crop_pct=0.95, interpolation="bicubic", use_prefetcher=True)(Image.fromarray(pixels))
    assert np.array_equal(source.eval_get(0)[0].numpy(), expected)
    assert torch.equal(source.subset(np.array([0]), "y").eval_get(0)[0], timm_eval_view(torch.from_numpy(pixels).permute(2, 0, 1), 32, 0.95, "bicubic"))


def test_repeated_augmentation_is_timms_repeat_aug_sampler():
    from timm.data.distributed_sampler import RepeatAugSampler

    assert repeated_epoch_images(1_281_167, 8) == 1_281_024 and repeated_epoch_images(80, 1) == 80
    n, batch, world = 600, 64, 2
    ranks = [EpochBatchSampler(n, batch, seed=0, repeats=3, rank=r, world_size=world, drop_last=True) for r in range(world)]
    for r, sampler in enumerate(ranks):  # timm's permutation in place of gkl's: then the same images per rank
        timm_sampler = RepeatAugSampler(list(range(n)), num_replicas=world, rank=r, num_repeats=3)
        timm_sampler.set_epoch(4)
        sampler._permutation = lambda p: torch.randperm(n, generator=torch.Generator().manual_seed(4))
        sampler.set_epoch(4)
        ours = [i for b in sampler for _, i, _ in b]
        assert len(sampler) == len(timm_sampler) // (batch // world) and ours == list(timm_sampler)[: len(ours)]
    single = EpochBatchSampler(n, batch, seed=0, repeats=3, drop_last=True)
    single.set_epoch(2)
    whole = [b for b in single]
    assert sum(map(len, whole)) == 512 and len(whole) == 8  # 600 // 256 · 256 images, 3 copies of each in a row
    flat = [(i, c) for b in whole for _, i, c in b]
    assert all(flat[k][0] == flat[k + 1][0] == flat[k + 2][0] and [c for _, c in flat[k:k + 3]] == [0, 1, 2]
               for k in range(0, 510, 3))
    single.set_epoch(2, 5)
    assert [b for b in single] == whole[5:]  # resumable at any batch
    with pytest.raises(GKLError, match="data.repeated_aug: 3 is not implemented with generated data"):
        EpochBatchSampler(n, batch, seed=0, repeats=3, num_generated=10, generated_fraction=0.5)


# ------------------------------------------------------------------------------ timm models and files


def test_timm_models_normalise_inside_and_their_files_load_strictly(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = create_model("timm/resnet18", 10, drop_path=0.05).eval()
    raw = timm.create_model("resnet18", num_classes=10).eval()
    raw.load_state_dict(model.state_dict(), strict=True)  # timm's own keys
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw((x - mean) / std))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for name in ("model.safetensors", "pytorch_model.bin"):
        recipe = SimpleNamespace(teacher=SimpleNamespace(arch="timm/resnet18", checkpoint=name))
        teacher = load_teacher(recipe, 10, torch.device("cpu"), str(tmp_path))
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            torch.testing.assert_close(teacher(x), model(x))
    bad = SimpleNamespace(teacher=SimpleNamespace(arch="timm/resnet34", checkpoint=str(tmp_path / "model.safetensors")))
    with pytest.raises(GKLError, match=r"model.safetensors: the weights do not fit timm/resnet34 \(missing layer1.2") as err:
        load_teacher(bad, 10, torch.device("cpu"), None)
    assert "\n" not in str(err.value)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    broken = SimpleNamespace(teacher=SimpleNamespace(arch="timm/resnet18", checkpoint=str(tmp_path / "broken.safetensors")))
    with pytest.raises(GKLError, match="broken.safetensors: not a readable safetensors file"):
        load_teacher(broken, 10, torch.device("cpu"), None)
    missing = SimpleNamespace(teacher=SimpleNamespace(arch="timm/beitv2_large_patch16_224", checkpoint="teachers/x/model.safetensors"))
    with pytest.raises(GKLError, match="teacher.checkpoint: teachers/x/model.safetensors not found .* huggingface-cli download timm/"):
        load_teacher(missing, 1000, torch.device("cpu"), str(tmp_path))


def test_the_beitv2_teacher_is_timms_on_the_meta_device():
    assert count_params("timm/beitv2_large_patch16_224") == 304_430_568  # timm's 304.43 M
    with torch.device("meta"):
        teacher = create_model("timm/beitv2_large_patch16_224")
        v1 = create_model("timm/beit_large_patch16_224")
    assert teacher.pretrained_cfg["tag"] == "in1k_ft_in22k_in1k" and teacher.head.out_features == 1000
    assert teacher.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and v1.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert teacher.mean.shape == (3, 1, 1) and teacher.mean.device.type == "meta"  # the normalisation inside


# ------------------------------------------------------------------------------ training and the CLI


def test_resume_with_mixup_and_repeats_is_bit_exact(teacher_file, tmp_path):
    from gklcli.train.engine import Interrupted

    recipe = load_recipe(STRONG["gkl"], toy(teacher_file, "train.max_steps_per_epoch=4", "data.re_prob=0.25"))
    train_distill(recipe, out_dir=tmp_path / "a", quiet=True, device="cpu")
    with pytest.raises(Interrupted):
        train_distill(recipe, out_dir=tmp_path / "b", quiet=True, device="cpu", interrupt_after_steps=2)
    with pytest.raises(Interrupted):
        train_distill(recipe, out_dir=tmp_path / "b", quiet=True, device="cpu", resume=True, interrupt_after_steps=3)
    train_distill(recipe, out_dir=tmp_path / "b", quiet=True, device="cpu", resume=True)
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("a", "b"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["train_state"]["step"]["position"] == [2, 4]


@pytest.mark.parametrize("row", ["dkd", "dist"])
def test_gkl_distill_runs_the_strong_recipes(capsys, tmp_path, teacher_file, row):
    sets = sum((["--set", s] for s in toy(teacher_file, "train.max_steps_per_epoch=2")), [])
    code, out, err = run_cli(capsys, "distill", STRONG[row], *sets, "--out", tmp_path, "--quiet", "--device", "cpu")
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["last"]["test_top1"] <= 100


@pytest.mark.parametrize("change, message", [
    ("teacher.checkpoint=nowhere.pth", "teacher.checkpoint: nowhere.pth not found"),
    ("model.arch=timm/resnet5000", "model.arch: unknown model 'timm/resnet5000'"),
    ("data.rand_augment=rand-q5", "data.rand_augment: 'rand-q5' is not a RandAugment string timm takes"),
])
def test_bad_inputs_are_one_line(capsys, tmp_path, teacher_file, change, message):
    sets = sum((["--set", s] for s in [*toy(teacher_file), change]), [])
    code, out, err = run_cli(capsys, "distill", STRONG["gkl"], *sets, "--out", tmp_path, "--quiet", "--device", "cpu")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_reproduce_table19_smoke(capsys, tmp_path):
    code, out, err = run_cli(capsys, "reproduce", "table19", "--smoke", "--out", tmp_path, "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / "smoke" / "table19.json").read_text())
    assert "4 run(s) trained" in " ".join(out.split())
    assert all(load_recipe(p).data.mixup == 0.1 for p in STRONG.values()) and report
