"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022).

Tip-Adapter turns the few-shot training set into a *cache model*: a key-value
memory whose keys are the CLIP image features of the training images and whose
values are their one-hot labels.  A test feature ``f`` reads the cache through
an exponential affinity and the result is added to the zero-shot CLIP logits:

.. math::

    A = \\exp(-\\beta (1 - f F_{train}^\\top))                \\quad \\text{[affinity]}

    \\mathrm{logits} = 100 \\, f W^\\top + \\alpha \\, A L_{train}   \\quad \\text{[Tip logits]}

where ``F_train`` are the cache keys ``(N, D)``, ``L_train`` the cache values
``(N, C)`` and ``W`` the zero-shot text classifier ``(C, D)``.  Only the CLIP
branch is scaled by 100 (the fixed CLIP temperature of the paper; we use 100 rather
than a backbone's learned ``logit_scale`` so that alpha keeps the paper's meaning).
The docstrings below refer to these two equations as *[affinity]* and *[Tip logits]*.

Tip-Adapter-F makes the keys a trainable linear layer initialised
from the cache and fine-tunes only them for a few epochs; the values and the
text classifier stay frozen.

The module has a *functional core* (pure tensor functions, usable with any
image encoder because they only see features) and a thin trainer.  Unlike the
public reference code, which picks Tip-Adapter-F's epoch and Tip-Adapter's
hyperparameters on test data for some datasets, everything here is selected on
the few-shot *validation* split: the trainer has no test argument at all.

Example:
    >>> keys = build_cache_keys(train_views)            # (V, N, D) -> (N, D)
    >>> values = build_cache_values(train_labels, C)    # (N,) -> (N, C)
    >>> betas, alphas = default_search_grid()
    >>> best = search_hparams(val_f, val_y, W, keys, values, betas, alphas)
    >>> logits = tip_logits(test_f, W, keys, values, best.best_alpha, best.best_beta)
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fewclip_tutorial.experiment import Context, Option, register_method

__all__ = [
    "CLIP_LOGIT_SCALE",
    "SearchResult",
    "TipAdapterError",
    "TipAdapterF",
    "TipAdapterFResult",
    "affinity",
    "build_cache_keys",
    "build_cache_values",
    "default_search_grid",
    "register_exercises",
    "run_tip_adapter",
    "run_tip_adapter_f",
    "search_hparams",
    "search_hparams_loop",
    "tip_logits",
    "train_tip_adapter_f",
]

#: The fixed CLIP temperature of the paper's zero-shot branch ([Tip logits]).
CLIP_LOGIT_SCALE: float = 100.0

# Upper bound on the number of floats of one (M, alphas, C) block in the vectorised search.
_MAX_BLOCK_ELEMENTS: int = 1 << 25


