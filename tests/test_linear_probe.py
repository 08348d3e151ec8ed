"""Tests of fewclip_tutorial.linear_probe and fewclip_tutorial.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import fewclip_tutorial.linear_probe as lp
from fewclip_tutorial.linear_probe import (
    DEFAULT_CS,
    LPCLIP_CS,
    LPCLIP_STEPS,
    LinearProbe,
    fit_linear_probe,
    fit_linear_probe_lpclip,
)
from fewclip_tutorial.metrics import accuracy, per_class_accuracy, round_metrics


def _blobs(n_per_class: int, centers: np.ndarray, noise: float, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + noise * rng.standard_normal((n_per_class, len(c))) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per_class)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


CENTERS = np.eye(4, 6) * 3.0


def test_default_grid() -> None:
    assert len(DEFAULT_CS) == 13
    # logspace is np.power(10, linspace(-3, 3)) with exact end points; np.power (libm, or
    # numpy's SIMD paths, validated to <= 2 float64 steps): within 2 steps, relative 2 * 2^-52
    two_steps = 2 * 2.0**-52
    assert DEFAULT_CS[0] == pytest.approx(1e-3, rel=two_steps, abs=0)  # the bound above
    assert DEFAULT_CS[-1] == pytest.approx(1e3, rel=two_steps, abs=0)  # the bound above


def test_separable_data_is_classified_perfectly() -> None:
    xtr, ytr = _blobs(4, CENTERS, 0.1, 0)
    xva, yva = _blobs(2, CENTERS, 0.1, 1)
    xte, yte = _blobs(20, CENTERS, 0.1, 2)
    probe = fit_linear_probe(xtr, ytr, xva, yva)
    assert probe.val_accuracy == 100.0
    assert accuracy(probe.logits(xte), yte) == 100.0
    assert probe.logits(xte).shape == (80, 4)


def test_chosen_C_is_argmax_of_search_with_ties_to_smaller_C() -> None:
    xtr, ytr = _blobs(3, CENTERS, 1.5, 3)
    xva, yva = _blobs(4, CENTERS, 1.5, 4)
    probe = fit_linear_probe(xtr, ytr, xva, yva, Cs=[100.0, 0.01, 1.0, 0.1, 10.0])
    assert [c for c, _ in probe.search] == [0.01, 0.1, 1.0, 10.0, 100.0]  # sorted grid
    best = max(acc for _, acc in probe.search)
    assert probe.val_accuracy == best
    assert probe.C == min(c for c, acc in probe.search if acc == best)
    # Each recorded accuracy is the probe's accuracy on val at that C.
    for C, acc in probe.search:
        # the probe's own fit (sklearn on the same float64 features), so the same predictions
        # and the same float64 mean: equal accuracies
        x64 = xtr.double().numpy()
        clf = LogisticRegression(C=C, max_iter=1000).fit(x64, ytr.numpy())
        assert acc == 100 * np.mean(clf.predict(xva.double().numpy()) == yva.numpy())


def test_probe_is_refit_on_train_only_and_matches_sklearn() -> None:
    xtr, ytr = _blobs(5, CENTERS, 1.0, 5)
    xva, yva = _blobs(3, CENTERS, 1.0, 6)
    probe = fit_linear_probe(xtr, ytr, xva, yva, Cs=[0.3])
    clf = LogisticRegression(C=0.3, max_iter=1000).fit(xtr.numpy(), ytr.numpy())
    xte, _ = _blobs(10, CENTERS, 1.0, 7)
    logits = probe.logits(xte)
    # the probe is sklearn's lbfgs fit on the same float64 data (the same coefficients), kept
    # in float32: its logits round by <= (D + 2) 2^-24 (|b| + sum_i |w_i x_i|), x2 for the cast
    w, b = probe.weight.double(), probe.bias.double()
    terms = xte.double().abs() @ w.abs().T + b.abs()
    bound = float(2 * (xte.shape[1] + 2) * 2**-24 * terms.max())
    torch.testing.assert_close(
        logits.double(),
        torch.tensor(clf.decision_function(xte.numpy()), dtype=torch.float64),
        atol=bound,  # the float32 bound above
        rtol=0,
    )
    assert probe(xte).shape == logits.shape  # callable like a predict function


def test_binary_problem_matches_sklearn_probabilities() -> None:
    xtr, ytr = _blobs(6, CENTERS[:2], 1.0, 8)
    xva, yva = _blobs(3, CENTERS[:2], 1.0, 9)
    probe = fit_linear_probe(xtr, ytr, xva, yva, Cs=[1.0])
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(xtr.numpy(), ytr.numpy())
    probs = probe.logits(xva).softmax(1).numpy()
    # as above: float32 logits off by <= bound; a softmax moves by <= 2 * bound (Lipschitz),
    # and its float32 output rounds by a few 2^-24 more (2^-23 for probabilities <= 1)
    w, b = probe.weight.double(), probe.bias.double()
    terms = xva.double().abs() @ w.abs().T + b.abs()
    bound = float(2 * (xva.shape[1] + 2) * 2**-24 * terms.max())
    want = clf.predict_proba(xva.numpy())
    np.testing.assert_allclose(probs, want, atol=2 * bound + 2**-23)  # the bound above


def test_classes_absent_from_training_are_never_predicted() -> None:
    xtr, ytr = _blobs(3, CENTERS[:3], 0.2, 10)
    xva, yva = _blobs(2, CENTERS[:3], 0.2, 11)
    probe = fit_linear_probe(xtr, ytr, xva, yva, num_classes=5)
    assert isinstance(probe, LinearProbe) and probe.num_classes == 5
    assert set(probe.logits(torch.randn(100, 6) * 5).argmax(1).tolist()) <= {0, 1, 2}


def test_bad_shapes_are_rejected() -> None:
    xtr, ytr = _blobs(3, CENTERS, 0.2, 12)
    xva, yva = _blobs(2, CENTERS, 0.2, 13)
    with pytest.raises(ValueError, match="train_y"):
        fit_linear_probe(xtr, ytr[:-1], xva, yva)
    with pytest.raises(ValueError, match="D=6"):
        fit_linear_probe(xtr, ytr, xva[:, :5], yva)
    with pytest.raises(ValueError, match=r"mean\(0\)"):
        fit_linear_probe(xtr.unsqueeze(0), ytr, xva, yva)
    with pytest.raises(ValueError, match="positive"):
        fit_linear_probe(xtr, ytr, xva, yva, Cs=[0.0, 1.0])
    with pytest.raises(ValueError, match="single class"):
        fit_linear_probe(xtr[:3], ytr[:3], xva, yva)
    probe = fit_linear_probe(xtr, ytr, xva, yva, Cs=[1.0])
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        probe.logits(torch.randn(2, 5))


# --------------------------------------------------------------------------- CoOp's lpclip


def test_lpclip_defaults_are_coops() -> None:
    from fewclip_tutorial.methods.baselines import LinearProbeConfig

    # KaiyangZhou/CoOp, lpclip/linear_probe.py: search_list, range(8), max_iter=1000, and the
    # "Linear probe CLIP" baseline is this protocol on the raw image features
    assert LPCLIP_CS == (1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6)
    assert LPCLIP_STEPS == 8
    assert LinearProbeConfig().protocol == "lpclip"
    assert LinearProbeConfig().max_iter == 1000
    assert LinearProbeConfig().steps == 8


def _coop_search(xtr, ytr, xva, yva):
    """CoOp's search re-written: the C of every fit in order, and the final classifier."""
    tried = []

    def fit(c):
        tried.append(c)
        # penalty="l2" is sklearn's default (the argument is deprecated since sklearn 1.8)
        clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(xtr, ytr)
        return clf, sum(clf.predict(xva) == yva) / len(yva)

    accs = [fit(c)[1] for c in [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]]
    c_peak = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6][int(np.argmax(accs))]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    outcomes = []
    for _ in range(8):
        clf_left, acc_left = fit(c_left)
        clf_right, acc_right = fit(c_right)
        if acc_left < acc_right:
            outcomes.append("right")
            c_final, clf_final = c_right, clf_right
            c_left = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_right = np.log10(c_right)
        else:
            outcomes.append("tie" if acc_left == acc_right else "left")
            c_final, clf_final = c_left, clf_left
            c_right = 0.5 * (np.log10(c_right) + np.log10(c_left))
            c_left = np.log10(c_left)
        c_left, c_right = np.power(10, c_left), np.power(10, c_right)
    return tried, c_final, clf_final, outcomes


