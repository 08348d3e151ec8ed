"""Tests of fewclip_tutorial.course.grading: a class of small submitted notebooks, graded for real.

One class is graded in one run (module fixture), with the isolation this machine has
(bubblewrap when ``bwrap`` works, else the in-process guard): correct, wrong,
crashing, endless and malicious submissions, one that memorised the notebook's
fixed trials, submissions that used to cost the whole class its grades (deep JSON,
``cells`` a number, colliding names, a FIFO, a symbolic link, forged messages, a
student that rewrites another's file), honest solutions the old grader marked
down, and (with bubblewrap) escapes from the sandbox against dummy files.
"""

from __future__ import annotations

import csv
import os
import socket
import stat
import threading
import time
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

from fewclip_tutorial.course import _grading_child as child
from fewclip_tutorial.course import grading
from fewclip_tutorial.course.exercises import Opaque, compare_outputs, get_exercise
from fewclip_tutorial.course.grading import (
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
#: seconds per exercise in the class graded below (see the fixture)
EXERCISE_LIMIT = 20.0
ISOLATION = grading.detect_isolation("auto")
SANDBOXED = ISOLATION.sandboxed
needs_sandbox = pytest.mark.skipif(
    not SANDBOXED, reason=f"no bubblewrap sandbox here: {ISOLATION.description}"
)

HEAD = (
    "import torch\n"
    "import torch.nn.functional as F\n"
    "from fewclip_tutorial.course.exercises import get_exercise\n"
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
    _submission(subs / "wrong.ipynb", WRONG_PE, GOOD_ZS)  # no per-template normalisation
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
    # ---- submissions that used to cost the whole class its grades
    (subs / "deep.ipynb").write_bytes(b"[" * 200_000 + b"]" * 200_000)
    (subs / "cells_a_number.ipynb").write_text('{"cells": 5, "nbformat": 4}')
    _submission(subs / "李雷.ipynb", GOOD_PE, GOOD_ZS)
    _submission(subs / "韩梅.ipynb", GOOD_PE, GOOD_ZS)
    _submission(subs / "ann lee.ipynb", GOOD_PE, GOOD_ZS)
    _submission(subs / "ann_lee.ipynb", WRONG_PE, GOOD_ZS)
    _submission(subs / "=HYPERLINK(1).ipynb", GOOD_PE, GOOD_ZS)
    os.mkfifo(subs / "fifo.ipynb")
    instructor = root / "instructor" / "ch01.ipynb"
    instructor.parent.mkdir()
    _submission(instructor, GOOD_PE, GOOD_ZS)
    (subs / "linked.ipynb").symlink_to(instructor)
    _submission(
        subs / "forger.ipynb",
        # forged protocol messages on every descriptor, then an endless loop: the
        # grader's deadline for the exercise must hold
        "import json, os, struct\n"
        "def my_prompt_ensemble(t):\n"
        "    for m in ({'event': 'answers', 'names': []}, {'event': 'ready'},\n"
        "              {'event': 'done', 'exit': 0, 'leftover': False}):\n"
        "        body = json.dumps(m).encode() + b'\\n'\n"
        "        for fd in range(3, 40):\n"
        "            for frame in (struct.pack('>I', len(body)) + body,\n"
        "                          struct.pack('>I', len(body) + 1) + b'Z' + body):\n"
        "                try:\n"
        "                    os.write(fd, frame)\n"
        "                except OSError:\n"
        "                    pass\n"
        "    while True:\n"
        "        pass",
        GOOD_ZS,
    )
    _submission(
        subs / "aa_rewriter.ipynb",
        # graded before zz_victim: its exercise cell replaces zz_victim's notebook first
        "import shutil\n"
        f"for _p in [{str(subs / 'zz_victim.ipynb')!r}, {str(subs / 'correct.ipynb')!r}]:\n"
        "    try:\n"
        f"        shutil.copyfile({str(subs / 'wrong.ipynb')!r}, _p)\n"
        "    except OSError as e:\n"
        "        print('blocked:', e)\n" + GOOD_PE,
        GOOD_ZS,
    )
    _submission(subs / "zz_victim.ipynb", GOOD_PE, GOOD_ZS)
    # ---- honest solutions that pass the notebook's own check
    _write(
        subs / "honest_constants.ipynb",
        "EPS = 0.0\nunit = lambda t: t / (t.norm(dim=-1, keepdim=True) + EPS)\nSCALE = 1.0",
        _check_cell(
            "def my_prompt_ensemble(t):\n    return unit(unit(t).mean(1))",
            "prompt_ensemble",
            "my_prompt_ensemble",
        ),
        _check_cell(
            "def my_zero_shot_logits(f, W, logit_scale=100.0):\n"
            "    return SCALE * logit_scale * f @ W.T",
            "zero_shot_logits",
            "my_zero_shot_logits",
        ),
    )
    _write(
        subs / "honest_tries_first.ipynb",
        "image_features = F.normalize(torch.randn(5, 8), dim=-1)  # the chapter's data",
        _check_cell(GOOD_PE, "prompt_ensemble", "my_prompt_ensemble"),
        GOOD_ZS + "\n\nprint(my_zero_shot_logits(image_features, image_features[:3]).shape)\n"
        "_ = get_exercise('zero_shot_logits').check(my_zero_shot_logits)",
    )
    _write(
        subs / "honest_loop.ipynb",
        GOOD_PE,
        GOOD_ZS,
        "for name, fn in [('prompt_ensemble', my_prompt_ensemble),\n"
        "                 ('zero_shot_logits', my_zero_shot_logits)]:\n"
        "    get_exercise(name).check(fn)",
    )
    _submission(
        subs / "honest_prints.ipynb",
        "print('x' * 250_000)  # a little over the output limit, at the top of the cell\n"
        + GOOD_PE,
        GOOD_ZS,
    )
    # ---- escapes (each answer is right only if its escape worked)
    port, connections = _loopback_server()
    pipe = victim.parent / "made_by_student"
    escapes = {
        "esc_dirfd": "fd = os.open(DIR, os.O_RDONLY)\n"
        "done, errors = [], []\n"
        "for attempt in (\n"
        "    lambda: os.close(os.open('keep.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd)),\n"
        "    lambda: os.chmod('keep.txt', 0o777, dir_fd=fd),\n"
        "    lambda: os.utime('keep.txt', (0, 0), dir_fd=fd),\n"
        "    lambda: os.rename('keep.txt', 'moved.txt', src_dir_fd=fd, dst_dir_fd=fd),\n"
        "    lambda: os.unlink('keep.txt', dir_fd=fd),\n"
        "):\n"
        "    try:\n"
        "        attempt(); done.append(1)\n"
        "    except OSError as e:\n"
        "        errors.append(e)\n"
        "if not done:\n"
        "    raise errors[0]",
        "esc_fifo": "os.mkfifo(PIPE)",
        "esc_fork_exec": "# subprocess.run is _posixsubprocess.fork_exec underneath\n"
        "r = subprocess.run(['/bin/sh', '-c', f'echo pwned > {VICTIM} && rm -f {VICTIM}'])\n"
        "if r.returncode:\n"
        "    raise RuntimeError('the shell could not reach the file')",
        "esc_socket": "s = socket.create_connection(('127.0.0.1', PORT), timeout=1)\n"
        "s.sendall(b'pwned')",
        "esc_read": "answers = open(INSTRUCTOR).read() + open(CLASSMATE).read()",
        # SIGCONT: harmless if it ever got through; the grader's PID is not in the sandbox
        "esc_signal": "import signal\n"
        "signal.pidfd_send_signal(os.pidfd_open(GRADER_PID), signal.SIGCONT)",
    }
    consts = (
        f"DIR = {str(victim.parent)!r}\nVICTIM = {str(victim)!r}\nPIPE = {str(pipe)!r}\n"
        f"PORT = {port}\nINSTRUCTOR = {str(instructor)!r}\nGRADER_PID = {os.getpid()}\n"
        f"CLASSMATE = {str(subs / 'correct.ipynb')!r}\n"
    )
    for student, attempt in escapes.items():
        if SANDBOXED or student not in SANDBOX_ONLY:
            _submission(subs / f"{student}.ipynb", _escaping_pe(attempt), GOOD_ZS, consts)
    _submission(
        subs / ("esc_daemon.ipynb" if SANDBOXED else ".skipped_without_a_sandbox.ipynb"),
        # an exercise cell runs in full: it leaves a daemon that rewrites files later
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        for _ in range(600):  # alive however slowly the grader runs on a busy machine\n"
        "            time.sleep(1)\n"
        "            try:\n"
        f"                open({str(victim)!r}, 'w').write('daemon')\n"
        "            except OSError:\n"
        "                pass\n"
        "    os._exit(0)\n" + GOOD_PE,
        GOOD_ZS,
    )
    _submission(
        subs / "sandbox_killer.ipynb",
        # kills the grader's process that forked it (the zygote): a fresh sandbox takes over
        "import os, signal\n"
        "def my_prompt_ensemble(t):\n"
        "    os.kill(os.getppid(), signal.SIGKILL)\n"
        "    while True:\n"
        "        pass",
        GOOD_ZS,
    )
    _submission(
        subs / "memory_hog.ipynb",
        "def my_prompt_ensemble(t):\n    return torch.ones(8 << 30, dtype=torch.uint8)",
        GOOD_ZS,
    )
    _submission(subs / "cell_exit.ipynb", "import os\nos._exit(5)\n" + GOOD_PE, GOOD_ZS)
    # ---- the package's answer reached around the profiler
    _submission(
        subs / "cheat_profiler_off.ipynb",
        "import sys\nimport fewclip_tutorial.zeroshot as z\n"
        "def my_prompt_ensemble(t):\n"
        "    p = sys.getprofile()\n"
        "    sys.setprofile(None)\n"
        "    r = z.prompt_ensemble(t)\n"
        "    sys.setprofile(p)\n"
        "    return r",
        GOOD_ZS,
    )
    _submission(
        subs / "cheat_thread.ipynb",
        "import _thread, time\nimport fewclip_tutorial.zeroshot as z\n"
        "def my_prompt_ensemble(t):\n"
        "    box = []\n"
        "    _thread.start_new_thread(lambda: box.append(z.prompt_ensemble(t)), ())\n"
        "    while not box:\n"
        "        time.sleep(0.001)\n"
        "    return box[0]",
        GOOD_ZS,
    )
    _submission(
        subs / "cheat_renamed.ipynb",
        "import inspect\nimport fewclip_tutorial.zeroshot as z\n"
        "src = inspect.getsource(z.prompt_ensemble)\n"
        "src = src.replace('text_features', 'tf').replace('per_prompt', 'pp')\n"
        "ns = dict(vars(z))\n"
        "exec(src.replace('def prompt_ensemble', 'def helper'), ns)\n"
        "def my_prompt_ensemble(t):\n"
        "    return ns['helper'](t)",
        GOOD_ZS,
    )
    # System V shared memory (the sandbox's own IPC namespace) left for a later student
    shm = "import ctypes\nlibc = ctypes.CDLL(None)\n"
    _submission(
        subs / "ipc_a_writer.ipynb",
        shm + "libc.shmget(0x5EED, 4096, 0o1600)  # IPC_CREAT | 0600\n" + GOOD_PE,
        GOOD_ZS,
    )
    _submission(
        subs / "ipc_b_reader.ipynb",
        shm + "def my_prompt_ensemble(t):\n"
        "    if libc.shmget(0x5EED, 0, 0) == -1:\n"
        "        raise LookupError('no shared memory from another student')\n"
        "    t = t / t.norm(dim=2, keepdim=True)\n"
        "    m = t.mean(1)\n"
        "    return m / m.norm(dim=1, keepdim=True)",
        GOOD_ZS,
    )
    victim_stat = victim.stat()
    # honest exercises take milliseconds and honest cells well under a second: the limits
    # leave a margin of over 100x for a loaded machine; the endless students cost the
    # exercise limit each (and no cell loops, so the setup limit costs nothing)
    config = GradeConfig(
        seed=RUN_SEED, timeout=EXERCISE_LIMIT, setup_timeout=120.0, output_limit=200_000
    )
    start = time.monotonic()
    grades = grade_directory(subs, config, isolation=ISOLATION)
    seconds = time.monotonic() - start
    out = write_grades_csv(grades, root / "grades.csv", RUN_SEED, ISOLATION.label)
    with open(out, newline="", encoding="utf-8") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    return {
        "grades": {g.student: g for g in grades},
        "rows": rows,
        "victim": victim,
        "victim_stat": victim_stat,
        "pipe": pipe,
        "subs": subs,
        "csv": out,
        "connections": connections,
        "seconds": seconds,
    }


#: escapes only the OS sandbox stops (the fallback guard is against accidents only)
SANDBOX_ONLY = ("esc_dirfd", "esc_fifo", "esc_daemon", "esc_read", "esc_signal")
WRONG_PE = "def my_prompt_ensemble(t):\n    return F.normalize(t.mean(dim=1), dim=-1)"


def _escaping_pe(attempt: str) -> str:
    body = "\n".join("    " + line for line in attempt.splitlines())
    return (
        "import os, socket, subprocess\n"
        "def my_prompt_ensemble(t):\n" + body + "\n"
        "    t = t / t.norm(dim=2, keepdim=True)\n"
        "    m = t.mean(1)\n"
        "    return m / m.norm(dim=1, keepdim=True)"
    )


def _loopback_server() -> tuple[int, list[bytes]]:
    """A TCP server on 127.0.0.1 that records what reaches it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    got: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    got.append(conn.recv(100) or b"(connected)")
                except OSError:
                    got.append(b"(connected)")

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], got


def _grader_processes(wait: float = 120.0) -> list[int]:
    """Processes of this checkout's grader sandboxes still running (any namespace), after
    waiting up to ``wait`` seconds for them to go: the kernel ends a PID namespace's
    processes after its init is killed, which takes a moment on a loaded machine."""
    deadline = time.monotonic() + wait
    while (found := _grader_processes_now()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def _grader_processes_now() -> list[int]:
    mine = f"PYTHONPATH={grading._package_dir().parent}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"_grading_child" in cmd and mine in env:
            found.append(int(pid))
    return found


def _reason(graded: dict, student: str, name: str) -> str:
    return graded["grades"][student].grades[name].reason


#: every student's total: the grade-losing cases cost only their own student
EXPECTED_TOTALS = {
    "correct": "2",
    "wrong": "1",
    "crashing": "1",
    "endless": "0",
    "malicious": "0",
    "memorised": "1",
    "cheater2": "1",
    "copied": "1",
    "deep": "0",
    "cells_a_number": "0",
    "李雷": "2",
    "韩梅": "2",
    "ann lee": "2",
    "ann_lee": "1",
    "'=HYPERLINK(1)": "2",
    "fifo": "0",
    "linked": "0",
    "forger": "1",
    "aa_rewriter": "2",
    "zz_victim": "2",
    "honest_constants": "2",
    "honest_tries_first": "2",
    "honest_loop": "2",
    "honest_prints": "2",
    "esc_dirfd": "1",
    "esc_fifo": "1",
    "esc_fork_exec": "1",
    "esc_socket": "1",
    "esc_read": "1",
    "esc_signal": "1",
    "esc_daemon": "0",
    "sandbox_killer": "1",
    "memory_hog": "1",
    "cell_exit": "0",
    "cheat_profiler_off": "1",
    "cheat_thread": "1",
    "cheat_renamed": "1",
    "ipc_a_writer": "2",
    "ipc_b_reader": "1",
}


def test_one_row_per_student_with_a_score_per_exercise_and_total(graded: dict) -> None:
    rows = graded["rows"]
    with open(graded["csv"], newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == ["student", *EXERCISES, "total", "max", "seed", "isolation", "notes"]
    for r in rows.values():
        assert float(r["total"]) == sum(float(r[n]) for n in EXERCISES)
        assert r["max"] == "2" and r["seed"] == str(RUN_SEED)
        assert r["isolation"] == ISOLATION.label
    expected = dict(EXPECTED_TOTALS)
    if not SANDBOXED:  # the guard does not stop these escapes: not in the class
        for name in SANDBOX_ONLY:
            expected.pop(name)
    assert {s: r["total"] for s, r in rows.items()} == expected


def test_bad_files_give_their_student_a_zero_with_the_reason(graded: dict) -> None:
    notes = {s: graded["rows"][s]["notes"] for s in ("deep", "cells_a_number", "fifo", "linked")}
    assert "nested more than 64 levels" in notes["deep"]
    assert "no 'cells' list" in notes["cells_a_number"]
    assert "not a plain file" in notes["fifo"]
    assert "symbolic link" in notes["linked"]
    cells = graded["rows"]["cell_exit"]["notes"]
    assert "the notebook's cells ended the process: exited with status 5" in cells


def test_names_that_look_alike_or_like_formulas_keep_their_own_rows(graded: dict) -> None:
    rows = graded["rows"]
    assert rows["ann lee"]["prompt_ensemble"] == "1" and rows["ann_lee"]["prompt_ensemble"] == "0"
    assert "=HYPERLINK(1)" in graded["grades"]  # the name itself; the CSV cell is escaped
    raw = graded["csv"].read_text(encoding="utf-8")
    assert "\n=HYPERLINK" not in raw and "\n'=HYPERLINK(1)," in raw
    names = ["李雷", "韩梅", "ann lee", "ann_lee", "=HYPERLINK(1)"]
    assert len({grading.log_name(n) for n in names}) == len(names)


def test_killing_the_sandbox_or_exhausting_memory_costs_one_exercise(graded: dict) -> None:
    killer = _reason(graded, "sandbox_killer", "prompt_ensemble")
    assert "sandbox stopped" in killer or "guard" in killer
    assert "memory" in _reason(graded, "memory_hog", "prompt_ensemble").lower()


def test_forged_messages_do_not_move_the_deadline(graded: dict) -> None:
    reason = _reason(graded, "forger", "prompt_ensemble")
    assert f"time limit ({EXERCISE_LIMIT:g} s)" in reason or "does not expect" in reason
    assert graded["rows"]["forger"]["zero_shot_logits"] == "1"


def test_a_student_cannot_change_another_students_notebook(graded: dict) -> None:
    assert graded["rows"]["zz_victim"]["total"] == "2"
    assert graded["rows"]["correct"]["total"] == "2"
    assert "blocked:" in graded["grades"]["aa_rewriter"].log


def test_honest_solutions_get_the_marks_of_the_notebooks_own_check(graded: dict) -> None:
    for student in ("honest_constants", "honest_tries_first", "honest_loop", "honest_prints"):
        assert graded["rows"][student]["total"] == "2", graded["rows"][student]["notes"]
    assert "NameError" in graded["grades"]["honest_tries_first"].log  # logged, not fatal
    assert "more bytes not kept" in graded["grades"]["honest_prints"].log


@needs_sandbox
def test_sandbox_escapes_get_zero_and_leave_the_dummy_files_alone(graded: dict) -> None:
    escapes = ("esc_dirfd", "esc_fifo", "esc_fork_exec", "esc_socket", "esc_read", "esc_signal")
    for student in escapes:
        row = graded["rows"][student]
        assert (row["prompt_ensemble"], row["zero_shot_logits"]) == ("0", "1"), student
        assert _reason(graded, student, "prompt_ensemble"), student
    assert "RuntimeError" in _reason(graded, "esc_fork_exec", "prompt_ensemble")
    assert "ConnectionRefused" in _reason(graded, "esc_socket", "prompt_ensemble")
    assert "No such file" in _reason(graded, "esc_read", "prompt_ensemble")
    assert "ProcessLookupError" in _reason(graded, "esc_signal", "prompt_ensemble")
    assert "daemon" in _reason(graded, "esc_daemon", "prompt_ensemble")
    assert "LookupError" in _reason(graded, "ipc_b_reader", "prompt_ensemble")
    victim, before = graded["victim"], graded["victim_stat"]
    after = victim.stat()
    assert victim.read_text() == "the grader's own file"
    assert (after.st_mode, after.st_mtime_ns, after.st_ino) == (
        before.st_mode,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert sorted(p.name for p in victim.parent.iterdir()) == ["keep.txt"]
    assert graded["connections"] == []


def test_no_grader_process_is_left_behind(graded: dict) -> None:
    assert _grader_processes() == []


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
    assert f"time limit ({EXERCISE_LIMIT:g} s)" in _reason(graded, "endless", "prompt_ensemble")
    assert "output limit" in _reason(graded, "endless", "zero_shot_logits")


def test_the_package_reference_scores_zero_however_it_is_reached(graded: dict) -> None:
    assert graded["rows"]["malicious"]["total"] == "0"
    assert "fewclip_tutorial.zeroshot.prompt_ensemble" in _reason(
        graded, "malicious", "prompt_ensemble"
    )
    # it writes a file of the grader's first: blocked (a guard error or a missing path)
    reason = _reason(graded, "malicious", "zero_shot_logits")
    assert "guard" in reason or "No such file" in reason
    pe = _reason(graded, "cheater2", "prompt_ensemble")
    assert "reference solution" in pe and "prompt_ensemble" in pe
    assert graded["rows"]["cheater2"]["zero_shot_logits"] == "1"
    # its copy of the package's source: in the sandbox, the source of a stub
    copied = _reason(graded, "copied", "prompt_ensemble")
    if SANDBOXED:
        assert "not available while grading prompt_ensemble" in copied, copied
    else:
        assert "a copy of fewclip_tutorial.zeroshot.prompt_ensemble" in copied, copied


def test_the_sandbox_keeps_the_graders_and_other_students_files(graded: dict) -> None:
    assert graded["victim"].read_text() == "the grader's own file"
    assert (graded["subs"] / "correct.ipynb").is_file()
    log = graded["grades"]["malicious"].log
    assert "blocked:" in log
    if SANDBOXED:  # the grader's files and the submissions are not even visible
        assert "No such file or directory" in log
    else:
        assert "guard" in log and "not readable from a submission" in log


def test_the_package_answer_around_the_profiler_scores_zero(graded: dict) -> None:
    assert "tampered" in _reason(graded, "cheat_profiler_off", "prompt_ensemble")
    for student in ("cheat_thread", "cheat_renamed"):
        reason = _reason(graded, student, "prompt_ensemble")
        assert "reference solution" in reason and "prompt_ensemble" in reason, reason


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
    code = main(["grade", str(subs), "--out", str(out), "--seed", "5", "--timeout", "60"])
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
    assert [label for label, _ in code] == ["cell 1", "cell 2", "cell 3", "cell 4", "cell 5"]
    assert code[0][1] == "import math\n\ndef f():\n    pass"  # x = train(): a call, skipped
    assert code[1][1] == "y = 1\n\nclass A:\n    pass"  # constants are kept
    assert code[2][1] == "z = 2"
    assert code[3][1] == "def g(:\n  pass"  # kept as is: running it reports the SyntaxError
    assert code[4][1].startswith("w = 3")
    assert len(notebook_code(nb, run_all=True)) == 5
    assert exercises_in(nb) == ["wise_ft"]
    lam = nbformat.v4.new_notebook()
    lam.cells = [
        nbformat.v4.new_code_cell(
            "f = lambda t: t.norm()\nA = [1, 2]\nB = [i for i in range(9)]\nC = load()"
        )
    ]
    assert notebook_code(lam) == [("cell 1", "f = lambda t: t.norm()\n\nA = [1, 2]")]


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
    frame = child.encode({"event": "result"}, child.sanitize(out))
    buffer = child.FrameBuffer()
    assert buffer.feed(frame[:3]) == []  # a partial frame waits for the rest
    (body,) = buffer.feed(frame[3:])
    head, payload = child.decode(body)
    assert head == {"event": "result"}
    back = grading._load_outputs(payload)
    assert torch.equal(back[0], torch.ones(2))
    assert back[1]["a"] == 1.5 and np.array_equal(back[1]["b"][0], np.arange(3))
    assert isinstance(back[2], Opaque) and "Weird" in repr(back[2])
    assert "should be a torch.Tensor, but it is Weird" in compare_outputs(back[2], torch.ones(1))
    with pytest.raises(ValueError, match="the limit is 10"):
        child.FrameBuffer(limit=10).feed(b"\x00\x00\x01\x00" + b"x" * 20)


def test_strict_checks_come_before_any_tensor_arithmetic() -> None:
    want = torch.ones(3)
    assert "inf or NaN" in grading._strict_problem(torch.tensor([1.0, float("nan"), 1.0]), want)
    assert "dense CPU" in grading._strict_problem(torch.ones(3).to_sparse(), want)
    assert grading._strict_problem(torch.ones(3), want) is None
    assert "finite" in grading._strict_problem((1.0, float("inf")), (1.0, 2.0))
    assert "__opaque__" in child.sanitize(torch.ones(2).to_sparse())


def test_write_grades_csv_notes_only_lost_points(tmp_path: Path) -> None:
    g = grading.StudentGrades(
        "ann",
        {
            "a": grading.ExerciseGrade("a", 1.0, 1.0),
            "b": grading.ExerciseGrade("b", 0.0, 2.0, "trial 1 raised KeyError: 'x'"),
        },
    )
    (tmp_path / "g.csv").write_text("old grades")
    path = write_grades_csv([g], tmp_path / "g.csv", seed=9, isolation="bubblewrap")
    assert path.read_text().splitlines() == [
        "student,a,b,total,max,seed,isolation,notes",
        "ann,1,0,1,3,9,bubblewrap,b: trial 1 raised KeyError: 'x'",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.csv"]  # no temporary file left


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder"])
def test_an_unusable_out_path_is_an_error_before_grading(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "grades.csv"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink":
        (tmp_path / "elsewhere.csv").write_text("")
        out.symlink_to(tmp_path / "elsewhere.csv")
    else:
        out.mkdir()
    with pytest.raises(ValueError, match="--out"):
        grading.check_output_path(out)
    subs = tmp_path / "subs"
    subs.mkdir()
    _submission(subs / "ann.ipynb", GOOD_PE, GOOD_ZS)
    start = time.monotonic()
    assert grading.main([str(subs), "--out", str(out)]) == 2
    assert time.monotonic() - start < 30  # no grading, no blocking on the FIFO
    if kind == "fifo":
        assert stat.S_ISFIFO(out.lstat().st_mode)


def test_parse_notebook_refuses_what_is_not_a_notebook() -> None:
    good = nbformat.writes(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")]))
    assert grading._cell_source(grading.parse_notebook(good.encode())["cells"][0]) == "x"
    bad = {
        b"[" * 70: "nested more than",
        b"\xff\xfe": "not a JSON notebook",
        b'{"cells": [3]}': "cell 1 is not a notebook cell",
        b'{"cells": [{"cell_type": "code", "source": 5}]}': "'source' is not text",
        b"{}" + b" " * 200: "over the limit",
    }
    for data, message in bad.items():
        with pytest.raises(ValueError, match=message):
            grading.parse_notebook(data, max_bytes=100)


def test_prompt_ensemble_fixture_answers_are_right() -> None:
    # the "correct" fixture is really correct (an independent formula: unit rows, mean, unit)
    namespace: dict = {"F": F}
    exec(GOOD_PE + "\n" + GOOD_ZS, namespace)
    t = torch.randn(3, 4, 5, dtype=torch.float64)  # float64: the two differ by rounding only
    want = F.normalize(F.normalize(t, dim=-1).mean(1), dim=-1)
    # float64 unit rows, D = 5, M = 4: <= 2 (D + M + 2) roundings of 1.1e-16, < 1e-14
    assert torch.allclose(namespace["my_prompt_ensemble"](t), want, atol=1e-12, rtol=0)


def test_run_all_runs_the_cells_that_definitions_only_mode_skips(tmp_path: Path) -> None:
    # the answer needs a top-level value computed by a call: only --run-all runs it
    nb = _write(
        tmp_path / "ann.ipynb",
        "SCALE = float(1)",
        _check_cell(
            "def my_zero_shot_logits(f, W, logit_scale=100.0):\n"
            "    return SCALE * logit_scale * f @ W.T",
            "zero_shot_logits",
            "my_zero_shot_logits",
        ),
    )
    config = GradeConfig(seed=3, timeout=60.0, setup_timeout=120.0)
    lean = grading.grade_notebooks([nb], ["zero_shot_logits"], config)
    assert lean.total == 0 and "NameError" in lean.grades["zero_shot_logits"].reason
    config.run_all = True
    full = grading.grade_notebooks([nb], ["zero_shot_logits"], config)
    assert full.total == 1


def test_cli_says_which_isolation_it_used_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fallback (--sandbox none, or auto without bwrap) says so first and in the CSV."""
    from fewclip_tutorial.cli import main

    subs = tmp_path / "subs"
    subs.mkdir()
    _submission(subs / "ann.ipynb", GOOD_PE, GOOD_ZS)
    out = tmp_path / "grades.csv"
    logs = tmp_path / "logs"
    for mode in ("none", "auto"):
        args = ["grade", str(subs), "--out", str(out), "--seed", "5", "--timeout", "60"]
        args += ["--sandbox", mode]
        assert main([*args, "--logs", str(logs)]) == 0
        first = capsys.readouterr().err.splitlines()[0]
        with open(out, newline="") as f:
            (row,) = csv.DictReader(f)
        assert row["total"] == "2"
        if mode == "none" or not SANDBOXED:
            assert first.startswith("isolation: NO OS SANDBOX")
            assert "accidents only" in first and row["isolation"].startswith("none")
        else:
            assert first.startswith("isolation: bubblewrap sandbox")
            assert row["isolation"] == "bubblewrap"
    assert [p.name for p in logs.iterdir()] == [grading.log_name("ann")]


def test_an_output_flood_in_the_cells_is_reported_as_one(tmp_path: Path) -> None:
    nb = _write(
        tmp_path / "ann.ipynb",
        _check_cell(GOOD_ZS + "\nwhile True:\n    print('spam' * 1000)", "zero_shot_logits", "x"),
    )
    # 15 s to print 100 kB, 4 kB a line: a margin of hundreds for a loaded machine
    config = GradeConfig(seed=3, timeout=60.0, setup_timeout=15.0, output_limit=100_000)
    g = grading.grade_notebooks([nb], ["zero_shot_logits"], config)
    reason = g.grades["zero_shot_logits"].reason
    assert g.total == 0 and "time limit (15 s)" in reason and "an output flood" in reason


@pytest.mark.slow
def test_a_sandbox_per_student_grades_the_same(tmp_path: Path) -> None:
    _submission(tmp_path / "ann.ipynb", GOOD_PE, GOOD_ZS)
    _submission(tmp_path / "bob.ipynb", WRONG_PE, GOOD_ZS)
    # a generous deadline: each sandbox imports torch anew, seconds on a loaded machine
    config = GradeConfig(seed=2, timeout=120.0, setup_timeout=120.0, sandbox_per_student=True)
    grades = grade_directory(tmp_path, config, isolation=ISOLATION)
    assert [(g.student, g.total) for g in grades] == [("ann", 2.0), ("bob", 1.0)]
    assert _grader_processes() == []


def test_a_sandbox_that_cannot_start_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _submission(tmp_path / "ann.ipynb", GOOD_PE, GOOD_ZS)
    monkeypatch.setattr(child, "__name__", "no_such_grader_module")
    out = tmp_path / "grades.csv"
    assert grading.main([str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "did not start" in err and "no_such_grader_module" in err and "--sandbox none" in err
    assert not out.exists()


def test_the_sandbox_refuses_to_show_the_submissions_with_the_interpreter() -> None:
    import sys

    with pytest.raises(ValueError, match="move the submissions out of it"):
        grading._bwrap_prefix([str(Path(sys.prefix) / "submissions")])
    command = grading._bwrap_command(9, ["/nonexistent/submissions"])
    binds = {command[i + 1] for i, a in enumerate(command) if a in ("--ro-bind", "--bind")}
    assert str(grading._package_dir()) in binds
    assert str(grading._package_dir().parent) not in binds  # not the book next to it
    assert "--unshare-all" in command and "--die-with-parent" in command


def test_readable_by_others_follows_every_parent(tmp_path: Path) -> None:
    import tempfile

    top = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        (top / "lib").mkdir()
        top.chmod(0o755)
        (top / "lib").chmod(0o755)
        assert grading._readable_by_others([top / "lib"])
        top.chmod(0o700)
        assert not grading._readable_by_others([top / "lib"])
    finally:
        top.chmod(0o755)
        (top / "lib").rmdir()
        top.rmdir()


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="drops to user 65534 only when run as root")
def test_as_root_a_failed_drop_to_nobody_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # claim the interpreter is readable by user 65534: where it is not, the start as
    # 65534 fails and the box starts as root (uid 65534 inside) instead
    monkeypatch.setattr(grading, "_readable_by_others", lambda paths: True)
    box = grading._Box(ISOLATION, GradeConfig(), [])
    try:
        box.start()
        assert box.alive
        monkeypatch.undo()
        nobody_can = grading._readable_by_others(
            [*grading._interpreter_roots(), grading._package_dir()]
        )
        assert box.drop_ok is nobody_can  # dropped where it can, fell back where not
    finally:
        box.close()


def test_names_reach_the_terminal_without_control_characters() -> None:
    assert grading._printable("ann\x1b[2J\nlee") == "ann\ufffd[2J\ufffdlee"
    assert grading._printable("李雷 ann_lee") == "李雷 ann_lee"


def test_an_interpreter_under_tmp_stays_visible_in_the_sandbox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A virtual environment in a checkout under /tmp (as CI may clone it) is bound on top
    of the sandbox's private /tmp, not hidden by it."""
    venv = Path("/tmp/some-ci-checkout/.venv")
    monkeypatch.setattr(grading, "_interpreter_roots", lambda: [venv])
    cmd = grading._bwrap_prefix()
    tmpfs = cmd.index("--tmpfs")
    assert cmd[tmpfs + 1] == "/tmp"
    bind = [i for i, a in enumerate(cmd) if a == "--ro-bind" and cmd[i + 1] == str(venv)]
    assert bind and bind[0] > tmpfs, cmd
    assert cmd.index(str(grading._package_dir())) > tmpfs
