"""Benchmark: Tip-Adapter's (beta, alpha) search against the authors' loop.

The baseline is the loop of the authors' ``search_hp`` (Tip-Adapter ``utils.py``),
re-stated here in their style: for every grid point it recomputes the affinity product
``features @ keys``, the exponentials, the cache logits ``A @ values`` (an ``M x N x C``
matmul), the CLIP logits and the top-1 accuracy, and keeps the first best with a strict
``>``.  Ours is :func:`fewclip_tutorial.methods.tip_adapter.search_hparams` (one affinity
product, per beta a segment sum over each class's keys, per pair an ``M x C`` mix).

Cases (:func:`bench_tip_search`):

* ``"shapeworld"``: the book's features (shapeworld-tiny, ShapeWorld, 16 shots, seed 1,
  cache of 10 augmented views, as chapter 2 builds them), the authors' 200 x 20 grid; both
  searches run in full.
* ``"imagenet_sized"``: synthetic class-structured unit features with ImageNet's 16-shot
  sizes (D 1024, C 1000, 16,000 keys, 10,000 validation images), grid 200 x 20.  Ours runs
  in full; the reference's time is a few of its grid points, timed, times the grid size
  (``reference_extrapolated``: about 11 hours would be needed otherwise).  The choice is
  compared on a sub-grid (a few betas x all alphas) computed both ways.

Threads: on a shared CPU, run it with ``OMP_NUM_THREADS=1``.  With two threads on a loaded
machine, every small kernel waits for the slower thread at its barrier, which inflates the
time of whichever side has more small kernels (the reference on ShapeWorld, ours on the
ImageNet-sized case); ``*_cpu_s`` shows it too.

Usage::

    python benchmarks/bench_tip_adapter.py [shapeworld|imagenet_sized ...] [--tiny]

prints one JSON line per case.  ``make bench`` runs it through ``benchmarks/bench.py``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fewclip_tutorial.methods.tip_adapter import (  # noqa: E402
    build_cache_keys,
    build_cache_values,
    default_search_grid,
    search_hparams,
)

CASES = ("shapeworld", "imagenet_sized")


# ---------------------------------------------------------------------- the authors' loop


def _top1_percent(logits: torch.Tensor, labels: torch.Tensor) -> float:
    # As the authors' cls_acc: top-1 by topk, percent, read back to the host every call.
    pred = logits.topk(1, 1, True, True)[1].t()
    return 100.0 * float(pred.eq(labels.view(1, -1)).float().sum().cpu()) / labels.shape[0]


def reference_cell(
    features: torch.Tensor,
    labels: torch.Tensor,
    clip_weights_dc: torch.Tensor,
    cache_keys_dn: torch.Tensor,
    cache_values: torch.Tensor,
    beta: float,
    alpha: float,
) -> float:
    """One grid point of the authors' loop: everything recomputed. Returns accuracy (%).

    ``clip_weights_dc`` is ``(D, C)`` and ``cache_keys_dn`` is ``(D, N)``, the authors' layout.
    """
    affinity = features @ cache_keys_dn
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
    clip_logits = 100.0 * features @ clip_weights_dc
    return _top1_percent(clip_logits + cache_logits * alpha, labels)


def reference_search(
    features: torch.Tensor,
    labels: torch.Tensor,
    clip_weights_dc: torch.Tensor,
    cache_keys_dn: torch.Tensor,
    cache_values: torch.Tensor,
    beta_list: list[float],
    alpha_list: list[float],
    recompute: bool = True,
) -> tuple[tuple[int, int], list[list[float]]]:
    """The authors' nested loop (beta outer, alpha inner, strict ``>``, best_acc from 0).

    ``recompute=False`` computes the alpha-free terms once per beta (the same arithmetic,
    so the same accuracies; used to check choices on a sub-grid of the large case).
    Returns the chosen ``(beta index, alpha index)`` and the accuracy grid.
    """
    best_acc, best = 0.0, (0, 0)
    grid = []
    for i, beta in enumerate(beta_list):
        row = []
        if not recompute:
            affinity = features @ cache_keys_dn
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
            del affinity
            clip_logits = 100.0 * features @ clip_weights_dc
        for j, alpha in enumerate(alpha_list):
            if recompute:
                acc = reference_cell(
                    features, labels, clip_weights_dc, cache_keys_dn, cache_values, beta, alpha
                )
            else:
                acc = _top1_percent(clip_logits + cache_logits * alpha, labels)
            row.append(acc)
            if acc > best_acc:
                best_acc, best = acc, (i, j)
        grid.append(row)
    return best, grid


def _authors_grid(scale: float, steps: int) -> list[float]:
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


# ---------------------------------------------------------------------- inputs


def _shapeworld_inputs(device: torch.device) -> dict[str, Any]:
    from fewclip_tutorial.experiment import build_context

    ctx = build_context("shapeworld", "shapeworld-tiny", shots=16, seed=1, progress=False)
    train = ctx.features("train", views=10, augment=True)
    val = ctx.features("val")
    return {
        "features": val.features.to(device),
        "labels": val.labels.to(device),
        "clip_weights": ctx.text_classifier.to(device=device, dtype=val.features.dtype),
        "keys": build_cache_keys(train.features).to(device),
        "values": build_cache_values(train.labels, ctx.num_classes).to(device),
    }


def _synthetic_inputs(
    num_val: int, num_classes: int, shots: int, dim: int, device: torch.device, seed: int = 0
) -> dict[str, Any]:
    """Class-structured unit features: class means plus noise (norm 3 against 1), for keys,
    validation and text alike, so that neither zero-shot (about 50% at ImageNet's sizes)
    nor the cache is perfect and the grid's accuracy varies."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)

    def around(centres: torch.Tensor, noise: float) -> torch.Tensor:
        jitter = torch.randn(centres.shape, generator=g) * (noise / dim**0.5)
        return F.normalize(centres + jitter, dim=-1)

    train_labels = torch.arange(num_classes).repeat_interleave(shots)
    val_labels = torch.randint(num_classes, (num_val,), generator=g)
    out = {
        "features": around(means[val_labels], 3.0),
        "labels": val_labels,
        "clip_weights": around(means, 3.0),
        "keys": around(means[train_labels], 3.0),
        "values": build_cache_values(train_labels, num_classes),
    }
    return {k: v.to(device) for k, v in out.items()}


# ---------------------------------------------------------------------- timing


CPU_SECONDS: list[float] = []  # process CPU time of each _timed call, in order


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` and its result; its CPU seconds go to ``CPU_SECONDS``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    CPU_SECONDS.append(time.process_time() - cpu)
    return time.perf_counter() - start, out


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _peak_rss_gb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux
    except (ImportError, AttributeError):
        return None


def bench_tip_search(case: str, tiny: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Time our search against the authors' loop on one case; a JSON-able dict.

    Keys: ``name``, ``ours_s``, ``reference_s``, ``ratio`` (reference / ours, wall time;
    ``*_cpu_s`` and ``ratio_cpu``: the same in process CPU time, less noisy on a shared CPU),
    ``reference_extrapolated``, ``same_choice`` (the same (beta, alpha) as the authors'
    loop: on the whole grid, or on the checked sub-grid when extrapolated),
    ``same_accuracy_grid``, the sizes, the chosen pair and the torch thread count.
    ``tiny`` shrinks the case to seconds (a smaller grid; for imagenet_sized also smaller
    sizes), for tests of the harness.
    """
    if case not in CASES:
        raise ValueError(f"case={case!r}: use one of {CASES}.")
    dev = torch.device(device)
    beta_steps, alpha_steps = (20, 5) if tiny else (200, 20)
    if case == "shapeworld":
        data = _shapeworld_inputs(dev)
    elif tiny:
        data = _synthetic_inputs(500, 50, 16, 64, dev)
    else:
        data = _synthetic_inputs(10_000, 1000, 16, 1024, dev)
    f, y, w, keys, values = (
        data[k] for k in ("features", "labels", "clip_weights", "keys", "values")
    )
    beta_list, alpha_list = _authors_grid(7.0, beta_steps), _authors_grid(3.0, alpha_steps)
    betas, alphas = default_search_grid(7.0, 3.0, beta_steps, alpha_steps)
    w_dc, keys_dn = w.T, keys.T  # the authors' layouts (transposed views, as they store them)
    ref_args = (f, y, w_dc, keys_dn, values)

    # Warm-up of both (allocator, kernels, thread pool) on 100 rows, one grid point / 1 x 2.
    reference_cell(f[:100], y[:100], w_dc, keys_dn, values, beta_list[0], alpha_list[0])
    search_hparams(f[:100], y[:100], w, keys, values, betas[:1], alphas[:2])
    _log(f"{case}: M={f.shape[0]} N={keys.shape[0]} D={f.shape[1]} C={w.shape[0]}, warmed up")

    # Best of a few runs where a run is short (the least disturbed by neighbours).
    repeats = 5 if case == "shapeworld" or tiny else 1
    runs = [_timed(lambda: search_hparams(f, y, w, keys, values, betas, alphas), dev)
            for _ in range(repeats)]  # fmt: skip
    ours_s, ours = min(runs, key=lambda r: r[0])
    ours_cpu = min(CPU_SECONDS[-repeats:])
    _log(f"{case}: ours {ours_s:.2f} s wall, {ours_cpu:.2f} s CPU")
    cells = len(beta_list) * len(alpha_list)
    out: dict[str, Any] = {"name": f"tip_search_{case}"}
    if case == "shapeworld":
        runs = [_timed(lambda: reference_search(*ref_args, beta_list, alpha_list), dev)
                for _ in range(2)]  # fmt: skip
        reference_s, (choice, grid) = min(runs, key=lambda r: r[0])
        ref_grid = torch.tensor(grid, dtype=torch.float64)
        reference_cpu = min(CPU_SECONDS[-2:])
        out.update(reference_extrapolated=False, reference_cells_timed=cells)
        ours_sub, beta_idx = ours, list(range(len(beta_list)))
    else:
        timed_cells = 2
        reference_s = 0.0
        for j in range(timed_cells):  # a few literal grid points of the authors' loop
            t, _ = _timed(lambda j=j: reference_cell(*ref_args, beta_list[0], alpha_list[j]), dev)
            reference_s += t
            _log(f"{case}: reference grid point {j}: {t:.2f} s wall, {CPU_SECONDS[-1]:.2f} s CPU")
        reference_s *= cells / timed_cells
        reference_cpu = sum(CPU_SECONDS[-timed_cells:]) * cells / timed_cells
        # The choice on a sub-grid: a few betas x all alphas, both ways.
        beta_idx = sorted({0, len(beta_list) // 2, len(beta_list) - 1})
        sub_betas = [beta_list[i] for i in beta_idx]
        choice, grid = reference_search(*ref_args, sub_betas, alpha_list, recompute=False)
        _log(f"{case}: reference sub-grid {len(sub_betas)} x {len(alpha_list)} done")
        ref_grid = torch.tensor(grid, dtype=torch.float64)
        ours_sub = search_hparams(f, y, w, keys, values, betas[beta_idx], alphas)
        out.update(reference_extrapolated=True, reference_cells_timed=timed_cells)
        out["checked_beta_indices"] = beta_idx
    ours_choice = (
        beta_idx.index(int((betas == ours_sub.best_beta).nonzero()[0])),
        int((alphas == ours_sub.best_alpha).nonzero()[0]),
    )
    out.update(
        ours_s=round(ours_s, 4),
        reference_s=round(reference_s, 2),
        ratio=round(reference_s / ours_s, 1),
        ours_cpu_s=round(ours_cpu, 3),
        reference_cpu_s=round(reference_cpu, 2),
        ratio_cpu=round(reference_cpu / max(ours_cpu, 1e-9), 1),
        same_choice=ours_choice == tuple(choice),
        same_accuracy_grid=bool(torch.allclose(ours_sub.accuracy, ref_grid, rtol=0, atol=1e-9)),
        chosen={"beta": ours.best_beta, "alpha": ours.best_alpha, "val_acc": ours.best_accuracy},
        grid=[len(beta_list), len(alpha_list)],
        sizes={
            "val_M": int(f.shape[0]),
            "keys_N": int(keys.shape[0]),
            "dim_D": int(f.shape[1]),
            "classes_C": int(w.shape[0]),
        },
        threads=torch.get_num_threads(),
        device=str(dev),
        peak_rss_gb=_peak_rss_gb(),
    )
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    for name in args or CASES:
        print(json.dumps(bench_tip_search(name, tiny="--tiny" in sys.argv)), flush=True)
