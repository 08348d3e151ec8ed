"""Every tolerance in the tests says where it comes from.

A tolerance keyword argument (atol, rtol, abs or rel) must have a comment on its line or
on one of the 3 lines above: the error bound it is (float64 rounding, a float32
unit-roundoff bound, one validation image = 100/N points, ...).  A guessed number that
passes on the machine that wrote it fails on another CPU (AVX2 vs AVX-512, other thread
counts); see issue 21.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).parent
# keyword arguments only: ruff writes them without spaces (``rel=``), assignments with them
TOLERANCE = re.compile(r"\b(atol|rtol|abs|rel)=(?!=)")
LINES_ABOVE = 3


def unjustified(path: Path) -> list[int]:
    """Line numbers (1-based) of tolerance arguments with no comment on or just above them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = []
    for i, line in enumerate(lines):
        code = line.split("#", 1)[0]
        if not TOLERANCE.search(code):
            continue
        window = lines[max(0, i - LINES_ABOVE) : i + 1]
        if not any("#" in w for w in window):
            bad.append(i + 1)
    return bad


def test_scanner_finds_a_bare_tolerance(tmp_path: Path) -> None:
    f = tmp_path / "test_x.py"
    f.write_text(
        "a = 1\nb = 2\nc = 3\nd = 4\n"
        "assert x == approx(1.0, rel=1e-5)\n"  # line 5: no comment within 3 lines
        "# float64: 10 roundings of 1.1e-16\n"
        "assert y == approx(1.0, abs=1e-12)\n"  # line 7: justified
        "assert z == approx(1.0, abs=1e-12)  # float64 bound\n"  # line 8: justified
        "f(absolute=3, rel_err=2)\n"  # line 9: not a tolerance argument
        "rel = path.name\n"  # line 10: an assignment, not an argument
    )
    assert unjustified(f) == [5]


def test_every_tolerance_in_the_tests_is_justified() -> None:
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        bad = set(unjustified(path))
        problems += [f"{path.relative_to(TESTS)}:{n}" for n in sorted(bad)]
    assert not problems, (
        "tolerance without a comment deriving it (on the line or within "
        f"{LINES_ABOVE} lines above): " + ", ".join(problems)
    )
