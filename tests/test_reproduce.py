"""`gkl reproduce`: the table registry, plans, smoke runs, reuse/resume and the reports."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from tests_helpers import run_cli

from gklcli.errors import GKLError
from gklcli.recipes import load_recipe, resolve_recipe_path
from gklcli.reproduce import (
    GPU_FLOPS, build_plan, forward_flops, mine, plan_for, run_key, smoke_wnid,
)
from gklcli.tables import expand, load_table, parse_table, table_names, validate_table

UNSUPPORTED = {"table8"}  # table7: CLIP distillation (issue 16); table23: segmentation distillation (issue 18)


# ------------------------------------------------------------------------------------------ registry


def test_registry_has_every_table_of_the_paper_and_each_validates():
    names = table_names()
    assert [n for n in names if not n.startswith("ikl-")] == [f"table{i}" for i in range(1, 25)]
    assert {"ikl-table1", "ikl-table2", "ikl-table4", "ikl-table6", "ikl-table9"} <= set(names)
    for name in names:
        table = load_table(name)
        for part in expand(table):
            validate_table(part)  # every run: an existing recipe that validates, of the metric's kind
            for row in part.rows:
                assert len(row.cells) == len(part.numeric) and len(row.labels) == len(part.text_columns)
                assert row.cited or row.runnable or part.status == "unsupported", (name, row.label)
                for cell in row.cells:
                    if cell.run is not None:
                        assert resolve_recipe_path(cell.run.recipe).is_file()
        if name in UNSUPPORTED:
            assert table.status == "unsupported" and table.reason and not any(r.runnable for r in table.rows)
        else:
            assert table.status == "runnable"


def test_registry_numbers_are_the_papers():
    t3 = load_table("table3")
    gkl_basic = next(r for r in t3.rows if r.labels["Method"] == "GKL-AT" and r.labels["Augmentation Type"] == "Basic")
    assert [c.paper for c in gkl_basic.cells] == [65.76, 31.91] and gkl_basic.cells[0].run.recipe == "cifar100_basic"
    assert next(r for r in t3.rows if "AWP" in r.label).cited
    t17 = load_table("table17")
    assert [c.paper for c in t17.rows[-1].cells] == [71.67, 74.26, 76.83, 76.45, 74.98, 74.98]
    assert t17.rows[-1].cells[2].run.recipe == "cifar100_res32x4_res8x4"
    # TABLE XIV's "Avg." is the mean of its six ε columns (the paper's own numbers agree to rounding)
    for row in load_table("table14").rows:
        values = [c.paper for c in row.cells]
        assert statistics.fmean(values[1:7]) == pytest.approx(values[7], abs=0.006)
    assert [t.name for t in expand(load_table("table9"))] == ["table10", "table11", "table12"]


def _write(tmp_path: Path, text: str, name: str = "tablex.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """name: tablex
paper: gkl
title: "T"
columns: [Method, Clean, AA]
metrics: {Clean: clean, AA: aa}
rows:
  - {labels: [GKL-AT], paper: [65.76, 31.91], recipe: cifar100_basic}
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("paper: [65.76, 31.91]", "paper: [65.76]"), "rows[0].paper: expected 2 numbers"),
        (("AA: aa}", "AA: robust}"), "metrics.AA: unknown metric 'robust'"),
        (("recipe: cifar100_basic}", "recipe: cifar100_basic, cited: true}"), "rows[0]: a cited row has no runs"),
        (("name: tablex", "name: other"), "name: must match the file name"),
        (("AA: aa}", "AA: top1@last}"), "metrics.AA: unknown metric 'top1@last'"),
        (("  - {labels", "  - {colour: red, labels"), "rows[0].colour: unknown key"),
    ],
)
def test_bad_table_files_are_refused_with_file_and_key(tmp_path, change, message):
    path = _write(tmp_path, GOOD.replace(*change))
    with pytest.raises(GKLError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
        parse_table(path)
    assert str(path) in str(info.value)


def test_a_table_run_of_the_wrong_kind_or_a_missing_recipe_is_refused(tmp_path, capsys):
    path = _write(tmp_path, GOOD.replace("recipe: cifar100_basic", "recipe: cifar100_res56_res20"))
    with pytest.raises(GKLError, match="metric 'clean' needs a kind-at recipe"):
        validate_table(parse_table(path))
    path = _write(tmp_path, GOOD.replace("recipe: cifar100_basic", "recipe: no_such_recipe"))
    code, _, err = run_cli(capsys, "reproduce", str(path), "--dry-run", "--out", str(tmp_path / "o"))
    assert code == 2 and "recipe not found: no_such_recipe" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "reproduce", "table99", "--dry-run")
    assert code == 2 and "unknown table 'table99'" in err


