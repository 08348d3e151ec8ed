"""Sweep tables: the method x task table and its average row."""

from __future__ import annotations

import pandas as pd
import pytest

from fewclip_tutorial.sweep import summarise, task_table


def _frame() -> pd.DataFrame:
    rows = []
    acc = {("b-task", "zs"): [50, 50], ("b-task", "lp"): [70, 74], ("a-task", "zs"): [90, 90]}
    acc[("a-task", "lp")] = [80, 82]
    for (dataset, label), values in acc.items():
        for seed, a in enumerate(values, start=1):
            rows.append(
                {
                    "label": label,
                    "dataset": dataset,
                    "shots": 16,
                    "seed": seed,
                    "test_accuracy": float(a),
                }
            )
    return pd.DataFrame(rows)


def test_task_table_means_over_seeds_and_averages_over_tasks():
    t = task_table(_frame())
    assert list(t.index) == ["b-task", "a-task", "average"]  # order of appearance, then average
    assert list(t.columns) == ["zs", "lp"]
    assert t.loc["b-task", "lp"] == pytest.approx(72.0)
    assert t.loc["average", "zs"] == pytest.approx(70.0)
    assert t.loc["average", "lp"] == pytest.approx((72.0 + 81.0) / 2)


def test_summarise_reports_mean_and_population_std_per_shot():
    out = summarise(_frame()[lambda f: f["dataset"] == "b-task"])
    assert out.loc["lp", "K=16"] == "72.0 ± 2.0" and out.loc["zs", "K=16"] == "50.0 ± 0.0"
