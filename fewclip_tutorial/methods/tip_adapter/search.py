"""Tip-Adapter's hyperparameter search: alpha and beta of [Tip logits] on the validation split.

:func:`search_hparams` is the vectorised search used everywhere; :func:`search_hparams_loop`
is the authors' nested loop (``search_hp`` in Tip-Adapter ``utils.py``), the reference the
tests and benchmarks compare it with.  The equations [affinity] and [Tip logits] are in
:mod:`~fewclip_tutorial.methods.tip_adapter.core`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fewclip_tutorial.methods.tip_adapter.core import (
    CLIP_LOGIT_SCALE,
    TipAdapterError,
    _check_beta,
    _check_labels,
    _check_logit_inputs,
    _clip_logits,
    _similarity,
    tip_logits,
)

__all__ = [
    "SearchResult",
    "class_sums",
    "default_search_grid",
    "search_hparams",
    "search_hparams_loop",
]

#: Elements of one work block of the vectorised search (beta chunk x rows x width); it
#: bounds the search's extra memory (4 bytes each) and keeps a block in the CPU's cache.
_BLOCK_ELEMENTS = {"cpu": 1 << 17, "cuda": 1 << 27}
#: The class sums of a group of betas are screened at once: up to this many blocks' worth.
_SCREEN_GROUP = 4


def default_search_grid(
    beta_scale: float = 7.0,
    alpha_scale: float = 3.0,
    beta_steps: int = 200,
    alpha_steps: int = 20,
    spacing: Literal["authors", "linspace"] = "authors",
) -> tuple[Tensor, Tensor]:
    """The search grid of the authors' ``search_hp`` (Tip-Adapter ``utils.py``).

    ``spacing="authors"`` (default): ``[i * (scale - 0.1) / steps + 0.1 for i in
    range(steps)]``, which starts at 0.1 and stops one step *short* of the scale.
    ``spacing="linspace"``: ``torch.linspace(0.1, scale, steps)``, both ends included.
    The defaults are the authors' ImageNet scales (7 for beta, 3 for alpha; their
    configs use other scales for other datasets, e.g. 12 and 10 for EuroSAT) with
    200 and 20 steps.  Values are computed in double precision, as the authors' Python
    floats are, then stored as float32 (the precision every search multiplies in).

    Returns:
        ``(betas (beta_steps,), alphas (alpha_steps,))`` float32 tensors.
    """
    if spacing not in ("authors", "linspace"):
        raise TipAdapterError(f"spacing={spacing!r}: use 'authors' or 'linspace'.")
    for name, steps in (("beta_steps", beta_steps), ("alpha_steps", alpha_steps)):
        if steps < 1:
            raise TipAdapterError(f"{name} must be >= 1, got {steps}.")
    for name, scale in (("beta_scale", beta_scale), ("alpha_scale", alpha_scale)):
        if scale < 0.1:
            raise TipAdapterError(f"{name} must be >= 0.1 (the grid starts at 0.1), got {scale}.")

    def grid(scale: float, steps: int) -> Tensor:
        if spacing == "linspace":
            return torch.linspace(0.1, float(scale), int(steps))
        return torch.tensor([i * (scale - 0.1) / steps + 0.1 for i in range(int(steps))])

    return grid(float(beta_scale), beta_steps), grid(float(alpha_scale), alpha_steps)


@dataclass
class SearchResult:
    """Outcome of a grid search over ``(beta, alpha)`` on the validation split.

    Attributes:
        best_alpha, best_beta: the chosen pair; best_accuracy: its validation accuracy (%).
        accuracy: ``(B, A)`` validation accuracy grid in percent (CPU, float64).
        betas, alphas: ``(B,)``, ``(A,)`` the searched grid (CPU, float32).
    """

    best_alpha: float
    best_beta: float
    best_accuracy: float
    accuracy: Tensor
    betas: Tensor
    alphas: Tensor


def _prepare_search(
    val_features: Tensor,
    val_labels: Tensor,
    clip_weights: Tensor,
    cache_keys: Tensor,
    cache_values: Tensor,
    betas: Sequence[float] | Tensor | None,
    alphas: Sequence[float] | Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_logit_inputs(val_features, clip_weights, cache_keys, cache_values)
    labels = _check_labels(
        "val_labels", val_labels, val_features.shape[0], clip_weights.shape[0]
    ).to(val_features.device)
    if val_features.shape[0] == 0:
        raise TipAdapterError("val_features is empty; the search needs validation images.")
    if betas is None or alphas is None:
        default_betas, default_alphas = default_search_grid()
        betas = default_betas if betas is None else betas
        alphas = default_alphas if alphas is None else alphas
    betas_t = torch.as_tensor(betas, dtype=torch.float32)
    alphas_t = torch.as_tensor(alphas, dtype=torch.float32)
    for name, grid in (("betas", betas_t), ("alphas", alphas_t)):
        if grid.dim() != 1 or grid.numel() == 0:
            raise TipAdapterError(f"{name} must be a non-empty 1-D sequence of numbers.")
    bad = ~(torch.isfinite(betas_t) & (betas_t >= 0))
    if bool(bad.any()):
        _check_beta(float(betas_t[bad][0]))  # raises, naming the first bad beta
    return labels, betas_t.to(val_features.dtype), alphas_t.to(val_features.dtype)


def _result(correct: Tensor, betas: Tensor, alphas: Tensor, num_val: int) -> SearchResult:
    correct = correct.cpu()
    # First maximum in beta-major order: the authors' nested loop with a strict ``>``.
    b, a = divmod(int(torch.argmax(correct.flatten())), correct.shape[1])
    accuracy = correct.double() * (100.0 / num_val)
    return SearchResult(
        best_alpha=float(alphas[a]),
        best_beta=float(betas[b]),
        best_accuracy=float(accuracy[b, a]),
        accuracy=accuracy,
        betas=betas.float().cpu(),
        alphas=alphas.float().cpu(),
    )


@torch.no_grad()
def search_hparams_loop(
    val_features: Tensor,
    val_labels: Tensor,
    clip_weights: Tensor,
    cache_keys: Tensor,
    cache_values: Tensor,
    betas: Sequence[float] | Tensor | None = None,
    alphas: Sequence[float] | Tensor | None = None,
    logit_scale: float = CLIP_LOGIT_SCALE,
) -> SearchResult:
    """The authors' search (``search_hp`` in Tip-Adapter ``utils.py``), loop for loop.

    Beta outer, alpha inner; every grid point recomputes the affinity product, the
    cache logits ``A @ L`` and the CLIP logits, as the authors' code does; a strict
    ``>`` keeps the first best pair.  It is the reference that tests and benchmarks
    compare :func:`search_hparams` with; use that one in practice.

    Args:
        val_features: ``(M, D)``; val_labels: ``(M,)``.
        clip_weights: ``(C, D)``; cache_keys: ``(N, D)``; cache_values: ``(N, C)``.
        betas, alphas: ``(B,)``, ``(A,)`` grids (default: :func:`default_search_grid`).

    Returns:
        :class:`SearchResult` with a ``(B, A)`` accuracy grid.
    """
    labels, betas_t, alphas_t = _prepare_search(
        val_features, val_labels, clip_weights, cache_keys, cache_values, betas, alphas
    )
    correct = torch.zeros(len(betas_t), len(alphas_t), dtype=torch.long)
    for i, beta in enumerate(betas_t.tolist()):
        for j, alpha in enumerate(alphas_t.tolist()):
            logits = tip_logits(
                val_features, clip_weights, cache_keys, cache_values, alpha, beta, logit_scale
            )
            correct[i, j] = int((logits.argmax(dim=1) == labels).sum())
    return _result(correct, betas_t, alphas_t, val_features.shape[0])


def _one_hot_layout(cache_values: Tensor) -> tuple[Tensor, Tensor | None, int] | None:
    """Keys grouped by class: ``(index (C*K,), mask (C*K,) or None, K)``; None if not one-hot.

    Slot ``k * C + c`` holds the ``k``-th key of class ``c`` (``K`` = the largest class), so
    the class sums add ``K`` contiguous blocks of ``C``; smaller classes get masked slots.
    """
    v = cache_values
    labels = v.argmax(dim=1)
    num_keys, num_classes = v.shape
    one_hot = torch.zeros_like(v).scatter_(1, labels.view(-1, 1), 1.0)
    if not torch.equal(v, one_hot):
        return None
    counts = torch.bincount(labels, minlength=num_classes)
    k = int(counts.max())
    if num_classes * k > 4 * num_keys:  # very unequal classes: padding would cost more
        return None
    order = torch.argsort(labels, stable=True)  # keys class by class, in their order
    sorted_labels = labels[order]
    starts = torch.cumsum(counts, 0) - counts
    slots = (torch.arange(num_keys, device=v.device) - starts[sorted_labels]) * num_classes
    slots += sorted_labels
    index = torch.zeros(num_classes * k, dtype=torch.long, device=v.device)
    index[slots] = order
    if int(counts.min()) == k:
        return index, None, k
    mask = torch.zeros(num_classes * k, dtype=v.dtype, device=v.device)
    mask[slots] = 1.0
    return index, mask, k


def class_sums(affinities: Tensor, cache_values: Tensor) -> Tensor:
    """``A @ L`` for one-hot ``L`` as a segment sum: each class adds up its keys' affinities.

    ``(..., N)`` affinities and ``(N, C)`` values -> ``(..., C)``.  Equal to the matmul up to
    float rounding (the order of the additions), with ``M * N`` additions instead of
    ``M * N * C`` multiply-adds.  Non-one-hot values fall back to the matmul.
    """
    layout = _one_hot_layout(cache_values)
    if layout is None:
        return affinities @ cache_values
    index, mask, k = layout
    grouped = affinities[..., index] if mask is None else affinities[..., index] * mask
    return grouped.unflatten(-1, (k, cache_values.shape[1])).sum(-2)


def _argmax_hits(own: Tensor, others: Tensor, labels: Tensor) -> Tensor:
    """``argmax == labels`` (first index on ties) from ``(b, m, A)`` label logits ``own`` and
    ``(b, m, A, C)`` logits ``others`` that hold -inf at the labels.

    A max is vectorised where argmax is not; an exact tie is a hit only if no earlier
    class reaches it.
    """
    other = others.amax(dim=3)
    hits, ties = own > other, own == other
    if bool(ties.any()):
        cells = ties.nonzero(as_tuple=True)
        rows = others[cells]  # (T, C)
        hits[cells] = (rows == own[cells].unsqueeze(1)).int().argmax(dim=1) > labels[cells[1]]
    return hits


@dataclass
class _RowBlock:
    """Per-row data of a block of validation rows, shared by all its betas.

    ``y`` ``(m,)`` labels; ``clip_y`` ``(m,)`` their CLIP logits; ``clip_others`` ``(m, C)``
    CLIP logits with -inf at the labels and ``clip_others_t`` the same as ``(C, m)``; ``top``
    ``(m,)`` the best other class by CLIP and ``clip_top`` ``(m,)`` its logit; ``clip_wins``
    ``(m,)`` the label's CLIP logit beats every other class's by more than the screen's
    tolerance; ``own_at`` ``(m,)`` the flat positions ``label * m + row`` in a ``(C, m)``
    block.
    """

    y: Tensor
    clip_y: Tensor
    clip_others: Tensor
    clip_others_t: Tensor
    top: Tensor
    clip_top: Tensor
    clip_wins: Tensor
    own_at: Tensor

    @classmethod
    def of(cls, clip: Tensor, y: Tensor, tol: float) -> _RowBlock:
        clip_y = clip.gather(1, y.view(-1, 1)).view(-1)
        # The labels' own logits are computed apart; -inf hides them among the others.
        clip_others = clip.scatter(1, y.view(-1, 1), -math.inf)  # (m, C)
        clip_top, top = clip_others.max(dim=1)
        wins = clip_y > clip_top + tol
        own_at = y * y.shape[0] + torch.arange(y.shape[0], device=y.device)
        return cls(y, clip_y, clip_others, clip_others.T.contiguous(), top, clip_top, wins, own_at)


def _full_counts(cache: Tensor, rb: _RowBlock, alphas: Tensor) -> Tensor:
    """Hits per (beta, alpha) of a block, every ``(b, m, A, C)`` logit computed: ``(b, A)``.

    ``cache`` ``(b, m, C)`` class sums of the rows of ``rb`` (any strides); ``alphas``
    ``(A,)``.
    """
    others = torch.mul(cache.unsqueeze(2), alphas.view(-1, 1)).add_(rb.clip_others.unsqueeze(1))
    own = (cache.gather(2, rb.y.view(1, -1, 1).expand(cache.shape[0], -1, 1)) * alphas).add_(
        rb.clip_y.view(1, -1, 1)
    )  # (b, m, A)
    return _argmax_hits(own, others, rb.y).sum(dim=1)


def _screen_tolerance(
    clip: Tensor, shifted: Tensor, column_max: float, betas: Tensor, alphas: Tensor
) -> float:
    """A margin ``tol`` above every rounding error of [Tip logits] on the alpha grid.

    A logit is computed as ``l_c(a) = fl(fl(cache_c * a) + clip_c)``; it differs from the
    line ``clip_c + cache_c * a`` by at most ``E = u (|clip| + 2.01 |a| cache_max)``
    (``u`` the unit roundoff).  Lines are linear in ``a``, so if ``l_c - l_y > tol >= 4E``
    at both ends of the alpha range, ``l_c > l_y`` at every alpha in between (and if
    ``l_y - l_c > tol`` at both ends, ``l_y > l_c`` in between).  ``cache_max`` bounds the
    class sums: ``column_max`` (the largest column sum of ``|values|``) x the largest
    affinity ``exp(beta max T)``, doubled for the rounding of the sums.  Returns ``inf``
    when an input is not finite (the screen then decides nothing).
    """
    unit = torch.finfo(clip.dtype).eps / 2
    t_max, clip_max = float(shifted.max()), float(clip.abs().max())
    beta_max, alpha_max = float(betas.max()), float(alphas.abs().max())
    if not all(math.isfinite(v) for v in (t_max, clip_max, alpha_max, column_max)):
        return math.inf
    exponent = max(0.0, beta_max * t_max) * 1.01
    if exponent > 80.0:
        return math.inf
    cache_max = 2.0 * column_max * math.exp(exponent) * 1.01
    return 16.0 * unit * (clip_max + 2.0 * alpha_max * cache_max) + 1e-30


#: Up to this many classes the search lays a block's class sums out ``(b, C, m)`` (rows
#: innermost) and screens every class of every (beta, image) at once
#: (:func:`_screened_counts_few`); above it, ``(b, m, C)`` (classes innermost, where a max
#: over classes is a contiguous reduction) with a first pass of two logits per
#: (beta, image) (:func:`_screened_counts`).  Both give the same counts (tests run both).
_FEW_CLASSES = 32


def _screened_counts(
    cache: Tensor, rb: _RowBlock, alphas: Tensor, ends: Tensor, tol: float
) -> Tensor:
    """Hits per (beta, alpha) of a block, equal to :func:`_full_counts`, through a screen.

    A logit is linear in alpha, so a (beta, row) is decided for every alpha of the grid
    when it is decided by more than ``tol`` (:func:`_screen_tolerance`) at both ends of
    the alpha range ``ends`` ``(2,)`` (alphas of the grid):

    1. a hit everywhere if the label leads both in CLIP logit (``rb.clip_wins``) and in
       class sum (``alpha >= 0``); a miss everywhere if the best other CLIP class beats
       the label at both ends (two logits per row);
    2. for the rest, the logits of all classes at both ends: a hit everywhere if the label
       beats them all at both ends, a miss everywhere if one class beats it at both;
    3. for the rest, only the classes within ``tol`` of the label at an end can win or
       tie: their logits at every alpha, rounded as in :func:`_full_counts`, are compared
       with the label's (ties: the first class wins, as ``argmax``).

    Shapes: ``cache`` ``(b, m, C)`` class sums of the rows of ``rb``; ``alphas`` ``(A,)``.
    Returns ``(b, A)`` int64 counts.
    """
    nb, m, _ = cache.shape
    own = cache.gather(2, rb.y.view(1, m, 1).expand(nb, m, 1)).view(nb, m)
    own_ends = (own.unsqueeze(2) * ends).add_(rb.clip_y.view(1, m, 1))  # (b, m, 2)
    top = cache.gather(2, rb.top.view(1, m, 1).expand(nb, m, 1))  # (b, m, 1)
    top_ends = (top * ends).add_(rb.clip_top.view(1, m, 1))
    miss = (top_ends > own_ends + tol).all(dim=2)  # (b, m)
    if float(ends[0]) >= 0:
        hit = (own >= cache.amax(dim=2)) & rb.clip_wins
    else:
        hit = torch.zeros_like(miss)
    counts = hit.sum(dim=1).view(nb, 1).expand(nb, alphas.shape[0]).clone()
    cells = (~(hit | miss)).view(-1).nonzero().view(-1)  # flat (beta, row) indices
    if cells.numel() == 0:
        return counts
    # 2. every class at both ends, for the undecided (beta, row)s: (P, 2, C) differences.
    r_idx = cells % m
    sub = cache.reshape(nb * m, -1).index_select(0, cells)  # (P, C)
    diff = torch.mul(sub.unsqueeze(1), ends.view(2, 1))
    diff.add_(rb.clip_others.index_select(0, r_idx).unsqueeze(1))
    diff.sub_(own_ends.view(nb * m, 2).index_select(0, cells).unsqueeze(2))  # l_c - l_y
    hit = (diff.amax(dim=2) < -tol).all(dim=1)
    miss = torch.minimum(diff[:, 0], diff[:, 1]).amax(dim=1) > tol
    counts += torch.zeros_like(counts[:, 0]).index_add_(0, cells // m, hit.long()).view(nb, 1)
    left = (~(hit | miss)).nonzero().view(-1)
    if left.numel() == 0:
        return counts
    # 3. the classes that come within tol of the label: logits at every alpha.
    cells, r_idx, sub, diff = cells[left], r_idx[left], sub[left], diff[left]
    num_classes = sub.shape[1]
    near = (torch.maximum(diff[:, 0], diff[:, 1]) >= -tol).view(-1).nonzero().view(-1)  # p*C+c
    p = near.div(num_classes, rounding_mode="floor")
    c = near - p * num_classes
    rows = r_idx.index_select(0, p)
    own_a = own.view(-1).index_select(0, cells).unsqueeze(1) * alphas
    own_a.add_(rb.clip_y.index_select(0, r_idx).unsqueeze(1))  # (P, A), as in _full_counts
    logit = sub.reshape(-1).index_select(0, near).unsqueeze(1) * alphas
    logit.add_(rb.clip_others.view(-1).index_select(0, rows * num_classes + c).unsqueeze(1))
    own_q = own_a.index_select(0, p)  # (Q, A): the label's logits
    beats = logit > own_q
    ties = logit == own_q
    if bool(ties.any()):  # an exact tie: the first class wins, as argmax
        beats |= ties & (c < rb.y.index_select(0, rows)).unsqueeze(1)
    lost = torch.zeros(own_a.shape, dtype=torch.int32, device=own_a.device)
    lost.index_add_(0, p, beats.int())
    return counts.index_add_(0, cells // m, (lost == 0).long())


def _screened_counts_few(
    cache: Tensor, rb: _RowBlock, alphas: Tensor, ends: Tensor, tol: float
) -> Tensor:
    """:func:`_screened_counts` for few classes, on ``(b, C, m)`` class sums (rows innermost).

    Steps 2 and 3 of :func:`_screened_counts` without step 1: the logits of every class at
    both ends of the alpha range for every (beta, row) (``2 C`` per row: with few classes
    this costs less than a first pass), then every logit at every alpha for the rows left
    undecided, laid out ``(A, C, P)`` so that the max over classes runs over contiguous
    rows.  Rounding and the tie rule are those of :func:`_full_counts`.  Returns ``(b, A)``
    int64 counts.
    """
    nb, num_classes, m = cache.shape
    own = cache.view(nb, num_classes * m).index_select(1, rb.own_at)  # (b, m)
    own_ends = (own.unsqueeze(1) * ends.view(1, 2, 1)).add_(rb.clip_y)  # (b, 2, m)
    # l_c - l_y at both ends for every (beta, class, row): (b, 2, C, m).
    diff = torch.mul(cache.unsqueeze(1), ends.view(1, 2, 1, 1)).add_(rb.clip_others_t)
    diff.sub_(own_ends.unsqueeze(2))
    hit = diff.view(nb, 2 * num_classes, m).amax(dim=1) < -tol  # (b, m)
    miss = torch.minimum(diff[:, 0], diff[:, 1]).amax(dim=1) > tol
    counts = hit.sum(dim=1).view(nb, 1).expand(nb, alphas.shape[0]).clone()
    cells = (~(hit | miss)).view(-1).nonzero().view(-1)  # sorted flat (beta, row) indices
    if cells.numel() == 0:
        return counts
    b_idx = cells.div(m, rounding_mode="floor")
    r_idx = cells - b_idx * m
    classes = torch.arange(num_classes, device=cells.device).view(-1, 1)
    a = alphas.view(-1, 1, 1)
    sums = cache.take(b_idx * (num_classes * m) + r_idx + classes * m)  # (C, P)
    others = (sums * a).add_(rb.clip_others_t.index_select(1, r_idx))  # (A, C, P)
    own_a = (own.view(-1).index_select(0, cells) * a[:, 0]).add_(rb.clip_y.index_select(0, r_idx))
    other = others.amax(dim=1)  # (A, P)
    hits = own_a > other
    ties = own_a == other
    if bool(ties.any()):  # the first class that reaches the label's logit wins
        ai, pi = ties.nonzero(as_tuple=True)
        first = (others[ai, :, pi] == own_a[ai, pi].unsqueeze(1)).int().argmax(dim=1)
        hits[ai, pi] = first > rb.y.index_select(0, r_idx)[pi]
    counts.T.index_add_(1, b_idx, hits.long())
    return counts


@torch.no_grad()
def search_hparams(
    val_features: Tensor,
    val_labels: Tensor,
    clip_weights: Tensor,
    cache_keys: Tensor,
    cache_values: Tensor,
    betas: Sequence[float] | Tensor | None = None,
    alphas: Sequence[float] | Tensor | None = None,
    logit_scale: float = CLIP_LOGIT_SCALE,
) -> SearchResult:
    """Grid search of ``(beta, alpha)`` for [Tip logits] on validation data, near the least work.

    * one affinity product ``S = f @ keys.T`` ``(M, N)`` and one CLIP product, for the
      whole grid (the authors' loop recomputes both at every grid point);
    * per beta, the exponentials ``exp(beta * (S - 1))`` (``S - 1`` computed once) and,
      because the values are one-hot, the class sums as a segment sum over each class's
      keys (:func:`class_sums`; non-one-hot values fall back to ``A @ L``);
    * per beta, the logits at the two ends of the alpha range; a validation image whose
      label wins (or loses to one class) by more than every rounding error at both ends
      wins (loses) at every alpha in between, since a logit is linear in alpha.  Only the
      other images get logits at every alpha (:func:`_screened_counts`,
      :func:`_screened_counts_few`), with the same rounding and the same tie rule (first
      class wins) as the full ``(M, A, C)`` computation.

    Work is done in blocks of rows and betas (at most ``_BLOCK_ELEMENTS`` floats each, sized
    to stay in the CPU's L2 cache), so the extra memory is ``S`` plus a few blocks.  With
    up to ``_FEW_CLASSES`` classes a block's rows are innermost (the segment sum then adds
    runs of ``C x rows`` floats), otherwise its classes.  The chosen pair is the first best
    in beta-major, alpha-minor order, as in the authors' loop (:func:`search_hparams_loop`).
    The accuracy grid equals the loop's except where two class logits of a validation
    image agree to within float rounding (the exponent and the class sums are rounded in
    another order than ``-(beta - beta * S)`` and ``A @ L``).

    Args:
        val_features: ``(M, D)`` validation features (never test); val_labels: ``(M,)``.
        clip_weights: ``(C, D)``; cache_keys: ``(N, D)`` (trained ones for Tip-Adapter-F);
            cache_values: ``(N, C)`` (one-hot for the segment sums).
        betas, alphas: ``(B,)``, ``(A,)`` grids (default: :func:`default_search_grid`).
        logit_scale: scale of the CLIP branch (100).

    Returns:
        :class:`SearchResult` with a ``(B, A)`` accuracy grid in percent.
    """
    labels, betas_t, alphas_t = _prepare_search(
        val_features, val_labels, clip_weights, cache_keys, cache_values, betas, alphas
    )
    device, num_val, num_classes = val_features.device, val_features.shape[0], clip_weights.shape[0]
    clip = _clip_logits(val_features, clip_weights, logit_scale)  # (M, C)
    layout = _one_hot_layout(cache_values)
    if layout is not None:  # keys grouped by class: slot k*C + c holds class c's k-th key
        index, mask, k = layout
        cache_keys = cache_keys[index]  # (C*K, D)
    # The one affinity product, shifted once: T = S - 1 = f @ keys.T - 1, (M, W).
    shifted = _similarity(val_features, cache_keys).sub_(1.0)
    width, n_b, n_a = shifted.shape[1], len(betas_t), len(alphas_t)
    betas_dev, alphas_dev = betas_t.to(device), alphas_t.to(device)
    ends = torch.stack([alphas_dev.min(), alphas_dev.max()])  # (2,) the alpha range
    column_max = float(k) if layout is not None else float(cache_values.abs().sum(dim=0).max())
    tol = _screen_tolerance(clip, shifted, column_max, betas_t, alphas_t)
    few = num_classes <= _FEW_CLASSES  # rows innermost: (W, m) blocks, (b, C, m) sums
    budget = _BLOCK_ELEMENTS.get(device.type, 1 << 17)
    rows = max(1, min(num_val, budget // width))  # a block: `chunk` betas x `rows` rows
    chunk = max(1, min(n_b, budget // (rows * width)))
    # Class sums of a group of betas are screened at once (fewer, larger calls).
    group = min(n_b, max(chunk, (_SCREEN_GROUP * budget) // (rows * num_classes)) // chunk * chunk)
    correct = torch.zeros(n_b, n_a, dtype=torch.long, device=device)
    e_buf = shifted.new_empty(chunk * rows * width)  # reused: no allocation per block
    c_buf = shifted.new_empty(group * rows * num_classes)
    t_buf = shifted.new_empty(width * rows) if few else None
    values_t = cache_values.T.contiguous() if few and layout is None else None  # (C, N)
    if layout is not None and mask is not None:  # the grouped view's (K, C) slots
        mask = mask.view(k, num_classes, 1) if few else mask.view(k, num_classes)
    # Per beta chunk: (first beta, exps, their class-grouped view or None, class sums).
    plans: dict[int, list[tuple[int, Tensor, Tensor | None, Tensor]]] = {}

    def plan(m: int, ng: int) -> list[tuple[int, Tensor, Tensor | None, Tensor]]:
        """Views of one group's blocks (built once per (rows, group size)): exps
        ``(b, W, m)`` or ``(b, m, W)``, grouped ``(b, K, C, m)`` or ``(b, m, K, C)``, class
        sums ``(b, C, m)`` or ``(b, m, C)``."""
        if (m, ng) not in plans:
            steps = []
            for b0 in range(0, ng, chunk):
                nb = min(chunk, ng - b0)
                out = c_buf[b0 * m * num_classes : (b0 + nb) * m * num_classes]
                if few:
                    e = e_buf[: nb * width * m].view(nb, width, m)
                    grouped = None if layout is None else e.view(nb, k, num_classes, m)
                    steps.append((b0, e, grouped, out.view(nb, num_classes, m)))
                else:
                    e = e_buf[: nb * m * width].view(nb, m, width)
                    grouped = None if layout is None else e.view(nb, m, k, num_classes)
                    steps.append((b0, e, grouped, out.view(nb, m, num_classes)))
            plans[(m, ng)] = steps
        return plans[(m, ng)]

    # Each chunk's betas as a (b, 1, 1) view, made once (chunks start at multiples of chunk).
    beta_chunks = [betas_dev[i : i + chunk].view(-1, 1, 1) for i in range(0, n_b, chunk)]
    for r0 in range(0, num_val, rows):
        m = min(rows, num_val - r0)
        if t_buf is not None:
            t = t_buf[: width * m].view(width, m)
            t.copy_(shifted[r0 : r0 + m].T)  # (W, m): this block's T, rows innermost
        else:
            t = shifted[r0 : r0 + m]  # (m, W)
        rb = _RowBlock.of(clip[r0 : r0 + m], labels[r0 : r0 + m], tol)
        for g0 in range(0, n_b, group):
            ng = min(group, n_b - g0)
            for b0, e, grouped, out in plan(m, ng):
                torch.mul(t, beta_chunks[(g0 + b0) // chunk], out=e).exp_()
                if grouped is None:  # A @ L
                    if few:
                        torch.matmul(values_t, e, out=out)  # (C, N) @ (b, N, m)
                    else:
                        torch.matmul(e, cache_values, out=out)  # (b, m, N) @ (N, C)
                else:  # segment sum over each class's K slots
                    if mask is not None:
                        grouped.mul_(mask)
                    torch.sum(grouped, dim=1 if few else 2, out=out)
            cache = c_buf[: ng * m * num_classes]
            if few:
                cache = cache.view(ng, num_classes, m)
                if math.isfinite(tol):
                    correct[g0 : g0 + ng] += _screened_counts_few(cache, rb, alphas_dev, ends, tol)
                else:
                    correct[g0 : g0 + ng] += _full_counts(cache.transpose(1, 2), rb, alphas_dev)
            else:
                cache = cache.view(ng, m, num_classes)
                if math.isfinite(tol):
                    correct[g0 : g0 + ng] += _screened_counts(cache, rb, alphas_dev, ends, tol)
                else:
                    correct[g0 : g0 + ng] += _full_counts(cache, rb, alphas_dev)
    return _result(correct, betas_t, alphas_t, num_val)
