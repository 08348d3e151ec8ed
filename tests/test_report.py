"""The claims tables' numbers: paired differences over seeds, the verdict rule, glue."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from fewclip_tutorial.report import glue, glue_paired, paired, styled, verdict


def _frame(rows: dict[str, list[float]], shots: int = 16) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"label": label, "dataset": "d", "shots": shots, "seed": seed, "test_accuracy": a}
            for label, values in rows.items()
            for seed, a in enumerate(values, start=1)
        ]
    )


def test_paired_differences_are_per_seed_not_differences_of_means():
    # seed-level noise shared by both methods cancels in the paired difference
    frame = _frame({"m": [70.0, 80.0, 90.0], "b": [68.0, 79.0, 87.0]})
    p = paired(frame, "m", "b")
    assert p.diffs == (2.0, 1.0, 3.0) and p.seeds == (1, 2, 3)
    assert p.diff[0] == pytest.approx(2.0)
    assert p.diff[1] == pytest.approx(math.sqrt(2 / 3))  # population std of (2, 1, 3)
    assert p.method[1] == pytest.approx(math.sqrt(200 / 3))  # far larger than the diff's
    assert p.text("diff") == "+2.0 ± 0.8" and p.text("method") == "80.0 ± 8.2"
    # rows in another order pair by seed, not by position
    shuffled = frame.sample(frac=1.0, random_state=0)
    assert paired(shuffled, "m", "b").diffs == p.diffs


def test_paired_refuses_different_episodes_and_unknown_labels():
    frame = _frame({"m": [70.0, 80.0], "b": [68.0, 79.0, 87.0]})
    with pytest.raises(ValueError, match="different episodes"):
        paired(frame, "m", "b")
    with pytest.raises(ValueError, match="no rows labelled 'x'.*labels: \\['b', 'm'\\]"):
        paired(frame, "x", "b")
    both = pd.concat([_frame({"m": [1.0], "b": [0.0]}, 1), _frame({"m": [5.0], "b": [1.0]})])
    assert paired(both, "m", "b", where={"shots": 1}).diffs == (1.0,)


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ((0.5, 1.0, 2.0), "reproduced"),
        ((3.0, -1.0, 0.5), "partly"),
        ((1.0, -1.0, 0.0), "not reproduced"),
        ((-0.1, -0.2, -0.3), "not reproduced"),
        ((0.0, 0.0, 0.0), "not reproduced"),
    ],
)
def test_verdict_rule(diffs, expected):
    assert verdict(diffs) == expected


def test_verdict_margin_and_empty():
    assert verdict((0.04, 0.06), margin=0.05) == "not reproduced"
    assert verdict((0.04, 0.2), margin=0.05) == "partly"
    with pytest.raises(ValueError, match="at least one"):
        verdict(())


def test_glue_returns_the_text_outside_a_book_build_and_checks_names():
    assert glue("fd_ood", 45.25) == "45.2" and glue("x-1", 3, "{:d}") == "3"
    assert glue("ready", "61.9 ± 4.1") == "61.9 ± 4.1"
    with pytest.raises(ValueError, match="letters, digits"):
        glue("bad name", 1.0)


def test_styled_formats_bolds_the_best_and_hides_nan():
    table = pd.DataFrame({"test_accuracy": [59.94, 97.04], "ood_mean": [48.0, float("nan")]})
    html = styled(table, caption="Table 1").to_html()
    assert "test accuracy" in html and "59.9" in html and "97.0" in html
    assert "59.94" not in html and "nan" not in html.lower() and "–" in html
    css = html.split("</style>")[0]
    bold = {m for m in re.findall(r"_(row\d+_col\d+)", css.split("font-weight")[0].split("}")[-1])}
    assert bold == {"row1_col0", "row0_col1"}  # the best of each column
    with pytest.raises(ValueError, match="'max', 'min'"):
        styled(table, best="mean")


def test_glue_paired_returns_the_verdict_of_the_differences():
    frame = _frame({"m": [70.0, 80.0, 90.0], "b": [68.0, 81.0, 87.0]})
    assert glue_paired("c1", paired(frame, "m", "b")) == "partly"
    assert glue_paired("c1", paired(frame, "m", "b"), margin=5.0) == "not reproduced"


def test_a_difference_that_rounds_to_zero_has_no_sign():
    frame = _frame({"m": [70.0, 80.0], "b": [70.02, 80.04]})
    assert paired(frame, "m", "b").text() == "0.0 ± 0.0"