KD_TABLE = """name: tablekd
paper: gkl
title: "T"
columns: [Method, Best, Last]
metrics: {Best: top1@best, Last: top1}
rows:
  - {labels: [GKL-KD], paper: [76.83, 76.83], recipe: cifar100_res32x4_res8x4}
"""


def test_cells_read_top1_best_where_the_table_asks_for_it_and_top1_last_otherwise(tmp_path):
    from gklcli.reproduce import Counts, write_report

    assert {c.metric for r in load_table("table17").rows for c in r.cells if c.run} == {"top1@best", "teacher_top1"}
    assert load_table("table5").rows[-1].cells[0].metric == "top1@best"  # ImageNet: mdistiller's trainer too
    assert load_table("table6").rows[-1].cells[-1].metric == "top1"  # ImageNet-LT: the last epoch
    table = parse_table(_write(tmp_path, KD_TABLE, "tablekd.yaml"))
    validate_table(table)
    plan = build_plan([table], rows=None, seeds=1, out=tmp_path / "o", smoke=False, checkpoint="last", data_dir=None)
    (job,) = plan.train_jobs()  # both columns: one run
    job.dir.mkdir(parents=True)
    results = {"last": {"test_top1": 75.9}, "best": {}, "top1_last": 75.9, "top1_best": 76.4, "top1_best_epoch": 231,
               "test_best": {"epoch": 231, "metric": "test_top1", "value": 76.4, "test_top1": 76.4}}
    (job.dir / "results.json").write_text(json.dumps(results))
    path, record = write_report("tablekd", plan, {}, Counts())
    cells = {c["column"]: c for c in record["tables"][0]["rows"][0]["cells"]}
    assert cells["Best"]["mean"] == 76.4 and cells["Best"]["last_values"] == [75.9]
    assert cells["Last"]["mean"] == 75.9 and "last_values" not in cells["Last"]
    md = path.read_text()
    assert "76.83 → **76.40 (-0.43)**" in md and "76.83 → **75.90 (-0.93)**" in md
    assert "top-1: best test accuracy over epochs, mdistiller's protocol" in md and record["tables"][0]["best_over_epochs"] == ["top1"]
    # a best-over-epochs cell needs a recipe that tests every epoch
    lt = _write(tmp_path, KD_TABLE.replace("cifar100_res32x4_res8x4", "imagenet_lt_x101_r18"), "tablekd.yaml")
    with pytest.raises(GKLError, match=r"column 'Best': metric 'top1@best' needs the test set evaluated every epoch.*test_every_epochs 0"):
        validate_table(parse_table(lt))


def test_table6_resnet101_baseline_is_the_resnext101_teacher_trained_alone():
    row = next(r for r in load_table("table6").rows if r.labels["Method"] == "Baseline" and r.labels["Student"] == "ResNet-101")
    assert row.cells[-1].paper == 48.33 == load_table("table24").rows[3].cells[0].paper  # the ResNeXt-101 teacher's accuracy
    recipe = load_recipe(resolve_recipe_path(row.cells[0].run.recipe), list(row.cells[0].run.overrides))
    assert recipe.model.arch == "resnext101-32x4d" == recipe.teacher.arch and recipe.loss.name == "ce"


# ------------------------------------------------------------------------------------------- plans


