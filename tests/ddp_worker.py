"""One rank of the DDP test (launched by tests/test_ddp.py through torch.distributed.run).

Trains the tiny quickstart on GKL_DDP_DEVICE (cpu: gloo; cuda: cuda:LOCAL_RANK with NCCL), then
writes this rank's class prior and weights to OUT/rank<r>.pt so the test can check that every rank
holds the same state. The device is always explicit: implicitly, every rank would pick cuda:LOCAL_RANK
wherever CUDA is visible.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gklcli.recipes import RECIPES_DIR, load_recipe
from gklcli.train.at import AdversarialStep
from gklcli.train.engine import Engine

out = Path(sys.argv[1])
overrides = sys.argv[2:]
recipe = load_recipe(RECIPES_DIR / "quickstart.yaml", overrides)
device = "cpu" if os.environ.get("GKL_DDP_DEVICE", "cpu") == "cpu" else f"cuda:{os.environ['LOCAL_RANK']}"
engine = Engine(recipe, AdversarialStep, out_dir=out / "run", quiet=True, device=device)
engine.fit()
rank = dist.get_rank()
torch.save({"prior": engine.step.term.matrix, "model": engine.module.state_dict(), "world": dist.get_world_size(),
            "backend": dist.get_backend(), "device": str(engine.env.device)}, out / f"rank{rank}.pt")
dist.destroy_process_group()
