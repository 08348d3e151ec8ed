"""Benchmark: Tip-Adapter's (beta, alpha) search against the authors' loop and this CPU's limit.

The baseline is the loop of the authors' ``search_hp`` (Tip-Adapter ``utils.py``),
re-stated here in their style: for every grid point it recomputes the affinity product
``features @ keys``, the exponentials, the cache logits ``A @ values`` (an ``M x N x C``
matmul), the CLIP logits and the top-1 accuracy, and keeps the first best with a strict
``>``.  Ours is :func:`fewclip_tutorial.methods.tip_adapter.search_hparams` (one affinity
product; per beta the exponentials and a segment sum over each class's keys; per beta a
screen of the logits at the ends of the alpha range, and logits at every alpha only for the
few (image, class) pairs the screen leaves open).

A ratio against the authors' loop is a fact about two programs on one CPU (it moves with
the CPU's instruction set: their loop is mostly one large matrix product).  So each line
also carries ``limit_s``, this CPU's limit for the search, timed in the same run with the
same thread count (:func:`measure_limit`), and ``fraction_of_limit = limit_s / ours_s``
(1.0: at the limit).  The limit is the sum of the work no implementation of the search can
skip, each part timed as torch's own kernel at its best size on this CPU (in-cache blocks or
one whole tensor, whichever is faster):

* ``gemm_s``: the one affinity product ``(M, D) @ (D, N)``, timed at its real size;
* ``exp_s``: ``B x M x N`` exponentials (the affinity of every key, for every beta);
* ``segment_sum_s``: ``B x M x N`` additions into ``(M, C)`` class sums (the segment sum
  over each class's keys, timed as a reduction over K in both layouts the search can use,
  ``(rows, K, C)`` and ``(K, C x rows)``, the faster counting);
* ``combine_s``: one pass over the ``B x M x C`` class sums (a max over the classes) plus
  one comparison per ``(beta, alpha, image)``, timed as a max over classes in both layouts
  (classes innermost or rows innermost), the faster counting.

Ours forms the exponent ``beta * (S - 1)`` in a pass of its own (to round as before), which
the limit does not count; a kernel that fused the scaling, the exponential and the segment
sum could go below the limit (``fraction_of_limit`` above 1).

Cases (:func:`bench_tip_search`):

* ``"shapeworld"``: the book's features (shapeworld-tiny, ShapeWorld, 16 shots, seed 1,
  cache of 10 augmented views, as chapter 2 builds them), the authors' 200 x 20 grid; both
  searches run in full.
* ``"imagenet_sized"``: synthetic class-structured unit features with ImageNet's 16-shot
  sizes (D 1024, C 1000, 16,000 keys, 10,000 validation images), grid 200 x 20.  Ours runs
  in full; the reference's time is a few of its grid points, timed, times the grid size
  (``reference_extrapolated``: about 11 hours would be needed otherwise): 2 grid points by
  default, a whole row of 20 with ``full=True`` (``--full``).  The choice is compared on a
  sub-grid (one beta x all alphas by default, three with ``full=True``) computed both ways.

Threads: both searches and the limit run on one torch thread by default (``threads=1``;
``--all-threads`` keeps torch's count).  With two threads on a loaded machine, every kernel
waits for the slower thread at its barrier, which inflated a 0.3 s loop to 20 s here; the
line's ``threads`` says which count ran.

Usage::

    python benchmarks/bench_tip_adapter.py [shapeworld|imagenet_sized ...] [--tiny] [--full]
        [--all-threads]

prints one JSON line per case.  ``make bench`` runs it through ``benchmarks/bench.py``.
"""

from __future__ import annotations

import json
import math
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

from fewclip_tutorial.device import cpu_info  # noqa: E402
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
    from fewclip_tutorial.episode import build_context

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


def _seconds_per_call(fn: Callable[[], Any], device: torch.device, min_s: float) -> float:
    """Best time of one ``fn()`` over 5 rounds of enough calls to last ``min_s`` each."""
    fn()

    def run(calls: int) -> float:
        t, _ = _timed(lambda: [fn() for _ in range(calls)], device)
        CPU_SECONDS.pop()
        return t

    calls, t = 1, run(1)
    while t < min_s and calls < 1 << 16:
        calls *= 2
        t = run(calls)
    return min([t] + [run(calls) for _ in range(4)]) / calls


