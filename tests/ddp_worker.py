"""One rank of the DDP test (launched by tests/test_ddp.py through torch.distributed.run).

Trains the tiny quickstart with gloo on CPU, then writes this rank's class prior and weights to
OUT/rank<r>.pt so the test can check that every rank holds the same state.
"""

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
engine = Engine(recipe, AdversarialStep, out_dir=out / "run", quiet=True, device="cpu")
engine.fit()
rank = dist.get_rank()
torch.save({"prior": engine.step.prior.prior, "model": engine.module.state_dict(), "world": dist.get_world_size()}, out / f"rank{rank}.pt")
dist.destroy_process_group()
