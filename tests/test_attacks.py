"""Tests of the [0, 1]-pixel-space attacks (FGSM, PGD-20, CW-20) and NormalizedClassifier."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewclip_tutorial.attacks import (
    EPS,
    STEP_SIZES,
    NormalizedClassifier,
    attack,
    cw,
    cw_margin_loss,
    fgsm,
    pgd,
    robust_accuracy,
)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


class MeanBrightness(nn.Module):
    """Visual encoder of the toy problem: D = 2 feature ``[m, 0.1]``, ``m`` the mean (normalised) pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([m, torch.full_like(m, 0.1)], dim=1)


def _easy_problem(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1: slightly bright images, class 0: slightly dark ones (margin 0.02 < eps)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    shift = torch.where(labels == 1, 0.02, -0.02).view(-1, 1, 1, 1)
    images = 0.5 + shift + 0.005 * torch.randn(n, 3, 8, 8, generator=g)
    return images.clamp(0, 1), labels


def _classifier() -> NormalizedClassifier:
    head = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])  # class 1 <-> bright
    return NormalizedClassifier(MeanBrightness(), MEAN, STD, head, logit_scale=10.0)


def _acc(clf: NormalizedClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((clf(x).argmax(-1) == y).float().mean())


def test_normalized_classifier_matches_manual_computation() -> None:
    torch.manual_seed(0)
    visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    head = F.normalize(torch.randn(3, 5), dim=-1)
    refine_fn = nn.Linear(5, 5)
    clf = NormalizedClassifier(visual, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), head, refine_fn, 100.0)
    x = torch.rand(2, 3, 4, 4)
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    f = F.normalize(visual((x - mean) / std), dim=-1)
    expected = 100.0 * F.normalize(refine_fn(f), dim=-1) @ head.T
    # the classifier runs these float32 operations in this order on the same inputs: exact
    assert torch.equal(clf(x), expected)
    with pytest.raises(ValueError, match="3 values"):
        NormalizedClassifier(visual, (0.5,), (0.2,), head)


def test_attacks_stay_in_the_eps_ball_and_the_pixel_range() -> None:
    x, y = _easy_problem()
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0  # pixels at the box edges
    clf = _classifier()
    gen = torch.Generator().manual_seed(0)
    for adv in (
        fgsm(clf, x, y),
        pgd(clf, x, y, generator=gen),
        cw(clf, x, y, generator=gen),
        pgd(clf, x, y, eps=0.1, alpha=0.05, steps=5, random_start=False),
    ):
        assert adv.shape == x.shape
        assert (adv - x).abs().max() <= max(EPS, 0.1) + 1e-6
        assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert (fgsm(clf, x, y) - x).abs().max() <= EPS + 1e-6
    assert (pgd(clf, x, y, generator=gen) - x).abs().max() <= EPS + 1e-6


def test_attacks_reduce_accuracy_of_an_easy_classifier() -> None:
    x, y = _easy_problem()
    clf = _classifier()
    assert _acc(clf, x, y) == 1.0
    assert _acc(clf, fgsm(clf, x, y), y) == 0.0
    assert _acc(clf, pgd(clf, x, y, generator=torch.Generator().manual_seed(0)), y) == 0.0
    assert _acc(clf, cw(clf, x, y, generator=torch.Generator().manual_seed(0)), y) == 0.0
    # a budget smaller than the class margin cannot flip anything
    assert _acc(clf, pgd(clf, x, y, eps=0.005, generator=torch.Generator()), y) == 1.0
    table = robust_accuracy(clf, x, y, batch_size=16, seed=0)
    assert table == {"clean": 100.0, "fgsm": 0.0, "pgd": 0.0, "cw": 0.0}


