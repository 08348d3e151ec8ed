#!/usr/bin/env python
"""Write the student and instructor editions of the chapter notebooks.

    python scripts/make_assignments.py                 # book/*.ipynb -> _build/assignments/
    python scripts/make_assignments.py --out DIR book/02_tip_adapter.ipynb

``DIR/student/`` has every solution cell removed (not hidden) and
``solution_source()`` disabled; ``DIR/instructor/`` is the book's notebooks with
their solutions.  See fewclip_tutorial/course/assignments.py and book/instructors.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewclip_tutorial.course.assignments import make_assignments  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks (default: book/*.ipynb)")
    parser.add_argument("--out", default=str(ROOT / "_build" / "assignments"), help="output folder")
    args = parser.parse_args(argv)
    notebooks = [Path(p) for p in args.notebooks] or sorted((ROOT / "book").glob("*.ipynb"))
    if not notebooks:
        parser.error("no notebooks found")
    report = make_assignments(notebooks, args.out, extra_dirs=[ROOT / "book" / "figures"])
    for name, n in report["solutions_removed"].items():
        print(f"{name:<42} {n} solution cell(s) removed from the student edition")
    print(f"student edition:    {Path(args.out) / 'student'}")
    print(f"instructor edition: {Path(args.out) / 'instructor'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
