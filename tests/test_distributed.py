"""Data-parallel training under torchrun (gloo, 2 CPU processes) matches one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewclip_tutorial.distributed import DistInfo, encode_sharded, shard_batch

HELPER = Path(__file__).parent / "helpers" / "ddp_toy.py"
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(tmp_path: Path, nproc: int) -> dict:
    out = tmp_path / f"out{nproc}.json"
    if nproc == 1:
        cmd = [sys.executable, str(HELPER), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", str(HELPER), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_shard_batch_splits_the_global_batch_like_a_distributed_sampler():
    batch = torch.arange(10, 22)
    parts = [shard_batch(batch, DistInfo(r, 3)) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == batch.tolist()
    assert parts[1].tolist() == [11, 14, 17, 20]
    with pytest.raises(ValueError, match="multiple of the world size"):
        shard_batch(torch.arange(7), DistInfo(0, 2))
    assert torch.equal(shard_batch(batch, DistInfo()), batch)


def test_encode_sharded_in_one_process_is_the_plain_encoding():
    x = torch.randn(7, 3)
    assert torch.equal(encode_sharded(lambda idx: x[idx] + 1, 7), x + 1)


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_model_as_one(tmp_path):
    one = _run(tmp_path, 1)
    two = _run(tmp_path, 2)
    assert two["world"] == 2 and one["world"] == 1
    assert two["sharded_encode_exact"]
    assert two["best_step"] == one["best_step"]
    # DDP averages the two half-batch gradients: the full-batch gradient up to float rounding
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    for a, b in zip(one["weights"], two["weights"], strict=True):
        assert b == pytest.approx(a, abs=1e-5)


@pytest.mark.slow
def test_fd_align_on_shapeworld_in_two_gloo_processes_matches_one(tmp_path):
    """Stated tolerance: 1e-5 on the losses, 1e-4 on the weights (a third of one AdamW step at
    lr 3e-4: the two processes sum gradients in another order, and AdamW divides each update by
    the root of its second moment, so a rounding difference in a tiny gradient moves a weight
    by up to a fraction of lr)."""
    helper = Path(__file__).parent / "helpers" / "ddp_fd_align.py"
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"fd{nproc}.json"
        cmd = [sys.executable, str(helper), str(out)]
        if nproc == 2:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "2", str(helper), str(out)]  # fmt: skip
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[nproc] = json.loads(out.read_text())
    one, two = runs[1], runs[2]
    assert two["world"] == 2
    assert len(one["history"]["loss"]) == len(two["history"]["loss"]) == 6
    assert two["history"]["loss"] == pytest.approx(one["history"]["loss"], abs=1e-5)
    assert two["history"]["val_score"] == one["history"]["val_score"]
    assert two["history"]["val_spurious_kl"] == pytest.approx(
        one["history"]["val_spurious_kl"], abs=1e-6
    )
    moved = max(abs(a) for a in one["weights"])
    assert moved > 0
    assert two["weights"] == pytest.approx(one["weights"], abs=1e-4)
