"""Student and instructor editions of the chapter notebooks (``make assignments``).

Each chapter's exercise is a *stub cell* (``def my_fn(...): raise
NotImplementedError`` followed by ``get_exercise(NAME).check(my_fn)``) and, in
the book, a *solution cell* right after it, folded away by the ``hide-cell`` tag.
A solution cell is marked by the cell tag ``solution`` (added by
``scripts/mark_solutions.py``) or, in notebooks not marked yet, by its first line
``# Reference solution``.

* The **instructor edition** is the notebook as the book has it.
* The **student edition** has every solution cell *removed* (nbconvert's
  ``TagRemovePreprocessor`` and ``RegexRemovePreprocessor``), the code between
  nbgrader-style ``### BEGIN SOLUTION`` / ``### END SOLUTION`` lines replaced by
  ``raise NotImplementedError``, and a first code cell that calls
  ``set_edition("student")`` so that ``Exercise.solution_source()`` refuses.

:func:`solution_leaks` checks the result: no line of a removed solution may
appear anywhere in the student edition (code or outputs).
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nbformat

__all__ = [
    "EDITION_CELL",
    "SOLUTION_FIRST_LINE",
    "SOLUTION_TAG",
    "is_solution_cell",
    "make_assignments",
    "solution_leaks",
    "student_edition",
]

#: The cell tag of a solution cell.
SOLUTION_TAG = "solution"
#: The first line that marks a solution cell in notebooks without the tag.
SOLUTION_FIRST_LINE = "# Reference solution"
#: nbgrader's in-cell markers (a solution written inside the exercise cell).
BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
#: The first code cell of a student edition.
EDITION_CELL = (
    "# Student edition: the reference solutions are not included.\n"
    "from fewclip_tutorial.course.exercises import set_edition\n"
    "\n"
    'set_edition("student")'
)
_STUB = "# YOUR CODE HERE\nraise NotImplementedError"
_BLOCK = re.compile(
    r"^([ \t]*)"
    + re.escape(BEGIN_SOLUTION)
    + r"[^\n]*\n.*?^[ \t]*"
    + re.escape(END_SOLUTION)
    + r"[^\n]*$",
    re.S | re.M,
)


def _source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def is_solution_cell(cell: Mapping[str, Any]) -> bool:
    """A code cell tagged ``solution`` or whose first line starts ``# Reference solution``."""
    if cell.get("cell_type") != "code":
        return False
    tags = cell.get("metadata", {}).get("tags", [])
    return SOLUTION_TAG in tags or _source(cell).lstrip().startswith(SOLUTION_FIRST_LINE)


def _clear_blocks(src: str) -> str:
    """Replace every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` block by a stub."""
    return _BLOCK.sub(lambda m: "\n".join(m.group(1) + s for s in _STUB.splitlines()), src)


def student_edition(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The student edition of one notebook (a new object; ``nb`` is unchanged)."""
    from nbconvert.preprocessors import RegexRemovePreprocessor, TagRemovePreprocessor

    nb = copy.deepcopy(nb)
    resources: dict[str, Any] = {}
    nb, resources = TagRemovePreprocessor(remove_cell_tags={SOLUTION_TAG}, enabled=True).preprocess(
        nb, resources
    )
    nb, resources = RegexRemovePreprocessor(
        patterns=[r"\s*" + re.escape(SOLUTION_FIRST_LINE)], enabled=True
    ).preprocess(nb, resources)
    for cell in nb.cells:
        if cell.cell_type == "code" and BEGIN_SOLUTION in _source(cell):
            cell.source = _clear_blocks(_source(cell))
            cell.outputs = []
            cell.execution_count = None
    first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
    nb.cells.insert(first_code, nbformat.v4.new_code_cell(EDITION_CELL))
    nb.metadata["fewclip"] = {"edition": "student"}
    return nb


def _solution_lines(nb: Mapping[str, Any]) -> set[str]:
    """The lines of the solutions that the rest of the notebook does not also have."""
    kept: set[str] = set()
    secret: set[str] = set()
    for cell in nb.get("cells", []):
        src = _source(cell)
        if is_solution_cell(cell):
            secret.update(src.splitlines())
            continue
        for block in _BLOCK.finditer(src):
            secret.update(block.group(0).splitlines()[1:-1])
        kept.update(_BLOCK.sub("", src).splitlines())
    kept = {line.strip() for line in kept}
    return {
        line.strip()
        for line in secret
        if re.search(r"\w", line)  # a line of brackets alone (formatted code) gives nothing away
        and not line.strip().startswith("#")
        and line.strip() not in kept
    }


def solution_leaks(original: Mapping[str, Any], student: Mapping[str, Any]) -> list[str]:
    """Solution lines of ``original`` found anywhere in ``student`` (cell sources or outputs)."""
    text = nbformat.writes(nbformat.from_dict(copy.deepcopy(dict(student))))
    sources = "\n".join(_source(c) for c in student.get("cells", []))
    haystack = sources + "\n" + text
    return sorted(line for line in _solution_lines(original) if line in haystack)


def make_assignments(
    notebooks: Iterable[str | Path],
    out_dir: str | Path,
    extra_dirs: Iterable[str | Path] = (),
) -> dict[str, Any]:
    """Write ``out_dir/student/`` and ``out_dir/instructor/``.

    Args:
        notebooks: the chapter notebooks (``book/*.ipynb``).
        out_dir: e.g. ``_build/assignments`` (its two sub-folders are replaced).
        extra_dirs: folders the notebooks read (``book/figures``), copied into both.

    Returns:
        ``{"student": [paths], "instructor": [paths], "solutions_removed": {notebook: n}}``.

    Raises:
        RuntimeError: if a solution line survives in a student edition.
    """
    out = Path(out_dir)
    report: dict[str, Any] = {"student": [], "instructor": [], "solutions_removed": {}}
    for edition in ("student", "instructor"):
        target = out / edition
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for extra in extra_dirs:
            extra = Path(extra)
            if extra.is_dir():
                shutil.copytree(extra, target / extra.name)
    for path in sorted(Path(p) for p in notebooks):
        nb = nbformat.read(path, as_version=4)
        student = student_edition(nb)
        leaks = solution_leaks(nb, student)
        if leaks:
            raise RuntimeError(
                f"{path.name}: solution lines remain in the student edition: {leaks[:3]}. "
                f"Tag the cells that hold them '{SOLUTION_TAG}' (scripts/mark_solutions.py)."
            )
        nbformat.write(nb, out / "instructor" / path.name)
        nbformat.write(student, out / "student" / path.name)
        report["instructor"].append(str(out / "instructor" / path.name))
        report["student"].append(str(out / "student" / path.name))
        report["solutions_removed"][path.name] = sum(is_solution_cell(c) for c in nb.cells) + sum(
            _source(c).count(BEGIN_SOLUTION) for c in nb.cells if not is_solution_cell(c)
        )
    return report
