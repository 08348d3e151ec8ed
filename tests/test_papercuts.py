"""Packaging metadata that tools would otherwise only warn about."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the checks need no more)

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string_and_setuptools_supports_it() -> None:
    """setuptools deprecates ``license = { text = ... }`` (an error from 2027-02-18)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    license_ = pyproject["project"]["license"]
    assert isinstance(license_, str) and license_ == "MIT"
    # a license string with a "License ::" classifier is an error under PEP 639
    classifiers = pyproject["project"].get("classifiers", [])
    assert not [c for c in classifiers if c.startswith("License ::")]
    requires = pyproject["build-system"]["requires"]
    setuptools = [r for r in requires if re.match(r"setuptools\b", r)]
    assert len(setuptools) == 1
    floor = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools[0].replace(" ", ""))
    assert floor and int(floor.group(1)) >= 77, "setuptools 77 reads PEP 639 license strings"
