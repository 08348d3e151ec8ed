"""Portable checks of trained numbers in the book's notebooks.

Training on a CPU is deterministic on one machine, but its last digits depend on the
instruction set (AVX2, AVX-512) and on the number of threads.  nbval compares every
output exactly, so a cell that prints a *trained* number follows one rule:

1. it carries nbval's cell tag ``nbval-ignore-output`` (nbval runs it but does not compare
   its output);
2. a cell after it, tagged ``remove-cell`` (run by nbval and ``make book``, hidden from the
   reader), calls :func:`assert_committed` with the values committed with the book and a
   tolerance stated there, so CI still fails when a number moves by more than that.

``scripts/tidy_notebooks.py`` (``make format``) turns a first-line ``# NBVAL_IGNORE_OUTPUT``
into the tag and moves the checks into the hidden cell.

Deterministic outputs (data, splits, closed-form results, zero-shot scores) stay
compared exactly.

Examples:
    >>> assert_committed({"test": 97.4}, {"test": 97.5}, tol=0.5, what="Tip-Adapter")
    >>> assert_committed({"test": 90.0}, {"test": 97.5}, tol=0.5, what="Tip-Adapter")
    Traceback (most recent call last):
    ...
    AssertionError: Tip-Adapter: test = 90 moved by 7.5 from the committed 97.5 (tolerance 0.5). ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["assert_committed"]


def _flatten(values: Mapping, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in values.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{name} / "))
        else:
            out[name] = float(v)
    return out


def assert_committed(
    measured: Mapping, committed: Mapping, tol: float | Mapping[str, float], what: str = "result"
) -> None:
    """Assert that trained numbers are within ``tol`` of the values committed with the book.

    Args:
        measured: ``name -> number`` (nested mappings are flattened as ``"outer / inner"``).
        committed: the same names with the committed values; every committed name must be
            measured (extra measured names are not checked).
        tol: an absolute tolerance, or one per committed name (missing names use 0).
        what: names the result in the error message.

    Raises:
        AssertionError: listing every number that moved, with the way out.
    """
    got, want = _flatten(measured), _flatten(committed)
    missing = sorted(set(want) - set(got))
    if missing:
        raise AssertionError(f"{what}: no measured value for {missing}; measured {sorted(got)}.")
    problems = []
    for name, ref in want.items():
        t = float(tol.get(name, 0.0)) if isinstance(tol, Mapping) else float(tol)
        value = got[name]
        if math.isnan(value) or abs(value - ref) > t + 1e-9:
            problems.append(
                f"{name} = {value:g} moved by {abs(value - ref):.3g} from the committed {ref:g} "
                f"(tolerance {t:g})"
            )
    if problems:
        raise AssertionError(
            f"{what}: "
            + "; ".join(problems)
            + ". If the method changed on purpose, re-execute the notebook "
            "(python scripts/execute_notebooks.py book/<chapter>.ipynb) and update the "
            "committed values in this cell."
        )
