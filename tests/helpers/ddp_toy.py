"""A toy data-parallel run: the same training in 1 process or under torchrun (gloo).

Usage: python tests/helpers/ddp_toy.py OUT.json   (or under torchrun --nproc_per_node 2)
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

from fewclip_tutorial.distributed import encode_sharded, init_distributed, shard_batch, wrap_ddp
from fewclip_tutorial.training import fit


def main(out: str) -> None:
    info = init_distributed("gloo")
    # float64: one process and two differ only in the order of the gradient sums, so the
    # difference is rounding (about 1e-16 per operation), not float32 noise
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = (x[:, 0] + x[:, 1] > 0).long()
    xv, yv = torch.randn(16, 5), None
    yv = (xv[:, 0] + xv[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    ddp = wrap_ddp(model, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(1)

    def step_loss(step: int) -> torch.Tensor:
        batch = torch.randperm(64, generator=gen)[:16]  # the same global batch on every rank
        mine = shard_batch(batch, info)
        return F.cross_entropy(ddp(x[mine]), y[mine])

    def evaluate() -> float:
        return float((model(xv).argmax(1) == yv).float().mean())

    res = fit(model, step_loss, steps=12, optimizer=opt, evaluate=evaluate, eval_every=3)
    feats = encode_sharded(lambda idx: x[idx] * 2.0, len(x))
    if info.is_main:
        with open(out, "w") as fh:
            json.dump(
                {
                    "world": info.world_size,
                    "best_step": res.best_step,
                    "loss": res.history["loss"],
                    "weights": [p.detach().flatten().tolist() for p in model.parameters()],
                    "sharded_encode_exact": bool(torch.equal(feats, x * 2.0)),
                },
                fh,
            )


if __name__ == "__main__":
    main(sys.argv[1])
