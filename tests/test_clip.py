"""CLIP distillation through the real engine and CLI (TABLE VII): the KD loss falls, resume is bit-exact,
corrupt samples are skipped and counted, zero-shot and the vision-tower export run on a trained student,
and `gkl reproduce table7 --smoke` fills every runnable cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests_helpers import run_cli

from gklcli.pairs import write_synthetic_classification, write_synthetic_shards
from gklcli.recipes import load_recipe, resolve_recipe_path
from gklcli.train.clip import train_clip
from gklcli.train.engine import Interrupted

TINY = ["model.arch=open_clip:gkl-tiny-clip", "teacher.arch=open_clip:gkl-tiny-clip-teacher", "data.batch_size=16",
        "data.samples_per_epoch=64", "data.num_workers=0", "data.shuffle_buffer=32", "schedule.warmup_steps=2",
        "train.amp=none", "train.save_every_steps=0", "optim.lr=0.002", "output.tensorboard=false", "output.plots=false"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Generated shards with 2 corrupt images and 2 empty captions, a zero-shot folder, and a tiny teacher."""
    root = tmp_path_factory.mktemp("clip")
    write_synthetic_shards(root / "pairs", shards=2, per_shard=48, size=32, seed=0, corrupt=2, empty_captions=2)
    write_synthetic_classification(root / "zeroshot", per_class=2, size=32, seed=1)
    teacher = load_recipe(resolve_recipe_path("datacomp15m_vitb16_baseline"), [
        *TINY, f"data.pairs={root / 'pairs'}", "model.arch=open_clip:gkl-tiny-clip-teacher", "schedule.epochs=3"])
    train_clip(teacher, out_dir=root / "teacher", quiet=True, device="cpu")
    return root


def _recipe(pool: Path, name: str, *extra: str):
    return load_recipe(resolve_recipe_path(name), [*TINY, f"data.pairs={pool / 'pairs'}",
                                                   f"teacher.checkpoint={pool / 'teacher' / 'last.pt'}", *extra])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _kd_loss(engine, teacher, batch) -> float:
    """The run's distillation term on a fixed batch, without its constant: GKL's soft-label CE at T is
    H(teacher) + KL, and β·H(teacher) does not depend on the student."""
    from gklcli.losses import LossTerm, clip_logits

    with torch.no_grad():
        engine.module.eval()
        s_img, s_txt, s_scale = engine.module(batch["images"], batch["tokens"])
        t_img, t_txt, t_scale = teacher(batch["images"], batch["tokens"])
    c = engine.recipe.loss
    s, t = clip_logits(s_img, s_txt, s_img, s_txt, s_scale), clip_logits(t_img, t_txt, t_img, t_txt, t_scale)
    total = float(LossTerm(c.name, "clip", c, 1).both_directions(s, t, torch.arange(len(s_img))).total)
    if c.name == "gkl":
        entropy = [-(torch.softmax(x / c.temperature, 1) * torch.log_softmax(x / c.temperature, 1)).sum(1).mean() for x in t]
        total -= c.beta * float(sum(entropy) / 2)
    return total


@pytest.mark.parametrize("row", ["datacomp15m_vitl14_vitb16", "datacomp15m_vitl14_vitb16_kd_t4"])
def test_distillation_lowers_the_kd_loss_and_counts_skipped_samples(pool, tmp_path, row):
    from gklcli.train.clip import ClipStep, ClipWorkload, load_clip_teacher
    from gklcli.train.engine import Engine

    recipe = _recipe(pool, row, "schedule.epochs=10", "data.samples_per_epoch=128", "optim.lr=0.005",
                     "loss.ce_weight=0.1")  # mostly the KD term
    engine = Engine(recipe, lambda ctx: ClipStep(ctx, load_clip_teacher(recipe, ctx.module, ctx.env.device)), out_dir=tmp_path,
                    quiet=True, device="cpu", make_workload=ClipWorkload)
    batch = next(iter(engine._train_loader(1, 0)))
    before = _kd_loss(engine, engine.step.teacher, batch)
    engine.fit()
    after = _kd_loss(engine, engine.step.teacher, batch)
    records = _records(tmp_path)
    assert after < 0.8 * before, (before, after)
    assert records[-1]["train_kd"] < records[0]["train_kd"], [r["train_kd"] for r in records]
    # corrupt images and empty captions were met (shards are drawn with replacement: every draw counts) and skipped
    assert sum(r["train_skipped_image"] for r in records) > 0 and sum(r["train_skipped_caption"] for r in records) > 0
    assert all(r["train_skipped_shard"] == 0 for r in records)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["arch"] == "open_clip:gkl-tiny-clip" and saved["kind"] == "clip-kd" and saved["image_size"] == 32


