"""DDP: two ranks under torch.distributed.run train, and every rank ends with the same class prior
(all-reduced) and the same weights.

gloo on CPU always runs, with CUDA hidden from the ranks: on a GPU machine each rank would otherwise
create a CUDA context (the checkpoint saves CUDA RNG states whenever CUDA is available), which fails
where the GPU is in exclusive-process mode, and a rank that picked its device implicitly would ask
for cuda:LOCAL_RANK, which does not exist for rank 1 on a one-GPU machine. NCCL runs with
GKL_TEST_DEVICE=cuda on two or more GPUs only: NCCL refuses two ranks on one GPU.
The rendezvous port is free (`--standalone` binds port 0) and the ranks meet on 127.0.0.1 rather
than on the host's name, so parallel runs (pytest -n) and machines without a resolvable name work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests_helpers import TINY_OVERRIDES

CUDA_TESTS = os.environ.get("GKL_TEST_DEVICE", "cpu").strip().lower().startswith("cuda")


def _torchrun(nproc: int) -> list[str]:
    from torch.distributed.run import get_args_parser

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    if any("--local-addr" in a.option_strings for a in get_args_parser()._actions):  # torch >= 2.2
        cmd.append("--local-addr=127.0.0.1")
    return cmd


def _nccl_ready() -> bool:
    return CUDA_TESTS and torch.distributed.is_nccl_available() and torch.cuda.device_count() >= 2


@pytest.mark.device
@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(not _nccl_ready(), reason="NCCL needs GKL_TEST_DEVICE=cuda and one GPU per rank (2+)")),
])
def test_two_process_ddp_ranks_agree(tmp_path, backend):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent), "GKL_DDP_DEVICE": "cpu" if backend == "gloo" else "cuda"}
    if backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [*_torchrun(2), str(worker), str(tmp_path), *TINY_OVERRIDES, "schedule.epochs=3", "awp.warmup_epochs=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["backend"] == ranks[1]["backend"] == backend
    assert [r["device"] for r in ranks] == (["cuda:0", "cuda:1"] if backend == "nccl" else ["cpu", "cpu"])
    assert torch.equal(ranks[0]["prior"], ranks[1]["prior"])
    assert not torch.allclose(ranks[0]["prior"], torch.full_like(ranks[0]["prior"], 0.25))  # learned, not uniform
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "last.pt").is_file()