def test_lpclip_search_equals_coops_loop() -> None:
    centers = np.eye(4, 6)
    xtr, ytr = _blobs(2, centers, 1.0, 14)
    xva, yva = _blobs(6, centers, 1.0, 15)
    xtr, xva = 30 * xtr.double(), 30 * xva.double()  # raw features: norms far from 1
    probe = fit_linear_probe_lpclip(xtr, ytr, xva, yva)
    tried, c_final, clf, outcomes = _coop_search(xtr.numpy(), ytr.numpy(), xva.numpy(), yva.numpy())
    # the problem exercises every branch: a right end kept, a left end kept, a tie
    assert {"right", "left", "tie"} <= set(outcomes), outcomes
    assert [c for c, _ in probe.search] == [float(c) for c in tried]  # the same C, bit for bit
    assert len(probe.search) == 7 + 2 * 8
    assert probe.C == c_final
    # the kept classifier is the last step's: sklearn's fit at C_final on the same float64 data
    logits = probe.logits(xva.float()).double()
    want = torch.tensor(clf.decision_function(xva.numpy()))
    w, b = probe.weight.double(), probe.bias.double()
    terms = xva.abs() @ w.abs().T + b.abs()
    bound = float(2 * (xva.shape[1] + 2) * 2**-24 * terms.max())  # float32 weights and inputs
    torch.testing.assert_close(logits, want, atol=bound, rtol=0)
    assert probe.val_accuracy == 100 * np.mean(clf.predict(xva.numpy()) == yva.numpy())


