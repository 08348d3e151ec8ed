"""Few-shot sampling and fixed stratified splits (fewclip_tutorial/data/splits.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_data import make_spec  # noqa: E402

from fewclip_tutorial.data.splits import (  # noqa: E402
    FewShotSplits,
    NotEnoughExamplesError,
    few_shot_indices,
    make_few_shot,
    stratified_split,
)

LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 2])  # 6 / 5 / 7 per class


def test_k_per_class_sorted_unique():
    idx = few_shot_indices(LABELS, 3, seed=1)
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
    assert np.bincount(LABELS[idx]).tolist() == [3, 3, 3]


def test_matches_hand_computed_draw():
    # One default_rng(seed) draws each class's shots in class order.
    rng = np.random.default_rng(7)
    expected = np.sort(
        np.concatenate(
            [rng.choice(np.flatnonzero(LABELS == c), 2, replace=False) for c in range(3)]
        )
    )
    np.testing.assert_array_equal(few_shot_indices(LABELS, 2, seed=7), expected)


def test_reproducible_and_seed_dependent():
    a = few_shot_indices(LABELS, 4, seed=1)
    np.testing.assert_array_equal(a, few_shot_indices(LABELS, 4, seed=1))
    draws = {tuple(few_shot_indices(LABELS, 4, seed=s)) for s in range(6)}
    assert len(draws) > 1


def test_exclude_is_respected():
    first = few_shot_indices(LABELS, 2, seed=0)
    second = few_shot_indices(LABELS, 3, seed=0, exclude=first)
    assert not set(first) & set(second)
    assert np.bincount(LABELS[second]).tolist() == [3, 3, 3]


def test_not_enough_examples_names_class_and_count():
    with pytest.raises(NotEnoughExamplesError, match=r"class 1 \('cat'\) has only 5 images"):
        few_shot_indices(LABELS, 6, seed=0, classnames=["dog", "cat", "bird"])
    assert issubclass(NotEnoughExamplesError, ValueError)


def test_not_enough_after_exclude_mentions_exclusion():
    used = np.flatnonzero(LABELS == 1)[:4]
    with pytest.raises(NotEnoughExamplesError, match=r"only 1 images available \(4 of its 5"):
        few_shot_indices(LABELS, 2, seed=0, exclude=used)


def test_empty_class_error():
    with pytest.raises(NotEnoughExamplesError, match=r"class 3 has no images"):
        few_shot_indices(LABELS, 1, seed=0, num_classes=4)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match="positive integer"):
        few_shot_indices(LABELS, k, seed=0)


def test_make_few_shot_with_val_pool():
    spec = make_spec([6, 6, 6], val_per_class=[5, 5, 5])
    ep = make_few_shot(spec, shots=2, seed=1)
    assert isinstance(ep, FewShotSplits)
    assert ep.train.name == "train[2shot,seed1]"
    assert np.bincount(ep.train.labels).tolist() == [2, 2, 2]
    assert np.bincount(ep.val.labels).tolist() == [2, 2, 2]  # min(K, 4) = 2
    assert ep.val.parent is spec.val  # drawn from the dataset's own val split
    assert ep.test is spec.test and ep.ood_test == spec.ood_test
    # The subsets really point at the parent's images and labels.
    i = 1
    np.testing.assert_array_equal(
        np.asarray(ep.train[i][0]), np.asarray(spec.train[int(ep.train.indices[i])][0])
    )
    assert ep.train[i][1] == spec.train.labels[ep.train.indices[i]]


def test_make_few_shot_val_from_train_is_disjoint():
    spec = make_spec([20, 21, 22], val_per_class=None)
    for seed in (1, 2, 3):
        ep = make_few_shot(spec, shots=16, seed=seed)
        assert ep.val.parent is spec.train
        assert np.bincount(ep.val.labels).tolist() == [4, 4, 4]
        assert not set(ep.train.indices) & set(ep.val.indices)
        assert ep.train.name == f"train[16shot,seed{seed}]"


def test_make_few_shot_reproducible_and_differs_across_seeds():
    spec = make_spec([10, 10, 10], val_per_class=None)
    a, b, c = (make_few_shot(spec, 4, s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.train.indices, b.train.indices)
    np.testing.assert_array_equal(a.val.indices, b.val.indices)
    assert a.train.fingerprint() == b.train.fingerprint()
    assert not np.array_equal(a.train.indices, c.train.indices)
    assert a.train.fingerprint() != c.train.fingerprint()


def test_make_few_shot_too_many_shots_error_names_class():
    spec = make_spec([20, 3, 20], val_per_class=None)
    with pytest.raises(NotEnoughExamplesError, match=r"class 1 \('class1'\) has only 3"):
        make_few_shot(spec, shots=4, seed=1)


def test_stratified_split_partitions_per_class():
    labels = np.repeat(np.arange(3), [10, 5, 1])
    tr, va, te = stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    allidx = np.concatenate([tr, va, te])
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))  # a partition
    assert np.bincount(labels[tr], minlength=3).tolist() == [6, 3, 1]  # a class of 1 stays in train
    assert np.bincount(labels[va], minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(labels[te], minlength=3).tolist() == [2, 1, 0]
    again = stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    for x, y in zip((tr, va, te), again, strict=True):
        np.testing.assert_array_equal(x, y)


def test_stratified_split_bad_fractions():
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(np.zeros(4), (0.5, 0.2))
