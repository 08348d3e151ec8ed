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

The committed values are those of the embedded default on a CPU, as CI runs the book.
Anywhere else (a GPU, ``SETUP = "colab"`` or another dataset or backbone, Google Colab)
they cannot hold, so :func:`assert_committed` and :func:`expect` print the difference in
one line and let the chapter go on (:func:`strict_checks` says which applies;
``FEWCLIP_COMMITTED_CHECKS=strict`` or ``=report`` in the environment decides instead).

Examples:
    >>> assert_committed({"test": 97.4}, {"test": 97.5}, tol=0.5, what="Tip-Adapter")
    >>> assert_committed({"test": 90.0}, {"test": 97.5}, tol=0.5, what="Tip-Adapter")
    Traceback (most recent call last):
    ...
    AssertionError: Tip-Adapter: test = 90 moved by 7.5 from the committed 97.5 (tolerance 0.5). ...
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping

__all__ = ["assert_committed", "expect", "strict_checks"]

_ENV = "FEWCLIP_COMMITTED_CHECKS"


def strict_checks() -> tuple[bool, str]:
    """``(strict, why not)``: whether the committed values can hold here.

    Strict on a CPU running the embedded default (the setup of the last
    :func:`~fewclip_tutorial.settings.get_setup`), outside Google Colab.  The environment
    variable ``FEWCLIP_COMMITTED_CHECKS`` (``strict`` or ``report``) overrides this.
    """
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced in ("strict", "report"):
        return forced == "strict", f"{_ENV}={forced}"
    if forced:
        raise ValueError(f"{_ENV}={forced!r} is unknown; set it to 'strict' or 'report'.")
    from fewclip_tutorial.settings import runs_embedded_default

    if "google.colab" in sys.modules:
        return False, "running on Google Colab"
    if not runs_embedded_default():
        return False, "not the embedded default setup"
    import torch

    if torch.cuda.is_available():
        return False, "a GPU is present"
    return True, ""


def _fail(message: str) -> None:
    """Raise where the committed values can hold, else print one line and go on."""
    strict, why = strict_checks()
    if strict:
        raise AssertionError(message)
    print(f"[not checked: {why}] {message.split('. If ')[0]}")


def expect(condition: object, message: str) -> None:
    """A self-consistency check of a chapter: ``assert condition, message`` where the
    committed values can hold (:func:`strict_checks`), else one printed line."""
    if not message:
        raise ValueError("expect() needs a message that says what should hold.")
    if not condition:
        _fail(message)


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
        AssertionError: listing every number that moved, with the way out, where the
            committed values can hold (:func:`strict_checks`); elsewhere the same text is
            printed on one line and the chapter goes on.
    """
    got, want = _flatten(measured), _flatten(committed)
    missing = sorted(set(want) - set(got))
    if missing:
        _fail(f"{what}: no measured value for {missing}; measured {sorted(got)}.")
        return
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
        _fail(
            f"{what}: "
            + "; ".join(problems)
            + ". If the method changed on purpose, re-execute the notebook "
            "(python scripts/execute_notebooks.py book/<chapter>.ipynb) and update the "
            "committed values in this cell."
        )
