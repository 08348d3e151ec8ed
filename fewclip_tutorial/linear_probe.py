"""The linear-probe baseline: logistic regression on frozen image features.

CLIP (Radford et al., 2021, Sec. 3.2 and Appendix A.3) and CoOp evaluate a
*linear probe*: an L2-regularised multinomial logistic regression trained on
the frozen features of the K-shot training set,

.. math::

    \\min_{V, b}\\; \\frac{1}{2} \\lVert V \\rVert^2
    + C \\sum_{i} -\\log \\operatorname{softmax}(V f_i + b)_{y_i},

with the inverse regularisation strength ``C`` searched on a grid.  CLIP searched
``C`` on a validation set with a parametric binary search; we scan a log-spaced
grid and choose on the *few-shot validation split* (``min(K, 4)`` images per
class, never the test set).  Ties go to the smaller ``C`` (stronger
regularisation), the safer choice with few shots.

After the search the probe is **refit on the training shots only** with the
chosen ``C``.  (CLIP's appendix describes merging the validation split back
into training for its final fit.)  We keep them apart on purpose: a K-shot
result then uses exactly K labelled images per class for training, and the
reported validation accuracy stays the accuracy that chose ``C``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_CS", "LinearProbe", "fit_linear_probe"]

#: The default grid of inverse regularisation strengths: 1e-3 ... 1e3, 13 values.
DEFAULT_CS: np.ndarray = np.logspace(-3, 3, 13)


def _as_numpy_2d(x: Tensor | np.ndarray, what: str) -> np.ndarray:
    arr = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(
            f"{what} must be (N, D) features, got shape {arr.shape}; "
            "average (V, N, D) augmented views with .mean(0) first."
        )
    return arr.astype(np.float64, copy=False)


def _as_labels(y: Tensor | np.ndarray, n: int, what: str) -> np.ndarray:
    arr = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(
            f"{what} must be (N,) labels matching the {n} feature rows, got shape {arr.shape}."
        )
    return arr.astype(np.int64, copy=False)


@dataclass
class LinearProbe:
    """A fitted linear probe.

    Attributes:
        C: the inverse regularisation strength chosen on validation.
        val_accuracy: validation accuracy (percent) at ``C``.
        search: ``[(C, val_accuracy), ...]`` for every ``C`` tried, in grid order.
        weight: ``(C_classes, D)`` fp32 weights (rows in label order ``0..C-1``).
        bias: ``(C_classes,)`` fp32 biases.
    """

    C: float
    val_accuracy: float
    weight: Tensor
    bias: Tensor
    search: list[tuple[float, float]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, x: Tensor) -> Tensor:
        """``(N, D)`` features -> ``(N, C)`` logits ``x @ V.T + b`` (on ``x``'s device)."""
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"LinearProbe.logits expects (N, {self.weight.shape[1]}) features, "
                f"got shape {tuple(x.shape)}."
            )
        w = self.weight.to(x.device)
        b = self.bias.to(x.device)
        return x.float() @ w.T + b

    __call__ = logits


def _fit(
    x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fit sklearn's lbfgs logistic regression; return dense ``(num_classes, D)`` weights."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=float(C), max_iter=max_iter, random_state=seed, solver="lbfgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    weight = np.zeros((num_classes, x.shape[1]))
    bias = np.full(num_classes, -1e4)  # classes absent from training are never predicted
    classes = clf.classes_.astype(np.int64)
    if len(classes) == 2:  # sklearn stores one row for binary problems
        weight[classes[1]] = clf.coef_[0] / 2
        weight[classes[0]] = -clf.coef_[0] / 2
        bias[classes[1]] = clf.intercept_[0] / 2
        bias[classes[0]] = -clf.intercept_[0] / 2
    else:
        weight[classes] = clf.coef_
        bias[classes] = clf.intercept_
    return weight, bias


def fit_linear_probe(
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    val_x: Tensor | np.ndarray,
    val_y: Tensor | np.ndarray,
    Cs: np.ndarray | list[float] | None = None,
    max_iter: int = 1000,
    seed: int = 0,
    num_classes: int | None = None,
) -> LinearProbe:
    """Train a logistic-regression probe, choosing ``C`` on validation accuracy.

    Args:
        train_x: ``(N, D)`` training features (the K shots).
        train_y: ``(N,)`` training labels.
        val_x: ``(M, D)`` validation features.
        val_y: ``(M,)`` validation labels.
        Cs: grid of inverse regularisation strengths (default ``logspace(-3, 3, 13)``).
        max_iter: lbfgs iterations.
        seed: ``random_state`` of the solver (lbfgs is deterministic; kept for clarity).
        num_classes: total number of classes (default ``max label + 1``).

    Returns:
        :class:`LinearProbe` refit on the training set with the chosen ``C``
        (the smallest ``C`` among those with the best validation accuracy).
    """
    xtr = _as_numpy_2d(train_x, "train_x")
    ytr = _as_labels(train_y, xtr.shape[0], "train_y")
    xva = _as_numpy_2d(val_x, "val_x")
    yva = _as_labels(val_y, xva.shape[0], "val_y")
    if xtr.shape[1] != xva.shape[1]:
        raise ValueError(
            f"train_x has D={xtr.shape[1]} but val_x has D={xva.shape[1]}; "
            "extract both with the same backbone."
        )
    if len(xtr) == 0 or len(xva) == 0:
        raise ValueError("fit_linear_probe needs at least one training and one validation example.")
    if len(np.unique(ytr)) < 2:
        raise ValueError(
            "The training set has a single class; a linear probe needs at least two classes."
        )
    grid = np.sort(np.asarray(DEFAULT_CS if Cs is None else Cs, dtype=np.float64))
    if grid.ndim != 1 or len(grid) == 0 or np.any(grid <= 0):
        raise ValueError(f"Cs must be a non-empty list of positive numbers, got {Cs!r}.")
    n_classes = int(num_classes) if num_classes is not None else int(max(ytr.max(), yva.max()) + 1)

    search: list[tuple[float, float]] = []
    fitted: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for C in grid:
        weight, bias = _fit(xtr, ytr, C, max_iter, seed, n_classes)
        acc = float(np.mean((xva @ weight.T + bias).argmax(1) == yva) * 100.0)
        search.append((float(C), acc))
        fitted[float(C)] = (weight, bias)
    best_acc = max(acc for _, acc in search)
    best_C = min(C for C, acc in search if acc == best_acc)  # ties -> smaller C
    # The probe for best_C was fit on the training shots only: that *is* the refit.
    weight, bias = fitted[best_C]
    return LinearProbe(
        C=best_C,
        val_accuracy=best_acc,
        weight=torch.from_numpy(weight).float(),
        bias=torch.from_numpy(bias).float(),
        search=search,
    )
