"""Tests of the student and instructor editions (``make assignments``).

The solution code is found here independently of fewclip_tutorial.course.assignments: by
parsing each solution cell and taking the bodies of the functions it defines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from fewclip_tutorial.course import exercises as exmod
from fewclip_tutorial.course.assignments import (
    EDITION_CELL,
    make_assignments,
    solution_leaks,
    student_edition,
)

ROOT = Path(__file__).resolve().parents[1]
BOOK = sorted((ROOT / "book").glob("*.ipynb"))


def _function_bodies(source: str) -> list[str]:
    """The source of every statement in the bodies of the functions ``source`` defines."""
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for stmt in node.body:
                seg = ast.get_source_segment(source, stmt)
                if seg and not seg.startswith("raise NotImplementedError"):
                    out.append(seg)
    return out


def _solution_bodies(nb: nbformat.NotebookNode) -> list[str]:
    """Bodies of the functions in the book's folded solution cells (or ``solution``-tagged)."""
    bodies = []
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        folded = "hide-cell" in tags and "Reference solution" in cell.source.split("\n")[0]
        if cell.cell_type == "code" and (folded or "solution" in tags):
            bodies += _function_bodies(cell.source)
    return bodies


@pytest.fixture(scope="module")
def editions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("assignments")
    make_assignments(BOOK, out, extra_dirs=[ROOT / "book" / "figures"])
    return out


def test_no_solution_code_in_the_student_edition(editions: Path) -> None:
    n_bodies = 0
    for path in BOOK:
        nb = nbformat.read(path, as_version=4)
        bodies = _solution_bodies(nb)
        n_bodies += len(bodies)
        student_text = (editions / "student" / path.name).read_text()
        instructor_text = (editions / "instructor" / path.name).read_text()
        student_code = "\n".join(
            c.source
            for c in nbformat.read(editions / "student" / path.name, as_version=4).cells
            if c.cell_type == "code"
        )
        for body in bodies:
            # a line of brackets alone (formatted code) is in any notebook: no leak
            lines = [ln.strip() for ln in body.splitlines() if any(ch.isalnum() for ch in ln)]
            for line in lines:
                assert line not in student_code, f"{path.name}: solution line {line!r} left"
                assert line not in student_text, f"{path.name}: solution line {line!r} in output"
            assert body.splitlines()[0].strip() in instructor_text
    assert n_bodies >= 10  # five method chapters with two exercises each, at least


def test_every_exercise_stub_stays_in_the_student_edition(editions: Path) -> None:
    from fewclip_tutorial.course.grading import exercises_in

    for path in BOOK:
        book = nbformat.read(path, as_version=4)
        student = nbformat.read(editions / "student" / path.name, as_version=4)
        assert exercises_in(student) == exercises_in(book)
        assert student.cells[[c.cell_type for c in student.cells].index("code")].source == (
            EDITION_CELL
        )
        n_code = sum(c.cell_type == "code" for c in book.cells)
        n_removed = len(
            [
                c
                for c in book.cells
                if c.cell_type == "code"
                and (
                    c.source.startswith("# Reference solution")
                    or "solution" in c.get("metadata", {}).get("tags", [])
                )
            ]
        )
        assert sum(c.cell_type == "code" for c in student.cells) == n_code - n_removed + 1
    assert (editions / "student" / "figures").is_dir()
    assert (editions / "instructor" / "figures").is_dir()


def test_fixture_notebook_all_three_markers(tmp_path: Path) -> None:
    stub = "def my_f(x):\n    # your code here\n    raise NotImplementedError\n\n_ = check(my_f)"
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Exercises"),
        nbformat.v4.new_code_cell("import torch"),
        nbformat.v4.new_code_cell(stub),
        # 1. the book's marker: first line, folded
        nbformat.v4.new_code_cell(
            "# Reference solution (click to expand)\ndef my_f(x):\n    return x.flip(0) * 7",
            metadata={"tags": ["hide-cell"]},
        ),
        # 2. the tag alone (first line edited)
        nbformat.v4.new_code_cell(
            "# answer\ndef my_g(x):\n    return x.cumsum(0) - 3", metadata={"tags": ["solution"]}
        ),
        # 3. nbgrader's in-cell markers
        nbformat.v4.new_code_cell(
            "def my_h(x):\n    ### BEGIN SOLUTION\n    y = x.sort().values\n    return y[::2]\n"
            "    ### END SOLUTION\n\nprint(my_h)"
        ),
    ]
    nb.cells[5].outputs = [nbformat.v4.new_output("stream", text="y = x.sort().values\n")]
    student = student_edition(nb)
    code = "\n".join(c.source for c in student.cells if c.cell_type == "code")
    text = nbformat.writes(student)
    for secret in ("x.flip(0) * 7", "x.cumsum(0) - 3", "x.sort().values", "y[::2]"):
        assert secret not in text
    assert (
        "def my_h(x):\n    # YOUR CODE HERE\n    raise NotImplementedError\n\nprint(my_h)" in code
    )
    assert stub in code
    assert student.metadata["fewclip"] == {"edition": "student"}
    assert solution_leaks(nb, student) == []
    # the book is unchanged, and the check would find a leak in it
    assert "x.flip(0) * 7" in nbformat.writes(nb)
    assert solution_leaks(nb, nb) == sorted(
        [
            "def my_g(x):",
            "return x.flip(0) * 7",
            "return x.cumsum(0) - 3",
            "y = x.sort().values",
            "return y[::2]",
        ]
    )
    nbformat.validate(student)


