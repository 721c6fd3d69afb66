"""DDP on CPU: two gloo processes under torch.distributed.run train, and every rank ends with the
same class prior (all-reduced) and the same weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests_helpers import TINY_OVERRIDES


def test_two_process_ddp_ranks_agree(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(worker), str(tmp_path),
           *TINY_OVERRIDES, "schedule.epochs=3", "awp.warmup_epochs=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert torch.equal(ranks[0]["prior"], ranks[1]["prior"])
    assert not torch.allclose(ranks[0]["prior"], torch.full_like(ranks[0]["prior"], 0.25))  # learned, not uniform
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "last.pt").is_file()
