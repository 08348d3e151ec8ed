"""Tip-Adapter's core: the cache model and its logits (Zhang et al., "Tip-Adapter: Training-free Adaption of
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

The grid search of alpha and beta is :mod:`~fewclip_tutorial.methods.tip_adapter.search`,
Tip-Adapter-F's trainer :mod:`~fewclip_tutorial.methods.tip_adapter.train`.

Example: ``keys = build_cache_keys(views)`` ``(V, N, D) -> (N, D)``, ``values =
build_cache_values(labels, C)``, ``best = search_hparams(val_f, val_y, W, keys, values)``,
``tip_logits(test_f, W, keys, values, best.best_alpha, best.best_beta)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE

__all__ = [
    "CLIP_LOGIT_SCALE",
    "TipAdapterError",
    "affinity",
    "build_cache_keys",
    "build_cache_values",
    "episode_tensors",
    "percent_correct",
    "tip_logits",
]


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
    dims = (_require_2d("f (features)", f, "M", "D").shape[1],
            _require_2d("cache_keys", cache_keys, "N", "D").shape[1])  # fmt: skip
    if dims[0] == dims[1]:
        return
    raise TipAdapterError(
        f"feature dimension mismatch: f has D={dims[0]} but cache_keys has D={dims[1]}; "
        f"build the cache and the features with the same image encoder."
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


def percent_correct(logits: Tensor, labels: Tensor) -> float:
    """Accuracy in percent of ``(M, C)`` logits against ``(M,)`` labels (in float64)."""
    return float((logits.argmax(dim=1) == labels).double().mean() * 100.0)


def episode_tensors(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    text_classifier: Tensor,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """An episode's cached features as the tensors of the cache and the search, on ``device``.

    Returns:
        ``(train views (V, N, D), train labels (N,), val features (M, D) (views averaged),
        val labels (M,), clip_weights (C, D) in the features' dtype)``.
    """
    train_views = torch.as_tensor(train_features).to(device)  # (V, N, D)
    train_views = train_views.unsqueeze(0) if train_views.dim() == 2 else train_views
    train_y = torch.as_tensor(train_labels).to(device)
    val_f = torch.as_tensor(val_features).to(device)
    val_f = val_f.mean(0) if val_f.dim() == 3 else val_f  # (M, D)
    w = text_classifier.to(device=device, dtype=train_views.dtype)  # (C, D)
    return train_views, train_y, val_f, torch.as_tensor(val_labels).to(device), w