def test_the_student_edition_disables_solution_source(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = exmod.get_exercise("prompt_ensemble")
    monkeypatch.setattr(exmod, "_EDITION", None)
    monkeypatch.delenv("FEWCLIP_EDITION", raising=False)
    assert "def prompt_ensemble" in ex.solution_source()
    namespace: dict = {}
    exec(EDITION_CELL, namespace)  # what the student edition's first cell runs
    with pytest.raises(exmod.SolutionsHiddenError, match="student edition"):
        ex.solution_source()
    assert ex.check(lambda t: t.mean(1), verbose=False) is False  # checking still works
    monkeypatch.setattr(exmod, "_EDITION", None)
    monkeypatch.setenv("FEWCLIP_EDITION", "student")
    with pytest.raises(exmod.SolutionsHiddenError):
        ex.solution_source()


def test_make_assignments_script(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("# Reference solution\ndef f():\n    return 42"),
        nbformat.v4.new_code_cell("print(1)"),
    ]
    src = tmp_path / "ch.ipynb"
    nbformat.write(nb, src)
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_assignments.py"),
            "--out",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "1 solution cell(s) removed" in res.stdout
    assert "return 42" not in (out / "student" / "ch.ipynb").read_text()
    assert "return 42" in (out / "instructor" / "ch.ipynb").read_text()


def test_mark_solutions_tags_only(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "# Reference solution (click to expand)\ndef f():\n    return 1",
            metadata={"tags": ["hide-cell"]},
        ),
        nbformat.v4.new_code_cell("def f():\n    raise NotImplementedError"),
    ]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    script = str(ROOT / "scripts" / "mark_solutions.py")
    check = subprocess.run([sys.executable, script, "--check", str(path)], capture_output=True)
    assert check.returncode == 1
    subprocess.run([sys.executable, script, str(path)], check=True, capture_output=True)
    marked = nbformat.read(path, as_version=4)
    assert marked.cells[0].metadata["tags"] == ["hide-cell", "solution"]
    assert marked.cells[1].metadata.get("tags") is None
    assert [c.source for c in marked.cells] == [c.source for c in nb.cells]
    again = subprocess.run([sys.executable, script, "--check", str(path)], capture_output=True)
    assert again.returncode == 0


@pytest.mark.slow
def test_the_instructor_edition_gets_full_marks_and_the_student_edition_none(
    editions: Path, tmp_path: Path
) -> None:
    """The book's own solutions are correct answers; the handed-out stubs answer nothing."""
    from fewclip_tutorial.course.grading import GradeConfig, grade_directory

    subs = tmp_path / "subs"
    for edition in ("instructor", "student"):
        (subs / edition).mkdir(parents=True)
        for path in BOOK:
            (subs / edition / path.name).write_bytes((editions / edition / path.name).read_bytes())
    grades = {
        g.student: g
        for g in grade_directory(subs, GradeConfig(seed=4321, timeout=30, setup_timeout=120))
    }
    teacher, student = grades["instructor"], grades["student"]
    assert len(teacher.grades) >= 10
    lost = {n: g.reason for n, g in teacher.grades.items() if g.score < g.points}
    assert lost == {}, f"the book's solutions lose points: {lost}"
    assert student.total == 0
    assert all("NotImplementedError" in g.reason for g in student.grades.values())


def test_a_line_of_brackets_alone_is_no_leak() -> None:
    # formatted code (ruff, 88 columns) puts lone brackets on lines of their own; the JSON of
    # any notebook holds them, so they give nothing away and must not count as a leak
    solution = (
        "# Reference solution (click to expand)\nys = torch.cat(\n    [\n        a,\n    ]\n)"
    )
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(solution, metadata={"tags": ["hide-cell"]})]
    assert solution_leaks(nb, student_edition(nb)) == []
    assert solution_leaks(nb, nb) == ["a,", "ys = torch.cat("]
