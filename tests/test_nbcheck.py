"""The notebooks' check of trained numbers against committed values."""

from __future__ import annotations

import pytest

from fewclip_tutorial.course.nbcheck import assert_committed


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