def test_attacks_are_deterministic_given_a_seed() -> None:
    torch.manual_seed(0)
    visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.Tanh())
    clf = NormalizedClassifier(visual, MEAN, STD, F.normalize(torch.randn(3, 4), dim=-1))
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    a = pgd(clf, x, y, generator=torch.Generator().manual_seed(3))
    b = pgd(clf, x, y, generator=torch.Generator().manual_seed(3))
    c = pgd(clf, x, y, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert robust_accuracy(clf, x, y, seed=1) == robust_accuracy(clf, x, y, seed=1)
    # the attack does not touch the model's parameters or their gradients
    assert all(p.grad is None for p in visual.parameters())


def test_cw_margin_loss_by_hand_and_input_checks() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    labels = torch.tensor([0, 2])
    # row 0: best other 2 - 3 = -1; row 1: best other 5 - (-1) = 6, capped at kappa = 4
    # small integers: every difference is exact in float32
    assert torch.equal(cw_margin_loss(logits, labels, kappa=4.0), torch.tensor([-1.0, 4.0]))
    x, y = _easy_problem(4)
    clf = _classifier()
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel space"):
        fgsm(clf, (x - 0.5) / 0.25, y)
    with pytest.raises(ValueError, match="eps"):
        pgd(clf, x, y, eps=0.0)
    with pytest.raises(ValueError, match="labels"):
        fgsm(clf, x, y[:2])


def _total_brightness(x: torch.Tensor) -> torch.Tensor:
    """Two-class logits ``[s, -s]``, ``s`` the pixel sum: CE on class 0 always lowers pixels."""
    s = x.sum(dim=(1, 2, 3))
    return torch.stack([s, -s], dim=1)


def test_pgd_step_defaults_to_the_authors_eps_over_10() -> None:
    """CLAP main/evaluate.py: step_size = eps / 10 for PGD-20 and CW-20, eps for FGSM."""
    x = torch.full((2, 3, 4, 4), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    # the CE gradient w.r.t. every pixel is negative, so each step moves every pixel by -alpha;
    # alpha = 0.1 * EPS as the package forms it (STEP_SIZES["clap"] * eps).  The expected
    # values repeat PGD's float32 subtractions one by one (the projection is inactive until
    # the eps boundary), so they are exact, not approximate
    a = 0.1 * EPS
    one = pgd(_total_brightness, x, y, steps=1, random_start=False)
    assert torch.equal(one, x - a)
    three = pgd(_total_brightness, x, y, steps=3, random_start=False)
    assert torch.equal(three, x - a - a - a)
    quarter = pgd(_total_brightness, x, y, steps=1, random_start=False, alpha="quarter")
    assert torch.equal(quarter, x - EPS / 4)  # 0.25 * EPS == EPS / 4 exactly (a power of 2)
    assert STEP_SIZES == {"clap": 0.1, "quarter": 0.25}
    # 20 steps of eps/10 reach the eps boundary and stay there: PGD clamps to x0 - eps, the
    # very subtraction on the right (FGSM's single step of eps is that subtraction too)
    assert torch.equal(pgd(_total_brightness, x, y, random_start=False), x - EPS)
    assert torch.equal(fgsm(_total_brightness, x, y), x - EPS)
    # CW uses the same step: its margin also falls with the pixel sum for class 0
    assert torch.equal(cw(_total_brightness, x, y, steps=2, random_start=False), x - a - a)
    with pytest.raises(ValueError, match="quarter"):
        pgd(_total_brightness, x, y, alpha="half")


def test_robust_accuracy_passes_the_step_to_pgd_and_cw() -> None:
    torch.manual_seed(0)
    visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.Tanh())
    clf = NormalizedClassifier(visual, MEAN, STD, F.normalize(torch.randn(3, 4), dim=-1))
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for a in ("pgd", "cw"):
        got = attack(a, clf, x, y, seed=5, alpha="quarter")
        loss = "ce" if a == "pgd" else "cw"
        gen = torch.Generator().manual_seed(5)
        # "quarter" is 0.25 * EPS == EPS / 4 (exact): the same attack, so the same pixels
        assert torch.equal(got, pgd(clf, x, y, alpha=EPS / 4, loss=loss, generator=gen))
