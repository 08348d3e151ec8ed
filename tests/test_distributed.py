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
    # DDP averages the two half-batch gradients: the full-batch gradient up to rounding. In
    # float64 (the helper's dtype) a step's gradient differs by at most 16 terms * 1.1e-16 *
    # |per-image gradient| (< 3) = 5e-15, i.e. 2.7e-15 on a weight at lr 0.5; an earlier
    # error grows by at most 1 + lr * |Hessian| = 1.6 per step (|Hessian| <= 1.17 along this
    # run, measured with torch.autograd.functional.hessian), so after 12 steps the weights
    # differ by at most 12 * 2.7e-15 * 1.6**12 = 8e-12: we assert 1e-10. A rank that skipped
    # the averaging would move its weights by about lr * |g| = 0.1 per step.
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-10, rel=0)
    for a, b in zip(one["weights"], two["weights"], strict=True):
        assert b == pytest.approx(a, abs=1e-10, rel=0)


@pytest.mark.slow
def test_fd_align_on_shapeworld_in_two_gloo_processes_matches_one(tmp_path):
    """The helper trains in float64, so the two runs differ only by rounding in another
    summation order (half batches, the gradient all-reduce, AVX2 or AVX-512 kernels).

    Bound on the weights: AdamW's update ``lr * m / (sqrt(v) + eps)`` moves by at most
    ``lr * dg / eps`` for a gradient error ``dg``. A float64 gradient summed over at most
    1e4 terms of size <= 1 is off by ``dg <= 1e4 * 1.1e-16 ~ 1e-12``, so each of the 6
    steps at lr 3e-4 adds at most ``3e-4 * 1e-12 / 1e-8 = 3e-8``: 2e-7 in all, and we assert
    1e-6. (In float32 the same bound is 6 * 3e-4 * 1e-3 / 1e-8, far above any step: that is
    why a float32 comparison could only be guessed.) A DDP bug, e.g. ranks that do not average
    their gradients, moves weights by about lr = 3e-4 per step, 300 times the tolerance.
    Losses: the same bound through a forward pass whose logits are at most 100 * |dW| * |x|
    apart; 1e-6 again. The validation KL is computed on float32 features (the feature
    extractor returns float32), so a last-bit flip of a feature (6e-8 relative) can move it
    by up to logit_scale 100 * 2 * 6e-8 = 1.2e-5: we assert 2e-5.
    """
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
    # bounds derived in the docstring: AdamW's lr * dg / eps in float64, 6 steps
    assert two["history"]["loss"] == pytest.approx(one["history"]["loss"], abs=1e-6, rel=0)
    assert two["history"]["val_score"] == one["history"]["val_score"]
    assert two["history"]["val_spurious_kl"] == pytest.approx(
        # float32 validation features: a last-bit flip moves the KL by <= 100 * 2 * 6e-8
        one["history"]["val_spurious_kl"],
        abs=2e-5,
        rel=0,
    )
    moved = max(abs(a) for a in one["weights"])
    assert moved > 0
    # 6 AdamW steps of at most lr * dg / eps = 3e-8 apart each (docstring): 2e-7 < 1e-6
    assert two["weights"] == pytest.approx(one["weights"], abs=1e-6, rel=0)
