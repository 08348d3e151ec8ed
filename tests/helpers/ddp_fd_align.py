"""FD-Align fine-tuning on ShapeWorld in 1 process or under torchrun (gloo): same result.

Usage: python tests/helpers/ddp_fd_align.py OUT.json   (or torchrun --nproc_per_node 2 ...)
"""

from __future__ import annotations

import json
import sys

import torch

from fewclip_tutorial.distributed import init_distributed
from fewclip_tutorial.episode import build_context
from fewclip_tutorial.methods import fd_align
from fewclip_tutorial.zeroshot import prompt_text_features


def main(out: str) -> None:
    info = init_distributed("gloo")
    # keep the last state, so the compared weights are trained ones whatever validation says
    fit = fd_align.train.fit
    fd_align.train.fit = lambda *args, **kw: fit(*args, **{**kw, "select_best": False})
    ctx = build_context("shapeworld", shots=2, seed=1, cache_dir=None, progress=False)
    text = prompt_text_features(ctx.backbone, ctx.classnames, ctx.dataset.templates)
    result = fd_align.train_fd_align(
        ctx.backbone,
        ctx.splits.train,
        ctx.splits.val,
        fd_align.class_prototypes(text),
        fd_align.spurious_prototypes(text),
        fd_align.FDAlignConfig(blocks=1, epochs=2, batch_size=8, spc=False, sampling="seeded"),
        seed=1,
        num_workers=0,
        dtype=torch.float64,  # the runs differ in summation order only: rounding, not AdamW noise
    )
    if info.is_main:
        trained = [p.detach().flatten() for p in result.visual.parameters()]
        with open(out, "w") as fh:
            json.dump(
                {
                    "world": info.world_size,
                    "history": result.fit.history,
                    "best_step": result.fit.best_step,
                    "weights": torch.cat(trained)[
                        :: max(1, sum(map(len, trained)) // 2000)
                    ].tolist(),
                },
                fh,
            )


if __name__ == "__main__":
    main(sys.argv[1])