def test_the_baseline_row_has_no_teacher(pool, tmp_path):
    results = train_clip(_recipe(pool, "datacomp15m_vitb16_baseline", "schedule.epochs=1",
                                 "teacher.checkpoint=/nonexistent/teacher.pt"), out_dir=tmp_path, quiet=True, device="cpu")
    assert results and all(r["train_kd"] == 0.0 for r in _records(tmp_path))


def test_resume_is_bit_exact(pool, tmp_path):
    recipe = _recipe(pool, "datacomp15m_vitl14_vitb16", "schedule.epochs=2", "data.num_workers=2")
    train_clip(recipe, out_dir=tmp_path / "a", quiet=True, device="cpu")
    with pytest.raises(Interrupted):  # mid-epoch (step 3 of 4), workers re-read the epoch's first batches
        train_clip(recipe, out_dir=tmp_path / "b", quiet=True, device="cpu", interrupt_after_steps=3)
    with pytest.raises(Interrupted):
        train_clip(recipe, out_dir=tmp_path / "b", quiet=True, device="cpu", resume=True, interrupt_after_steps=3)
    train_clip(recipe, out_dir=tmp_path / "b", quiet=True, device="cpu", resume=True)
    a, b = (torch.load(tmp_path / x / "last.pt", weights_only=True) for x in ("a", "b"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    strip = lambda r: {k: v for k, v in r.items() if k not in ("img_s", "seconds", "s_iter")}  # noqa: E731
    assert [strip(r) for r in _records(tmp_path / "a")] == [strip(r) for r in _records(tmp_path / "b")]


def test_cli_distill_zeroshot_and_vision_tower_export(pool, tmp_path, capsys):
    sets = [x for s in [*TINY, f"data.pairs={pool / 'pairs'}", f"teacher.checkpoint={pool / 'teacher' / 'last.pt'}",
                        f"data.val_pairs={pool / 'pairs'}", "data.eval_batch_size=64", "schedule.epochs=1"] for x in ("--set", s)]
    code, out, err = run_cli(capsys, "distill", "datacomp15m_vitl14_vitb16", *sets, "--out", tmp_path / "run", "-q")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["best"]["val_r1"] <= 100 and results["best"]["val_n"] == 92  # 96 pairs − 2 corrupt − 2 empty
    code, out, err = run_cli(capsys, "eval-zeroshot", tmp_path / "run" / "last.pt", "--dataset", "folder", "--data-dir",
                             pool / "zeroshot", "--templates", "simple", "--workers", "0", "--out", tmp_path / "zs")
    assert code == 0, err
    zs = json.loads((tmp_path / "zs" / "results.json").read_text())["folder"]
    assert zs["n"] == 20 and zs["classes"] == 10 and "folder: top-1" in out
    code, out, err = run_cli(capsys, "export-vision-tower", tmp_path / "run" / "last.pt", "--out", tmp_path / "tower")
    assert code == 0, err
    exported = json.loads((tmp_path / "tower" / "gkl_export.json").read_text())
    assert exported["max_abs_diff"] < 1e-5 and exported["arch"] == "open_clip:gkl-tiny-clip"
    code, _, err = run_cli(capsys, "export-vision-tower", tmp_path / "run" / "last.pt", "--out", tmp_path / "tower")
    assert code == 2 and "overwrite" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--set", "loss.weights=class"], "loss.weights: CLIP distillation has no classes"),
    (["--set", "model.arch=resnet18"], "kind 'clip-kd' uses OpenCLIP models"),
    (["--set", "model.arch=open_clip:ViT-Q-99"], "OpenCLIP has no model 'ViT-Q-99'"),
    (["--set", "data.pairs=/nonexistent/shards"], "/nonexistent/shards"),
    (["--set", "teacher.checkpoint=no_such_tag"], "no pretrained weights 'no_such_tag'"),
    (["--set", "data.batch_size=100000"], "data.batch_size"),
])
def test_bad_clip_inputs_are_one_line_and_exit_2(pool, tmp_path, capsys, args, message):
    base = [x for s in [*TINY, f"data.pairs={pool / 'pairs'}", f"teacher.checkpoint={pool / 'teacher' / 'last.pt'}",
                        "schedule.epochs=1"] for x in ("--set", s)]
    code, _, err = run_cli(capsys, "distill", "datacomp15m_vitl14_vitb16", *base, *args, "--out", tmp_path / "x", "-q")
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_bf16_autocast_trains_and_teacher_only_points_to_zeroshot(pool, tmp_path, capsys):
    train_clip(_recipe(pool, "datacomp15m_vitl14_vitb16", "schedule.epochs=1", "train.amp=bf16"), out_dir=tmp_path, quiet=True,
               device="cpu")
    (record,) = _records(tmp_path)
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("train_loss", "train_kd", "train_contrastive"))
    code, _, err = run_cli(capsys, "distill", "datacomp15m_vitl14_vitb16", "--teacher-only")
    assert code == 2 and "gkl eval-zeroshot open_clip:ViT-L-14:" in err