def test_dry_run_of_every_table_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    for name in table_names():
        code, text, err = run_cli(capsys, "reproduce", name, "--dry-run", "--out", str(out), "--seeds", "2")
        assert code == 0, (name, err)
        assert name in text
        if name in UNSUPPORTED:
            assert "not reproducible with gkl" in text
        else:
            assert "gkl train-at" in text or "gkl distill" in text or "gkl train-semi" in text, name
            assert str(out / "runs") in " ".join(text.split())
    code, text, _ = run_cli(capsys, "reproduce", "table15", "--dry-run", "--out", str(out))
    flat = " ".join(text.split())
    assert "KL-AT(TRADES)" in flat and "36.01" in flat and "--pgd 10,20 --cw 10,20" in flat
    assert not out.exists()


def test_list_shows_every_table_with_runs_and_gpu_hours(capsys):
    code, text, _ = run_cli(capsys, "reproduce", "--list")
    assert code == 0
    for name in ("table1", "table24", "ikl-table6"):
        assert name in text
    assert "unsupported" in text and "GPU-h" in text


def test_runs_are_shared_between_rows_and_tables_and_seeds_are_separate(tmp_path):
    plan = build_plan([load_table("table3"), load_table("table10"), load_table("table12")], rows=None, seeds=3,
                      out=tmp_path, smoke=False, checkpoint="last", data_dir=None)
    basic = load_recipe(resolve_recipe_path("cifar100_basic"), ["train.seed=0"])
    keys = {j.key for j in plan.train_jobs()}
    assert run_key(basic) in keys
    # table3: 4 rows (with the γ = 1 sibling); table10: α 12/16/24 new (α/4 = 5 is table3's run);
    # table12: sample-wise + γ 0.2/0.3 → 10 settings × 3 seeds
    assert len(keys) == 10 * 3
    seeds = sorted(j.seed for j in plan.train_jobs() if j.recipe.meta.name == "cifar100_basic" and not j.spec.overrides)
    assert seeds == [0, 1, 2]


def test_run_key_ignores_paths_and_logging_but_not_settings():
    path = resolve_recipe_path("cifar100_basic")
    base = run_key(load_recipe(path))
    assert run_key(load_recipe(path, ["data.root=/elsewhere", "data.num_workers=16", "output.dir=x", "train.log_every_steps=7"])) == base
    assert run_key(load_recipe(path, ["train.seed=1"])) != base
    assert run_key(load_recipe(path, ["loss.alpha=16"])) != base


def test_shards_split_the_jobs_disjointly_and_completely(tmp_path):
    plan = plan_for("table17", rows=None, seeds=1, out=tmp_path, smoke=False, checkpoint="last", data_dir=None)
    jobs = list(plan.jobs.values())
    parts = [mine(jobs, (i, 3)) for i in range(3)]
    flat = [j.key for part in parts for j in part]
    assert sorted(flat) == sorted(j.key for j in jobs) and len(set(flat)) == len(flat)


def test_flop_counts_and_the_gpu_speed_calibration():
    # torchvision documents 1.81 GMACs for resnet18 and 3.66 for resnet34 at 224²
    assert forward_flops("resnet18", 1000, 224) == pytest.approx(2 * 1.814e9, rel=0.01)
    assert forward_flops("resnet34", 1000, 224) == pytest.approx(2 * 3.664e9, rel=0.01)
    # GPU_FLOPS is calibrated on TABLE V: a KD step r34 → r18, batch 512, 4 GPUs, 0.197 s
    per_image = forward_flops("resnet34", 1000, 224) + 3 * forward_flops("resnet18", 1000, 224)
    assert per_image * 512 / (4 * GPU_FLOPS) == pytest.approx(0.197, rel=0.05)


def test_reproduce_refuses_to_run_under_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "reproduce", "table3", "--smoke", "--rows", "5", "--out", str(tmp_path))
    assert code == 2 and "--shard" in err


# ---------------------------------------------------------------------------------------- smoke runs


