"""Self-checking notebook exercises.

A chapter asks the reader to write a small tensor function (say, the prompt
ensemble) and then checks it against the package's reference implementation on
random inputs::

    from fewclip_tutorial.course.exercises import get_exercise

    ex = get_exercise("zero_shot_logits")
    print(ex.description)
    ex.check(my_zero_shot_logits)      # prints feedback, returns True/False
    print(ex.solution_source())        # the reference code, when stuck (book edition only)

The chapters' exercises are registered with :func:`register_exercise` by
:mod:`fewclip_tutorial.course.catalog`, which refers to the methods (imported with the
:mod:`fewclip_tutorial.course` package).  The checker compares outputs structurally: type,
shape, dtype, then values (``atol``/``rtol``), and reports the first trial that
fails with its input shapes, the maximum absolute error, or the exception.

In a notebook the check runs on the fixed seeds ``0 .. n_trials - 1`` so that the
feedback printed in the book is reproducible.  The course grader
(:mod:`fewclip_tutorial.course.grading`) draws fresh inputs per run with
:meth:`Exercise.trial_inputs` and refuses a submission that calls one of
:meth:`Exercise.forbidden_functions` (the package's own answer).

The *student edition* of the notebooks (``make assignments``) calls
``set_edition("student")``, which makes :meth:`Exercise.solution_source` refuse;
the environment variable ``FEWCLIP_EDITION=student`` does the same.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import os
import textwrap
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "EDITIONS",
    "Exercise",
    "Opaque",
    "ReferenceHiddenError",
    "SolutionsHiddenError",
    "UnknownExerciseError",
    "check",
    "compare_outputs",
    "edition",
    "get_exercise",
    "list_exercises",
    "register_exercise",
    "set_edition",
]

InputMaker = Callable[[torch.Generator], Any]


class UnknownExerciseError(KeyError):
    """No exercise is registered under this name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SolutionsHiddenError(RuntimeError):
    """The student edition does not print reference solutions."""


class ReferenceHiddenError(RuntimeError):
    """A reference solution called while the grader grades its exercise.

    Inside the grader's sandbox the package is a copy in which the graded exercises'
    reference functions (:meth:`Exercise.forbidden_functions`) are stubs that raise this:
    their code is not there to call, reload or read.
    """

    def __init__(self, function: str, exercises: Sequence[str]) -> None:
        super().__init__(function, tuple(exercises))
        self.function = function
        self.exercises = tuple(exercises)

    def __str__(self) -> str:
        now = GRADING[0]
        which = now if now in self.exercises else " / ".join(self.exercises)
        return (
            f"{self.function} is the package's reference solution: it is not available "
            f"while grading {which}; write your own"
        )


#: inside the grader's sandbox: ``[the exercise being graded or None]`` and every stub of a
#: reference that was called, as ``(function, exercises it is forbidden for)``
GRADING: list[str | None] = [None]
HIDDEN_CALLS: list[tuple[str, tuple[str, ...]]] = []


def _reference_hidden(function: str, exercises: Sequence[str]) -> ReferenceHiddenError:
    """What a stub of a reference raises (see :class:`ReferenceHiddenError`); noted first."""
    HIDDEN_CALLS.append((function, tuple(exercises)))
    return ReferenceHiddenError(function, exercises)


# --------------------------------------------------------------------------- edition

#: ``"book"``: the published book (reference solutions one click away);
#: ``"student"``: the handed-out assignment (no reference solutions).
EDITIONS: tuple[str, ...] = ("book", "student")
_EDITION: str | None = None


def set_edition(name: str) -> None:
    """Switch this kernel to the ``"book"`` or the ``"student"`` edition.

    The student edition's notebooks call ``set_edition("student")`` in their first
    code cell; :meth:`Exercise.solution_source` then refuses.
    """
    global _EDITION
    if name not in EDITIONS:
        raise ValueError(f"Unknown edition {name!r}; use one of {', '.join(EDITIONS)}.")
    _EDITION = name


def edition() -> str:
    """The current edition: set by :func:`set_edition`, else ``$FEWCLIP_EDITION``, else "book"."""
    if _EDITION is not None:
        return _EDITION
    env = os.environ.get("FEWCLIP_EDITION", "").strip().lower()
    return env if env in EDITIONS else "book"


# --------------------------------------------------------------------------- comparison


