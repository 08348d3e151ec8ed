"""Few-shot sampling: K images per class, reproducible per seed, labels only.

The few-shot protocol of CoOp / Tip-Adapter: for each seed, draw ``K`` training
images per class ("K shots") and a small validation set of ``min(K, 4)`` images
per class that never overlaps the training shots.  Hyperparameters are chosen on
that validation set; the test set is never touched here.

All sampling works on the ``(N,)`` label array of a split, so no image is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fewclip_tutorial.data.base import DatasetSpec, LabeledSplit

__all__ = [
    "FewShotSplits",
    "NotEnoughExamplesError",
    "few_shot_indices",
    "make_few_shot",
    "stratified_split",
    "val_shots_for",
]


class NotEnoughExamplesError(ValueError):
    """A class has fewer examples than the number of shots requested."""


@dataclass
class FewShotSplits:
    """The splits of one few-shot episode (one dataset, one ``K``, one seed).

    Attributes:
        train: ``K`` images per class.
        val: ``min(K, 4)`` images per class, disjoint from ``train``.
        test: the dataset's in-distribution test split, untouched.
        ood_test: the dataset's shifted test splits by domain, untouched.
    """

    train: LabeledSplit
    val: LabeledSplit
    test: LabeledSplit
    ood_test: dict[str, LabeledSplit] = field(default_factory=dict)


def _class_label(c: int, classnames: Sequence[str] | None) -> str:
    if classnames is not None and 0 <= c < len(classnames):
        return f"class {c} ({classnames[c]!r})"
    return f"class {c}"


def few_shot_indices(
    labels: np.ndarray,
    k: int,
    seed: int,
    exclude: np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    classnames: Sequence[str] | None = None,
) -> np.ndarray:
    """Pick ``k`` indices per class, without replacement, reproducibly.

    One ``np.random.default_rng(seed)`` generator draws the ``k`` shots of each
    class in turn, classes in increasing label order.  The result is sorted.

    Args:
        labels: ``(N,)`` integer labels.
        k: shots per class (``>= 1``).
        seed: the random seed of the episode.
        exclude: indices that may not be picked (e.g. the training shots when
            drawing a validation set from the same pool).
        num_classes: if given, every class ``0 .. num_classes - 1`` must be
            present; otherwise the classes are the distinct labels in ``labels``.
        classnames: optional names, used only in error messages.

    Returns:
        ``(C * k,)`` sorted int64 indices into ``labels``.

    Raises:
        NotEnoughExamplesError: a class has no images or fewer than ``k``
            (after ``exclude``); the message names the class and its count.
        ValueError: ``k < 1`` or ``labels`` is not one-dimensional.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {labels.shape}.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (shots per class) must be a positive integer, got {k!r}.")
    k = int(k)
    if len(labels) == 0:
        raise NotEnoughExamplesError(
            "Cannot draw few-shot examples from an empty split; check the dataset's train split."
        )
    labels = labels.astype(np.int64)
    available = np.ones(len(labels), dtype=bool)
    if exclude is not None and len(exclude) > 0:
        available[np.asarray(exclude, dtype=np.int64)] = False

    if num_classes is None:
        classes = np.unique(labels)
    else:
        classes = np.arange(int(num_classes))

    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for c in classes:
        in_class = labels == c
        pool = np.flatnonzero(in_class & available)
        n_total = int(in_class.sum())
        n_free = len(pool)
        excluded_note = (
            f" ({n_total - n_free} of its {n_total} are excluded, e.g. already used for training)"
            if n_free != n_total
            else ""
        )
        name = _class_label(int(c), classnames)
        if n_free == 0:
            raise NotEnoughExamplesError(
                f"{name} has no images available{excluded_note}, so {k} shots cannot be drawn. "
                "Check that every class has images in this split, or remove the class."
            )
        if n_free < k:
            raise NotEnoughExamplesError(
                f"{name} has only {n_free} images available{excluded_note}, "
                f"but {k} shots per class were requested. Use fewer shots (at most {n_free}) "
                "or a dataset with more images per class."
            )
        chosen.append(rng.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def val_shots_for(shots: int) -> int:
    """Validation images per class for a ``shots``-shot episode: ``min(shots, 4)``."""
    return min(int(shots), 4)


def make_few_shot(spec: DatasetSpec, shots: int, seed: int) -> FewShotSplits:
    """Build the few-shot episode ``(spec, shots, seed)``.

    * ``train``: ``shots`` images per class from ``spec.train``.
    * ``val``: ``min(shots, 4)`` images per class from ``spec.val`` when the
      dataset has a validation split, otherwise from ``spec.train`` excluding
      the training shots (so train and val never overlap).
    * ``test`` and ``ood_test``: ``spec.test`` and ``spec.ood_test`` unchanged.

    Reproducible per ``seed``; different seeds give different shots.
    """
    num_classes = spec.num_classes
    train_idx = few_shot_indices(
        spec.train.labels, shots, seed, num_classes=num_classes, classnames=spec.classnames
    )
    train = spec.train.subset(train_idx, name=f"{spec.train.name}[{shots}shot,seed{seed}]")

    k_val = val_shots_for(shots)
    # A separate stream for validation, so changing the pool never shifts the training draw.
    val_seed = int(np.random.default_rng([int(seed), 1]).integers(2**31))
    if spec.val is not None:
        val_idx = few_shot_indices(
            spec.val.labels, k_val, val_seed, num_classes=num_classes, classnames=spec.classnames
        )
        val = spec.val.subset(val_idx, name=f"{spec.val.name}[{k_val}shot,seed{seed}]")
    else:
        val_idx = few_shot_indices(
            spec.train.labels,
            k_val,
            val_seed,
            exclude=train_idx,
            num_classes=num_classes,
            classnames=spec.classnames,
        )
        val = spec.train.subset(val_idx, name=f"{spec.train.name}[val{k_val}shot,seed{seed}]")
    return FewShotSplits(train=train, val=val, test=spec.test, ood_test=dict(spec.ood_test))


def stratified_split(
    labels: np.ndarray,
    fractions: Sequence[float],
    seed: int = 0,
) -> list[np.ndarray]:
    """Split indices into parts with the given fractions, class by class.

    For each class (in label order) its indices are shuffled with one
    ``np.random.default_rng(seed)`` generator; part ``j >= 1`` gets
    ``round(n * fractions[j])`` of them and part 0 gets the rest, keeping at
    least one image in part 0 when the class has any.  Used to carve
    train/val/test out of datasets that ship a single set (EuroSAT, Caltech101,
    a flat image folder).

    Args:
        labels: ``(N,)`` integer labels.
        fractions: e.g. ``(0.6, 0.2, 0.2)``; non-negative, summing to 1.
        seed: the fixed split seed.

    Returns:
        one sorted int64 index array per fraction; together they partition ``range(N)``.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) < 1 or np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
        raise ValueError(
            f"fractions must be non-negative and sum to 1, got {list(fractions)}; "
            "e.g. (0.6, 0.2, 0.2) for train/val/test."
        )
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        sizes = [int(round(n * f)) for f in fr[1:]]
        # Keep at least one image in part 0 (the training pool).
        while sum(sizes) > n - 1 and sum(sizes) > 0:
            j = int(np.argmax(sizes))
            sizes[j] -= 1
        start = n - sum(sizes)
        parts[0].append(idx[:start])
        for j, size in enumerate(sizes, start=1):
            parts[j].append(idx[start : start + size])
            start += size
    return [
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, dtype=np.int64)
        for p in parts
    ]