def _report(out: Path, name: str) -> dict:
    return json.loads((out / "smoke" / f"{name}.json").read_text())


def _runnable_cells(record: dict):
    for table in record["tables"]:
        for row in table["rows"]:
            if not row["cited"]:
                for cell in row["cells"]:
                    if cell["runs"]:
                        yield row, cell


def test_smoke_table3_fills_every_runnable_cell_with_mean_and_std_of_the_seeds(smoke_out):
    record = _report(smoke_out, "table3")
    md = (smoke_out / "smoke" / "table3.md").read_text()
    assert record["smoke"] and "SMOKE" in md.splitlines()[0]
    cells = list(_runnable_cells(record))
    assert len(cells) == 8  # four GKL-AT rows (with the γ = 1 sibling) × (Clean, AA)
    for row, cell in cells:
        assert cell["n"] == 2 and len(cell["runs"]) == 2 and len(set(cell["runs"])) == 2
        # the numbers are those of each seed's own eval-aa results.json
        field = {"clean": "clean_acc", "aa": "robust_acc"}[cell["metric"]]
        values = []
        for run in cell["runs"]:
            (results,) = sorted(Path(run).glob("eval/last-*/results.json"))
            values.append(json.loads(results.read_text())[field])
        assert cell["values"] == values
        assert cell["mean"] == pytest.approx(statistics.fmean(values))
        assert cell["std"] == pytest.approx(statistics.stdev(values))
        assert cell["delta"] == pytest.approx(cell["mean"] - cell["paper"])
        assert f"{cell['paper']:.2f} → **{cell['mean']:.2f} ± {cell['std']:.2f}" in md
    assert "60.38 (cited)" in md
    assert "extra row, not in the paper" in md  # the γ = 1 sibling of GKL-AT (Basic) says what it is
    assert (smoke_out / "smoke" / "figures" / "table3-1-tsne.png").is_file()


def test_smoke_table1_fills_every_cell_and_shares_runs(smoke_out):
    record = _report(smoke_out, "table1")
    cells = list(_runnable_cells(record))
    assert len(cells) == 15 and all(c["n"] == 1 and c["mean"] is not None for _, c in cells)
    by = {(row["labels"]["Index"], c["column"]): c for row, c in cells}
    assert by[("(a)", "Top-1 (%)")]["runs"] == by[("(b)", "Top-1 (%)")]["runs"]  # DKL ≡ KL for KD: one run
    # row (e) is the same setting as TABLE III's GKL-AT (Basic) seed 0: found and reused, not retrained
    t3 = {c["runs"][0] for row, c in _runnable_cells(_report(smoke_out, "table3")) if row["index"] == 5}
    assert set(by[("(e)", "AA (%)")]["runs"]) == t3
    # the KD column is mdistiller's best test top-1 over epochs (top1@best), the last epoch's beside it
    results = json.loads((Path(by[("(e)", "Top-1 (%)")]["runs"][0]) / "results.json").read_text())
    assert by[("(e)", "Top-1 (%)")]["metric"] == "top1@best" and by[("(e)", "Top-1 (%)")]["mean"] == results["top1_best"]
    assert by[("(e)", "Top-1 (%)")]["last_values"] == [results["top1_last"]] == [results["last"]["test_top1"]]
    assert "top-1: best test accuracy over epochs, mdistiller's protocol" in (smoke_out / "smoke" / "table1.md").read_text()
    assert (smoke_out / "smoke" / "figures" / "table1-1-margins.png").is_file()


def test_rerun_reuses_finished_runs_and_evaluations(smoke_out, capsys):
    files = sorted((smoke_out / "smoke" / "runs").glob("*/**/results.json"))
    before = {f: f.stat().st_mtime_ns for f in files}
    code, text, _ = run_cli(capsys, "reproduce", "table3", "--smoke", "--seeds", "2", "--quiet", "--out", str(smoke_out))
    assert code == 0 and "0 run(s) trained, 8 reused; 0 evaluation(s) run" in text
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert _report(smoke_out, "table3")["counts"]["trained"] == 0