def test_resume_refuses_another_worker_count_and_eval_aa_refuses_a_clip_checkpoint(pool, tmp_path, capsys):
    recipe = _recipe(pool, "datacomp15m_vitl14_vitb16", "schedule.epochs=1")
    with pytest.raises(Interrupted):
        train_clip(recipe, out_dir=tmp_path, quiet=True, device="cpu", interrupt_after_steps=1)
    sets = [x for s in [*TINY, f"data.pairs={pool / 'pairs'}", f"teacher.checkpoint={pool / 'teacher' / 'last.pt'}",
                        "schedule.epochs=1", "data.num_workers=2"] for x in ("--set", s)]
    code, _, err = run_cli(capsys, "distill", "datacomp15m_vitl14_vitb16", *sets, "--out", tmp_path, "--resume", "-q")
    assert code == 2 and "data.num_workers (0 → 2)" in err, err
    code, _, err = run_cli(capsys, "eval-aa", tmp_path / "last.pt", "--n-ex", "4")
    assert code == 2 and "a CLIP checkpoint" in err and "Traceback" not in err


def test_zeroshot_refuses_a_classifier_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train-at", "quickstart", "--set", "schedule.epochs=1", "--set", "train.max_steps_per_epoch=1",
                           "--set", "output.tensorboard=false", "--out", tmp_path / "at", "-q")
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval-zeroshot", tmp_path / "at" / "last.pt", "--dataset", "folder", "--data-dir", tmp_path)
    assert code == 2 and "not a gkl CLIP checkpoint" in err


def test_reproduce_table7_smoke_fills_every_runnable_cell(tmp_path, capsys):
    code, out, err = run_cli(capsys, "reproduce", "table7", "--smoke", "--out", tmp_path, "--quiet")
    assert code == 0, err
    report = json.loads((tmp_path / "smoke" / "table7.json").read_text())
    cells = [c for row in report["tables"][0]["rows"] for c in row["cells"] if c["runs"]]
    assert len(cells) == 1 + 6 * 4  # the teacher's ImageNet cell and four zero-shot columns of six student rows
    assert all(c["mean"] is not None and 0 <= c["mean"] <= 100 for c in cells)
    assert (tmp_path / "smoke" / "clip-teacher" / "results.json").is_file()


def test_two_process_ddp_ranks_agree_and_read_their_own_streams(tmp_path):
    import os
    import subprocess

    from test_ddp import _torchrun

    from gklcli.models.clip import create_clip

    write_synthetic_shards(tmp_path / "pairs", shards=2, per_shard=32, size=32, seed=0)
    torch.manual_seed(0)
    torch.save(create_clip("open_clip:gkl-tiny-clip-teacher").state_dict(), tmp_path / "teacher.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*_torchrun(2), str(Path(__file__).with_name("ddp_clip_worker.py")), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == 2 and len(ranks[0]["keys"]) == 8  # the global batch of 16 split over two ranks
    assert ranks[0]["keys"] != ranks[1]["keys"]  # each rank its own seeded stream (shards drawn with replacement)
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    assert (tmp_path / "run" / "results.json").is_file()