class TipAdapterError(ValueError):
    """Bad input to a Tip-Adapter function (wrong shape, empty class, negative beta...)."""


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _require_tensor(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TipAdapterError(
            f"{name} must be a torch.Tensor, got {type(x).__name__}; "
            f"wrap it with torch.as_tensor(...)."
        )
    return x


def _require_2d(name: str, x: Any, rows: str, cols: str) -> Tensor:
    x = _require_tensor(name, x)
    if x.dim() != 2:
        hint = (
            " (for augmented views (V, N, D) build the keys with build_cache_keys first)"
            if x.dim() == 3
            else " (for a single vector use x.unsqueeze(0))"
            if x.dim() == 1
            else ""
        )
        raise TipAdapterError(
            f"{name} must be 2-D ({rows}, {cols}), got shape {tuple(x.shape)}{hint}."
        )
    return x


def _check_beta(beta: float) -> None:
    if not math.isfinite(beta) or beta < 0:
        raise TipAdapterError(
            f"beta must be a finite number >= 0 (it is the sharpness of the affinity "
            f"exp(-beta * (1 - cos))), got {beta}; use a positive value such as 1.0."
        )


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
        shown = empty[:10]
        more = "" if len(empty) <= 10 else f" (and {len(empty) - 10} more)"
        raise TipAdapterError(
            f"class(es) {shown}{more} have no cache entries (all-zero columns in "
            f"cache_values), so the cache can never vote for them; sample at least one "
            f"training shot per class."
        )


def _check_clip_weights(clip_weights: Tensor, dim: int) -> None:
    _require_2d("clip_weights", clip_weights, "C", "D")
    if clip_weights.shape[1] != dim:
        raise TipAdapterError(
            f"feature dimension mismatch: clip_weights has D={clip_weights.shape[1]} but the "
            f"features have D={dim}; build the text classifier with the same backbone."
        )


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
    """Cache keys ``F_train``: one L2-normalised key per training image.

    Each view is L2-normalised, the ``V`` augmented views of an image are averaged,
    and the average is normalised again (the paper encodes every image 10 times
    with random crops and flips).

    Args:
        view_features: ``(V, N, D)`` features of ``V`` augmented views of ``N`` images,
            or ``(N, D)`` for a single view.

    Returns:
        ``(N, D)`` unit-norm keys, same dtype and device as the input.
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
    """Cache values ``L_train``: one-hot labels.

    Args:
        labels: ``(N,)`` integer class indices of the cached images.
        num_classes: ``C``.
        dtype: floating dtype of the result.

    Returns:
        ``(N, C)`` one-hot matrix on the labels' device.

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
    # (M, D) @ (D, N) -> (M, N): cosine similarity of unit vectors.
    return f @ cache_keys.T


def _affinity_from_similarity(similarity: Tensor, beta: float) -> Tensor:
    # [affinity].  Kept as one function so every code path rounds identically.
    return torch.exp((1.0 - similarity) * -beta)


def _clip_logits(f: Tensor, clip_weights: Tensor, logit_scale: float) -> Tensor:
    # Same expression (and rounding) as zeroshot.zero_shot_logits and the reference code.
    return logit_scale * f @ clip_weights.T


def _combine(clip_logits: Tensor, cache_logits: Tensor, alpha: float) -> Tensor:
    # [Tip logits]: the residual blend.  Multiplication then addition, never a fused op,
    # so the vectorised search reproduces the loop bit for bit.
    return clip_logits + cache_logits * alpha


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
    """[Tip logits]: ``logit_scale * f @ W.T + alpha * A @ L``.

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
    _check_features_and_keys(f, cache_keys)
    _check_clip_weights(clip_weights, f.shape[1])
    _check_cache(cache_keys, cache_values, clip_weights.shape[0])
    beta = float(beta)
    _check_beta(beta)
    cache = _affinity_from_similarity(_similarity(f, cache_keys), beta) @ cache_values
    return _combine(_clip_logits(f, clip_weights, logit_scale), cache, float(alpha))


# --------------------------------------------------------------------------------------
# Hyperparameter search
# --------------------------------------------------------------------------------------


def default_search_grid(
    beta_scale: float = 7.0,
    alpha_scale: float = 3.0,
    beta_steps: int = 200,
    alpha_steps: int = 20,
) -> tuple[Tensor, Tensor]:
    """The paper's search grid: ``beta`` and ``alpha`` from 0.1 to their scale.

    The defaults are the ImageNet scales (7 for beta, 3 for alpha) with 200 and 20
    steps.  Both ends are included (``torch.linspace``).

    Returns:
        ``(betas (beta_steps,), alphas (alpha_steps,))`` float32 tensors.
    """
    for name, steps in (("beta_steps", beta_steps), ("alpha_steps", alpha_steps)):
        if steps < 1:
            raise TipAdapterError(f"{name} must be >= 1, got {steps}.")
    for name, scale in (("beta_scale", beta_scale), ("alpha_scale", alpha_scale)):
        if scale < 0.1:
            raise TipAdapterError(f"{name} must be >= 0.1 (the grid starts at 0.1), got {scale}.")
    betas = torch.linspace(0.1, float(beta_scale), int(beta_steps))
    alphas = torch.linspace(0.1, float(alpha_scale), int(alpha_steps))
    return betas, alphas


@dataclass
class SearchResult:
    """Outcome of a grid search over ``(beta, alpha)`` on the validation split.

    Attributes:
        best_alpha: chosen residual ratio.
        best_beta: chosen sharpness.
        best_accuracy: validation accuracy (percent) at the chosen pair.
        accuracy: ``(len(betas), len(alphas))`` validation accuracy grid in percent (CPU,
            float64).
        betas: ``(B,)`` searched betas (CPU, float32).
        alphas: ``(A,)`` searched alphas (CPU, float32).
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
    _check_features_and_keys(val_features, cache_keys)
    _check_clip_weights(clip_weights, val_features.shape[1])
    _check_cache(cache_keys, cache_values, clip_weights.shape[0])
    labels = _check_labels(
        "val_labels", val_labels, val_features.shape[0], clip_weights.shape[0]
    ).to(val_features.device)
    if val_features.shape[0] == 0:
        raise TipAdapterError("val_features is empty; the search needs validation images.")
    default_betas, default_alphas = default_search_grid()
    betas_t = torch.as_tensor(default_betas if betas is None else betas, dtype=torch.float32)
    alphas_t = torch.as_tensor(default_alphas if alphas is None else alphas, dtype=torch.float32)
    for name, grid in (("betas", betas_t), ("alphas", alphas_t)):
        if grid.dim() != 1 or grid.numel() == 0:
            raise TipAdapterError(f"{name} must be a non-empty 1-D sequence of numbers.")
    for beta in betas_t.tolist():
        _check_beta(beta)
    return labels, betas_t.to(val_features.dtype), alphas_t.to(val_features.dtype)


def _result(
    correct: Tensor,
    betas: Tensor,
    alphas: Tensor,
    num_val: int,
    best: tuple[int, int] | None = None,
) -> SearchResult:
    correct = correct.cpu()
    if best is None:
        flat = int(torch.argmax(correct.flatten()))  # first maximum in beta-major order
        best = divmod(flat, correct.shape[1])
    b, a = best
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
    """Reference search: a plain nested loop, recomputing [Tip logits] for every pair.

    This mirrors the reference implementation (beta outer, alpha inner, strict
    ``>`` so the first best pair wins).  It exists to test and benchmark
    :func:`search_hparams`; use that one in practice.

    Args:
        val_features: ``(M, D)`` validation features.
        val_labels: ``(M,)`` validation labels.
        clip_weights: ``(C, D)``; cache_keys: ``(N, D)``; cache_values: ``(N, C)``.
        betas: ``(B,)`` grid (default: :func:`default_search_grid`).
        alphas: ``(A,)`` grid (default: :func:`default_search_grid`).

    Returns:
        :class:`SearchResult` with a ``(B, A)`` accuracy grid.
    """
    labels, betas_t, alphas_t = _prepare_search(
        val_features, val_labels, clip_weights, cache_keys, cache_values, betas, alphas
    )
    correct = torch.zeros(len(betas_t), len(alphas_t), dtype=torch.long)
    best, best_pair = -1, (0, 0)
    for i, beta in enumerate(betas_t.tolist()):
        for j, alpha in enumerate(alphas_t.tolist()):
            clip = _clip_logits(val_features, clip_weights, logit_scale)
            similarity = _similarity(val_features, cache_keys)
            cache = _affinity_from_similarity(similarity, beta) @ cache_values
            logits = _combine(clip, cache, alpha)
            n_correct = int((logits.argmax(dim=1) == labels).sum())
            correct[i, j] = n_correct
            if n_correct > best:  # strict: the first best pair wins
                best, best_pair = n_correct, (i, j)
    return _result(correct, betas_t, alphas_t, val_features.shape[0], best_pair)


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
    progress: bool = False,
) -> SearchResult:
    """Vectorised grid search of ``(beta, alpha)`` for [Tip logits] on validation data.

    The CLIP logits and the similarity ``f @ keys.T`` do not depend on the
    hyperparameters and are computed once.  For each beta, one affinity matrix
    and one ``A @ L`` product are computed, and every alpha is then evaluated at
    once by broadcasting ``(M, 1, C) + alphas (1, A, 1) * (M, 1, C)``.  The
    arithmetic is the same as in :func:`search_hparams_loop`, so the accuracy
    grid and the chosen pair (first best in beta-major, alpha-minor order) are
    identical.  Everything runs on ``val_features``' device.

    Args:
        val_features: ``(M, D)`` validation features (never test features).
        val_labels: ``(M,)`` validation labels.
        clip_weights: ``(C, D)`` zero-shot classifier.
        cache_keys: ``(N, D)`` keys (trained ones for Tip-Adapter-F).
        cache_values: ``(N, C)`` one-hot values.
        betas: ``(B,)`` grid (default: :func:`default_search_grid`).
        alphas: ``(A,)`` grid (default: :func:`default_search_grid`).
        logit_scale: scale of the CLIP branch (100).
        progress: show a progress bar over betas.

    Returns:
        :class:`SearchResult` with a ``(B, A)`` accuracy grid in percent.
    """
    labels, betas_t, alphas_t = _prepare_search(
        val_features, val_labels, clip_weights, cache_keys, cache_values, betas, alphas
    )
    device = val_features.device
    num_val, num_classes = val_features.shape[0], clip_weights.shape[0]
    clip = _clip_logits(val_features, clip_weights, logit_scale).unsqueeze(1)  # (M, 1, C)
    similarity = _similarity(val_features, cache_keys)  # (M, N)
    alphas_dev = alphas_t.to(device)
    chunk = max(1, min(len(alphas_t), _MAX_BLOCK_ELEMENTS // max(1, num_val * num_classes)))
    correct = torch.zeros(len(betas_t), len(alphas_t), dtype=torch.long, device=device)
    target = labels.unsqueeze(1)  # (M, 1)
    for i, beta in enumerate(tqdm(betas_t.tolist(), desc="search", disable=not progress)):
        cache = (_affinity_from_similarity(similarity, beta) @ cache_values).unsqueeze(1)
        for start in range(0, len(alphas_t), chunk):
            a = alphas_dev[start : start + chunk].view(1, -1, 1)  # (1, A, 1)
            logits = clip + cache * a  # (M, A, C), same rounding as _combine
            correct[i, start : start + chunk] = (logits.argmax(dim=2) == target).sum(dim=0)
    return _result(correct, betas_t, alphas_t, num_val)


# --------------------------------------------------------------------------------------
# Tip-Adapter-F
# --------------------------------------------------------------------------------------


class TipAdapterF(nn.Module):
    """Tip-Adapter-F: the cache keys become a trainable linear layer.

    ``self.cache_keys`` is ``nn.Linear(D, N, bias=False)`` whose weight ``(N, D)``
    starts as the cache keys, so ``self.cache_keys(f) == f @ keys.T`` and the
    untrained forward equals :func:`tip_logits`.  The values ``(N, C)`` are a
    frozen buffer.  The trained keys are not renormalised (as in the paper).

    Args:
        cache_keys: ``(N, D)`` initial keys.
        cache_values: ``(N, C)`` one-hot values.
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
        _check_features_and_keys(f, self.cache_keys.weight)
        _check_clip_weights(clip_weights, f.shape[1])
        if clip_weights.shape[0] != self.cache_values.shape[1]:
            raise TipAdapterError(
                f"class count mismatch: clip_weights has {clip_weights.shape[0]} rows but the "
                f"cache has C={self.cache_values.shape[1]} classes; use the classifier of "
                f"the same dataset."
            )
        beta = float(beta)
        _check_beta(beta)
        similarity = self.cache_keys(f)  # (M, N) = f @ keys.T
        cache = _affinity_from_similarity(similarity, beta) @ self.cache_values
        return _combine(_clip_logits(f, clip_weights, logit_scale), cache, float(alpha))


@dataclass
class TipAdapterFResult:
    """Outcome of :func:`train_tip_adapter_f`.

    Attributes:
        model: the adapter with the best-validation-epoch keys loaded.
        cache_keys: ``(N, D)`` those trained keys (detached).
        alpha: residual ratio re-searched on validation with the trained keys.
        beta: sharpness re-searched on validation with the trained keys.
        train_alpha: the alpha used during training.
        train_beta: the beta used during training.
        best_epoch: 1-based epoch with the best validation accuracy (first best wins).
        best_val_accuracy: validation accuracy (percent) of that epoch at the training
            alpha/beta.
        search: the final :class:`SearchResult` (its best_accuracy is at alpha, beta).
        history: one dict per epoch: ``epoch``, ``train_loss``, ``val_accuracy``, ``lr``
            (at the epoch's start) and ``seconds`` (wall time, training + validation).
    """

    model: TipAdapterF
    cache_keys: Tensor
    alpha: float
    beta: float
    train_alpha: float
    train_beta: float
    best_epoch: int
    best_val_accuracy: float
    search: SearchResult
    history: list[dict[str, float]] = field(default_factory=list)

    def logits(self, f: Tensor, clip_weights: Tensor) -> Tensor:
        """``(M, D) -> (M, C)`` logits of the trained adapter at the searched alpha, beta."""
        with torch.no_grad():
            return self.model(f, clip_weights, self.alpha, self.beta)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean() * 100.0)


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
) -> TipAdapterFResult:
    """Fine-tune the cache keys (Tip-Adapter-F) on cached augmented features.

    Each epoch visits every training image once in random order, each time
    through one randomly chosen augmented view of its cached features (so no
    image is re-encoded).  Loss: cross-entropy of [Tip logits].  Optimiser: AdamW
    (``lr``, ``eps``), cosine schedule stepped per iteration over
    ``epochs * iterations_per_epoch``.  After each epoch the adapter is evaluated
    on the *validation* split only; the best epoch's keys are kept (first best
    wins) and alpha/beta are then re-searched on validation with those keys.
    There is deliberately no test argument.

    Args:
        train_view_features: ``(V, N, D)`` cached features of ``V`` augmented views
            (``(N, D)`` is taken as ``V = 1``).
        train_labels: ``(N,)`` labels of the training images.
        val_features: ``(M, D)``; val_labels: ``(M,)``.
        clip_weights: ``(C, D)`` frozen zero-shot classifier.
        cache_keys: ``(N, D)`` initial keys; cache_values: ``(N, C)`` one-hot values.
        alpha, beta: hyperparameters used while training.
        epochs, lr, eps, batch_size, weight_decay: optimisation settings (paper: 20, 1e-3,
            1e-4, 256; AdamW's default weight decay).
        seed: seeds the shuffling and the choice of views (deterministic on CPU).
        progress: show a tqdm bar over epochs.
        search_grid: ``(betas, alphas)`` for the final search (default grid if None).

    Returns:
        :class:`TipAdapterFResult`.
    """
    views = _require_tensor("train_view_features", train_view_features)
    if views.dim() == 2:
        views = views.unsqueeze(0)
    if views.dim() != 3:
        raise TipAdapterError(
            f"train_view_features must be (V, N, D), got shape {tuple(views.shape)}."
        )
    _check_features_and_keys(val_features, cache_keys)
    _check_clip_weights(clip_weights, cache_keys.shape[1])
    _check_cache(cache_keys, cache_values, clip_weights.shape[0])
    if views.shape[1:] != cache_keys.shape:
        raise TipAdapterError(
            f"train_view_features has (N, D) = {tuple(views.shape[1:])} but cache_keys is "
            f"{tuple(cache_keys.shape)}; the cache must be built from these training features."
        )
    num_classes = clip_weights.shape[0]
    device = cache_keys.device
    train_y = _check_labels("train_labels", train_labels, views.shape[1], num_classes).to(device)
    val_y = _check_labels("val_labels", val_labels, val_features.shape[0], num_classes).to(device)
    _check_beta(float(beta))
    if epochs < 1 or batch_size < 1:
        raise TipAdapterError(
            f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}."
        )
    views = views.to(device)
    val_features = val_features.to(device)
    clip_weights = clip_weights.to(device)

    generator = torch.Generator().manual_seed(int(seed))
    model = TipAdapterF(cache_keys, cache_values).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, weight_decay=weight_decay)
    num_views, num_train = views.shape[0], views.shape[1]
    iters_per_epoch = math.ceil(num_train / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs * iters_per_epoch
    )

    history: list[dict[str, float]] = []
    best_acc, best_epoch = -1.0, 0
    best_state = copy.deepcopy(model.state_dict())
    bar = tqdm(range(1, epochs + 1), desc="Tip-Adapter-F", disable=not progress)
    for epoch in bar:
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(num_train, generator=generator).to(device)
        chosen_view = torch.randint(num_views, (num_train,), generator=generator).to(device)
        loss_sum = 0.0
        lr_now = optimizer.param_groups[0]["lr"]
        for start in range(0, num_train, batch_size):
            idx = order[start : start + batch_size]
            x = views[chosen_view[idx], idx]  # (B, D): one random view per image
            logits = model(x, clip_weights, alpha, beta)
            loss = F.cross_entropy(logits, train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            val_acc = _accuracy(model(val_features, clip_weights, alpha, beta), val_y)
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / num_train,
                "val_accuracy": val_acc,
                "lr": lr_now,
                "seconds": time.perf_counter() - epoch_start,
            }
        )
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss_sum / num_train:.3f}", val=f"{val_acc:.1f}")

    model.load_state_dict(best_state)
    model.eval()
    betas, alphas = search_grid if search_grid is not None else default_search_grid()
    search = search_hparams(
        val_features, val_y, clip_weights, model.keys, model.cache_values, betas, alphas
    )
    return TipAdapterFResult(
        model=model,
        cache_keys=model.keys.clone(),
        alpha=search.best_alpha,
        beta=search.best_beta,
        train_alpha=float(alpha),
        train_beta=float(beta),
        best_epoch=best_epoch,
        best_val_accuracy=best_acc,
        search=search,
        history=history,
    )


# --------------------------------------------------------------------------------------
# Runner integration (fewclip run tip-adapter / tip-adapter-f)
# --------------------------------------------------------------------------------------

_SEARCH_OPTIONS: dict[str, Option] = {
    "views": Option(int, 10, "augmented views per training image averaged into a cache key"),
    "beta_scale": Option(float, 7.0, "largest beta of the search grid (the grid starts at 0.1)"),
    "alpha_scale": Option(float, 3.0, "largest alpha of the search grid (starts at 0.1)"),
    "beta_steps": Option(int, 200, "number of betas in the search grid"),
    "alpha_steps": Option(int, 20, "number of alphas in the search grid"),
}


@dataclass
class _Episode:
    """Tensors of one episode on the compute device."""

    train_views: Tensor  # (V, N, D)
    train_labels: Tensor  # (N,)
    val_features: Tensor  # (M, D)
    val_labels: Tensor  # (M,)
    clip_weights: Tensor  # (C, D)
    cache_keys: Tensor  # (N, D)
    cache_values: Tensor  # (N, C)


def _episode(ctx: Context, views: int) -> _Episode:
    if views < 1:
        raise TipAdapterError(f"views must be >= 1, got {views}.")
    device = ctx.device
    train = ctx.features("train", views=views, augment=True)
    train_views = torch.as_tensor(train.features).to(device)
    if train_views.dim() == 2:
        train_views = train_views.unsqueeze(0)
    train_labels = torch.as_tensor(train.labels).to(device)
    val = ctx.features("val")
    val_features = torch.as_tensor(val.features).to(device)
    if val_features.dim() == 3:
        val_features = val_features.mean(0)
    clip_weights = ctx.text_classifier.to(device=device, dtype=train_views.dtype)
    return _Episode(
        train_views=train_views,
        train_labels=train_labels,
        val_features=val_features,
        val_labels=torch.as_tensor(val.labels).to(device),
        clip_weights=clip_weights,
        cache_keys=build_cache_keys(train_views),
        cache_values=build_cache_values(train_labels, clip_weights.shape[0]),
    )


def _predictor(fn: Callable[[Tensor], Tensor], device: torch.device) -> Callable[[Tensor], Tensor]:
    """Wrap ``fn`` so that CPU features from ``ctx.report`` are scored on ``device``."""

    def predict(f: Tensor) -> Tensor:
        with torch.no_grad():
            return fn(f.to(device)).to(f.device)

    return predict


@register_method(
    "tip-adapter",
    options=dict(_SEARCH_OPTIONS),
    help="Training-free Tip-Adapter: cache model, alpha/beta searched on the few-shot val split.",
)
def run_tip_adapter(
    ctx: Context,
    views: int = 10,
    beta_scale: float = 7.0,
    alpha_scale: float = 3.0,
    beta_steps: int = 200,
    alpha_steps: int = 20,
) -> dict[str, Any]:
    """Tip-Adapter ([Tip logits]) with alpha and beta searched on validation (CLIP branch scale 100)."""
    ep = _episode(ctx, views)
    grid = default_search_grid(beta_scale, alpha_scale, beta_steps, alpha_steps)
    best = search_hparams(
        ep.val_features, ep.val_labels, ep.clip_weights, ep.cache_keys, ep.cache_values, *grid
    )

    def logits(f: Tensor) -> Tensor:
        return tip_logits(
            f, ep.clip_weights, ep.cache_keys, ep.cache_values, best.best_alpha, best.best_beta
        )

    result = ctx.report(_predictor(logits, ctx.device))
    zero_shot = _clip_logits(ep.val_features, ep.clip_weights, CLIP_LOGIT_SCALE)
    result.update(
        alpha=best.best_alpha,
        beta=best.best_beta,
        selection_val_accuracy=best.best_accuracy,
        zero_shot_val_accuracy=_accuracy(zero_shot, ep.val_labels),
        cache_size=int(ep.cache_keys.shape[0]),
        views=int(ep.train_views.shape[0]),
        logit_scale=CLIP_LOGIT_SCALE,
    )
    return result


@register_method(
    "tip-adapter-f",
    options={
        **_SEARCH_OPTIONS,
        "epochs": Option(int, 20, "training epochs (paper: 20; 100 for EuroSAT)"),
        "lr": Option(float, 1e-3, "AdamW learning rate (eps 1e-4, cosine schedule)"),
        "batch_size": Option(int, 256, "mini-batch size"),
    },
    help="Tip-Adapter-F: fine-tune the cache keys; best epoch and alpha/beta chosen on val.",
)
def run_tip_adapter_f(
    ctx: Context,
    views: int = 10,
    beta_scale: float = 7.0,
    alpha_scale: float = 3.0,
    beta_steps: int = 200,
    alpha_steps: int = 20,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Tip-Adapter-F: train the keys on cached augmented views, select everything on val.

    Training starts from the alpha/beta of the training-free search on validation
    (the reference code starts from fixed per-dataset values instead).
    """
    ep = _episode(ctx, views)
    grid = default_search_grid(beta_scale, alpha_scale, beta_steps, alpha_steps)
    init = search_hparams(
        ep.val_features, ep.val_labels, ep.clip_weights, ep.cache_keys, ep.cache_values, *grid
    )
    trained = train_tip_adapter_f(
        ep.train_views,
        ep.train_labels,
        ep.val_features,
        ep.val_labels,
        ep.clip_weights,
        ep.cache_keys,
        ep.cache_values,
        alpha=init.best_alpha,
        beta=init.best_beta,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=ctx.seed,
        progress=progress,
        search_grid=grid,
    )
    result = ctx.report(_predictor(lambda f: trained.logits(f, ep.clip_weights), ctx.device))
    result.update(
        alpha=trained.alpha,
        beta=trained.beta,
        best_epoch=trained.best_epoch,
        selection_val_accuracy=trained.search.best_accuracy,
        train_alpha=trained.train_alpha,
        train_beta=trained.train_beta,
        training_free_val_accuracy=init.best_accuracy,
        history=trained.history,
        cache_size=int(ep.cache_keys.shape[0]),
        views=int(ep.train_views.shape[0]),
        logit_scale=CLIP_LOGIT_SCALE,
    )
    return result


# --------------------------------------------------------------------------------------
# Exercises
# --------------------------------------------------------------------------------------


def _exercise_sizes(gen: torch.Generator) -> tuple[int, int, int, int]:
    m, c, k, d = (int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in
                  ((1, 6), (2, 5), (1, 3), (3, 8)))  # fmt: skip
    return m, c, k, d


def _affinity_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    m, c, k, d = _exercise_sizes(gen)
    f = F.normalize(torch.randn(m, d, generator=gen), dim=-1)
    keys = F.normalize(torch.randn(c * k, d, generator=gen), dim=-1)
    keys[0] = f[0]  # one exact match: its affinity must be 1
    beta = float(torch.empty(1).uniform_(0.5, 8.0, generator=gen))
    return f, keys, beta


def _tip_logits_inputs(
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float]:
    m, c, k, d = _exercise_sizes(gen)
    f = F.normalize(torch.randn(m, d, generator=gen), dim=-1)
    clip_weights = F.normalize(torch.randn(c, d, generator=gen), dim=-1)
    keys = F.normalize(torch.randn(c * k, d, generator=gen), dim=-1)
    labels = torch.arange(c).repeat_interleave(k)[torch.randperm(c * k, generator=gen)]
    values = F.one_hot(labels, c).float()
    alpha = float(torch.empty(1).uniform_(0.5, 5.0, generator=gen))
    beta = float(torch.empty(1).uniform_(0.5, 8.0, generator=gen))
    return f, clip_weights, keys, values, alpha, beta


def register_exercises() -> None:
    """Register the notebook exercises ``tip_affinity`` and ``tip_cache_logits``.

    Called by :mod:`fewclip_tutorial.methods` after importing this module; calling it
    again is harmless (the exercise registry replaces same-function entries).
    """
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