def test_report_only_trains_nothing_and_marks_missing_cells(tmp_path, capsys):
    code, text, _ = run_cli(capsys, "reproduce", "table3", "--smoke", "--report-only", "--out", str(tmp_path))
    assert code == 0 and not (tmp_path / "smoke" / "runs").exists()
    md = (tmp_path / "smoke" / "table3.md").read_text()
    assert "65.76 → …" in md and all(c["n"] == 0 for _, c in _runnable_cells(_report(tmp_path, "table3")))


def test_unfinished_run_needs_resume_and_then_completes(tmp_path, capsys):
    from gklcli.train.at import train_at
    from gklcli.train.engine import Interrupted

    plan = plan_for("table3", rows="5", seeds=1, out=tmp_path, smoke=True, checkpoint="last", data_dir=None)
    (job,) = plan.train_jobs()
    with pytest.raises(Interrupted):
        train_at(job.recipe, out_dir=job.dir, quiet=True, device="cpu", interrupt_after_steps=2)
    assert (job.dir / "last.pt").is_file() and not (job.dir / "results.json").exists()
    args = ("reproduce", "table3", "--rows", "5", "--smoke", "--quiet", "--out", str(tmp_path))
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "unfinished" in err and "--resume" in err
    code, text, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and "1 run(s) trained" in text
    assert json.loads((job.dir / "results.json").read_text())["epochs"] == 2


def test_worst_case_and_eps_average_follow_their_definitions(smoke_out, capsys):
    out = str(smoke_out)
    for name in ("table15", "table14"):
        code, _, err = run_cli(capsys, "reproduce", name, "--rows", "2", "--smoke", "--quiet", "--out", out)
        assert code == 0, err
    (row15,) = [r for r in _report(smoke_out, "table15")["tables"][0]["rows"]]
    cells = {c["column"]: c for c in row15["cells"]}
    (evaluation,) = [p.parent for p in Path(cells["Worst"]["runs"][0]).glob("eval/last-*/results.json")
                     if json.loads(p.read_text())["other_attacks"]]
    flags = torch.load(evaluation / "flags.pt", weights_only=True)
    worst = flags["robust"] & flags["extra/pgd-10"] & flags["extra/pgd-20"] & flags["extra/cw-10"] & flags["extra/cw-20"]
    assert cells["Worst"]["mean"] == pytest.approx(100.0 * worst.float().mean().item())
    assert cells["PGD-20"]["mean"] == pytest.approx(100.0 * flags["extra/pgd-20"].float().mean().item())
    (row14,) = _report(smoke_out, "table14")["tables"][0]["rows"]
    c14 = [c["mean"] for c in row14["cells"]]
    assert c14[-1] == pytest.approx(statistics.fmean(c14[1:7]))
    assert c14[4] == cells["Auto-Attack"]["mean"]  # ε = 8/255 is the same AutoAttack run's number


