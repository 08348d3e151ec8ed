"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of
CLIP for Few-shot Classification", ECCV 2022; code: github.com/gaopengcuhk/Tip-Adapter).

Tip-Adapter turns the few-shot training set into a *cache model*: a key-value
memory whose keys are the CLIP image features of the training images and whose
values are their one-hot labels.  A test feature ``f`` reads the cache through
the paper's exponential affinity and the result is added to the zero-shot CLIP
logits (Sec. 3.1 of the paper):

.. math::

    A = \\exp(-\\beta (1 - f F_{train}^\\top))                \\quad \\text{[affinity]}

    \\mathrm{logits} = 100 \\, f W_c^\\top + \\alpha \\, A L_{train}   \\quad \\text{[Tip logits]}

where ``F_train`` are the cache keys ``(N, D)``, ``L_train`` the cache values
``(N, C)`` and ``W_c`` the zero-shot text classifier ``(C, D)``.  Only the CLIP branch
is scaled by 100 (:data:`~fewclip_tutorial.zeroshot.CLIP_LOGIT_SCALE`), so alpha keeps
the paper's meaning.  The docstrings below name these two equations *[affinity]* and
*[Tip logits]*; the arithmetic follows the authors' code (``main.py``, ``search_hp`` in
``utils.py``): ``((-1) * (beta - beta * f @ keys.T)).exp() @ values``.