def _scripted(monkeypatch, score):
    """Replace the fits by a validation accuracy ``score(C)`` (the search logic alone)."""

    def fake_fit(x, y, C, max_iter, seed, num_classes):
        return np.full((num_classes, x.shape[1]), float(C)), np.zeros(num_classes)

    monkeypatch.setattr(lp, "_fit", fake_fit)
    monkeypatch.setattr(lp, "_val_accuracy", lambda w, b, x, y: float(score(w[0, 0])))
    x, y = _blobs(2, CENTERS, 0.1, 0)
    return fit_linear_probe_lpclip(x, y, x, y)


def test_lpclip_first_grid_keeps_the_first_best(monkeypatch) -> None:
    # 1e4 and 1e-2 tie for the best: argmax keeps 1e4, the first in CoOp's order
    probe = _scripted(monkeypatch, lambda c: 50.0 if c in (1e4, 1e-2) else 10.0)
    assert [c for c, _ in probe.search[7:9]] == [1e3, 1e5]  # [C*/10, 10 C*] around 1e4


def test_lpclip_bisection_keeps_the_left_end_on_a_tie(monkeypatch) -> None:
    probe = _scripted(monkeypatch, lambda c: 30.0)  # every fit ties
    cs = [c for c, _ in probe.search]
    assert cs[:7] == [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]  # the first of the ties: 1e6
    lefts, rights = cs[7::2], cs[8::2]
    # ties keep the left end, 1e5 (recomputed as 10^log10 each step: within a rounding);
    # the right end halves towards it in log10 C: 7, 6, 5.5, 5.25, ...
    np.testing.assert_allclose(np.log10(lefts), [5.0] * 8, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        np.log10(rights), [5 + 2 / 2**k for k in range(8)], rtol=0, atol=1e-12
    )
    assert probe.C == lefts[-1]  # the end kept at the last step


def test_lpclip_bisection_moves_right_when_the_right_end_is_better(monkeypatch) -> None:
    probe = _scripted(monkeypatch, lambda c: math.log10(c))  # larger C, strictly better
    cs = [c for c, _ in probe.search]
    assert cs[:2] == [1e6, 1e4]  # 1e6 is the best of the first grid
    lefts, rights = cs[7::2], cs[8::2]
    # the left end halves towards the right one, 1e7: 5, 6, 6.5, 6.75, ...; log10 of
    # 10**x in float64 is x within a few ulp of 7 (< 1e-14): atol 1e-12 bounds it
    np.testing.assert_allclose(
        np.log10(lefts), [7 - 2 / 2**k for k in range(8)], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(np.log10(rights), [7.0] * 8, rtol=0, atol=1e-12)  # as above
    assert probe.C == rights[-1]


def test_lpclip_rejects_bad_steps() -> None:
    xtr, ytr = _blobs(3, CENTERS, 0.2, 12)
    with pytest.raises(ValueError, match="non-negative integer"):
        fit_linear_probe_lpclip(xtr, ytr, xtr, ytr, steps=-1)
    probe = fit_linear_probe_lpclip(xtr, ytr, xtr, ytr, steps=0)  # the first grid alone
    assert len(probe.search) == 7 and probe.C in LPCLIP_CS


# --------------------------------------------------------------------------- metrics


def test_accuracy_from_logits_and_predictions() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert accuracy(logits, labels) == 75.0
    assert accuracy(np.array([0, 1, 0, 0]), labels) == 50.0
    with pytest.raises(ValueError, match="one label per example"):
        accuracy(logits, labels[:3])


def test_per_class_accuracy() -> None:
    preds = np.array([0, 0, 1, 2, 2, 2])
    labels = np.array([0, 1, 1, 2, 2, 0])
    out = per_class_accuracy(preds, labels, num_classes=4)
    np.testing.assert_array_equal(out[:3], [50.0, 50.0, 100.0])  # 0.5 * 100, 1 * 100: exact
    assert math.isnan(out[3])


def test_round_metrics_rounds_accuracies_only() -> None:
    result = {
        "test_accuracy": 61.2345,
        "ood_accuracy": {"sketch": np.float32(33.333)},
        "C": 0.00123456,
        "alpha": 1.1712,
        "C_search": [[0.001, 25.0]],
        "shots": np.int64(4),
        "probs": torch.tensor([0.123456]),
        "name": "x",
    }
    out = round_metrics(result)
    assert out["test_accuracy"] == 61.2
    assert out["ood_accuracy"] == {"sketch": 33.3}
    assert out["C"] == 0.001235 and out["alpha"] == 1.171
    assert out["shots"] == 4 and type(out["shots"]) is int
    assert out["probs"] == [0.1235]
    assert out["name"] == "x"
