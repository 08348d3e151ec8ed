"""Metrics over seeds and methods, and the comparison chapter's exercises."""

from __future__ import annotations

import statistics

import pandas as pd
import pytest
import torch

from fewclip_tutorial import metrics
from fewclip_tutorial.course.exercises import get_exercise
from fewclip_tutorial.sweep import summarise


def _table(seed: int, seeds: int = 3, methods: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(seeds, methods, generator=g, dtype=torch.float64) * 60 + 40


@pytest.mark.parametrize("seed", range(4))
def test_mean_std_over_seeds_is_the_population_statistic(seed: int) -> None:
    acc = _table(seed, seeds=2 + seed)
    mean, std = metrics.mean_std_over_seeds(acc)
    for m in range(acc.shape[1]):
        column = [float(v) for v in acc[:, m]]
        # float64 accuracies <= 100, a handful of seeds: n * 1.1e-16 * 100 < 1e-12
        assert float(mean[m]) == pytest.approx(statistics.fmean(column), abs=1e-12)
        assert float(std[m]) == pytest.approx(statistics.pstdev(column), abs=1e-12)


def test_mean_std_over_seeds_agrees_with_the_books_tables() -> None:
    # the "mean ± std" strings of sweep.summarise, from the same numbers in a sweep frame
    acc = _table(7, seeds=3, methods=2)
    frame = pd.DataFrame(
        [
            {"label": label, "shots": 16, "seed": s, "test_accuracy": float(acc[s, m])}
            for m, label in enumerate(["a", "b"])
            for s in range(3)
        ]
    )
    mean, std = metrics.mean_std_over_seeds(acc)
    printed = summarise(frame)["K=16"]
    for m, label in enumerate(["a", "b"]):
        assert printed[label] == f"{round(float(mean[m]), 1)} ± {round(float(std[m]), 1)}"


def test_one_seed_has_zero_spread() -> None:
    mean, std = metrics.mean_std_over_seeds(torch.tensor([[59.9, 97.5]]))
    assert torch.equal(std, torch.zeros(2)) and torch.allclose(mean, torch.tensor([59.9, 97.5]))


def test_select_on_validation_by_hand() -> None:
    # means 60, 65, 65, 62.5: methods 1 and 2 tie, the first listed wins
    val = torch.tensor([[50.0, 70.0, 60.0, 62.5], [70.0, 60.0, 70.0, 62.5]])
    assert metrics.select_on_validation(val) == 1
    # the best mean wins even where it is never the best single seed
    val = torch.tensor([[80.0, 85.0, 40.0], [80.0, 70.0, 90.0]])  # means 80, 77.5, 65
    assert metrics.select_on_validation(val) == 0
    assert isinstance(metrics.select_on_validation(val), int)


@pytest.mark.parametrize("seed", range(10))
def test_select_on_validation_against_a_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    val = torch.randint(30, 41, (3, 5), generator=g).double() * 2.5  # frequent ties
    means = [sum(float(v) for v in val[:, m]) / 3 for m in range(5)]
    best = 0
    for m in range(1, 5):
        if means[m] > means[best] + 1e-6:
            best = m
    assert metrics.select_on_validation(val) == best


def test_bad_tables_are_refused_with_the_way_out() -> None:
    with pytest.raises(ValueError, match="one row per seed"):
        metrics.mean_std_over_seeds(torch.ones(4))
    with pytest.raises(ValueError, match="floating-point"):
        metrics.select_on_validation(torch.ones(2, 3, dtype=torch.long))


def test_comparison_exercises_accept_the_references_and_correct_rewrites() -> None:
    def student_mean_std(acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = acc.sum(0) / acc.shape[0]
        return mean, ((acc - mean) ** 2).sum(0).div(acc.shape[0]).sqrt()

    def student_select(val_acc: torch.Tensor) -> int:
        return int(val_acc.mean(0).argmax())  # argmax returns the first maximal index

    assert get_exercise("seed_mean_std").check(metrics.mean_std_over_seeds, verbose=False)
    assert get_exercise("seed_mean_std").check(student_mean_std, verbose=False)
    assert get_exercise("select_on_validation").check(metrics.select_on_validation, verbose=False)
    assert get_exercise("select_on_validation").check(student_select, verbose=False)


def test_comparison_exercises_reject_wrong_answers(capsys: pytest.CaptureFixture[str]) -> None:
    def sample_std(acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return acc.mean(0), acc.std(0)  # divides by S - 1

    def over_methods(acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return acc.mean(1), acc.std(1, correction=0)

    def last_of_the_tied(val_acc: torch.Tensor) -> int:
        mean = val_acc.mean(0)
        return int(torch.nonzero(mean == mean.max())[-1, 0])

    def best_single_seed(val_acc: torch.Tensor) -> int:
        return int(val_acc.max(0).values.argmax())

    assert not get_exercise("seed_mean_std").check(sample_std)
    assert "values differ" in capsys.readouterr().out
    assert not get_exercise("seed_mean_std").check(over_methods)
    assert "shape" in capsys.readouterr().out
    assert not get_exercise("select_on_validation").check(last_of_the_tied)
    assert "hint:" in capsys.readouterr().out
    assert not get_exercise("select_on_validation").check(best_single_seed, verbose=False)