Tip-Adapter-F makes the keys a trainable linear layer initialised from the cache and
fine-tunes only them (authors' ``run_tip_adapter_F``); values and text classifier stay
frozen.  It trains through the book's one loop, :func:`fewclip_tutorial.training.fit`.

Unlike the authors' code, which picks Tip-Adapter-F's epoch and, for ImageNet, the
hyperparameters on test data, everything here is selected on the few-shot
*validation* split: no function has a test argument.

Example: ``keys = build_cache_keys(views)`` ``(V, N, D) -> (N, D)``, ``values =
build_cache_values(labels, C)``, ``best = search_hparams(val_f, val_y, W, keys, values)``,
``tip_logits(test_f, W, keys, values, best.best_alpha, best.best_beta)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewclip_tutorial.experiment import Context, Option, register_method
from fewclip_tutorial.training import fit
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE

__all__ = [
    "CLIP_LOGIT_SCALE",
    "SearchResult",
    "TipAdapterError",
    "TipAdapterF",
    "TipAdapterFResult",
    "affinity",
    "build_cache_keys",
    "build_cache_values",
    "class_sums",
    "default_search_grid",
    "register_exercises",
    "run_tip_adapter",
    "run_tip_adapter_f",
    "search_hparams",
    "search_hparams_loop",
    "tip_logits",
    "train_tip_adapter_f",
]

#: Elements of one work block of the vectorised search (beta chunk x rows x width); it
#: bounds the search's extra memory (4 bytes each) and keeps a block in the CPU's cache.
_BLOCK_ELEMENTS = {"cpu": 1 << 17, "cuda": 1 << 27}
#: The class sums of a group of betas are screened at once: up to this many blocks' worth.
_SCREEN_GROUP = 4


class TipAdapterError(ValueError):
    """Bad input to a Tip-Adapter function (wrong shape, empty class, negative beta...)."""


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _require_tensor(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TipAdapterError(f"{name} must be a torch.Tensor, got {type(x).__name__}; "
                              f"wrap it with torch.as_tensor(...).")  # fmt: skip
    return x


def _require_2d(name: str, x: Any, rows: str, cols: str) -> Tensor:
    x = _require_tensor(name, x)
    if x.dim() != 2:
        hints = {3: " (for views (V, N, D) build the keys with build_cache_keys first)",
                 1: " (for a single vector use x.unsqueeze(0))"}  # fmt: skip
        hint = hints.get(x.dim(), "")
        raise TipAdapterError(
            f"{name} must be 2-D ({rows}, {cols}), got shape {tuple(x.shape)}{hint}."
        )
    return x


def _check_beta(beta: float) -> None:
    if not math.isfinite(beta) or beta < 0:
        raise TipAdapterError(f"beta must be a finite number >= 0 (the sharpness of the affinity "
                              f"exp(-beta * (1 - cos))), got {beta}; use e.g. 1.0.")  # fmt: skip


def _check_features_and_keys(f: Tensor, cache_keys: Tensor) -> None:
    _require_2d("f (features)", f, "M", "D")
    _require_2d("cache_keys", cache_keys, "N", "D")
    if f.shape[1] != cache_keys.shape[1]:
        raise TipAdapterError(
            f"feature dimension mismatch: f has D={f.shape[1]} but cache_keys has "
            f"D={cache_keys.shape[1]}; build the cache and the features with the same "
            f"image encoder."
        )


def _check_cache(cache_keys: Tensor, cache_values: Tensor, num_classes: int | None) -> None:
    _require_2d("cache_keys", cache_keys, "N", "D")
    _require_2d("cache_values", cache_values, "N", "C")
    if cache_values.shape[0] != cache_keys.shape[0]:
        raise TipAdapterError(
            f"cache size mismatch: cache_keys has N={cache_keys.shape[0]} rows but "
            f"cache_values has {cache_values.shape[0]}; build both from the same training "
            f"images (one key and one one-hot value per image)."
        )
    if num_classes is not None and cache_values.shape[1] != num_classes:
        raise TipAdapterError(
            f"class count mismatch: cache_values has C={cache_values.shape[1]} columns but "
            f"clip_weights has {num_classes} rows; pass num_classes=clip_weights.shape[0] "
            f"to build_cache_values."
        )
    empty = (cache_values.sum(dim=0) == 0).nonzero().flatten().tolist()
    if empty:
        raise TipAdapterError(
            f"class(es) {empty[:10]}{' ...' if len(empty) > 10 else ''} have no cache entries "
            f"(all-zero columns in cache_values), so the cache can never vote for them; "
            f"sample at least one training shot per class."
        )


def _check_logit_inputs(f: Tensor, clip_weights: Tensor, keys: Tensor, values: Tensor) -> None:
    _check_features_and_keys(f, keys)
    if _require_2d("clip_weights", clip_weights, "C", "D").shape[1] != f.shape[1]:
        raise TipAdapterError(
            f"feature dimension mismatch: clip_weights has D={clip_weights.shape[1]} but the "
            f"features have D={f.shape[1]}; build the text classifier with the same backbone."
        )
    _check_cache(keys, values, clip_weights.shape[0])


def _check_labels(name: str, labels: Any, length: int, num_classes: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise TipAdapterError(
            f"{name} must be 1-D (one class index per row), got shape {tuple(labels.shape)}."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TipAdapterError(
            f"{name} must hold integer class indices, got dtype {labels.dtype}; use labels.long()."
        )
    if labels.shape[0] != length:
        raise TipAdapterError(
            f"{name} has {labels.shape[0]} entries but there are {length} feature rows; "
            f"pass one label per feature."
        )
    if length and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise TipAdapterError(
            f"{name} must lie in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]; check num_classes."
        )
    return labels.long()


# --------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------


def build_cache_keys(view_features: Tensor) -> Tensor:
    """Cache keys ``F_train``: ``(V, N, D)`` views (or ``(N, D)``) -> ``(N, D)`` unit keys.

    Each view is L2-normalised, the ``V`` augmented views of an image are averaged and the
    average is normalised again (the authors encode every image 10 times with random
    crops and flips, ``build_cache_model`` in ``utils.py``).
    """
    view_features = _require_tensor("view_features", view_features)
    if view_features.dim() == 2:
        view_features = view_features.unsqueeze(0)
    if view_features.dim() != 3:
        raise TipAdapterError(
            f"view_features must be (V, N, D) or (N, D), got shape {tuple(view_features.shape)}."
        )
    if view_features.shape[0] == 0 or view_features.shape[1] == 0:
        raise TipAdapterError(
            f"view_features is empty (shape {tuple(view_features.shape)}); the cache "
            f"needs at least one view of at least one image."
        )
    mean = F.normalize(view_features, dim=-1).mean(dim=0)
    return F.normalize(mean, dim=-1)


def build_cache_values(
    labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Cache values ``L_train``: ``(N,)`` integer labels -> ``(N, C)`` one-hot ``dtype`` matrix.

    Raises:
        TipAdapterError: labels out of range, or a class without any cache entry.
    """
    if num_classes <= 0:
        raise TipAdapterError(f"num_classes must be positive, got {num_classes}.")
    labels = _check_labels("labels", labels, len(labels), num_classes)
    values = F.one_hot(labels, num_classes).to(dtype)
    _check_cache(values.new_zeros(values.shape[0], 1), values, None)
    return values


def _similarity(f: Tensor, cache_keys: Tensor) -> Tensor:
    # (M, D) @ (D, N) -> (M, N): cosine similarity of unit vectors (authors: features @ keys).
    return f @ cache_keys.T


def _affinity_from_similarity(similarity: Tensor, beta: float) -> Tensor:
    # [affinity] with the authors' rounding: ((-1) * (beta - beta * S)).exp().
    return torch.exp(-(beta - beta * similarity))


def _clip_logits(f: Tensor, clip_weights: Tensor, logit_scale: float) -> Tensor:
    # Same expression (and rounding) as zeroshot.zero_shot_logits and the authors' code.
    return logit_scale * f @ clip_weights.T


def _tip(
    sim: Tensor, f: Tensor, w: Tensor, v: Tensor, alpha: float, beta: float, s: float
) -> Tensor:
    # [Tip logits] as the authors write them: clip_logits + cache_logits * alpha.
    beta = float(beta)
    _check_beta(beta)
    cache = _affinity_from_similarity(sim, beta) @ v
    return _clip_logits(f, w, s) + cache * float(alpha)


def affinity(f: Tensor, cache_keys: Tensor, beta: float) -> Tensor:
    """[affinity]: ``A = exp(-beta * (1 - f @ cache_keys.T))``.

    Args:
        f: ``(M, D)`` L2-normalised query features.
        cache_keys: ``(N, D)`` L2-normalised keys.
        beta: sharpness ``>= 0``; ``A`` is 1 where ``f`` equals a key.

    Returns:
        ``(M, N)`` affinities in ``[exp(-2 beta), 1]``.
    """
    _check_features_and_keys(f, cache_keys)
    beta = float(beta)
    _check_beta(beta)
    return _affinity_from_similarity(_similarity(f, cache_keys), beta)


def tip_logits(
    f: Tensor,
    clip_weights: Tensor,
    cache_keys: Tensor,
    cache_values: Tensor,
    alpha: float,
    beta: float,
    logit_scale: float = CLIP_LOGIT_SCALE,
) -> Tensor:
    """[Tip logits]: ``logit_scale * f @ W.T + alpha * A @ L`` (authors' order of operations).

    Args:
        f: ``(M, D)`` L2-normalised image features (any encoder, fine-tuned or not).
        clip_weights: ``(C, D)`` zero-shot text classifier ``W``.
        cache_keys: ``(N, D)`` keys ``F_train``.
        cache_values: ``(N, C)`` one-hot values ``L_train``.
        alpha: residual ratio; ``alpha = 0`` gives exactly the zero-shot logits.
        beta: affinity sharpness ``>= 0``.
        logit_scale: scale of the CLIP branch only (100 in the paper).

    Returns:
        ``(M, C)`` logits.
    """
    _check_logit_inputs(f, clip_weights, cache_keys, cache_values)
    return _tip(_similarity(f, cache_keys), f, clip_weights, cache_values, alpha, beta, logit_scale)


# --------------------------------------------------------------------------------------
# Hyperparameter search
# --------------------------------------------------------------------------------------


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


class TipAdapterF(nn.Module):
    """Tip-Adapter-F: the ``(N, D)`` cache keys become a trainable linear layer.

    ``self.cache_keys`` is ``nn.Linear(D, N, bias=False)`` whose weight starts as the keys
    (the authors' ``adapter``), so the untrained forward equals :func:`tip_logits`.  The
    ``(N, C)`` values are a frozen buffer; trained keys are not renormalised (as the authors).
    """

    def __init__(self, cache_keys: Tensor, cache_values: Tensor) -> None:
        super().__init__()
        _check_cache(cache_keys, cache_values, None)
        num_entries, dim = cache_keys.shape
        self.cache_keys = nn.Linear(dim, num_entries, bias=False, device="meta")
        self.cache_keys.weight = nn.Parameter(cache_keys.detach().clone())
        self.register_buffer("cache_values", cache_values.detach().clone())

    @property
    def keys(self) -> Tensor:
        """``(N, D)`` current (trained) keys, detached."""
        return self.cache_keys.weight.detach()

    def forward(
        self,
        f: Tensor,
        clip_weights: Tensor,
        alpha: float,
        beta: float,
        logit_scale: float = CLIP_LOGIT_SCALE,
    ) -> Tensor:
        """[Tip logits] with trainable keys: ``(M, D) -> (M, C)`` logits."""
        _check_logit_inputs(f, clip_weights, self.cache_keys.weight, self.cache_values)
        similarity = self.cache_keys(f)  # (M, N) = f @ keys.T, the authors' adapter(f)
        return _tip(similarity, f, clip_weights, self.cache_values, alpha, beta, logit_scale)


@dataclass
class TipAdapterFResult:
    """Outcome of :func:`train_tip_adapter_f`.

    Attributes:
        model, cache_keys: the adapter holding the kept ``(N, D)`` keys, and those keys.
        alpha, beta: re-searched on validation with the kept keys (``search``).
        train_alpha, train_beta: the pair used during training.
        best_step: the optimiser step whose keys were kept (0: the starting keys, that is
            training-free Tip-Adapter; a later step is kept only if strictly better).
        steps: optimiser steps taken; best_val_accuracy: the kept keys' validation
            accuracy (%) at the training pair.
        history: :class:`~fewclip_tutorial.training.FitResult` history (``step``, ``loss``,
            ``lr`` per step; ``val_step``, ``val_score`` = validation accuracy per epoch).
    """

    model: TipAdapterF
    cache_keys: Tensor
    alpha: float
    beta: float
    train_alpha: float
    train_beta: float
    best_step: int
    steps: int
    best_val_accuracy: float
    search: SearchResult
    history: dict[str, list] = field(default_factory=dict)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean() * 100.0)


def tip_f_steps(num_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """Tip-Adapter-F's training length: ``max(epochs * ceil(N / batch_size), min_steps)``.

    The authors train ``epochs`` passes (20; 100 for EuroSAT) in batches of 256.  On a set
    smaller than a batch that is one optimiser step per epoch, and the authors' own
    schedule for their one-batch dataset (EuroSAT, 16 shots x 10 classes = 160 images) is
    100 epochs, i.e. 100 steps.  So the length is the authors' schedule, but never fewer
    than ``min_steps`` (100) steps; where the authors' schedule already has 100 steps (20
    epochs of 5 or more batches, e.g. 63 for 16-shot ImageNet) it is unchanged.
    """
    if min(num_train, batch_size, epochs) < 1 or min_steps < 0:
        raise TipAdapterError(f"need N, batch_size, epochs >= 1, min_steps >= 0; got "
                              f"{num_train}, {batch_size}, {epochs}, {min_steps}.")  # fmt: skip
    return max(epochs * math.ceil(num_train / batch_size), min_steps)


def train_tip_adapter_f(
    train_view_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    clip_weights: Tensor,
    cache_keys: Tensor,
    cache_values: Tensor,
    alpha: float,
    beta: float,
    epochs: int = 20,
    lr: float = 1e-3,
    eps: float = 1e-4,
    batch_size: int = 256,
    seed: int = 1,
    progress: bool = True,
    search_grid: tuple[Tensor, Tensor] | None = None,
    weight_decay: float = 0.01,
    min_steps: int = 100,
) -> TipAdapterFResult:
    """Fine-tune the cache keys (Tip-Adapter-F) on cached augmented features.

    Runs :func:`fewclip_tutorial.training.fit` for :func:`tip_f_steps` optimiser steps:
    each epoch visits every training image once in random order (batches of
    ``min(batch_size, N)``), each time through one randomly chosen augmented view of its
    cached features, so no image is re-encoded.  Loss: cross-entropy of [Tip logits] at
    the training ``alpha``, ``beta``.  AdamW (``lr``, ``eps``, ``weight_decay``) with a
    cosine schedule stepped per iteration, as in the authors' ``run_tip_adapter_F``.
    Validation accuracy is measured at step 0 and after every epoch; the starting keys
    (training-free Tip-Adapter) are kept unless a later epoch is strictly better.  Alpha
    and beta are then re-searched on validation with the kept keys.  There is
    deliberately no test argument.

    Args:
        train_view_features: ``(V, N, D)`` cached views (``(N, D)``: ``V = 1``);
            train_labels: ``(N,)``; val_features: ``(M, D)``; val_labels: ``(M,)``.
        clip_weights: ``(C, D)`` frozen; cache_keys: ``(N, D)`` initial; cache_values: ``(N, C)``.
        alpha, beta: the pair used while training.
        epochs, lr, eps, batch_size, weight_decay: the authors' settings (20, 1e-3, 1e-4,
            256; AdamW's default weight decay 0.01); min_steps: see :func:`tip_f_steps`.
        seed: seeds the shuffling and the views (deterministic on CPU); progress: a bar.
        search_grid: ``(betas, alphas)`` of the final search (default grid if None).
    """
    views = _require_tensor("train_view_features", train_view_features)
    views = views.unsqueeze(0) if views.dim() == 2 else views
    if views.dim() != 3:
        raise TipAdapterError(f"train_view_features must be (V, N, D), got {tuple(views.shape)}.")
    _check_logit_inputs(val_features, clip_weights, cache_keys, cache_values)
    if views.shape[1:] != cache_keys.shape:
        raise TipAdapterError(
            f"train_view_features has (N, D) = {tuple(views.shape[1:])} but cache_keys is "
            f"{tuple(cache_keys.shape)}; the cache must be built from these training features."
        )
    num_classes, device = clip_weights.shape[0], cache_keys.device
    train_y = _check_labels("train_labels", train_labels, views.shape[1], num_classes).to(device)
    val_y = _check_labels("val_labels", val_labels, val_features.shape[0], num_classes).to(device)
    alpha, beta = float(alpha), float(beta)
    _check_beta(beta)
    num_views, num_train = views.shape[0], views.shape[1]
    steps = tip_f_steps(num_train, batch_size, epochs, min_steps)
    batch = min(batch_size, num_train)
    per_epoch = math.ceil(num_train / batch)
    views, val_f, w = views.to(device), val_features.to(device), clip_weights.to(device)

    generator = torch.Generator().manual_seed(int(seed))
    model = TipAdapterF(cache_keys, cache_values).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, weight_decay=weight_decay)
    epoch: dict[str, Tensor] = {}

    def step_loss(step: int) -> Tensor:
        b = (step - 1) % per_epoch
        if b == 0:  # a new epoch: new order, one random view per image
            epoch["order"] = torch.randperm(num_train, generator=generator).to(device)
            epoch["view"] = torch.randint(num_views, (num_train,), generator=generator).to(device)
        idx = epoch["order"][b * batch : (b + 1) * batch]
        logits = model(views[epoch["view"][idx], idx], w, alpha, beta)  # (B, C)
        return F.cross_entropy(logits, train_y[idx])

    fitted = fit(model, step_loss, steps=steps, optimizer=optimizer, schedule="cosine",
                 evaluate=lambda: _accuracy(model(val_f, w, alpha, beta), val_y),
                 eval_every=per_epoch, device=device, progress=progress, desc="Tip-Adapter-F")  # fmt: skip
    betas, alphas = search_grid if search_grid is not None else default_search_grid()
    search = search_hparams(val_f, val_y, w, model.keys, model.cache_values, betas, alphas)
    return TipAdapterFResult(
        model, model.keys.clone(), search.best_alpha, search.best_beta, alpha, beta,
        fitted.best_step, fitted.steps_run, float(fitted.best_score), search, fitted.history,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Runner integration (fewclip run tip-adapter / tip-adapter-f)
# --------------------------------------------------------------------------------------

#: The options of ``tip-adapter``, declared once (CLI, runner and docs read them here).
SEARCH_OPTIONS: dict[str, Option] = {
    "views": Option(int, 10, "augmented views per training image averaged into a cache key"),
    "beta_scale": Option(float, 7.0, "beta grid scale: authors' grid 0.1 + i*(scale-0.1)/steps"),
    "alpha_scale": Option(float, 3.0, "alpha grid scale: authors' grid 0.1 + i*(scale-0.1)/steps"),
    "beta_steps": Option(int, 200, "number of betas in the search grid"),
    "alpha_steps": Option(int, 20, "number of alphas in the search grid"),
}
#: The options of ``tip-adapter-f``: the search's plus training (see train_tip_adapter_f).
FINETUNE_OPTIONS: dict[str, Option] = {
    **SEARCH_OPTIONS,
    "epochs": Option(int, 20, "training epochs (authors: 20; 100 for EuroSAT)"),
    "min_steps": Option(int, 100, "at least this many optimiser steps (small training sets)"),
    "lr": Option(float, 1e-3, "AdamW learning rate (eps 1e-4, cosine schedule per step)"),
    "batch_size": Option(int, 256, "mini-batch size (capped at the training-set size)"),
}


def _run(
    ctx: Context, declared: dict[str, Option], given: dict[str, Any], progress: bool
) -> dict[str, Any]:
    """Tip-Adapter, and Tip-Adapter-F when ``declared`` has the training options."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise TipAdapterError(f"unknown option(s) {unknown}; the options are {sorted(declared)}.")
    o = {name: opt.coerce(name, given.get(name, opt.default)) for name, opt in declared.items()}
    if o["views"] < 1:
        raise TipAdapterError(f"views must be >= 1, got {o['views']}.")
    dev, train = ctx.device, ctx.features("train", views=o["views"], augment=True)
    train_views = torch.as_tensor(train.features).to(dev)  # (V, N, D)
    train_views = train_views.unsqueeze(0) if train_views.dim() == 2 else train_views
    train_labels = torch.as_tensor(train.labels).to(dev)
    val_set = ctx.features("val")
    val_f = torch.as_tensor(val_set.features).to(dev)
    val_f = val_f.mean(0) if val_f.dim() == 3 else val_f  # (M, D)
    w = ctx.text_classifier.to(device=dev, dtype=train_views.dtype)  # (C, D)
    val = (val_f, torch.as_tensor(val_set.labels).to(dev), w)
    keys, values = build_cache_keys(train_views), build_cache_values(train_labels, w.shape[0])
    grid = default_search_grid(o["beta_scale"], o["alpha_scale"], o["beta_steps"], o["alpha_steps"])
    search, extra = search_hparams(*val, keys, values, *grid), {}
    if "epochs" in declared:
        trained = train_tip_adapter_f(
            train_views, train_labels, *val, keys, values,
            alpha=search.best_alpha, beta=search.best_beta, epochs=o["epochs"], lr=o["lr"],
            batch_size=o["batch_size"], min_steps=o["min_steps"], seed=ctx.seed,
            progress=progress, search_grid=grid,
        )  # fmt: skip
        keys = trained.cache_keys
        extra = dict(best_step=trained.best_step, steps=trained.steps, history=trained.history,
                     train_alpha=trained.train_alpha, train_beta=trained.train_beta,
                     training_free_val_accuracy=search.best_accuracy)  # fmt: skip
        search = trained.search
    alpha, beta = search.best_alpha, search.best_beta

    def predict(f: Tensor) -> Tensor:  # CPU features from ctx.report, scored on ctx.device
        with torch.no_grad():
            return tip_logits(f.to(ctx.device), w, keys, values, alpha, beta).to(f.device)

    result = ctx.report(predict)
    result.update(
        alpha=alpha,
        beta=beta,
        selection_val_accuracy=search.best_accuracy,
        zero_shot_val_accuracy=_accuracy(_clip_logits(*val[0::2], CLIP_LOGIT_SCALE), val[1]),
        cache_size=int(keys.shape[0]),
        views=int(train_views.shape[0]),
        logit_scale=CLIP_LOGIT_SCALE,
        **extra,
    )
    return result


@register_method(
    "tip-adapter",
    options=SEARCH_OPTIONS,
    help="Training-free Tip-Adapter: cache model, alpha/beta searched on the few-shot val split.",
)
def run_tip_adapter(ctx: Context, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Tip-Adapter ([Tip logits]) with alpha, beta searched on validation (:data:`SEARCH_OPTIONS`)."""
    return _run(ctx, SEARCH_OPTIONS, options, progress)


@register_method(
    "tip-adapter-f",
    options=FINETUNE_OPTIONS,
    help="Tip-Adapter-F: fine-tune the cache keys; kept step and alpha/beta chosen on val.",
)
def run_tip_adapter_f(ctx: Context, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Tip-Adapter-F (:data:`FINETUNE_OPTIONS`): keys trained from the searched pair.

    Training starts at the alpha/beta of the training-free search on validation (the
    authors start from fixed per-dataset values instead).
    """
    return _run(ctx, FINETUNE_OPTIONS, options, progress)


# --------------------------------------------------------------------------------------
# Exercises
# --------------------------------------------------------------------------------------


def _tip_logits_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float]:
    m, c, k, d = (int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in
                  ((1, 6), (2, 5), (1, 3), (3, 8)))  # fmt: skip
    f = F.normalize(torch.randn(m, d, generator=gen), dim=-1)
    clip_weights = F.normalize(torch.randn(c, d, generator=gen), dim=-1)
    keys = F.normalize(torch.randn(c * k, d, generator=gen), dim=-1)
    keys[0] = f[0]  # one exact match: its affinity must be 1
    labels = torch.arange(c).repeat_interleave(k)[torch.randperm(c * k, generator=gen)]
    alpha, beta = (float(torch.empty(1).uniform_(0.5, hi, generator=gen)) for hi in (5.0, 8.0))
    return f, clip_weights, keys, F.one_hot(labels, c).float(), alpha, beta


def _affinity_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    f, _, keys, _, _, beta = _tip_logits_inputs(gen)
    return f, keys, beta


def register_exercises() -> None:
    """Register the exercises ``tip_affinity`` and ``tip_cache_logits`` (idempotent)."""
    from fewclip_tutorial.exercises import register_exercise

    register_exercise(
        "tip_affinity",
        affinity,
        _affinity_inputs,
        description=(
            "Write affinity(f, cache_keys, beta) taking (M, D) L2-normalised features, "
            "(N, D) L2-normalised cache keys and a float beta, and returning the (M, N) "
            "Tip-Adapter affinities exp(-beta * (1 - cosine similarity))."
        ),
        hint=(
            "Cosine similarity of unit vectors is f @ cache_keys.T; an image equal to a key "
            "must get affinity exactly 1."
        ),
    )
    register_exercise(
        "tip_cache_logits",
        tip_logits,
        _tip_logits_inputs,
        description=(
            "Write tip_logits(f, clip_weights, cache_keys, cache_values, alpha, beta) "
            "returning the (M, C) Tip-Adapter logits 100 * f @ W.T + alpha * A @ L, "
            "where A is the (M, N) affinity of the features to the (N, D) cache keys and L "
            "the (N, C) one-hot cache values."
        ),
        hint=(
            "Only the CLIP branch is multiplied by 100; the cache branch A @ L is scaled by "
            "alpha alone."
        ),
        atol=1e-4,
    )
