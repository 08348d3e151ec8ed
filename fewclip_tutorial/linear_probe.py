"""The linear-probe baseline: logistic regression on frozen image features.

CLIP (Radford et al., 2021, Sec. 3.2 and Appendix A.3) and CoOp evaluate a
*linear probe*: an L2-regularised multinomial logistic regression trained on
the frozen features of the K-shot training set,

.. math::

    \\min_{V, b}\\; \\frac{1}{2} \\lVert V \\rVert^2
    + C \\sum_{i} -\\log \\operatorname{softmax}(V f_i + b)_{y_i},

with the inverse regularisation strength ``C`` chosen on the *few-shot validation
split* (``min(K, 4)`` images per class, never the test set).  CLIP searched ``C``
with a parametric binary search; CoOp's ``lpclip`` code, the default here, with a
coarse grid and a bisection in ``log10 C`` (below).

Every probe is **fit on the training shots only** with the chosen ``C``.  (CLIP's appendix describes merging the validation split back
into training for its final fit.)  We keep them apart on purpose: a K-shot
result then uses exactly K labelled images per class for training, and the
reported validation accuracy stays the accuracy that chose ``C``.

Two protocols (:data:`PROTOCOLS`):

* ``"lpclip"``, the "Linear probe CLIP" rows of the CoOp, Tip-Adapter and cross-modal
  tables (CoOp's ``lpclip/linear_probe.py``, KaiyangZhou/CoOp):
  :func:`fit_linear_probe_lpclip` on the *raw* image-tower output (not L2-normalised).
  ``C`` is first chosen on :data:`LPCLIP_CS` in that order (``argmax``: the first best
  wins), then refined by :data:`LPCLIP_STEPS` steps of a bisection in ``log10 C`` from
  ``[C*/10, 10 C*]``: both ends are fit, the better end is kept (the left one on a tie)
  and the interval is halved towards it; the classifier of the last step is the probe.
* ``"normalized"``, this package's earlier probe: :func:`fit_linear_probe` on
  L2-normalised features over :data:`DEFAULT_CS`, ties to the smaller ``C``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CS",
    "LPCLIP_CS",
    "LPCLIP_STEPS",
    "PROTOCOLS",
    "LinearProbe",
    "fit_linear_probe",
    "fit_linear_probe_lpclip",
]

#: The grid of the ``"normalized"`` protocol: 1e-3 ... 1e3, 13 values.
DEFAULT_CS: np.ndarray = np.logspace(-3, 3, 13)
#: The first grid of CoOp's ``lpclip/linear_probe.py``, in its order (``search_list``).
LPCLIP_CS: tuple[float, ...] = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
#: Bisection steps of CoOp's ``lpclip/linear_probe.py`` after the first grid.
LPCLIP_STEPS: int = 8
#: The probe protocols: CoOp's ``lpclip`` (raw features), or normalised features on a grid.
PROTOCOLS: tuple[str, ...] = ("lpclip", "normalized")


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


def _prepare(
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    val_x: Tensor | np.ndarray,
    val_y: Tensor | np.ndarray,
    num_classes: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Checked float64 features, int64 labels and the number of classes."""
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
    n_classes = int(num_classes) if num_classes is not None else int(max(ytr.max(), yva.max()) + 1)
    return xtr, ytr, xva, yva, n_classes


def _check_grid(Cs: np.ndarray | list[float] | tuple[float, ...]) -> np.ndarray:
    grid = np.asarray(Cs, dtype=np.float64)
    if grid.ndim != 1 or len(grid) == 0 or np.any(grid <= 0):
        raise ValueError(f"Cs must be a non-empty list of positive numbers, got {Cs!r}.")
    return grid