def test_smoke_distillation_cells_teacher_speed_baseline_and_variants(smoke_out, capsys):
    from gklcli.ood import variant_source, variant_top1
    from gklcli.loading import load_model_file
    from gklcli.train.kd import teacher_report

    out = str(smoke_out)
    for name, rows in (("table5", "1,2,9"), ("table13", "1")):
        code, _, err = run_cli(capsys, "reproduce", name, "--rows", rows, "--smoke", "--quiet", "--out", out)
        assert code == 0, err
    rows = {r["labels"]["Method"]: r for r in _report(smoke_out, "table5")["tables"][0]["rows"]}
    plan = plan_for("table5", rows="1", seeds=1, out=smoke_out, smoke=True, checkpoint="last", data_dir=None)
    teacher_job = plan.teacher_jobs()[0]
    assert rows["Teacher"]["cells"][0]["mean"] == teacher_report(teacher_job.recipe, data_dir=None, device="cpu")["test_top1"]
    student_run = Path(rows["Student"]["cells"][0]["runs"][0])
    assert "name: ce" in (student_run / "recipe.yaml").read_text()
    speed = rows["IKL-KD [67]"]["cells"][1]
    log = [json.loads(line) for line in (Path(speed["runs"][0]) / "metrics.jsonl").read_text().splitlines()]
    assert speed["mean"] == pytest.approx(statistics.fmean(r["s_iter"] for r in log)) and speed["mean"] > 0
    # ImageNet-R cell: the arg-max restricted to the classes present, computed here by hand
    (row,) = _report(smoke_out, "table13")["tables"][0]["rows"]
    cell = row["cells"][1]
    loaded = load_model_file(str(Path(cell["runs"][0]) / "last.pt"), device=torch.device("cpu"))
    source, present = variant_source(smoke_out / "smoke" / "data" / "imagenet-r", {smoke_wnid(k): k for k in range(10)}, 8)
    correct = 0
    for i in range(len(source)):
        img, label = source.eval_get(i)
        logits = loaded.module.eval()(img[None].float() / 255)
        correct += int(present[int(logits[0, present].argmax())] == label)
    assert cell["mean"] == pytest.approx(100.0 * correct / len(source))
    assert variant_top1(loaded.module, source, present, batch_size=7, num_workers=0, device=torch.device("cpu"))["n"] == len(source)


def test_missing_generated_data_or_teacher_is_refused_before_any_training(tmp_path, capsys):
    code, _, err = run_cli(capsys, "reproduce", "table3", "--out", str(tmp_path))
    assert code == 2 and "generated/cifar100_50m.npz" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "reproduce", "table17", "--rows", "9", "--out", str(tmp_path))
    assert code == 2 and "teacher.checkpoint" in err and "ckpt_epoch_240.pth" in err
    assert not (tmp_path / "runs").exists()


def test_smoke_long_tail_groups_match_a_hand_count(smoke_out, capsys):
    """TABLE II in smoke: Many/Medium/Few/All of a run, recomputed from its weights and its training class counts."""
    from gklcli.data import build_data
    from gklcli.loading import load_model_file

    code, _, err = run_cli(capsys, "reproduce", "table2", "--rows", "4", "--smoke", "--quiet", "--out", str(smoke_out))
    assert code == 0, err
    (row,) = _report(smoke_out, "table2")["tables"][0]["rows"]
    cells = {c["column"]: c for c in row["cells"]}
    run = Path(cells["All(%)"]["runs"][0])
    recipe = load_recipe(run / "recipe.yaml")
    data = build_data(recipe.data)
    counts = np.bincount(data.train.labels, minlength=10)
    groups = {"Many(%)": counts > 100, "Medium(%)": (counts >= 20) & (counts <= 100), "Few(%)": counts < 20}
    assert all(mask.any() for mask in groups.values())  # the smoke long tail has all three groups
    model = load_model_file(str(run / "last.pt"), device=torch.device("cpu")).module.eval()
    x = torch.from_numpy(np.asarray(data.test.images)).permute(0, 3, 1, 2).float() / 255
    y = np.asarray(data.test.labels)
    with torch.no_grad():
        hit = (model(x).argmax(1).numpy() == y)
    assert cells["All(%)"]["mean"] == pytest.approx(100 * hit.mean())
    for column, mask in groups.items():
        assert cells[column]["mean"] == pytest.approx(100 * hit[mask[y]].mean())


def test_two_shards_then_report_only_fill_the_table(tmp_path, capsys):
    args = ("reproduce", "table3", "--rows", "5,8", "--smoke", "--quiet", "--out", str(tmp_path))
    for shard in ("0/2", "1/2"):
        code, text, err = run_cli(capsys, *args, "--shard", shard)
        assert code == 0 and "1 run(s) trained" in text, err
    code, text, _ = run_cli(capsys, *args, "--report-only")
    assert code == 0 and "0 run(s) trained" in text
    cells = list(_runnable_cells(_report(tmp_path, "table3")))
    assert len(cells) == 4 and all(c["n"] == 1 for _, c in cells)
