"""The notebooks' check of trained numbers against committed values."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fewclip_tutorial.course.nbcheck import assert_committed, expect, strict_checks


def test_within_tolerance_passes_and_beyond_fails_naming_the_number():
    assert_committed({"a": 1.0, "b": {"x": 2.0}}, {"a": 1.4, "b": {"x": 2.0}}, tol=0.5)
    with pytest.raises(AssertionError, match=r"b / x = 3 moved by 1 .*re-execute"):
        assert_committed({"a": 1.0, "b": {"x": 3.0}}, {"a": 1.0, "b": {"x": 2.0}}, tol=0.5)


def test_per_name_tolerances_and_missing_values():
    assert_committed({"val": 90.0, "test": 68.0}, {"val": 85.0, "test": 68.0}, {"val": 5.0})
    with pytest.raises(AssertionError, match="test"):
        assert_committed({"val": 90.0, "test": 68.5}, {"val": 90.0, "test": 68.0}, {"val": 5.0})
    with pytest.raises(AssertionError, match="no measured value"):
        assert_committed({"val": 90.0}, {"test": 68.0}, tol=1.0)
    with pytest.raises(AssertionError, match="nan"):
        assert_committed({"test": float("nan")}, {"test": 68.0}, tol=1.0)


# ------------------------------------------------------------- where the values can hold


@pytest.fixture
def embedded_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The setting CI runs: the embedded default on a CPU, outside Colab."""
    from fewclip_tutorial import settings

    monkeypatch.delenv("FEWCLIP_COMMITTED_CHECKS", raising=False)
    monkeypatch.delenv("FEWCLIP_SETUP", raising=False)
    monkeypatch.setattr(settings, "_LAST", None)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_strict_on_the_embedded_default_on_a_cpu(embedded_cpu: None) -> None:
    from fewclip_tutorial.settings import get_setup

    assert strict_checks() == (True, "")
    get_setup("embedded", seeds=(1,))  # other seeds: still the embedded world
    assert strict_checks()[0]
    with pytest.raises(AssertionError, match="moved by"):
        assert_committed({"a": 3.0}, {"a": 1.0}, tol=0.5)
    with pytest.raises(AssertionError, match="the kept step"):
        expect(False, "the kept step")


@pytest.mark.parametrize("where", ["gpu", "colab", "colab-setup", "other-dataset", "env"])
def test_elsewhere_a_moved_number_is_one_printed_line(
    where: str, embedded_cpu: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from fewclip_tutorial.settings import get_setup

    if where == "gpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    elif where == "colab":
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    elif where == "colab-setup":
        get_setup("colab")
    elif where == "other-dataset":
        get_setup("embedded", dataset="shapeworld-everyday")
    else:
        monkeypatch.setenv("FEWCLIP_COMMITTED_CHECKS", "report")
    assert not strict_checks()[0]
    assert_committed({"a": 3.0}, {"a": 1.0}, tol=0.5, what="probe")
    expect(False, "the kept step")
    assert_committed({"a": 1.2}, {"a": 1.0}, tol=0.5, what="close")  # within: silent
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("[not checked: ") and "probe: a = 3 moved by 2" in lines[0]
    assert "re-execute" not in lines[0] and lines[1].endswith("] the kept step")


def test_the_environment_can_force_strict_and_rejects_typos(
    embedded_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FEWCLIP_COMMITTED_CHECKS", "strict")
    with pytest.raises(AssertionError):
        expect(0, "forced")
    monkeypatch.setenv("FEWCLIP_COMMITTED_CHECKS", "strickt")
    with pytest.raises(ValueError, match="'strict' or 'report'"):
        strict_checks()
    with pytest.raises(ValueError, match="needs a message"):
        expect(True, "")
