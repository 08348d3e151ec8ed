"""Data-parallel training and sharded encoding under ``torchrun``.

``torchrun --nproc_per_node N -m fewclip_tutorial run fd-align ...`` starts ``N`` processes
with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set.  :func:`init_distributed` reads them and
joins the process group (NCCL on CUDA, gloo on CPU); without them everything here is a
no-op, so the same code runs in one process.

How the methods use it (the batch arithmetic that makes N processes match one):

* every rank draws the *same* global batch of ``B`` indices (same seed), and keeps its
  slice ``indices[rank::N]`` (:func:`shard_batch`), as ``DistributedSampler`` does;
* the trainable module is wrapped in ``DistributedDataParallel`` (:func:`wrap_ddp`), which
  averages the gradients of the ``N`` per-rank mean losses: the gradient of the mean over
  the global batch when ``B`` is a multiple of ``N``;
* every rank evaluates the same (synchronised) weights on the same validation split, so
  selection decisions agree without communication; only rank 0 prints and writes;
* encoding a split is sharded across ranks and gathered back in order (:func:`encode_sharded`).

Per-sample randomness (augmentations) must be seeded by sample and epoch, not by process,
for N processes to see the same augmented views as one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "dist_info",
    "encode_sharded",
    "init_distributed",
    "shard_batch",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (``world_size = 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """The current process group's rank and size (1 process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    return DistInfo()


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment; a no-op otherwise.

    Args:
        backend: ``"nccl"`` or ``"gloo"`` (default: NCCL when CUDA is available, else gloo).

    Returns:
        :class:`DistInfo`.  On CUDA, the process's device is set to ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(
            "WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process."
        )
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    info = dist_info()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def shard_batch(indices: Tensor, info: DistInfo | None = None) -> Tensor:
    """This rank's slice ``indices[rank::world_size]`` of a global batch.

    Raises:
        ValueError: the batch does not split evenly, which would weight the ranks'
            mean losses unequally (make the batch size a multiple of the world size).
    """
    info = dist_info() if info is None else info
    if not info.enabled:
        return indices
    if len(indices) % info.world_size:
        raise ValueError(
            f"a global batch of {len(indices)} does not split evenly over {info.world_size} "
            "processes; use a batch size (and drop_last) that is a multiple of the world size."
        )
    return indices[info.rank :: info.world_size]


def wrap_ddp(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``DistributedDataParallel(module)`` when distributed, else ``module`` itself."""
    info = dist_info()
    if not info.enabled:
        return module
    device = torch.device(device)
    ids = [device.index if device.index is not None else info.local_rank]
    return nn.parallel.DistributedDataParallel(
        module, device_ids=ids if device.type == "cuda" else None
    )


def encode_sharded(encode_rows: Callable[[Tensor], Tensor], n: int) -> Tensor:
    """Encode ``n`` rows split over the ranks and gather them back in order.

    Args:
        encode_rows: ``(k,) int64 indices -> (k, D)`` features of those rows.
        n: number of rows.

    Returns:
        ``(n, D)`` on every rank, row ``i`` encoded by rank ``i % world_size``.
    """
    info = dist_info()
    if not info.enabled:
        return encode_rows(torch.arange(n))
    mine = torch.arange(info.rank, n, info.world_size)
    local = encode_rows(mine)
    per_rank = -(-n // info.world_size)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(gathered, padded.contiguous())
    out = local.new_empty((n, *local.shape[1:]))
    for r, block in enumerate(gathered):
        rows = torch.arange(r, n, info.world_size)
        out[rows] = block[: len(rows)]
    return out