def _val_accuracy(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Percent of ``x`` whose top logit is its label (sklearn's ``predict``, ties to class 0)."""
    return float(np.mean((x @ weight.T + bias).argmax(1) == y) * 100.0)


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
    xtr, ytr, xva, yva, n_classes = _prepare(train_x, train_y, val_x, val_y, num_classes)
    grid = np.sort(_check_grid(DEFAULT_CS if Cs is None else Cs))

    search: list[tuple[float, float]] = []
    fitted: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for C in grid:
        weight, bias = _fit(xtr, ytr, C, max_iter, seed, n_classes)
        acc = _val_accuracy(weight, bias, xva, yva)
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


def fit_linear_probe_lpclip(
    train_x: Tensor | np.ndarray,
    train_y: Tensor | np.ndarray,
    val_x: Tensor | np.ndarray,
    val_y: Tensor | np.ndarray,
    Cs: tuple[float, ...] | list[float] = LPCLIP_CS,
    steps: int = LPCLIP_STEPS,
    max_iter: int = 1000,
    seed: int = 0,
    num_classes: int | None = None,
) -> LinearProbe:
    """CoOp's linear-probe search (``lpclip/linear_probe.py``, KaiyangZhou/CoOp).

    Pass the raw image-tower features (CoOp's ``clip_model.visual(images)``, not
    L2-normalised) for the protocol of the published "Linear probe CLIP" rows.

    1. Fit at every ``C`` of ``Cs`` in the given order and keep ``C*``, the first with
       the best validation accuracy (``np.argmax``).
    2. ``[l, r] = [C*/10, 10 C*]``; ``steps`` times: fit at ``l`` and at ``r``; when
       ``acc(l) < acc(r)`` keep ``r`` and set ``l = 10^((log10 l + log10 r) / 2)``, else
       (the left one wins ties) keep ``l`` and set ``r`` to that midpoint; as in CoOp's
       code, both new ends are computed as ``10^x`` of their ``log10``.
    3. The classifier kept at the last step is the probe (fit on the training shots only).

    Each fit is scikit-learn's ``LogisticRegression(solver="lbfgs", max_iter=max_iter)``
    (its default penalty is CoOp's ``penalty="l2"``).  Validation accuracy is sklearn's
    ``predict``: the top decision value, ties to the lower class.

    Args:
        train_x, train_y, val_x, val_y, max_iter, seed, num_classes: as
            :func:`fit_linear_probe`.
        Cs: the first grid (default :data:`LPCLIP_CS`, CoOp's ``search_list``), searched in
            its order.
        steps: bisection steps (default :data:`LPCLIP_STEPS`; ``0``: keep ``C*``).

    Returns:
        :class:`LinearProbe` with ``C`` the kept end of the last step and ``search`` every
        fit in order: the first grid, then ``(left, right)`` of each step.
    """
    xtr, ytr, xva, yva, n_classes = _prepare(train_x, train_y, val_x, val_y, num_classes)
    grid = _check_grid(Cs)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer (CoOp: 8), got {steps!r}.")
    search: list[tuple[float, float]] = []

    def fit_at(C: float) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
        weight, bias = _fit(xtr, ytr, C, max_iter, seed, n_classes)
        acc = _val_accuracy(weight, bias, xva, yva)
        search.append((float(C), acc))
        return acc, (weight, bias)

    first = [fit_at(float(C)) for C in grid]
    peak = int(np.argmax([acc for acc, _ in first]))  # the first best
    C_final, (acc_final, params) = float(grid[peak]), first[peak]
    left, right = 0.1 * C_final, 10.0 * C_final
    for _ in range(int(steps)):
        acc_left, params_left = fit_at(left)
        acc_right, params_right = fit_at(right)
        # the new interval in log10 C, back through 10^x as CoOp computes it (the kept end
        # too, which can move it by a rounding)
        log_left, log_right = np.log10(left), np.log10(right)
        middle = 0.5 * (log_right + log_left)
        if acc_left < acc_right:
            C_final, acc_final, params = right, acc_right, params_right
            log_left, log_right = middle, log_right
        else:  # a tie keeps the left end
            C_final, acc_final, params = left, acc_left, params_left
            log_left, log_right = log_left, middle
        left, right = float(np.power(10, log_left)), float(np.power(10, log_right))
    weight, bias = params
    return LinearProbe(
        C=float(C_final),
        val_accuracy=acc_final,
        weight=torch.from_numpy(weight).float(),
        bias=torch.from_numpy(bias).float(),
        search=search,
    )