def _best_rate(
    kernel: Callable[[int], Callable[[], Any]],
    total: int,
    device: torch.device,
    min_s: float,
    granule: int = 1,
) -> tuple[float, int]:
    """Fewest seconds per element of ``kernel(n)()`` over block sizes ``n`` (a multiple of
    ``granule``): in-cache blocks of 16 K to 1 M elements and one block of ``total``, capped
    at 16 M.  Returns ``(seconds per element, the fastest block size)``."""
    sizes = sorted({min(total, 1 << p) for p in (14, 16, 18, 20)} | {min(total, 1 << 24)})
    best = (math.inf, 0)
    for n in sizes:
        n = max(granule, n // granule * granule)
        best = min(best, (_seconds_per_call(kernel(n), device, min_s) / n, n))
    return best


def measure_limit(
    features: torch.Tensor,
    keys: torch.Tensor,
    num_classes: int,
    num_betas: int,
    num_alphas: int,
    min_s: float = 0.02,
) -> dict[str, Any]:
    """This CPU's limit for a search of ``num_betas x num_alphas`` on these sizes.

    ``features`` ``(M, D)``, ``keys`` ``(N, D)`` (``N = K x C``, K keys per class).  Timed here,
    on the current thread count: the affinity product ``features @ keys.T`` (best of 3), and
    the best per-element rates of ``torch.exp``, of the segment sum (``torch.sum`` over the
    K axis of ``(rows, K, C)`` or of ``(K, C x rows)`` blocks) and of a max over classes
    (``torch.amax`` over ``(rows, C)`` or ``(C, rows)``) on blocks of 16 K elements to the
    whole size.  The limit is
    ``gemm + B M N (exp + segment sum) + (B M C + B A M) max`` seconds.
    """
    device = features.device
    m, n, c = features.shape[0], keys.shape[0], num_classes
    k = max(1, n // c)
    gemm_s = min(_timed(lambda: features @ keys.T, device)[0] for _ in range(3))
    del CPU_SECONDS[-3:]
    affinity = num_betas * m * n  # B x M x N exponentials and additions
    sample = torch.empty(1 << 24, device=device).uniform_(-14.0, 0.0)  # beta * (S - 1)
    out = torch.empty_like(sample)

    def exp_kernel(size: int) -> Callable[[], Any]:
        x, y = sample[:size], out[:size]
        return lambda: torch.exp(x, out=y)

    def segment_kernel(size: int) -> Callable[[], Any]:
        x = sample[:size].view(-1, k, c)
        y = out[: x.shape[0] * c].view(-1, c)
        return lambda: torch.sum(x, dim=1, out=y)

    def segment_rows_inner(size: int) -> Callable[[], Any]:
        x = sample[:size].view(1, k, -1)  # (1, K, C * rows): rows innermost
        y = out[: x.shape[2]].view(1, -1)
        return lambda: torch.sum(x, dim=1, out=y)

    def max_kernel(size: int) -> Callable[[], Any]:
        x = sample[:size].view(-1, c)
        y = out[: x.shape[0]]
        return lambda: torch.amax(x, dim=1, out=y)

    def max_rows_inner(size: int) -> Callable[[], Any]:
        x = sample[:size].view(1, c, -1)  # (1, C, rows)
        y = out[: x.shape[2]].view(1, -1)
        return lambda: torch.amax(x, dim=1, out=y)

    exp_rate, exp_n = _best_rate(exp_kernel, affinity, device, min_s)
    seg_rate, seg_n = min(
        _best_rate(segment_kernel, affinity, device, min_s, granule=k * c),
        _best_rate(segment_rows_inner, affinity, device, min_s, granule=k * c),
    )
    combine = num_betas * m * c + num_betas * num_alphas * m
    max_rate, max_n = min(
        _best_rate(max_kernel, num_betas * m * c, device, min_s, granule=c),
        _best_rate(max_rows_inner, num_betas * m * c, device, min_s, granule=c),
    )
    parts = {
        "gemm_s": gemm_s,
        "exp_s": affinity * exp_rate,
        "segment_sum_s": affinity * seg_rate,
        "combine_s": combine * max_rate,
    }
    return {
        "limit_s": sum(parts.values()),
        "limit_parts": parts,
        "limit_rates_ns_per_element": {
            "exp": exp_rate * 1e9,
            "segment_sum": seg_rate * 1e9,
            "max_over_classes": max_rate * 1e9,
        },
        "limit_block_elements": {"exp": exp_n, "segment_sum": seg_n, "max_over_classes": max_n},
        "limit_elements": {"affinity_B_M_N": affinity, "combine": combine},
    }


def bench_tip_search(
    case: str, tiny: bool = False, device: str = "cpu", full: bool = False, threads: int = 1
) -> dict[str, Any]:
    """Time our search against the authors' loop and this CPU's limit; a JSON-able dict.

    Keys: ``name``, ``ours_s``, ``reference_s``, ``ratio`` (reference / ours, wall time;
    ``*_cpu_s`` and ``ratio_cpu``: the same in process CPU time, less noisy on a shared CPU),
    ``limit_s``, ``limit_parts`` and ``fraction_of_limit`` (limit / ours; see
    :func:`measure_limit`; ``fraction_of_limit_cpu`` with our CPU time),
    ``reference_extrapolated``, ``same_choice`` (the same (beta, alpha) as the authors'
    loop: on the whole grid, or on the checked sub-grid when extrapolated),
    ``same_accuracy_grid``, the sizes, the chosen pair, the CPU (:func:`cpu_info`).
    ``tiny`` shrinks the case to seconds (a smaller grid; for imagenet_sized also smaller
    sizes), for tests of the harness.  ``full``: on the ImageNet-sized case, time a whole
    row of the authors' grid (20 points, minutes) and check the choice on three betas.
    ``threads``: torch's thread count on a CPU while this runs (1 by default: on a shared
    CPU a second thread's waits at every kernel's barrier swamp the measurement; 0 keeps
    torch's own count).
    """
    if case not in CASES:
        raise ValueError(f"case={case!r}: use one of {CASES}.")
    before = torch.get_num_threads()
    if threads > 0 and device == "cpu":
        torch.set_num_threads(threads)
    try:
        return _bench_tip_search(case, tiny, device, full)
    finally:
        torch.set_num_threads(before)


def _bench_tip_search(case: str, tiny: bool, device: str, full: bool) -> dict[str, Any]:
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

    # Best of a few runs (the least disturbed by neighbours): 5 where a run is short.
    repeats = 5 if case == "shapeworld" or tiny else 2
    runs = [_timed(lambda: search_hparams(f, y, w, keys, values, betas, alphas), dev)
            for _ in range(repeats)]  # fmt: skip
    ours_s, ours = min(runs, key=lambda r: r[0])
    ours_cpu = min(CPU_SECONDS[-repeats:])
    _log(f"{case}: ours {ours_s:.3f} s wall, {ours_cpu:.3f} s CPU (best of {repeats})")
    limit = measure_limit(f, keys, w.shape[0], len(beta_list), len(alpha_list))
    _log(f"{case}: limit {limit['limit_s']:.3f} s {limit['limit_parts']}")
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
        timed_cells = len(alpha_list) if full else 2
        reference_s = 0.0
        for j in range(timed_cells):  # literal grid points of the authors' loop (beta 0)
            t, _ = _timed(lambda j=j: reference_cell(*ref_args, beta_list[0], alpha_list[j]), dev)
            reference_s += t
            _log(f"{case}: reference grid point {j}: {t:.2f} s wall, {CPU_SECONDS[-1]:.2f} s CPU")
        reference_s *= cells / timed_cells
        reference_cpu = sum(CPU_SECONDS[-timed_cells:]) * cells / timed_cells
        # The choice on a sub-grid: a few betas x all alphas, both ways.
        last = len(beta_list) - 1
        beta_idx = sorted({0, last // 2, last}) if full else [last // 2]
        sub_betas = [beta_list[i] for i in beta_idx]
        choice, grid = reference_search(*ref_args, sub_betas, alpha_list, recompute=False)
        _log(f"{case}: reference sub-grid {len(sub_betas)} x {len(alpha_list)} done")
        ref_grid = torch.tensor(grid, dtype=torch.float64)
        ours_sub = search_hparams(f, y, w, keys, values, betas[beta_idx], alphas)
        out.update(
            reference_extrapolated=True,
            reference_cells_timed=timed_cells,
            reference_note=f"{timed_cells} grid points timed, times {cells}"
            + ("" if full else "; --full times a whole row of the grid"),
            checked_beta_indices=beta_idx,
        )
    ours_choice = (
        beta_idx.index(int((betas == ours_sub.best_beta).nonzero()[0])),
        int((alphas == ours_sub.best_alpha).nonzero()[0]),
    )
    out.update(
        ours_s=round(ours_s, 6),
        reference_s=round(reference_s, 2),
        ratio=round(reference_s / ours_s, 1),
        ours_cpu_s=round(ours_cpu, 6),
        reference_cpu_s=round(reference_cpu, 2),
        ratio_cpu=round(reference_cpu / max(ours_cpu, 1e-9), 1),
        limit_s=limit["limit_s"],
        fraction_of_limit=round(limit["limit_s"] / ours_s, 3),
        fraction_of_limit_cpu=round(limit["limit_s"] / max(ours_cpu, 1e-9), 3),
        fraction_means="limit_s / ours_s: 1.0 = at this CPU's limit (see limit_parts)",
        **{k: v for k, v in limit.items() if k != "limit_s"},
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
        **cpu_info(),
        device=str(dev),
        peak_rss_gb=_peak_rss_gb(),
    )
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    for name in args or CASES:
        record = bench_tip_search(name, tiny="--tiny" in sys.argv, full="--full" in sys.argv,
                                  threads=0 if "--all-threads" in sys.argv else 1)  # fmt: skip
        print(json.dumps(record), flush=True)
