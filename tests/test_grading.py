"""Tests of fewclip_tutorial.grading: a class of small submitted notebooks, graded for real.

The five kinds of submission of the course issue (correct, wrong, crashing, endless,
malicious) plus one that memorised the notebook's fixed trials are written here as
notebooks and graded in one run (module fixture): every notebook runs in its own
forked process, so this also tests the sandbox and the per-exercise restarts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

from fewclip_tutorial import grading
from fewclip_tutorial.exercises import Opaque, compare_outputs, get_exercise
from fewclip_tutorial.grading import (
    GradeConfig,
    exercise_seed,
    exercises_in,
    find_submissions,
    grade_directory,
    notebook_code,
    write_grades_csv,
)

EXERCISES = ["prompt_ensemble", "zero_shot_logits"]
RUN_SEED = 20261201

HEAD = (
    "import torch\n"
    "import torch.nn.functional as F\n"
    "from fewclip_tutorial.exercises import get_exercise\n"
    "\n"
    "big = torch.randn(3000, 3000) @ torch.randn(3000, 3000)  # not run: not a definition"
)
GOOD_PE = (
    "def my_prompt_ensemble(t):\n"
    "    t = t / t.norm(dim=2, keepdim=True)\n"
    "    m = t.sum(1) / t.shape[1]\n"
    "    return m / m.norm(dim=1, keepdim=True)"
)
GOOD_ZS = "def my_zero_shot_logits(f, W, logit_scale=100.0):\n    return logit_scale * (f @ W.T)"
# Passes the notebook's check (fixed seeds 0-4) by a lookup table: the grader's fresh
# inputs must catch it.
MEMORISED_PE = (
    "ex = get_exercise('prompt_ensemble')\n"
    "_table = {}\n"
    "for _s in range(ex.n_trials):\n"
    "    (_t,) = ex.example_inputs(_s)\n"
    "    _table[_t.numpy().tobytes()] = ex.reference_fn(_t)\n"
    "\n"
    "def my_prompt_ensemble(t):\n"
    "    return _table.get(t.numpy().tobytes(), torch.zeros(t.shape[0], t.shape[2]))"
)


def _check_cell(code: str, name: str, fn: str) -> str:
    return f"{code}\n\n\n_ = get_exercise({name!r}).check({fn})"


def _write(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Chapter 1 exercises")]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in (HEAD, *cells)]
    nbformat.write(nb, path)
    return path


def _submission(path: Path, pe: str, zs: str, *extra: str) -> Path:
    return _write(
        path,
        *extra,
        _check_cell(pe, "prompt_ensemble", "my_prompt_ensemble"),
        _check_cell(zs, "zero_shot_logits", "my_zero_shot_logits"),
    )


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("class")
    subs = root / "submissions"
    subs.mkdir()
    victim = root / "grader_files" / "keep.txt"
    victim.parent.mkdir()
    victim.write_text("the grader's own file")
    _submission(subs / "correct.ipynb", GOOD_PE, GOOD_ZS)
    _submission(
        subs / "wrong.ipynb",
        # forgot the per-template normalisation
        "def my_prompt_ensemble(t):\n    return F.normalize(t.mean(dim=1), dim=-1)",
        GOOD_ZS,
    )
    _submission(
        subs / "crashing.ipynb",
        "import os\n\ndef my_prompt_ensemble(t):\n    os._exit(3)",  # the process dies
        GOOD_ZS,
        "import no_such_module_here  # a cell that raises: the next cells still run",
    )
    _submission(
        subs / "endless.ipynb",
        "def my_prompt_ensemble(t):\n    while True:\n        pass",
        "def my_zero_shot_logits(f, W, logit_scale=100.0):\n"
        "    while True:\n"
        "        print('spam' * 1000)",
    )
    # a folder submission: the student's answers spread over two notebooks
    mal = subs / "malicious"
    mal.mkdir()
    deleter = (
        "import os, shutil\n"
        f"for _p in [{str(victim)!r}, {str(subs / 'correct.ipynb')!r}]:\n"
        "    try:\n"
        "        shutil.rmtree(_p) if os.path.isdir(_p) else os.remove(_p)\n"
        "    except OSError as e:\n"
        "        print('blocked:', e)\n"
        "try:\n"
        f"    print(open({str(subs / 'correct.ipynb')!r}).read()[:20])\n"
        "except OSError as e:\n"
        "    print('blocked:', e)\n"
    )
    _write(
        mal / "part1.ipynb",
        # an exercise cell runs in full: it tries to delete files first
        _check_cell(
            deleter + "from fewclip_tutorial.zeroshot import prompt_ensemble as my_prompt_ensemble",
            "prompt_ensemble",
            "my_prompt_ensemble",
        ),
    )
    _write(
        mal / "part2.ipynb",
        _check_cell(
            "import os\n"
            "def my_zero_shot_logits(f, W, logit_scale=100.0):\n"
            f"    open({str(victim)!r}, 'w').write('overwritten')\n"
            "    return get_exercise('zero_shot_logits').reference_fn(f, W, logit_scale)",
            "zero_shot_logits",
            "my_zero_shot_logits",
        ),
    )
    _submission(subs / "memorised.ipynb", MEMORISED_PE, GOOD_ZS)
    _submission(
        subs / "cheater2.ipynb",
        # the reference reached through an alias, called inside the student's function
        "import fewclip_tutorial.zeroshot as z\n"
        "def my_prompt_ensemble(t):\n"
        "    helper = z.prompt_ensemble\n"
        "    return helper(t.clone())",
        GOOD_ZS,
    )
    _submission(
        subs / "copied.ipynb",
        # the package's source copied into a fresh namespace: a new function object
        "import inspect\n"
        "import fewclip_tutorial.zeroshot as z\n"
        "ns = {k: v for k, v in vars(z).items() if not k.startswith('__')}\n"
        "ns['__name__'] = '__main__'\n"
        "exec(inspect.getsource(z.prompt_ensemble), ns)\n"
        "my_prompt_ensemble = ns['prompt_ensemble']",
        GOOD_ZS,
    )
    config = GradeConfig(seed=RUN_SEED, timeout=3.0, setup_timeout=30.0, output_limit=200_000)
    grades = grade_directory(subs, config)
    out = write_grades_csv(grades, root / "grades.csv", RUN_SEED)
    with open(out, newline="") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    return {
        "grades": {g.student: g for g in grades},
        "rows": rows,
        "victim": victim,
        "subs": subs,
        "csv": out,
    }


def _reason(graded: dict, student: str, name: str) -> str:
    return graded["grades"][student].grades[name].reason


def test_one_row_per_student_with_a_score_per_exercise_and_total(graded: dict) -> None:
    rows = graded["rows"]
    assert set(rows) == {
        "correct",
        "wrong",
        "crashing",
        "endless",
        "malicious",
        "memorised",
        "cheater2",
        "copied",
    }
    with open(graded["csv"], newline="") as f:
        header = next(csv.reader(f))
    assert header == ["student", *EXERCISES, "total", "max", "seed", "notes"]
    for r in rows.values():
        assert float(r["total"]) == sum(float(r[n]) for n in EXERCISES)
        assert r["max"] == "2" and r["seed"] == str(RUN_SEED)


def test_a_correct_submission_gets_full_marks(graded: dict) -> None:
    row = graded["rows"]["correct"]
    assert (row["prompt_ensemble"], row["zero_shot_logits"], row["total"]) == ("1", "1", "2")
    assert row["notes"] == ""


def test_a_wrong_answer_loses_only_its_exercise(graded: dict) -> None:
    row = graded["rows"]["wrong"]
    assert (row["prompt_ensemble"], row["zero_shot_logits"]) == ("0", "1")
    assert "values differ" in _reason(graded, "wrong", "prompt_ensemble")


def test_a_crash_costs_its_exercise_only(graded: dict) -> None:
    row = graded["rows"]["crashing"]
    assert (row["prompt_ensemble"], row["zero_shot_logits"]) == ("0", "1")
    assert "exited with status 3" in _reason(graded, "crashing", "prompt_ensemble")
    assert "ModuleNotFoundError" in graded["grades"]["crashing"].log  # the failing cell


def test_endless_loops_and_floods_are_stopped(graded: dict) -> None:
    row = graded["rows"]["endless"]
    assert row["total"] == "0"
    assert "time limit (3 s)" in _reason(graded, "endless", "prompt_ensemble")
    assert "output limit" in _reason(graded, "endless", "zero_shot_logits")


def test_the_package_reference_scores_zero_however_it_is_reached(graded: dict) -> None:
    assert graded["rows"]["malicious"]["total"] == "0"
    assert "fewclip_tutorial.zeroshot.prompt_ensemble" in _reason(
        graded, "malicious", "prompt_ensemble"
    )
    reason = _reason(graded, "malicious", "zero_shot_logits")
    assert "sandbox" in reason or "reference solution" in reason
    pe = _reason(graded, "cheater2", "prompt_ensemble")
    assert "reference solution" in pe and "prompt_ensemble" in pe
    assert graded["rows"]["cheater2"]["zero_shot_logits"] == "1"
    assert "a copy of fewclip_tutorial.zeroshot.prompt_ensemble" in _reason(
        graded, "copied", "prompt_ensemble"
    )


def test_the_sandbox_keeps_the_graders_and_other_students_files(graded: dict) -> None:
    assert graded["victim"].read_text() == "the grader's own file"
    assert (graded["subs"] / "correct.ipynb").is_file()
    assert "blocked:" in graded["grades"]["malicious"].log
    assert "sandbox" in graded["grades"]["malicious"].log
    assert "not readable from a submission" in graded["grades"]["malicious"].log


def test_fresh_inputs_catch_an_answer_learnt_from_the_notebooks_trials(graded: dict) -> None:
    ex = get_exercise("prompt_ensemble")
    # the memorised function passes the notebook's check on seeds 0-4 ...
    namespace: dict = {"torch": torch, "get_exercise": get_exercise}
    exec(MEMORISED_PE, namespace)
    assert ex.check(namespace["my_prompt_ensemble"], verbose=False)
    # ... the grader's trials start elsewhere, and it fails there
    assert exercise_seed(RUN_SEED, "prompt_ensemble") >= ex.n_trials
    assert graded["rows"]["memorised"]["prompt_ensemble"] == "0"
    assert graded["rows"]["memorised"]["zero_shot_logits"] == "1"


def test_cli_grade_writes_the_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fewclip_tutorial.cli import main

    subs = tmp_path / "subs"
    subs.mkdir()
    _submission(subs / "ann.ipynb", GOOD_PE, GOOD_ZS)
    _write(subs / "bob.ipynb", _check_cell(GOOD_ZS, "zero_shot_logits", "my_zero_shot_logits"))
    out = tmp_path / "g" / "grades.csv"
    code = main(["grade", str(subs), "--out", str(out), "--seed", "5", "--timeout", "5"])
    assert code == 0
    rows = list(csv.DictReader(open(out, newline="")))
    assert [(r["student"], r["total"], r["max"]) for r in rows] == [
        ("ann", "2", "2"),
        ("bob", "1", "2"),
    ]
    assert "no notebook checks this exercise" in rows[1]["notes"]
    assert "wrote" in capsys.readouterr().out
    assert main(["grade", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["grade", str(subs), "--exercises", "no_such_exercise", "--out", str(out)]) == 2


# --------------------------------------------------------------------------- no processes


def test_exercise_seed_is_stable_and_differs_by_run_and_exercise() -> None:
    a = exercise_seed(1, "prompt_ensemble")
    assert a == exercise_seed(1, "prompt_ensemble")
    assert a != exercise_seed(2, "prompt_ensemble")
    assert a != exercise_seed(1, "zero_shot_logits")
    ex = get_exercise("prompt_ensemble")
    x1, x2 = ex.trial_inputs(a, 2), ex.trial_inputs(exercise_seed(2, "prompt_ensemble"), 2)
    assert any(u[0].shape != v[0].shape or not torch.equal(u[0], v[0]) for u, v in zip(x1, x2))
    assert all(torch.equal(u[0], v[0]) for u, v in zip(x1, ex.trial_inputs(a, 2)))


def test_notebook_code_keeps_definitions_and_exercise_cells() -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "%matplotlib inline\nimport math\nx = train()\ndef f():\n    pass"
        ),
        nbformat.v4.new_markdown_cell("get_exercise('nope').check(f)"),
        nbformat.v4.new_code_cell("y = 1\nclass A:\n    pass"),
        nbformat.v4.new_code_cell("z = 2  # no definitions: dropped"),
        nbformat.v4.new_code_cell("def g(:\n  pass"),
        nbformat.v4.new_code_cell("w = 3\n_ = get_exercise('wise_ft').check(g)"),
    ]
    code = notebook_code(nb)
    assert [label for label, _ in code] == ["cell 1", "cell 2", "cell 4", "cell 5"]
    assert code[0][1] == "import math\n\ndef f():\n    pass"
    assert code[1][1] == "class A:\n    pass"
    assert code[2][1] == "def g(:\n  pass"  # kept as is: running it reports the SyntaxError
    assert code[3][1].startswith("w = 3")
    assert len(notebook_code(nb, run_all=True)) == 5
    assert exercises_in(nb) == ["wise_ft"]


def test_find_submissions_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "ann.ipynb").write_text("{}")
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "ch2.ipynb").write_text("{}")
    (tmp_path / "bob" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "bob" / ".ipynb_checkpoints" / "ch2-checkpoint.ipynb").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "empty").mkdir()
    found = find_submissions(tmp_path)
    assert list(found) == ["ann", "bob"]
    assert [p.name for p in found["bob"]] == ["ch2.ipynb"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_submissions(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No notebooks"):
        find_submissions(tmp_path / "empty")


def test_outputs_travel_as_data_only() -> None:
    import numpy as np

    class Weird:
        pass

    out = (torch.ones(2), {"a": 1.5, "b": [np.arange(3), "s"]}, Weird())
    payload = grading._pack({"event": "result"}, grading._sanitize(out))
    head, _, body = payload.partition(b"\n")
    assert json.loads(head) == {"event": "result"}
    back = grading._load_outputs(body)
    assert torch.equal(back[0], torch.ones(2))
    assert back[1]["a"] == 1.5 and np.array_equal(back[1]["b"][0], np.arange(3))
    assert isinstance(back[2], Opaque) and "Weird" in repr(back[2])
    assert "should be a torch.Tensor, but it is Weird" in compare_outputs(back[2], torch.ones(1))


def test_write_grades_csv_notes_only_lost_points(tmp_path: Path) -> None:
    g = grading.StudentGrades(
        "ann",
        {
            "a": grading.ExerciseGrade("a", 1.0, 1.0),
            "b": grading.ExerciseGrade("b", 0.0, 2.0, "trial 1 raised KeyError: 'x'"),
        },
    )
    path = write_grades_csv([g], tmp_path / "g.csv", seed=9)
    assert path.read_text().splitlines() == [
        "student,a,b,total,max,seed,notes",
        "ann,1,0,1,3,9,b: trial 1 raised KeyError: 'x'",
    ]


def test_prompt_ensemble_fixture_answers_are_right() -> None:
    # the "correct" fixture is really correct (an independent formula: unit rows, mean, unit)
    namespace: dict = {"F": F}
    exec(GOOD_PE + "\n" + GOOD_ZS, namespace)
    t = torch.randn(3, 4, 5, dtype=torch.float64)  # float64: the two differ by rounding only
    want = F.normalize(F.normalize(t, dim=-1).mean(1), dim=-1)
    # float64 unit rows, D = 5, M = 4: <= 2 (D + M + 2) roundings of 1.1e-16, < 1e-14
    assert torch.allclose(namespace["my_prompt_ensemble"](t), want, atol=1e-12, rtol=0)


def test_run_all_runs_the_cells_that_definitions_only_mode_skips(tmp_path: Path) -> None:
    # the answer needs a top-level assignment: only --run-all runs it
    nb = _write(
        tmp_path / "ann.ipynb",
        "SCALE = 1.0",
        _check_cell(
            "def my_zero_shot_logits(f, W, logit_scale=100.0):\n"
            "    return SCALE * logit_scale * f @ W.T",
            "zero_shot_logits",
            "my_zero_shot_logits",
        ),
    )
    config = GradeConfig(seed=3, timeout=5.0, setup_timeout=30.0)
    lean = grading.grade_notebooks([nb], ["zero_shot_logits"], config)
    assert lean.total == 0 and "NameError" in lean.grades["zero_shot_logits"].reason
    config.run_all = True
    full = grading.grade_notebooks([nb], ["zero_shot_logits"], config)
    assert full.total == 1
