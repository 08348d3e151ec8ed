"""Numbers for the book's prose and claims tables: paired comparisons over seeds, the
verdict rule, readable HTML tables, and ``glue`` that also runs outside the book.

A chapter states a claim of a paper as *method beats baseline on a metric*.  Both ran on
the same few-shot episodes (same task, shots and seed), so the evidence is the **paired**
difference per seed (:func:`paired`), and the verdict follows one rule written down
once (:func:`verdict`).  Every number the prose quotes goes through :func:`glue`, so the
text is filled from the cell that computed it (myst-nb's ``{glue:text}`` role).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Paired", "glue", "glue_paired", "paired", "styled", "verdict"]


def glue(name: str, value: Any, fmt: str = "{:.1f}") -> str:
    """Format ``value`` with ``fmt`` and hand the text to myst-nb under ``name``.

    The prose quotes it as ``{glue:text}`name` ``.  Outside a book build (no myst-nb,
    as on Colab, or no running kernel) nothing is glued and the text is only returned.

    Returns:
        The formatted text.
    """
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"glue name {name!r}: use letters, digits, '_' and '-' only.")
    text = value if isinstance(value, str) else fmt.format(value)
    try:
        from IPython import get_ipython
        from myst_nb import glue as myst_glue
    except ImportError:
        return text
    if get_ipython() is not None:
        myst_glue(name, text, display=False)
    return text


@dataclass(frozen=True)
class Paired:
    """A method against a baseline on the same episodes (percent).

    Attributes:
        method, baseline: ``(mean, std)`` over the seeds (population std, as the tables).
        diff: ``(mean, std)`` of the per-seed difference ``method - baseline``.
        diffs: the per-seed differences, in seed order.
        seeds: the seeds, in order.
    """

    method: tuple[float, float]
    baseline: tuple[float, float]
    diff: tuple[float, float]
    diffs: tuple[float, ...]
    seeds: tuple[int, ...]

    def text(self, part: str = "diff", ndigits: int = 1) -> str:
        """``"mean ± std"`` of ``part`` (``"method"``, ``"baseline"`` or ``"diff"``, signed)."""
        mean, std = getattr(self, part)
        if round(mean, ndigits) == 0:
            mean = 0.0  # a difference that rounds to zero prints "0.0", never "-0.0"
        sign = "+" if part == "diff" and round(mean, ndigits) > 0 else ""
        return f"{sign}{mean:.{ndigits}f} ± {std:.{ndigits}f}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def paired(
    frame: Any,
    method: str,
    baseline: str,
    metric: str = "test_accuracy",
    where: Mapping[str, Any] | None = None,
) -> Paired:
    """Compare two labels of a sweep frame episode by episode.

    Args:
        frame: a :func:`~fewclip_tutorial.sweep.run_sweep` frame (``label``, ``dataset``,
            ``shots``, ``seed`` and ``metric`` columns).
        method, baseline: two labels of ``frame``.
        metric: the column compared.
        where: ``{column: value}`` filters applied first (e.g. ``{"shots": 16}``).

    Raises:
        ValueError: a label is missing, or the two do not cover the same episodes.
    """
    rows = frame
    for column, value in (where or {}).items():
        rows = rows[rows[column] == value]
    keys = ["dataset", "shots", "seed"]
    sides = {}
    for label in (method, baseline):
        part = rows[rows["label"] == label]
        if part.empty:
            known = sorted(set(rows["label"]))
            raise ValueError(f"no rows labelled {label!r} (filters {where}); labels: {known}.")
        sides[label] = part.set_index(keys)[metric].sort_index()
    a, b = sides[method], sides[baseline]
    if list(a.index) != list(b.index):
        raise ValueError(
            f"{method!r} and {baseline!r} ran on different episodes: {sorted(set(a.index))} "
            f"against {sorted(set(b.index))}; compare them on the same sweep."
        )
    diffs = [float(x - y) for x, y in zip(a, b, strict=True)]
    return Paired(
        method=_mean_std([float(x) for x in a]),
        baseline=_mean_std([float(x) for x in b]),
        diff=_mean_std(diffs),
        diffs=tuple(diffs),
        seeds=tuple(int(i[-1]) for i in a.index),
    )


def verdict(diffs: Sequence[float], margin: float = 0.0) -> str:
    """The book's verdict on "the method beats the baseline", from paired differences.

    * ``"reproduced"``: the method is ahead by more than ``margin`` on every episode;
    * ``"not reproduced"``: its mean difference is at most ``margin``;
    * ``"partly"``: ahead on average, but not on every episode.

    ``margin`` is the smallest difference that counts (e.g. one test image in percent).
    """
    if not diffs:
        raise ValueError("verdict needs at least one paired difference.")
    if all(d > margin for d in diffs):
        return "reproduced"
    if sum(diffs) / len(diffs) <= margin:
        return "not reproduced"
    return "partly"


def glue_paired(prefix: str, p: Paired, margin: float = 0.0, ndigits: int = 1) -> str:
    """Glue one claim's numbers: ``<prefix>_m`` and ``<prefix>_b`` (method and baseline,
    mean ± std), ``<prefix>_d`` (the paired difference, signed) and ``<prefix>_v`` (the
    :func:`verdict`, with ``margin``).

    Returns:
        The verdict.
    """
    for part, suffix in (("method", "m"), ("baseline", "b"), ("diff", "d")):
        glue(f"{prefix}_{suffix}", p.text(part, ndigits))
    return glue(f"{prefix}_v", verdict(p.diffs, margin))


def styled(
    table: Any,
    decimals: int = 1,
    best: str | None = "max",
    axis: int = 0,
    caption: str | None = None,
) -> Any:
    """A DataFrame as the book shows tables: fixed decimals, readable headers, the best
    value of each column (``axis=0``) or row (``axis=1``) in bold, empty cells as "–".

    Args:
        best: ``"max"``, ``"min"`` or ``None`` (no bold).
    """
    frame = table.copy()
    rename = {c: str(c).replace("_", " ") for c in frame.columns}
    frame = frame.rename(columns=rename)
    styler = frame.style.format(precision=decimals, na_rep="–", thousands=",")
    numeric = frame.select_dtypes("number").columns
    if best is not None and len(numeric):
        if best not in ("max", "min"):
            raise ValueError(f"best={best!r}: use 'max', 'min' or None.")
        highlight = styler.highlight_max if best == "max" else styler.highlight_min
        styler = highlight(subset=list(numeric), axis=axis, props="font-weight: bold")
    if caption:
        styler = styler.set_caption(caption)
    return styler.set_table_styles(
        [
            {"selector": "th, td", "props": "padding: 0.2em 0.6em; text-align: right"},
            {"selector": "caption", "props": "caption-side: bottom; text-align: left"},
        ]
    )