class Opaque:
    """Stands for a value that could not be sent back from a graded submission.

    The grader (:mod:`fewclip_tutorial.course.grading`) only accepts tensors, numbers,
    strings and containers of them from a student's process; anything else arrives
    as its description, so that the feedback still names what the function returned.
    """

    def __init__(self, description: str) -> None:
        self.description = description

    def __repr__(self) -> str:
        return self.description

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__


def _describe(x: Any) -> str:
    if isinstance(x, Opaque):
        return x.description
    if isinstance(x, Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype})"
    if isinstance(x, np.ndarray):
        return f"ndarray(shape={x.shape}, dtype={x.dtype})"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__}[{', '.join(_describe(v) for v in x)}]"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in x.items()) + "}"
    return (
        f"{type(x).__name__}({x!r})" if isinstance(x, (int, float, bool, str)) else type(x).__name__
    )


def compare_outputs(
    got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-4, where: str = "output"
) -> str | None:
    """Compare a student's output with the reference output.

    Handles tensors, NumPy arrays, numbers, and (nested) tuples/lists/dicts.

    Returns:
        ``None`` when they match, else a one-paragraph explanation of the first mismatch.
    """
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor):
            return f"{where} should be a torch.Tensor, but it is {_describe(got)}."
        if tuple(got.shape) != tuple(expected.shape):
            return (
                f"{where} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}. "
                "Check which dimension you reduce over, and transposes."
            )
        if got.dtype != expected.dtype:
            return f"{where} has dtype {got.dtype}, expected {expected.dtype}."
        g = got.detach().cpu()
        e = expected.detach().cpu()
        if e.dtype == torch.bool or not (e.is_floating_point() or e.is_complex()):
            n_bad = int((g != e).sum())
            if n_bad:
                return f"{where}: {n_bad} of {e.numel()} entries differ from the reference."
            return None
        if torch.isnan(g).any() and not torch.isnan(e).any():
            return f"{where} contains NaN values; the reference does not."
        if not torch.allclose(g, e, atol=atol, rtol=rtol, equal_nan=True):
            diff = (g - e).abs().nan_to_num(0.0)
            idx = np.unravel_index(int(diff.argmax()), tuple(e.shape)) if e.ndim else ()
            idx_t = tuple(int(i) for i in idx)
            ratio = ""
            denom = e.abs().sum()
            if float(denom) > 0:
                r = float((g * e).sum() / (e * e).sum())
                if abs(r - 1) > 1e-3 and torch.allclose(g, r * e, atol=atol * 10, rtol=rtol * 10):
                    ratio = f" Your values are the reference times {r:.4g}: a missing scale factor?"
            return (
                f"{where} values differ: max abs error {float(diff.max()):.3g} at index "
                f"{idx_t} (got {float(g[idx_t]):.6g}, expected {float(e[idx_t]):.6g}; "
                f"tolerance atol={atol:g}, rtol={rtol:g}).{ratio}"
            )
        return None
    if isinstance(expected, np.ndarray):
        return compare_outputs(
            torch.as_tensor(np.asarray(got)) if not isinstance(got, Tensor) else got,
            torch.as_tensor(expected),
            atol,
            rtol,
            where,
        )
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping):
            return f"{where} should be a dict, but it is {_describe(got)}."
        if set(got) != set(expected):
            return f"{where} has keys {sorted(got)}, expected {sorted(expected)}."
        for k in expected:
            problem = compare_outputs(got[k], expected[k], atol, rtol, f"{where}[{k!r}]")
            if problem:
                return problem
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return f"{where} should be a {type(expected).__name__}, but it is {_describe(got)}."
        if len(got) != len(expected):
            return f"{where} has {len(got)} elements, expected {len(expected)}."
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            problem = compare_outputs(g, e, atol, rtol, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        if isinstance(got, Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, (int, float, np.number)) or isinstance(got, bool):
            return f"{where} should be a number, but it is {_describe(got)}."
        if not math.isclose(float(got), float(expected), rel_tol=rtol, abs_tol=atol):
            return f"{where} is {got!r}, expected {expected!r}."
        return None
    if got != expected:
        return f"{where} is {got!r}, expected {expected!r}."
    return None


def _clone(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, tuple):
        return tuple(_clone(v) for v in x)
    if isinstance(x, list):
        return [_clone(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _call(fn: Callable, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    if isinstance(inputs, tuple):
        return fn(*inputs)
    return fn(inputs)


def check(
    student_fn: Callable,
    reference_fn: Callable,
    make_inputs: InputMaker,
    n_trials: int = 5,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    name: str = "exercise",
    seed: int = 0,
    verbose: bool = True,
) -> bool:
    """Run ``student_fn`` and ``reference_fn`` on random inputs and compare.

    Args:
        student_fn: the reader's function.
        reference_fn: the package's implementation.
        make_inputs: ``generator -> inputs``; a tuple is passed as positional
            arguments, a dict as keyword arguments, anything else as one argument.
        n_trials: number of random input sets (trial ``t`` uses seed ``seed + t``).
        atol, rtol: tolerances for floating-point tensors.
        name: shown in the feedback.
        seed: first generator seed.
        verbose: print the feedback.

    Returns:
        ``True`` if every trial matches; otherwise prints what went wrong in the
        first failing trial (shape/dtype mismatch, max abs error, the exception,
        or an in-place modification of an input) and returns ``False``.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}.")

    def say(msg: str) -> None:
        if verbose:
            print(msg)

    for trial in range(n_trials):
        inputs = make_inputs(torch.Generator().manual_seed(seed + trial))
        expected = _call(reference_fn, _clone(inputs))
        student_inputs = _clone(inputs)
        shown = _describe(inputs)
        try:
            got = _call(student_fn, student_inputs)
        except Exception as err:  # noqa: BLE001 - any error of the student's code is feedback
            say(
                f"✗ {name}: trial {trial + 1}/{n_trials} raised "
                f"{type(err).__name__}: {err}\n  inputs: {shown}"
            )
            return False
        problem = compare_outputs(got, expected, atol=atol, rtol=rtol)
        if problem is None and compare_outputs(student_inputs, inputs, atol=0, rtol=0):
            problem = "your function modified its input in place; work on a copy instead."
        if problem is not None:
            say(f"✗ {name}: trial {trial + 1}/{n_trials} failed: {problem}\n  inputs: {shown}")
            return False
    say(f"✓ {name}: correct on all {n_trials} random trials.")
    return True


# --------------------------------------------------------------------------- registry


@dataclass
class Exercise:
    """A registered exercise: a reference function plus its random-input maker.

    ``points`` is what the grader awards when every trial matches.  ``forbidden``
    lists package functions a submission may not call besides the reference
    itself (see :meth:`forbidden_functions`).
    """

    name: str
    reference_fn: Callable
    make_inputs: InputMaker
    description: str = ""
    hint: str = ""
    n_trials: int = 5
    atol: float = 1e-5
    rtol: float = 1e-4
    points: float = 1.0
    forbidden: tuple[Callable, ...] = ()

    def check(
        self,
        student_fn: Callable,
        verbose: bool = True,
        seed: int = 0,
        n_trials: int | None = None,
    ) -> bool:
        """Compare ``student_fn`` with the reference on random inputs (see :func:`check`).

        ``seed`` and ``n_trials`` default to the notebook's reproducible trials
        (seeds ``0 .. n_trials - 1``).  In the student edition, handing in the
        package's own function (see :meth:`forbidden_functions`) fails, as it does
        in the grader.
        """
        if edition() == "student" and _unwrap(student_fn) in self.forbidden_functions():
            if verbose:
                print(
                    f"✗ {self.name}: this is the package's own function; write your own "
                    "(the grader gives the package's answer zero)."
                )
            return False
        ok = check(
            student_fn,
            self.reference_fn,
            self.make_inputs,
            n_trials=self.n_trials if n_trials is None else n_trials,
            atol=self.atol,
            rtol=self.rtol,
            name=self.name,
            seed=seed,
            verbose=verbose,
        )
        if not ok and self.hint and verbose:
            print(f"  hint: {self.hint}")
        return ok

    def trial_inputs(self, seed: int, n_trials: int | None = None) -> list[Any]:
        """The inputs of trials ``seed, seed + 1, ...`` (what :meth:`check` feeds)."""
        n = self.n_trials if n_trials is None else n_trials
        return [self.make_inputs(torch.Generator().manual_seed(seed + t)) for t in range(n)]

    def solution_source(self) -> str:
        """The source code of the reference implementation (book edition only).

        Raises:
            SolutionsHiddenError: in the student edition (see :func:`set_edition`).
        """
        if edition() == "student":
            raise SolutionsHiddenError(
                f"This is the student edition: the reference solution of {self.name!r} is not "
                "shown. Use the hint (get_exercise(...).hint) or ask your instructor."
            )
        return inspect.getsource(self.reference_fn)

    def forbidden_functions(self) -> list[Callable]:
        """Package functions a graded submission must not call.

        The reference function itself, every function it calls directly that is
        defined in the same module (for a thin wrapper such as
        ``_exercise_ocd_reference`` that is the real implementation,
        ``delete_color``), and the exercise's explicit ``forbidden`` list.
        Functions of *other* modules (an earlier chapter's ``prompt_ensemble``
        inside ``spurious_prototypes``) stay allowed as building blocks.
        """
        ref = _unwrap(self.reference_fn)
        found: list[Callable] = [ref]
        for fn in (*_same_module_callees(ref), *map(_unwrap, self.forbidden)):
            if fn not in found:
                found.append(fn)
        return found

    def example_inputs(self, seed: int = 0) -> Any:
        """One set of random inputs, to try a function by hand."""
        return self.make_inputs(torch.Generator().manual_seed(seed))


def _unwrap(fn: Callable) -> Callable:
    fn = inspect.unwrap(fn)
    return getattr(fn, "__func__", fn)


def _same_module_callees(fn: Callable) -> list[Callable]:
    """Plain functions that ``fn`` calls by name and that live in ``fn``'s own module."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return []
    module = getattr(fn, "__module__", None)
    namespace = getattr(fn, "__globals__", {})
    out: list[Callable] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target: Any = None
        if isinstance(node.func, ast.Name):
            target = namespace.get(node.func.id)
        elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            owner = namespace.get(node.func.value.id)
            if isinstance(owner, types.ModuleType):
                target = getattr(owner, node.func.attr, None)
        if (
            isinstance(target, types.FunctionType)
            and target.__module__ == module
            and target is not fn
            and target not in out
        ):
            out.append(target)
    return out


_EXERCISES: dict[str, Exercise] = {}


def register_exercise(
    name: str,
    reference_fn: Callable,
    make_inputs: InputMaker,
    description: str = "",
    hint: str = "",
    n_trials: int = 5,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    *,
    points: float = 1.0,
    forbidden: Sequence[Callable] = (),
) -> Exercise:
    """Register an exercise under ``name`` and return it.

    Args:
        name: the key readers pass to :func:`get_exercise`.
        reference_fn: the package's answer.
        make_inputs: ``torch.Generator -> inputs`` (a tuple is passed as positional
            arguments, a dict as keywords); must draw every random number from the generator.
        description, hint: shown to the reader.
        n_trials, atol, rtol: see :func:`check`.
        points: what the grader awards for this exercise.
        forbidden: further package functions a submission may not call (the
            reference and its same-module callees are always forbidden).

    Re-registering the same reference function (a module reloaded in a notebook)
    replaces the entry; a *different* function under a taken name is an error.
    """
    old = _EXERCISES.get(name)
    if old is not None:
        same = (old.reference_fn.__module__, old.reference_fn.__qualname__) == (
            reference_fn.__module__,
            reference_fn.__qualname__,
        )
        if not same:
            raise ValueError(
                f"Exercise {name!r} is already registered with "
                f"{old.reference_fn.__module__}.{old.reference_fn.__qualname__}; pick another name."
            )
    ex = Exercise(
        name=name,
        reference_fn=reference_fn,
        make_inputs=make_inputs,
        description=description or (inspect.getdoc(reference_fn) or "").split("\n\n")[0],
        hint=hint,
        n_trials=n_trials,
        atol=atol,
        rtol=rtol,
        points=float(points),
        forbidden=tuple(forbidden),
    )
    _EXERCISES[name] = ex
    return ex


def list_exercises() -> list[str]:
    """Names of every registered exercise (:mod:`fewclip_tutorial.course.catalog` registers
    the chapters' exercises when :mod:`fewclip_tutorial.course` is imported)."""
    return sorted(_EXERCISES)


def get_exercise(name: str) -> Exercise:
    """The exercise registered as ``name``.

    Raises:
        UnknownExerciseError: with close matches and the list of exercises.
    """
    if name not in _EXERCISES:
        names: Sequence[str] = sorted(_EXERCISES)
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownExerciseError(
            f"No exercise named {name!r}.{hint} Available: {', '.join(names)}"
        )
    return _EXERCISES[name]
