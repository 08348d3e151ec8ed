"""Benchmark: Tip-Adapter's vectorised hyperparameter search against the plain loop.

Builds random unit-norm features with class structure, runs the paper's
200 x 20 (beta, alpha) grid with :func:`search_hparams_loop` (nested Python
loops, as in the reference code) and with :func:`search_hparams` (vectorised),
checks that both return the same accuracy grid and the same chosen pair, and
prints the speed-up (PASS when >= the required ratio, 20x by default).  It also
times one Tip-Adapter-F epoch on cached augmented features.

Usage::

    python benchmarks/bench_tip_adapter.py                 # CPU sizes, < 2 min on 2 cores
    python benchmarks/bench_tip_adapter.py --device cuda   # paper-like sizes on a GPU

Exit status 0 on PASS, 1 on FAIL (results differ or speed-up too small).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewclip_tutorial.methods.tip_adapter import (  # noqa: E402
    SearchResult,
    build_cache_keys,
    build_cache_values,
    default_search_grid,
    search_hparams,
    search_hparams_loop,
    train_tip_adapter_f,
)

#: Problem sizes per device: (val images M, classes C, shots K, feature dim D).
DEFAULT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "cpu": (200, 10, 16, 256),
    "cuda": (1000, 100, 16, 512),
}


def make_problem(
    num_val: int,
    num_classes: int,
    shots: int,
    dim: int,
    views: int,
    device: torch.device,
    seed: int = 0,
    noise: float = 4.0,
    text_noise: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Random class-structured unit features: cache views, validation set, text classifier."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
    text = F.normalize(
        means + text_noise * torch.randn(num_classes, dim, generator=g) / dim**0.5, dim=-1
    )
    train_labels = torch.arange(num_classes).repeat_interleave(shots)
    train_views = F.normalize(
        means[train_labels]
        + noise * torch.randn(views, len(train_labels), dim, generator=g) / dim**0.5,
        dim=-1,
    )
    val_labels = torch.randint(num_classes, (num_val,), generator=g)
    val = F.normalize(
        means[val_labels] + noise * torch.randn(num_val, dim, generator=g) / dim**0.5, dim=-1
    )
    tensors = {
        "train_views": train_views,
        "train_labels": train_labels,
        "val": val,
        "val_labels": val_labels,
        "clip_weights": text,
    }
    return {k: v.to(device) for k, v in tensors.items()}


def best_time(
    fn: Callable[[], SearchResult], repeats: int, device: torch.device
) -> tuple[float, SearchResult]:
    """Best wall time of ``repeats`` calls (after the caller's warm-up), and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--val", type=int, default=None, help="validation images M")
    parser.add_argument("--classes", type=int, default=None, help="classes C")
    parser.add_argument("--shots", type=int, default=None, help="shots per class K")
    parser.add_argument("--dim", type=int, default=None, help="feature dimension D")
    parser.add_argument("--views", type=int, default=10, help="augmented views per image")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best is kept)")
    parser.add_argument("--min-speedup", type=float, default=20.0, help="PASS threshold")
    parser.add_argument("--f-classes", type=int, default=100, help="classes for the -F epoch")
    parser.add_argument("--f-epochs", type=int, default=3, help="epochs timed for -F")
    args = parser.parse_args(argv)
    started, cpu_started = time.perf_counter(), time.process_time()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no CUDA GPU is available; use --device cpu.")
    m, c, k, d = DEFAULT_SIZES["cuda" if device.type == "cuda" else "cpu"]
    m, c, k, d = args.val or m, args.classes or c, args.shots or k, args.dim or d

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"search: M={m} val, C={c} classes, N={c * k} cache entries ({k} shots), D={d}")
    data = make_problem(m, c, k, d, args.views, device)
    keys = build_cache_keys(data["train_views"])
    values = build_cache_values(data["train_labels"], c)
    betas, alphas = default_search_grid()
    print(f"grid: {len(betas)} betas x {len(alphas)} alphas = {len(betas) * len(alphas)} pairs")
    inputs = (data["val"], data["val_labels"], data["clip_weights"], keys, values)

    # Warm-up on a small grid (allocator, kernels, BLAS threads).
    search_hparams_loop(*inputs, betas[:2], alphas[:2])
    search_hparams(*inputs, betas[:2], alphas[:2])

    t_loop, r_loop = best_time(
        lambda: search_hparams_loop(*inputs, betas, alphas), args.repeats, device
    )
    t_vec, r_vec = best_time(lambda: search_hparams(*inputs, betas, alphas), args.repeats, device)
    same = (
        torch.equal(r_loop.accuracy, r_vec.accuracy)
        and r_loop.best_alpha == r_vec.best_alpha
        and r_loop.best_beta == r_vec.best_beta
        and r_loop.best_accuracy == r_vec.best_accuracy
    )
    ratio = t_loop / t_vec
    print(f"loop      : {t_loop:8.3f} s  (best of {args.repeats})")
    print(f"vectorised: {t_vec:8.3f} s  (best of {args.repeats})")
    print(
        f"chosen    : alpha={r_vec.best_alpha:.4f} beta={r_vec.best_beta:.4f} "
        f"val acc={r_vec.best_accuracy:.2f}%  identical results: {same}"
    )
    print(f"speed-up  : {ratio:.1f}x (required >= {args.min_speedup:g}x)")

    # Tip-Adapter-F: time per epoch on cached augmented features (no image re-encoding).
    fc = args.f_classes
    f_data = make_problem(4 * fc, fc, k, d, args.views, device, seed=1)
    f_keys = build_cache_keys(f_data["train_views"])
    f_values = build_cache_values(f_data["train_labels"], fc)
    trained = train_tip_adapter_f(
        f_data["train_views"],
        f_data["train_labels"],
        f_data["val"],
        f_data["val_labels"],
        f_data["clip_weights"],
        f_keys,
        f_values,
        alpha=1.0,
        beta=1.0,
        epochs=args.f_epochs,
        progress=False,
        search_grid=(betas[:1], alphas[:1]),
    )
    seconds = [h["seconds"] for h in trained.history]
    print(
        f"Tip-Adapter-F: {k} shots x {fc} classes x {args.views} views (N={fc * k}, D={d}), "
        f"val {4 * fc}: {min(seconds) * 1000:.1f} ms per epoch (best of {len(seconds)}; "
        f"mean {sum(seconds) / len(seconds) * 1000:.1f} ms)"
    )

    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"total     : {wall:.1f} s wall, {cpu:.1f} s CPU time of this process")
    ok = same and ratio >= args.min_speedup
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
