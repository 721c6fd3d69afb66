"""One rank of the segmentation DDP test (tests/test_seg.py, through torch.distributed.run, gloo on CPU).

Trains APD+GKL at toy scale, then writes this rank's student weights, teacher adapter and class prior to
OUT/rank<r>.pt, so the test can check that every rank holds the same state (the teacher adapter trains
outside DDP, its gradients averaged by the step)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.engine import Engine
from gklcli.train.seg import SegStep, SegWorkload, load_seg_teacher

out = Path(sys.argv[1])
recipe = load_recipe(RECIPES_DIR / "seg" / "ade20k_psp101_psp18_apd_gkl.yaml", sys.argv[2:])
engine = Engine(recipe, lambda ctx: SegStep(ctx, load_seg_teacher(recipe, ctx.num_classes, ctx.env.device, None)),
                out_dir=out / "run", quiet=True, device="cpu", make_workload=SegWorkload)
engine.fit()
torch.save({"model": engine.module.state_dict(), "adapter": engine.step.teacher_adapter.state_dict(),
            "prior": engine.step.term.matrix, "world": dist.get_world_size()}, out / f"rank{dist.get_rank()}.pt")
dist.destroy_process_group()
