"""Tests of fewclip_tutorial.course.exercises: the checker must reject wrong answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewclip_tutorial.course import catalog
from fewclip_tutorial.course import exercises as exmod
from fewclip_tutorial.course.exercises import (
    UnknownExerciseError,
    check,
    compare_outputs,
    get_exercise,
    register_exercise,
)
from fewclip_tutorial.zeroshot import prompt_ensemble, zero_shot_logits


def test_references_pass_their_own_exercises(capsys: pytest.CaptureFixture[str]) -> None:
    assert get_exercise("prompt_ensemble").check(prompt_ensemble)
    assert get_exercise("zero_shot_logits").check(zero_shot_logits)
    out = capsys.readouterr().out
    assert out.count("✓") == 2 and "✗" not in out


def test_a_correct_student_solution_written_differently_passes() -> None:
    def student(t: torch.Tensor) -> torch.Tensor:
        t = t / t.norm(dim=2, keepdim=True)
        m = t.sum(1) / t.shape[1]
        return m / m.norm(dim=1, keepdim=True)

    assert get_exercise("prompt_ensemble").check(student, verbose=False)


@pytest.mark.parametrize(
    ("wrong", "expected_feedback"),
    [
        (lambda t: F.normalize(t.mean(0), dim=-1), "shape"),  # averaged over classes
        (lambda t: F.normalize(t.mean(1), dim=-1), "values differ"),  # forgot per-prompt norm
        (lambda t: F.normalize(t, dim=-1).mean(1), "values differ"),  # forgot final norm
        (lambda t: prompt_ensemble(t).double(), "dtype"),
        (lambda t: prompt_ensemble(t).tolist(), "torch.Tensor"),
    ],
)
def test_wrong_prompt_ensembles_are_rejected(
    wrong, expected_feedback: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not get_exercise("prompt_ensemble").check(wrong)
    out = capsys.readouterr().out
    assert "✗ prompt_ensemble: trial 1/5" in out
    assert expected_feedback in out
    assert "inputs: tuple[Tensor(shape=(" in out
    assert "hint:" in out


def test_off_by_scale_is_rejected_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    def no_scale(f: torch.Tensor, W: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
        return f @ W.T

    assert not get_exercise("zero_shot_logits").check(no_scale)
    out = capsys.readouterr().out
    assert "max abs error" in out and "missing scale factor" in out


def test_hard_coded_scale_is_rejected() -> None:
    def hard_coded(f: torch.Tensor, W: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
        return 100.0 * f @ W.T

    assert not get_exercise("zero_shot_logits").check(hard_coded, verbose=False)


def test_transposed_classifier_is_a_shape_error(capsys: pytest.CaptureFixture[str]) -> None:
    def transposed(f: torch.Tensor, W: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
        return logit_scale * (f @ W.T).T

    assert not get_exercise("zero_shot_logits").check(transposed)
    assert "shape" in capsys.readouterr().out


def test_exceptions_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    def broken(f: torch.Tensor, W: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
        return f @ W  # (N, D) @ (C, D): a matmul shape error

    assert not get_exercise("zero_shot_logits").check(broken)
    out = capsys.readouterr().out
    assert "trial 1/5 raised RuntimeError" in out


def test_in_place_modification_of_inputs_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    def in_place(t: torch.Tensor) -> torch.Tensor:
        t /= t.norm(dim=-1, keepdim=True)  # right answer, but mutates the caller's tensor
        return F.normalize(t.mean(1), dim=-1)

    assert not get_exercise("prompt_ensemble").check(in_place)
    assert "in place" in capsys.readouterr().out


def test_later_trial_failures_are_found() -> None:
    # Correct only for a single template: the random inputs always have M >= 2 ...
    def only_first(t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t[:, 0], dim=-1)

    assert not check(only_first, prompt_ensemble, catalog._prompt_ensemble_inputs, verbose=False)
    # ... and a student that is wrong only for big inputs fails on some trial, not all.
    calls = {"n": 0}

    def wrong_on_third(t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = prompt_ensemble(t)
        return out if calls["n"] != 3 else out + 1e-2

    assert not check(wrong_on_third, prompt_ensemble, catalog._prompt_ensemble_inputs, n_trials=5)
    assert calls["n"] == 3  # stopped at the first failing trial


def test_check_passes_dict_inputs_as_keywords_and_rejects_zero_trials() -> None:
    def make(g: torch.Generator) -> dict:
        return {"a": torch.randn(3, generator=g), "b": 2.0}

    def ref(a: torch.Tensor, b: float) -> torch.Tensor:
        return a * b

    assert check(lambda a, b: b * a, ref, make, verbose=False)
    assert not check(lambda a, b: a + b, ref, make, verbose=False)
    with pytest.raises(ValueError, match="n_trials"):
        check(ref, ref, make, n_trials=0)


def test_compare_outputs_structures() -> None:
    t = torch.ones(2)
    assert compare_outputs((t, {"x": 1.0}), (t.clone(), {"x": 1.0})) is None
    assert "1 elements, expected 2" in compare_outputs((t,), (t, t))
    assert "keys" in compare_outputs({"y": t}, {"x": t})
    assert "expected 2.0" in compare_outputs(1.0, 2.0)
    assert "differ" in compare_outputs(torch.tensor([1, 2]), torch.tensor([1, 3]))
    assert "NaN" in compare_outputs(torch.tensor([float("nan")]), torch.tensor([0.0]))


def test_solution_source_and_registry() -> None:
    ex = get_exercise("prompt_ensemble")
    assert ex.solution_source().lstrip().startswith("def prompt_ensemble(")
    assert "(C, M, D)" in ex.description
    inputs = ex.example_inputs(0)
    assert isinstance(inputs, tuple) and inputs[0].ndim == 3
    assert {"prompt_ensemble", "zero_shot_logits"} <= set(exmod.list_exercises())
    with pytest.raises(UnknownExerciseError, match="Did you mean 'zero_shot_logits'") as info:
        get_exercise("zero_shot_logit")
    assert isinstance(info.value, KeyError)


def test_register_exercise_conflicts() -> None:
    def _ref_for_test(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def _other(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    try:
        ex = register_exercise(
            "_test_double", _ref_for_test, lambda g: (torch.randn(2, generator=g),)
        )
        assert get_exercise("_test_double") is ex
        # Re-registering the same function (a notebook reload) is fine.
        register_exercise("_test_double", _ref_for_test, lambda g: (torch.randn(3, generator=g),))
        with pytest.raises(ValueError, match="already registered"):
            register_exercise("_test_double", _other, lambda g: (torch.randn(2, generator=g),))
        assert get_exercise("_test_double").check(lambda x: x + x, verbose=False)
        assert not get_exercise("_test_double").check(_other, verbose=False)
    finally:
        exmod._EXERCISES.pop("_test_double", None)


# --------------------------------------------------------------------------- grading support


def test_check_seed_draws_other_trials_than_the_notebook() -> None:
    ex = get_exercise("prompt_ensemble")
    seen = {t[0].numpy().tobytes(): prompt_ensemble(t[0]) for t in ex.trial_inputs(0)}

    def memorised(t: torch.Tensor) -> torch.Tensor:  # right only on the notebook's trials
        return seen.get(t.numpy().tobytes(), torch.zeros(t.shape[0], t.shape[2]))

    assert ex.check(memorised, verbose=False)  # seeds 0-4, as printed in the book
    assert not ex.check(memorised, verbose=False, seed=1000)
    assert ex.check(prompt_ensemble, verbose=False, seed=1000, n_trials=2)
    a = ex.trial_inputs(7, 3)
    assert len(a) == 3 and torch.equal(a[1][0], ex.example_inputs(8)[0])


def test_forbidden_functions_reach_through_thin_wrappers() -> None:
    from fewclip_tutorial.methods import clap, fd_align

    ocd = get_exercise("prompt_augmentation").forbidden_functions()
    assert ocd[0] is get_exercise("prompt_augmentation").reference_fn
    assert clap.delete_color in ocd  # the wrapper's same-module callee is the real answer
    protos = get_exercise("spurious_prototypes").forbidden_functions()
    assert fd_align.spurious_prototypes in protos
    assert prompt_ensemble not in protos  # an earlier chapter's building block stays allowed
    assert get_exercise("zero_shot_logits").forbidden_functions() == [zero_shot_logits]


def test_register_exercise_points_and_explicit_forbidden() -> None:
    def _ref_for_points(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    try:
        ex = register_exercise(
            "_test_points",
            _ref_for_points,
            lambda g: (torch.randn(2, generator=g),),
            points=2.5,
            forbidden=[prompt_ensemble],
        )
        assert ex.points == 2.5
        assert ex.forbidden_functions() == [_ref_for_points, prompt_ensemble]
        assert get_exercise("_test_points").check(lambda x: 1 + x, verbose=False)
    finally:
        exmod._EXERCISES.pop("_test_points", None)


def test_editions_and_opaque_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exmod, "_EDITION", None)
    monkeypatch.setenv("FEWCLIP_EDITION", "nonsense")
    assert exmod.edition() == "book"
    with pytest.raises(ValueError, match="Unknown edition 'teacher'"):
        exmod.set_edition("teacher")
    exmod.set_edition("student")
    assert exmod.edition() == "student"
    with pytest.raises(exmod.SolutionsHiddenError, match="prompt_ensemble"):
        get_exercise("prompt_ensemble").solution_source()
    assert not get_exercise("prompt_ensemble").check(prompt_ensemble)  # the package's own
    weird = exmod.Opaque("Generator")
    assert "should be a torch.Tensor, but it is Generator" in compare_outputs(weird, torch.ones(1))
    assert "expected 'x'" in compare_outputs(weird, "x")
