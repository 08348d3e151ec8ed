"""Accuracy metrics (in percent) shared by every method and notebook."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "mean_std_over_seeds",
    "per_class_accuracy",
    "predictions",
    "round_metrics",
    "select_on_validation",
]


def _to_numpy(x: Tensor | np.ndarray | list) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def predictions(logits_or_preds: Tensor | np.ndarray | list) -> np.ndarray:
    """``(N, C)`` logits -> ``(N,)`` argmax predictions; ``(N,)`` predictions pass through."""
    arr = _to_numpy(logits_or_preds)
    if arr.ndim == 2:
        return arr.argmax(axis=1).astype(np.int64)
    if arr.ndim == 1:
        return arr.astype(np.int64)
    raise ValueError(
        f"Expected (N, C) logits or (N,) predictions, got an array of shape {arr.shape}."
    )


def _preds_and_labels(
    logits_or_preds: Tensor | np.ndarray | list, labels: Tensor | np.ndarray | list
) -> tuple[np.ndarray, np.ndarray]:
    preds = predictions(logits_or_preds)
    y = _to_numpy(labels)
    if y.ndim != 1 or y.shape[0] != preds.shape[0]:
        raise ValueError(
            f"Got {preds.shape[0]} predictions but labels of shape {y.shape}; "
            "pass one label per example."
        )
    if y.shape[0] == 0:
        raise ValueError("Cannot compute an accuracy on zero examples.")
    return preds, y.astype(np.int64)


def accuracy(logits_or_preds: Tensor | np.ndarray | list, labels: Tensor | np.ndarray) -> float:
    """Top-1 accuracy in percent.

    Args:
        logits_or_preds: ``(N, C)`` logits (argmax is taken) or ``(N,)`` predicted labels.
        labels: ``(N,)`` true labels.

    Returns:
        ``100 * mean(pred == label)`` as a Python float.
    """
    preds, y = _preds_and_labels(logits_or_preds, labels)
    return float((preds == y).mean() * 100.0)


def per_class_accuracy(
    logits_or_preds: Tensor | np.ndarray | list,
    labels: Tensor | np.ndarray,
    num_classes: int | None = None,
) -> np.ndarray:
    """Accuracy of each class in percent.

    Returns:
        ``(C,)`` float array; entry ``c`` is the accuracy over examples whose label is
        ``c`` (``nan`` for classes without examples).  ``C`` defaults to
        ``max(max label + 1, logits width)``.
    """
    preds, y = _preds_and_labels(logits_or_preds, labels)
    arr = _to_numpy(logits_or_preds)
    if num_classes is None:
        num_classes = int(max(y.max() + 1, arr.shape[1] if arr.ndim == 2 else 0))
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = y == c
        if mask.any():
            out[c] = (preds[mask] == c).mean() * 100.0
    return out


def _is_accuracy_key(key: Any) -> bool:
    return isinstance(key, str) and ("accuracy" in key or key.endswith("_acc") or key == "acc")


def round_metrics(
    d: Any, ndigits: int = 1, significant: int | None = 4, _in_accuracy: bool = False
) -> Any:
    """Round the metrics of a (nested) result for display.

    Floats stored under a key containing ``"accuracy"`` (at any depth, e.g.
    ``{"ood_accuracy": {"sketch": 61.234}}``) are rounded to ``ndigits`` decimals;
    other floats (hyperparameters such as ``C = 0.001`` or ``alpha``) keep
    ``significant`` significant digits (``None``: untouched).  Tensors and NumPy
    values become Python numbers/lists; ints, bools, strings and ``None`` are kept.
    """
    if isinstance(d, Mapping):
        return {
            k: round_metrics(v, ndigits, significant, _in_accuracy or _is_accuracy_key(k))
            for k, v in d.items()
        }
    if isinstance(d, (list, tuple)):
        return type(d)(round_metrics(v, ndigits, significant, _in_accuracy) for v in d)
    if isinstance(d, Tensor):
        return round_metrics(d.detach().cpu().tolist(), ndigits, significant, _in_accuracy)
    if isinstance(d, np.ndarray):
        return round_metrics(d.tolist(), ndigits, significant, _in_accuracy)
    if isinstance(d, (bool, np.bool_)):
        return bool(d)
    if isinstance(d, (int, np.integer)):
        return int(d)
    if isinstance(d, (float, np.floating)):
        value = float(d)
        if not np.isfinite(value):
            return value
        if _in_accuracy:
            return round(value, ndigits)
        return value if significant is None else float(f"{value:.{significant}g}")
    return d


# --------------------------------------------------------------------------- over seeds and methods


def _check_results_table(acc: Tensor, what: str) -> None:
    if not isinstance(acc, Tensor) or acc.ndim != 2 or 0 in acc.shape:
        shape = tuple(acc.shape) if isinstance(acc, Tensor) else type(acc).__name__
        raise ValueError(
            f"{what} must be an (S, M) tensor: one row per seed, one column per method; got "
            f"{shape}. Stack the per-seed results with torch.stack(rows) first."
        )
    if not acc.is_floating_point():
        raise ValueError(f"{what} must hold floating-point accuracies; got dtype {acc.dtype}.")


def mean_std_over_seeds(acc: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation over seeds of a results table, as the book's tables print them.

    Args:
        acc: ``(S, M)`` accuracies (%) of ``M`` methods (columns) over ``S`` seeds (rows).

    Returns:
        ``(mean, std)``, each ``(M,)``: the mean over the seeds and the *population*
        standard deviation (``ddof=0``, dividing by ``S``), the convention of
        :func:`fewclip_tutorial.sweep.summarise`.
    """
    _check_results_table(acc, "acc")
    mean = acc.mean(dim=0)
    std = acc.std(dim=0, correction=0)
    return mean, std


def select_on_validation(val_acc: Tensor, tol: float = 1e-6) -> int:
    """Index of the method with the best mean validation accuracy over seeds.

    With a few validation images per class, accuracies move in coarse steps (one image in
    40 is 2.5 points) and ties are common.  The rule: methods whose mean is within ``tol``
    points of the best tie, and a tie goes to the method listed *first*.  The book lists
    methods from the simplest (zero-shot, linear probe) to the most trained, so a tie keeps
    the simpler one.  Test accuracies never enter the choice.

    Args:
        val_acc: ``(S, M)`` validation accuracies (%) of ``M`` methods over ``S`` seeds.
        tol: tie tolerance, in points.

    Returns:
        the column index (a Python ``int``) of the chosen method.
    """
    _check_results_table(val_acc, "val_acc")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}.")
    mean = val_acc.mean(dim=0)
    return int(torch.nonzero(mean >= mean.max() - tol)[0, 0])
