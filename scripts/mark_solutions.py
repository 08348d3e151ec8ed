#!/usr/bin/env python
"""Tag the reference-solution cells of the chapter notebooks with ``solution``.

    python scripts/mark_solutions.py            # tag book/*.ipynb in place
    python scripts/mark_solutions.py --check    # exit 1 if a solution cell lacks the tag

A solution cell is a code cell whose first line starts with ``# Reference solution``
and which re-defines the function of the exercise cell before it.  The tag lets
``make assignments`` remove the cell from the student edition even if its comment
line is edited later; ``hide-cell`` (the book's fold) is kept.  Only the cell tags
change: sources and outputs are left as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewclip_tutorial.course.assignments import SOLUTION_FIRST_LINE, SOLUTION_TAG  # noqa: E402


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def mark(path: Path, check: bool) -> list[str]:
    """Tag the solution cells of one notebook; return what was (or would be) changed."""
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    changed: list[str] = []
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        if not _source(cell).lstrip().startswith(SOLUTION_FIRST_LINE):
            continue
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if SOLUTION_TAG not in tags:
            tags.append(SOLUTION_TAG)
            changed.append(f"{path.name}: cell {i}")
    if changed and not check:
        # the same layout as nbformat/Jupyter writes (indent 1, trailing newline)
        out = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        path.write_text(out, encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks (default: book/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if untagged")
    args = parser.parse_args(argv)
    notebooks = [Path(p) for p in args.notebooks] or sorted((ROOT / "book").glob("*.ipynb"))
    changed = [c for p in notebooks for c in mark(p, args.check)]
    verb = "untagged" if args.check else "tagged"
    for c in changed:
        print(f"{verb}: {c}")
    print(f"{len(changed)} solution cell(s) {verb}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
