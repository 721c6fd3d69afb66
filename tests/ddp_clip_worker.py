"""One rank of the CLIP DDP test (launched by tests/test_clip.py through torch.distributed.run).

Trains the tiny CLIP student with GKL-KD on the shards in OUT/pairs and the teacher OUT/teacher.pt on
CPU (gloo), then writes this rank's weights and the keys of its first batch to OUT/rank<r>.pt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gklcli.recipes import load_recipe, resolve_recipe_path
from gklcli.train.clip import ClipStep, ClipWorkload, load_clip_teacher
from gklcli.train.engine import Engine

out = Path(sys.argv[1])
recipe = load_recipe(resolve_recipe_path("datacomp15m_vitl14_vitb16"), [
    "model.arch=open_clip:gkl-tiny-clip", "teacher.arch=open_clip:gkl-tiny-clip-teacher", f"teacher.checkpoint={out / 'teacher.pt'}",
    f"data.pairs={out / 'pairs'}", "data.batch_size=16", "data.samples_per_epoch=48", "data.num_workers=0",
    "data.shuffle_buffer=16", "schedule.epochs=2", "schedule.warmup_steps=2", "train.amp=none", "output.tensorboard=false",
    "output.plots=false"])
engine = Engine(recipe, lambda ctx: ClipStep(ctx, load_clip_teacher(recipe, ctx.module, ctx.env.device)), out_dir=out / "run",
                quiet=True, device="cpu", make_workload=ClipWorkload)
keys = next(iter(engine._train_loader(1, 0)))["keys"]
engine.fit()
torch.save({"model": engine.module.state_dict(), "keys": keys, "world": dist.get_world_size()}, out / f"rank{dist.get_rank()}.pt")
dist.destroy_process_group()
