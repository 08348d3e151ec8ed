"""Grade a class's submitted notebooks: ``fewclip grade SUBMISSIONS_DIR --out grades.csv``.

A *submission* is a student's copy of a chapter notebook (the student edition of
``make assignments``) with the exercise functions filled in.  ``SUBMISSIONS_DIR``
holds one notebook per student (``alice.ipynb``) or one folder per student
(``alice/02_tip_adapter.ipynb``, ...).

How a class is graded
---------------------
1. **Every notebook is read into memory and validated first** (a size cap, the
   notebook schema, a nesting-depth cap; symbolic links and anything but a plain
   file are refused).  A notebook that fails gives its student zero with the
   reason; nothing on disk is read again, so no submission can change another.
2. **Student code runs in an OS-level sandbox**: on Linux with bubblewrap
   (``bwrap``) one sandbox holds a read-only view of the interpreter and of this
   package only (not the submissions, not the book, not the instructor edition,
   not the grader's output; the package is a copy, :func:`reference_view`, in which
   every exercise's reference functions are stubs), a private tmpfs as the only writable place, no
   network, its own PID namespace, a non-root user, and CPU, memory, process and
   file-size limits set from outside.  Inside, a process that has imported torch
   forks one *student process* per notebook, in a fresh work folder; when it ends,
   every process it left behind is killed, ``/tmp``, ``/dev/shm`` and the message
   queues are emptied, IPC objects and keyrings cleared, and all of it checked: a
   sandbox with anything left is replaced by a fresh one before the next student
   (``--sandbox-per-student`` starts a fresh sandbox for every student, slower).
   A process of the sandbox that a student stopped is resumed.  Without bubblewrap the
   grader says so on its first line and in the CSV, and runs the student process
   under an in-process audit hook: **a guard against accidents only**.
3. The student process runs the notebook's imports, definitions, constants,
   lambdas and exercise cells (``--run-all``: every cell), statement by statement
   (a failing statement is logged and the next one runs).
   ``get_exercise(NAME).check(fn)`` records ``fn``: the exercises graded are the
   checks that ran.
4. For each exercise the grader draws fresh inputs (trial ``t`` uses
   ``exercise_seed(run_seed, NAME) + t``; the run seed never enters the sandbox),
   sends them, and gets the student's outputs back as data only
   (``torch.load(weights_only=True)``).  **The reference outputs and the
   comparison are computed in the grader's process, outside the sandbox**, after
   strict type, dtype, shape, layout and finiteness checks.
5. Zero for an exercise, with the reason, when the function raises, returns a
   wrong value, changes its input in place, runs past ``--timeout`` (a deadline
   kept by the grader, which nothing the student sends can move), prints more
   than ``--output-limit`` bytes while it runs, kills its process, or calls the
   package's own answer (in the sandbox a stub: the answer's code is not there; an
   answer that failed after calling *another* exercise's reference, a stub too, is
   graded again alone in a process that gets the real code of every reference but its
   own exercise's) or copies it (a best-effort check inside the student process: see
   the instructors' page).  Zero for every exercise of a notebook
   that leaves a process running after it finished.

The CSV (written atomically) has one row per student: ``student``, one score column
per exercise, ``total``, ``max``, ``seed``, ``isolation`` and ``notes``.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewclip_tutorial.course import _grading_child as child

__all__ = [
    "ExerciseGrade",
    "GradeConfig",
    "Isolation",
    "ReferenceView",
    "StudentGrades",
    "build_parser",
    "check_output_path",
    "detect_isolation",
    "exercise_seed",
    "exercises_in",
    "find_submissions",
    "grade_directory",
    "grade_notebooks",
    "load_submissions",
    "main",
    "new_run_seed",
    "notebook_code",
    "parse_notebook",
    "reference_view",
    "stub_module_source",
    "write_grades_csv",
]

# --------------------------------------------------------------------------- results


@dataclass
class ExerciseGrade:
    """The grade of one exercise of one student."""

    name: str
    score: float
    points: float
    reason: str = ""


@dataclass
class StudentGrades:
    """All exercise grades of one student (``notebooks``: the files graded)."""

    student: str
    grades: dict[str, ExerciseGrade] = field(default_factory=dict)
    notebooks: list[str] = field(default_factory=list)
    log: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return float(sum(g.score for g in self.grades.values()))

    @property
    def max_points(self) -> float:
        return float(sum(g.points for g in self.grades.values()))


@dataclass
class GradeConfig:
    """Limits of one grading run.

    Attributes:
        seed: the run seed; trial ``t`` of exercise ``name`` uses
            :func:`exercise_seed` ``(seed, name) + t``.
        timeout: seconds one exercise (all its trials) may take.
        setup_timeout: seconds the notebook's cells may take before the exercises.
        output_limit: bytes a student's function may print while it is graded.
        memory_limit: bytes of address space the student process may add.
        n_trials: trials per exercise (default: the exercise's own ``n_trials``).
        run_all: run every cell, not only imports, definitions and exercise cells.
        sandbox: ``"auto"`` (bubblewrap when it works, else the guard), ``"bwrap"``
            (an error without it) or ``"none"`` (the in-process guard only).
        sandbox_per_student: a fresh sandbox for every student (slower: each start
            imports torch again).
        max_notebook_bytes: larger notebooks are refused.
    """

    seed: int = 0
    timeout: float = 10.0
    setup_timeout: float = 60.0
    output_limit: int = 1_000_000
    memory_limit: int = 4 << 30
    n_trials: int | None = None
    run_all: bool = False
    sandbox: str = "auto"
    sandbox_per_student: bool = False
    max_notebook_bytes: int = 20 << 20


def exercise_seed(run_seed: int, name: str) -> int:
    """The first trial seed of exercise ``name`` in run ``run_seed`` (stable across machines)."""
    digest = hashlib.sha256(f"{run_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x3FFFFFFF


def new_run_seed() -> int:
    """A fresh run seed (so that no list of inputs can be learnt in advance)."""
    return secrets.randbits(30)


# --------------------------------------------------------------------------- notebooks

_MAGIC = re.compile(r"^\s*[%!]")
_EXERCISE_CALL = re.compile(r"get_exercise\s*\(\s*['\"]([A-Za-z0-9_]+)['\"]\s*\)")
_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
MAX_DEPTH = 64


def parse_notebook(data: bytes, max_bytes: int = 20 << 20) -> dict[str, Any]:
    """A validated notebook from its bytes; ValueError naming the problem otherwise.

    Checks: at most ``max_bytes``, UTF-8 JSON, nesting at most ``MAX_DEPTH``, a dict
    with a ``cells`` list of dicts whose ``cell_type`` is a string and whose
    ``source`` is a string or a list of strings.
    """
    if len(data) > max_bytes:
        raise ValueError(f"the file is {len(data)} bytes, over the limit of {max_bytes}")
    depth = level = 0
    in_string = escaped = False
    for byte in data:  # the nesting depth before the JSON parser recurses into it
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            level += 1
            depth = max(depth, level)
            if depth > MAX_DEPTH:
                raise ValueError(f"its JSON is nested more than {MAX_DEPTH} levels deep")
        elif byte in (0x5D, 0x7D):
            level -= 1
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"it is not a JSON notebook ({str(err)[:120]})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError("it is not a Jupyter notebook (no 'cells' list)")
    for i, cell in enumerate(nb["cells"], 1):
        if not isinstance(cell, dict) or not isinstance(cell.get("cell_type"), str):
            raise ValueError(f"cell {i} is not a notebook cell (no 'cell_type')")
        src = cell.get("source", "")
        if not (
            isinstance(src, str) or (isinstance(src, list) and all(isinstance(s, str) for s in src))
        ):
            raise ValueError(f"cell {i}'s 'source' is not text")
    return nb


def _read_notebook(path: Path, max_bytes: int = 20 << 20) -> dict[str, Any]:
    return parse_notebook(_read_regular_file(path, max_bytes), max_bytes)


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """A plain file's bytes; ValueError for a symbolic link, a FIFO, a folder, a large file."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ValueError("it is a symbolic link (hand in the notebook itself)")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("it is not a plain file")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("it is not a plain file")
        if st.st_size > max_bytes:
            raise ValueError(f"the file is {st.st_size} bytes, over the limit of {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"the file is over the limit of {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _cell_source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _is_cheap(node: ast.AST) -> bool:
    """An assignment whose value makes no call outside a lambda: a constant, a lambda, an alias."""
    value = getattr(node, "value", None)
    if value is None:
        return False
    todo: list[ast.AST] = [value]
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Lambda):
            continue
        if isinstance(n, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr)):
            return False
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return False
        todo.extend(ast.iter_child_nodes(n))
    return True


def notebook_code(nb: Mapping[str, Any], run_all: bool = False) -> list[tuple[str, str]]:
    """The code a graded notebook runs, as ``(label, code)`` pairs in cell order.

    IPython magics (``%...``, ``!...``) are dropped.  Unless ``run_all``, a cell
    that does not mention ``get_exercise`` keeps only its top-level imports,
    functions, classes and *cheap* assignments (constants, lambdas, aliases: no
    call outside a lambda); a cell that does not parse is kept as it is (running it
    reports the ``SyntaxError``).
    """
    out: list[tuple[str, str]] = []
    n = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        n += 1
        src = "\n".join(
            "" if _MAGIC.match(line) else line for line in _cell_source(cell).splitlines()
        )
        if not src.strip():
            continue
        label = f"cell {n}"
        if run_all or "get_exercise" in src:
            out.append((label, src))
            continue
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            out.append((label, src))
            continue
        kept = [
            node
            for node in tree.body
            if isinstance(node, _KEEP)
            or (isinstance(node, (ast.Assign, ast.AnnAssign)) and _is_cheap(node))
        ]
        if kept:
            out.append((label, "\n\n".join(ast.get_source_segment(src, k) or "" for k in kept)))
    return out


def exercises_in(nb: Mapping[str, Any]) -> list[str]:
    """Names a notebook's code passes literally to ``get_exercise``, in order (a hint only:
    the grader grades the checks that actually ran)."""
    names: list[str] = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            for name in _EXERCISE_CALL.findall(_cell_source(cell)):
                if name not in names:
                    names.append(name)
    return names


# --------------------------------------------------------------------------- submissions


def find_submissions(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """``{student: [notebooks]}``: ``root/NAME.ipynb`` or every notebook under ``root/NAME/``.

    Checkpoint folders (``.ipynb_checkpoints``) and hidden files are skipped; symbolic
    links are listed (and refused when read); symbolic links to folders are not
    followed.  ``NAME.ipynb`` and a folder ``NAME/`` are the same student.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Submissions folder {root} does not exist or is not a folder.")
    found: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name.endswith(".ipynb") and (entry.is_symlink() or not entry.is_dir()):
            found.setdefault(entry.name[: -len(".ipynb")], []).append(entry)
        elif entry.is_dir() and not entry.is_symlink():
            notebooks: list[Path] = []
            for top, dirs, files in os.walk(entry, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                notebooks += [
                    Path(top) / f for f in sorted(files) if f.endswith(".ipynb") and f[0] != "."
                ]
            if notebooks:
                found.setdefault(entry.name, []).extend(notebooks)
        elif entry.is_symlink() and entry.is_dir():
            found.setdefault(entry.name, []).append(entry)
    if not found:
        raise FileNotFoundError(
            f"No notebooks in {root}: put one NAME.ipynb per student, or one folder per student."
        )
    return found


@dataclass
class LoadedNotebook:
    """One submitted notebook, read and validated (``error``: why it cannot be graded)."""

    path: Path
    notebook: dict[str, Any] | None
    error: str = ""


def load_submissions(
    root: str | os.PathLike[str], max_bytes: int = 20 << 20
) -> dict[str, list[LoadedNotebook]]:
    """Every student's notebooks, read into memory and validated before anything runs."""
    out: dict[str, list[LoadedNotebook]] = {}
    for student, paths in find_submissions(root).items():
        loaded: list[LoadedNotebook] = []
        for p in paths:
            try:
                loaded.append(LoadedNotebook(p, _read_notebook(p, max_bytes)))
            except (OSError, ValueError) as err:
                loaded.append(LoadedNotebook(p, None, f"{p.name}: {err}"))
        out[student] = loaded
    return out


# --------------------------------------------------------------------------- isolation


@dataclass
class Isolation:
    """How student code is isolated: ``kind`` is ``"bubblewrap"`` or ``"guard"``."""

    kind: str
    description: str

    @property
    def sandboxed(self) -> bool:
        return self.kind == "bubblewrap"

    @property
    def label(self) -> str:
        """The CSV's ``isolation`` column."""
        return "bubblewrap" if self.sandboxed else "none (in-process guard against accidents only)"


_BWRAP_OK: dict[str, str] = {}


def _bwrap_problem() -> str:
    """Why bubblewrap cannot be used here ("" when it can)."""
    if "problem" in _BWRAP_OK:
        return _BWRAP_OK["problem"]
    problem = ""
    exe = shutil.which("bwrap")
    if sys.platform != "linux":
        problem = f"no OS sandbox on {sys.platform} (bubblewrap needs Linux)"
    elif exe is None:
        problem = "bwrap not found (Debian/Ubuntu: apt-get install bubblewrap)"
    else:
        try:
            run = subprocess.run(
                [*_bwrap_prefix(), "--", sys.executable, "-c", "import sys"],
                capture_output=True,
                timeout=60,
                env=_sandbox_env(),
            )
            if run.returncode:
                why = run.stderr.decode(errors="replace").strip()[:200]
                problem = f"bwrap cannot create a sandbox here ({why}: user namespaces disabled?)"
        except (OSError, subprocess.SubprocessError) as err:
            problem = f"bwrap does not run ({err})"
    _BWRAP_OK["problem"] = problem
    return problem


def detect_isolation(mode: str = "auto") -> Isolation:
    """The isolation a run will use (``mode``: ``auto``, ``bwrap`` or ``none``)."""
    if mode not in ("auto", "bwrap", "none"):
        raise ValueError(f"Unknown sandbox mode {mode!r}; use auto, bwrap or none.")
    problem = "--sandbox none was asked for" if mode == "none" else _bwrap_problem()
    if not problem:
        keyrings = child.keyrings_unchecked()
        return Isolation(
            "bubblewrap",
            "bubblewrap sandbox: read-only interpreter, the package with the exercises' "
            "reference solutions replaced by stubs, private tmpfs, no network, "
            "own PID namespace, uid 65534, CPU/memory/process/file-size limits"
            + (f"; {keyrings}" if keyrings else ""),
        )
    if mode == "bwrap":
        raise ValueError(f"--sandbox bwrap: {problem}")
    return Isolation(
        "guard",
        f"NO OS SANDBOX ({problem}): student code runs under an in-process audit hook, "
        "a guard against accidents only, not against a deliberate student",
    )


_BASE_FLAGS = (
    "--unshare-all",
    "--die-with-parent",
    "--new-session",
    "--uid",
    "65534",
    "--gid",
    "65534",
)


def _package_dir() -> Path:
    import fewclip_tutorial

    return Path(fewclip_tutorial.__file__).resolve().parent


def _bwrap_supports(flag: str) -> bool:
    """Whether this bwrap knows ``flag`` (``--size`` is bwrap >= 0.8)."""
    key = f"flag {flag}"
    if key not in _BWRAP_OK:
        try:
            out = subprocess.run(
                [shutil.which("bwrap") or "bwrap", "--help"], capture_output=True, timeout=30
            )
            _BWRAP_OK[key] = "yes" if flag.encode() in out.stdout + out.stderr else ""
        except (OSError, subprocess.SubprocessError):
            _BWRAP_OK[key] = ""
    return bool(_BWRAP_OK[key])


def _sandbox_env() -> dict[str, str]:
    """The whole environment inside the sandbox (bwrap passes its own on)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "PYTHONPATH": str(_package_dir().parent),
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "FEWCLIP_EDITION": "student",
        "LANG": "C.UTF-8",
    }


def _bwrap_prefix(
    private: Sequence[str] = (), tmp_bytes: int = 512 << 20, package_view: Path | None = None
) -> list[str]:
    """bwrap with a read-only view of the interpreter, its libraries and this package only
    (``package_view``, a :class:`ReferenceView` root, shown in the package's place).

    ValueError when a folder the interpreter needs holds one of ``private`` (the
    submissions would be visible inside).
    """
    exe = shutil.which("bwrap") or "bwrap"
    cmd = [exe, *_BASE_FLAGS]
    for system in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32"):
        cmd += ["--ro-bind-try", system, system]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/fonts"):
        cmd += ["--ro-bind-try", f, f]
    roots = _interpreter_roots()
    hidden = [Path(os.path.realpath(x)) for x in private]
    for r in [*roots, Path("/usr")]:
        for h in hidden:
            if h == r or r in h.parents:
                raise ValueError(
                    f"the sandbox must show {r} (the interpreter's files), which holds {h}: "
                    "move the submissions out of it"
                )
    # the private /tmp first: an interpreter or package that lives under /tmp (a virtual
    # environment in a CI checkout there) is bound on top of it, read-only, and stays visible
    if _bwrap_supports("--size"):
        cmd += ["--size", str(tmp_bytes)]
    cmd += ["--tmpfs", "/tmp"]
    for r in roots:
        cmd += ["--ro-bind", str(r), str(r)]
    package = _package_dir()
    shown = package if package_view is None else package_view
    cmd += ["--ro-bind", str(shown), str(package), "--proc", "/proc", "--dev", "/dev"]
    # /dev read-only but for its own small /dev/shm and POSIX message queues: the zygote
    # empties both (and /tmp) between students and checks that they are empty
    if _bwrap_supports("--size"):
        cmd += ["--size", str(64 << 20)]
    cmd += ["--tmpfs", "/dev/shm"]
    if _bwrap_supports("--mqueue"):
        cmd += ["--mqueue", "/dev/mqueue"]
    cmd += ["--remount-ro", "/dev"]
    return [*cmd, "--chdir", "/tmp"]


# --------------------------------------------------------------------------- the package view


@dataclass
class ReferenceView:
    """The package as the sandbox shows it: a copy in which every exercise's reference
    functions (:meth:`~fewclip_tutorial.course.exercises.Exercise.forbidden_functions`) are
    stubs that raise :class:`~fewclip_tutorial.course.exercises.ReferenceHiddenError`.

    Attributes:
        root: the copy (no ``__pycache__``), bound read-only over the package's folder.
        stubs: ``{(module, name): exercises}``: the stubbed functions and whose they are.
        sources: ``{(module, name): source}``: the real code of each stubbed function, sent
            into a student process that grades one exercise only (its building blocks:
            another exercise's reference stays usable, the graded one's never arrives).
        keys: ``{exercise: [(label, key)]}``: what a copy of each forbidden function's code
            looks like (see ``_grading_child._code_key``), for the in-process check.
        skipped: forbidden functions not defined at a module's top level (lambdas and nested
            wrappers of the catalog): not stubbed, they only call a stubbed function.
    """

    root: Path
    stubs: dict[tuple[str, str], tuple[str, ...]]
    sources: dict[tuple[str, str], str]
    keys: dict[str, list[tuple[str, str]]]
    skipped: list[str]

    def restore_for(self, exercise: str) -> list[tuple[str, str, str]]:
        """``[(module, name, source)]``: every stub but those of ``exercise``, made real."""
        return [
            (module, name, self.sources[module, name])
            for (module, name), owners in self.stubs.items()
            if exercise not in owners
        ]


def _stub_statement(label: str, owners: Sequence[str]) -> str:
    return (
        "from fewclip_tutorial.course.exercises import _reference_hidden as _h; "
        f"raise _h({label!r}, {tuple(owners)!r})"
    )


def stub_module_source(
    source: str, module: str, names: Mapping[str, Sequence[str]]
) -> tuple[str, dict[str, str]]:
    """``(source with the top-level functions in names stubbed, {name: real source})``.

    Each stubbed function keeps its decorators and signature; its body (docstring included)
    becomes one ``raise`` of :class:`~fewclip_tutorial.course.exercises.ReferenceHiddenError`
    naming the exercises in ``names[function]``.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    real: dict[str, str] = {}
    edits: list[tuple[int, int, int, str]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            end = node.end_lineno or node.lineno
            real[node.name] = "".join(lines[first - 1 : end])
            body = node.body[0]
            edits.append((body.lineno, body.col_offset, end, node.name))
    for lineno, col, end, name in sorted(edits, reverse=True):
        head = lines[lineno - 1].encode()[:col].decode()  # col_offset counts UTF-8 bytes
        stub = _stub_statement(f"{module}.{name}", names[name])
        lines[lineno - 1 : end] = [head + stub + "\n"]
    return "".join(lines), real


_VIEWS: dict[str, ReferenceView] = {}


def reference_view() -> ReferenceView:
    """The sandbox's copy of the package (made once per grading process; removed at exit)."""
    import atexit
    import sys as _sys

    from fewclip_tutorial.course.exercises import get_exercise, list_exercises

    package = _package_dir()
    if str(package) in _VIEWS:
        return _VIEWS[str(package)]
    per_module: dict[str, dict[str, list[str]]] = {}
    keys: dict[str, list[tuple[str, str]]] = {}
    skipped: list[str] = []
    for name in list_exercises():
        keys[name] = []
        for fn in get_exercise(name).forbidden_functions():
            label = f"{fn.__module__}.{fn.__qualname__}"
            keys[name].append((label, repr(child._code_key(fn.__code__))))
            if "." in fn.__qualname__ or "<" in fn.__qualname__:
                skipped.append(label)
                continue
            owners = per_module.setdefault(fn.__module__, {}).setdefault(fn.__qualname__, [])
            owners.append(name)
    top = Path(tempfile.mkdtemp(prefix="fewclip-grade-view-"))
    atexit.register(shutil.rmtree, top, True)
    root = top / package.name
    shutil.copytree(package, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    stubs: dict[tuple[str, str], tuple[str, ...]] = {}
    sources: dict[tuple[str, str], str] = {}
    for module, names in per_module.items():
        path = Path(_sys.modules[module].__file__ or "").resolve()
        text, real = stub_module_source(path.read_text(encoding="utf-8"), module, names)
        missing = set(names) - set(real)
        if missing:
            skipped += [f"{module}.{n}" for n in sorted(missing)]
        (root / path.relative_to(package)).write_text(text, encoding="utf-8")
        for fname, src in real.items():
            stubs[module, fname] = tuple(names[fname])
            sources[module, fname] = src
    os.chmod(top, 0o755)  # a grader run as root starts bwrap as user 65534: it must read it
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)
    view = ReferenceView(root, stubs, sources, keys, skipped)
    _VIEWS[str(package)] = view
    return view


def _interpreter_roots() -> list[Path]:
    """The folders the interpreter and its libraries live in (the sandbox shows them)."""
    package = _package_dir()
    roots: list[Path] = []
    candidates = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).parent]
    for entry in sys.path:
        p = Path(entry) if entry else None
        if p is None or not p.is_dir():
            continue
        if (p / package.name).resolve() == package:
            continue  # the folder above the package (a source checkout): the package only
        if p.name in ("site-packages", "dist-packages"):
            candidates.append(p)
    for c in candidates:
        for p in {c, c.resolve()}:
            if p.is_dir() and not any(p == r or r in p.parents for r in roots):
                roots = [r for r in roots if p not in r.parents] + [p]
    return roots


def _readable_by_others(paths: Iterable[Path]) -> bool:
    """Whether another user (65534) can reach and read every one of ``paths``."""
    try:
        for p in paths:
            p = Path(os.path.realpath(p))
            if not os.stat(p).st_mode & stat.S_IROTH:
                return False
            if not all(os.stat(d).st_mode & stat.S_IXOTH for d in [p, *p.parents]):
                return False
    except OSError:
        return False
    return True


def _bwrap_command(
    output_fd: int, private: Sequence[str] = (), package_view: Path | None = None
) -> list[str]:
    """The sandbox's command line: bwrap, then the zygote."""
    zygote = ["-m", child.__name__, "--sandboxed", "--output-fd", str(output_fd)]
    return [*_bwrap_prefix(private, package_view=package_view), "--", sys.executable, *zygote]


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _SandboxDied(Exception):
    """The sandbox's process ended or stopped answering."""


class _Box:
    """One sandbox (or, without bubblewrap, one guarded process) with a zygote inside."""

    def __init__(self, isolation: Isolation, config: GradeConfig, private: Sequence[str]) -> None:
        self.isolation = isolation
        self.config = config
        self.private = list(private)
        self.proc: subprocess.Popen[bytes] | None = None
        self.frames = child.FrameBuffer(child.MAX_FRAME + 1)
        self.pending: list[bytes] = []
        self.out_r = -1
        self.output = bytearray()
        self.output_seen = 0
        self.log_limit = 64_000
        self.work = "/tmp/work"
        self.drop_ok = True
        #: what the student process reported against itself the moment it happened (a call
        #: of the reference, tampering): kept here, out of the student's reach
        self.flags: list[str] = []

    # ---- life cycle
    def start(self) -> None:
        """Start the zygote; as root, bwrap itself runs as user 65534 when that user can read
        the interpreter (else, or if that fails, as root with uid 65534 inside only)."""
        drop = (
            self.isolation.sandboxed
            and self.drop_ok
            and hasattr(os, "geteuid")
            and os.geteuid() == 0
            and _readable_by_others([*_interpreter_roots(), _package_dir()])
        )
        try:
            self._start(drop)
        except (_SandboxDied, subprocess.SubprocessError, OSError):
            if not drop:
                raise
            self.drop_ok = False
            self._start(False)

    def _start(self, drop: bool) -> None:
        import resource

        if sys.platform == "win32":
            raise OSError("fewclip grade needs fork (Linux or macOS); on Windows run it in WSL.")
        self.close()
        out_r, out_w = os.pipe()
        os.set_blocking(out_r, False)
        self.out_r = out_r
        sandboxed = self.isolation.sandboxed
        if sandboxed:
            try:
                cmd = _bwrap_command(out_w, self.private, reference_view().root)
            except (ValueError, OSError, SyntaxError) as err:
                os.close(out_w)
                raise _SandboxDied(str(err)) from None
            self.work = "/tmp/work"
        else:
            self._tmp = tempfile.mkdtemp(prefix="fewclip-grade-")
            self.work = os.path.join(self._tmp, "work")
            cmd = [sys.executable, "-m", child.__name__, "--guard", "--output-fd", str(out_w)]
        address_space = _vm_size() + self.config.memory_limit + (1 << 30)

        def limits() -> None:  # pragma: no cover - runs between fork and exec
            os.setsid()
            for res, value in (
                (resource.RLIMIT_AS, address_space),
                (resource.RLIMIT_FSIZE, 256 << 20),
                (resource.RLIMIT_CORE, 0),
                (resource.RLIMIT_NOFILE, 1024),
            ):
                with contextlib.suppress(Exception):
                    resource.setrlimit(res, (value, value))
            if sandboxed:  # counted per user namespace (Linux >= 5.14): the sandbox's own
                with contextlib.suppress(Exception):
                    resource.setrlimit(resource.RLIMIT_NPROC, (256, 256))
            if drop:  # not root outside the sandbox either
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)

        if sandboxed:
            env = _sandbox_env()
        else:
            env = dict(os.environ)
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FEWCLIP_EDITION="student")
            env["PYTHONPATH"] = os.pathsep.join(
                [str(_package_dir().parent), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=out_w,
            pass_fds=(out_w,),
            preexec_fn=limits,  # noqa: PLW1509 - setrlimit before exec is what it is for
            env=env,
        )
        os.close(out_w)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.frames = child.FrameBuffer(child.MAX_FRAME + 1)
        self.pending = []
        source, header, _ = self.next(time.monotonic() + 600)
        if source != "Z" or header.get("event") != "ready":
            raise _SandboxDied("the sandbox did not start")
        self.take_output()

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(120)  # SIGKILLed: only a very loaded machine takes seconds
            for f in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(Exception):
                    f.close()  # type: ignore[union-attr]
            self.proc = None
        if self.out_r >= 0:
            with contextlib.suppress(OSError):
                os.close(self.out_r)
            self.out_r = -1
        if getattr(self, "_tmp", None):
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def resume_stopped(self) -> int:
        """SIGCONT to every stopped process of the sandbox (a student's process may stop the
        zygote, which would otherwise hold up the grader until a deadline); how many."""
        if self.proc is None or not sys.platform.startswith("linux"):
            return 0
        parents: dict[int, int] = {}
        stopped: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            if fields[0] == b"T":
                stopped.add(int(entry))
        resumed = 0
        for pid in stopped:
            up, hops = pid, 0
            while up > 1 and up != self.proc.pid and hops < 64:
                up, hops = parents.get(up, 0), hops + 1
            if up == self.proc.pid:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)
                    resumed += 1
        return resumed

    # ---- messages
    def send(self, header: Mapping[str, Any], payload: Any = None, timeout: float = 60.0) -> None:
        """Write a frame, reading what comes meanwhile (neither side can block the other)."""
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stdout is not None
        data = memoryview(child.encode(header, payload))
        fd_in, fd_out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _SandboxDied("the sandbox stopped reading the grader's messages")
            ready, can_write, _ = select.select([fd_out, self.out_r], [fd_in], [], min(left, 0.5))
            if self.out_r in ready:
                self._drain_output()
            if fd_out in ready:
                self._read_frames(fd_out)
            if can_write:
                try:
                    data = data[os.write(fd_in, data[: 1 << 16]) :]
                except BlockingIOError:
                    continue
                except OSError as err:
                    raise _SandboxDied(f"the sandbox stopped ({err})") from None

    def _read_frames(self, fd: int) -> None:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            self._drain_output()
            raise _SandboxDied("the sandbox's process ended")
        try:
            self.pending += self.frames.feed(chunk)
        except ValueError as err:
            raise _SandboxDied(str(err)) from None

    def _drain_output(self) -> None:
        while self.out_r >= 0:
            try:
                chunk = os.read(self.out_r, 1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not chunk:
                return
            self.output_seen += len(chunk)
            room = self.log_limit - len(self.output)
            if room > 0:
                self.output += chunk[:room]

    def take_output(self) -> str:
        self._drain_output()
        text = self.output.decode("utf-8", "replace")
        if self.output_seen > len(self.output):
            text += f"\n[grader] ... {self.output_seen - len(self.output)} more bytes not kept"
        self.output = bytearray()
        self.output_seen = 0
        return text

    def next(
        self, deadline: float, flood_limit: int | None = None
    ) -> tuple[str, dict[str, Any], bytes]:
        """The next frame: ``("Z" | "C", header, payload)``, ``("timeout"|"flood", {}, b"")``."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        if flood_limit is not None:
            self._drain_output()  # what the cells printed before does not count
        start_seen = self.output_seen
        while True:
            while not self.pending:
                if flood_limit is not None and self.output_seen - start_seen > flood_limit:
                    return "flood", {}, b""
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout", {}, b""
                ready, _, _ = select.select([fd, self.out_r], [], [], min(left, 0.5))
                if self.out_r in ready:
                    self._drain_output()
                if fd in ready:
                    self._read_frames(fd)
                elif not ready:
                    self.resume_stopped()
            body = self.pending.pop(0)
            source, body = body[:1].decode("latin-1"), body[1:]
            try:
                header, payload = child.decode(body)
            except (ValueError, RecursionError):
                header, payload = {"event": "unreadable"}, b""
            if source == "C" and header.get("event") == "flag":
                self.flags.append(str(header.get("what"))[:300])
                continue
            return source, header, payload


# --------------------------------------------------------------------------- grading


def _describe_exit(code: Any) -> str:
    if not isinstance(code, int):
        return "the process ended"
    if code < 0:
        sig = -code
        if sig == getattr(signal, "SIGXCPU", -1):
            return "used more CPU time than allowed"
        if sig == getattr(signal, "SIGXFSZ", -1):
            return "wrote a file larger than allowed"
        try:
            return f"the process died ({signal.Signals(sig).name})"
        except ValueError:
            return f"the process died (signal {sig})"
    return f"the process exited with status {code} before finishing"


def _restore(x: Any, depth: int = 0) -> Any:
    from fewclip_tutorial.course.exercises import Opaque

    if depth > 40:
        raise ValueError("nested too deeply")
    if isinstance(x, dict):
        if set(x) == {"__opaque__"}:
            return Opaque(str(x["__opaque__"])[:300])
        if set(x) == {"__ndarray__"}:
            return x["__ndarray__"].numpy()
        return {k: _restore(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_restore(v, depth + 1) for v in x)
    return x


def _load_outputs(payload: bytes) -> Any:
    return _restore(child.load_payload(payload))


def _strict_problem(got: Any, want: Any, where: str = "output") -> str | None:
    """Type, dtype, shape, layout and finiteness before any tensor arithmetic."""
    import numpy as np
    import torch

    if isinstance(want, torch.Tensor):
        if type(got) is not torch.Tensor:
            return None  # compare_outputs names the type
        if got.layout != torch.strided or got.device.type != "cpu":
            return f"{where} should be a dense CPU tensor, got layout {got.layout}."
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            return None  # compare_outputs explains
        if (got.is_floating_point() or got.is_complex()) and bool(
            (~torch.isfinite(got) & torch.isfinite(want)).any()
        ):
            return f"{where} contains inf or NaN where the reference is finite."
        return None
    if isinstance(want, np.ndarray):
        return None
    if isinstance(want, Mapping) and isinstance(got, Mapping) and set(got) == set(want):
        for k in want:
            p = _strict_problem(got[k], want[k], f"{where}[{k!r}]")
            if p:
                return p
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)) and len(got) == len(want):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            p = _strict_problem(g, w, f"{where}[{i}]")
            if p:
                return p
    if isinstance(want, float) and isinstance(got, float) and math.isfinite(want):
        if not math.isfinite(got):
            return f"{where} is {got!r}, expected a finite number."
    return None


class _Grader:
    """Grades notebooks one after the other in one sandbox (restarted when it breaks)."""

    def __init__(
        self,
        config: GradeConfig,
        isolation: Isolation,
        private: Sequence[str | os.PathLike[str]] = (),
        exercises: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.isolation = isolation
        self.box = _Box(isolation, config, [os.fspath(p) for p in private])
        self.wanted = list(exercises) if exercises is not None else None
        self.inputs: dict[str, list[Any]] = {}
        self.expected: dict[str, list[Any]] = {}
        self.setup_problem = ""
        self._keys: dict[str, list[tuple[str, str]]] | None = None

    def close(self) -> None:
        self.box.close()

    def _ensure(self) -> None:
        if not self.box.alive:
            self.box.start()

    def _view(self) -> ReferenceView | None:
        """The sandbox's copy of the package (None without a sandbox: the package itself)."""
        return reference_view() if self.isolation.sandboxed else None

    def _copy_keys(self) -> dict[str, list[tuple[str, str]]]:
        """``{exercise: [(label, code key)]}`` of every exercise's reference functions."""
        if self._keys is None:
            view = self._view()
            if view is not None:
                self._keys = view.keys
            else:
                from fewclip_tutorial.course.exercises import get_exercise, list_exercises

                self._keys = {
                    name: [
                        (label, key)
                        for key, label in child.code_keys(
                            get_exercise(name).forbidden_functions()
                        ).items()
                    ]
                    for name in list_exercises()
                }
        return self._keys

    def _trial_inputs(self, name: str) -> list[Any]:
        from fewclip_tutorial.course.exercises import get_exercise

        if name not in self.inputs:
            ex = get_exercise(name)
            self.inputs[name] = ex.trial_inputs(
                exercise_seed(self.config.seed, name), self.config.n_trials
            )
        return self.inputs[name]

    def _judge(self, name: str, outputs: Any) -> str:
        from fewclip_tutorial.course.exercises import _call, _clone, compare_outputs, get_exercise

        ex = get_exercise(name)
        inputs = self._trial_inputs(name)
        if name not in self.expected:
            self.expected[name] = [_call(ex.reference_fn, _clone(x)) for x in inputs]
        if not isinstance(outputs, list) or len(outputs) != len(inputs):
            return "did not return an output for every trial"
        try:
            for t, (want, got) in enumerate(zip(self.expected[name], outputs, strict=True)):
                problem = _strict_problem(got, want) or compare_outputs(
                    got, want, atol=ex.atol, rtol=ex.rtol
                )
                if problem:
                    return f"trial {t + 1}: {problem}"
        except Exception as err:  # noqa: BLE001 - an odd output is the student's problem
            return f"returned something the grader cannot compare ({type(err).__name__})"
        return ""

    #: seconds the zygote may take to end a student process and clean the sandbox after
    #: it: killing and reaping, emptying the tmpfs; far more than a loaded machine needs
    DONE_BOUND = 120.0

    def _await_done(self, event: str) -> dict[str, Any] | None:
        """Send ``event`` to the zygote and wait for its ``done`` header: None when it does
        not come within :attr:`DONE_BOUND` (or the output floods meanwhile)."""
        self.box.send({"event": event})
        deadline = time.monotonic() + self.DONE_BOUND
        while True:
            source, header, _ = self.box.next(deadline)
            if source in ("timeout", "flood"):
                return None
            if source == "Z" and header.get("event") == "done":
                return header

    def _kill_child(self) -> dict[str, Any]:
        """Stop the student process; the zygote's ``done`` header (empty if it broke)."""
        with contextlib.suppress(_SandboxDied):
            header = self._await_done("kill")
            if header is not None:
                return header
        self.box.close()
        return {}

    def _finish(self) -> dict[str, Any]:
        """Let the student process end (``end``), as the zygote reports it."""
        try:
            header = self._await_done("end")
        except _SandboxDied:
            self.box.close()
            return {}
        return header if header is not None else self._kill_child()

    def run_notebook(self, nb: Mapping[str, Any]) -> tuple[dict[str, str], list[str], str]:
        """``({name: reason for zero, "" when right}, names in check order, log)``."""
        from fewclip_tutorial.course.exercises import get_exercise

        code = notebook_code(nb, run_all=self.config.run_all)
        self.setup_problem = ""
        results: dict[str, tuple[str, Any]] = {}
        order: list[str] = []
        remaining: list[str] | None = None
        logs: list[str] = []
        leftover = False
        cfg = self.config
        cpu = int(cfg.setup_timeout + cfg.timeout * 50 + 60)
        view = self._view()
        solo: str | None = None  # the exercise a process grades alone (see below)
        again: list[str] = []
        while remaining is None or remaining or again:
            if remaining is not None and not remaining:
                # an answer that called another exercise's (stubbed) reference as a building
                # block and failed: graded again alone, in a process where only its own
                # references are stubs
                solo = again.pop(0)
                remaining = [solo]
            try:
                self._ensure()
            except (_SandboxDied, OSError) as err:
                why = f"the grader could not start the sandbox ({err})"
                for name in remaining or []:
                    results[name] = (why, None)
                break
            self.box.flags = []
            request = {
                "event": "student",
                "code": code,
                "work": self.box.work,
                "cpu_limit": cpu,
                "private": self.box.private,
                "copy_keys": self._copy_keys(),
                "solo": solo,
                "restore": view.restore_for(solo) if view is not None and solo else [],
            }
            current: str | None = None
            done: dict[str, Any] = {}
            problem = ""
            try:
                self.box.send(request)
                source, header, _ = self.box.next(time.monotonic() + cfg.setup_timeout)
                in_cells = list(self.box.flags)  # during the cells: against every exercise
                if source == "C" and header.get("event") == "answers":
                    names = header.get("names")
                    if not isinstance(names, list) or not all(
                        isinstance(n, str) and len(n) < 200 for n in names
                    ):
                        problem = "sent a list of exercises the grader cannot read"
                        done = self._kill_child()
                    else:
                        for n in names:
                            known = True
                            try:
                                get_exercise(n)
                            except KeyError:
                                known = False
                            if (
                                known
                                and n not in order
                                and (self.wanted is None or n in self.wanted)
                            ):
                                order.append(n)
                        if remaining is None:
                            remaining = list(order)
                        else:
                            remaining = [n for n in remaining if n in names]
                elif source == "timeout":
                    flood = self.box.output_seen > cfg.output_limit
                    problem = (
                        f"the notebook's cells ran past the time limit ({cfg.setup_timeout:g} s)"
                    )
                    if flood:
                        problem += f" while printing {self.box.output_seen} bytes (an output flood)"
                    done = self._kill_child()
                elif source == "Z" and header.get("event") == "done":
                    done = header
                    problem = "the notebook's cells " + _describe_exit(header.get("exit")).replace(
                        "the process", "ended the process:"
                    )
                else:
                    problem = "sent a message the grader does not expect"
                    done = self._kill_child()
                if problem:
                    logs.append(self.box.take_output())
                    if remaining is None:
                        self.setup_problem = problem
                    for name in remaining or []:
                        results[name] = (problem, None)
                    leftover |= bool(done.get("leftover"))
                    if done and not done.get("clean", True):
                        self.box.close()
                    break
                for name in list(remaining or []):
                    current = name
                    trials = list(self._trial_inputs(name))
                    self.box.flags[:] = in_cells
                    self.box.send({"event": "run", "name": name}, trials)
                    deadline = time.monotonic() + cfg.timeout  # the child cannot move it
                    source, header, payload = self.box.next(deadline, flood_limit=cfg.output_limit)
                    if (
                        source == "C"
                        and header.get("event") == "result"
                        and header.get("name") == name
                    ):
                        error = header.get("error")
                        error = (
                            error[:500] if isinstance(error, str) else "sent an unreadable result"
                        )
                        outputs = None
                        if not error:
                            try:
                                outputs = _load_outputs(payload)
                            except Exception as err:  # noqa: BLE001
                                error = f"returned something the grader cannot read ({type(err).__name__})"
                        if self.box.flags:  # it said so itself before it could hide it
                            error, outputs = self.box.flags[0], None
                        elif (
                            error
                            and header.get("retry") is True
                            and solo is None
                            and view is not None
                            and name not in again
                        ):
                            again.append(name)
                        results[name] = (error, outputs)
                        remaining.remove(name)
                        current = None
                        continue
                    if source == "timeout":
                        problem = f"ran past the time limit ({cfg.timeout:g} s)"
                        done = self._kill_child()
                    elif source == "flood":
                        problem = (
                            f"printed more than the output limit ({cfg.output_limit} bytes) "
                            "while it ran: an output flood"
                        )
                        done = self._kill_child()
                    elif source == "Z" and header.get("event") == "done":
                        done = header
                        problem = _describe_exit(header.get("exit"))
                        if header.get("problem"):
                            problem = str(header["problem"])[:300]
                    else:
                        problem = "sent a message the grader does not expect"
                        done = self._kill_child()
                    if self.box.flags:  # what it said against itself before it ended
                        problem = self.box.flags[0]
                    break
                if not problem:
                    done = self._finish()
            except _SandboxDied as err:
                problem = f"the sandbox stopped ({err}): the submission killed or exhausted it"
                self.box.close()
            leftover |= bool(done.get("leftover"))
            logs.append(self.box.take_output())
            if done and not done.get("clean", True):
                # something survived the zygote's cleaning: a fresh sandbox for the next one
                logs.append(f"[grader] a fresh sandbox follows: left {done.get('remains')}")
                self.box.close()
            if problem and current is not None and remaining is not None:
                results[current] = (problem, None)
                remaining.remove(current)
            elif problem:
                if remaining is None:  # before any check ran: said in the notes instead
                    self.setup_problem = problem
                for name in remaining or []:
                    results[name] = (problem, None)
                break
        if leftover:
            why = "left a process running after its notebook finished (a daemon): not allowed"
            for name in order:
                results[name] = (why, None)
        graded: dict[str, str] = {}
        for name in order:
            error, outputs = results.get(name, ("not graded", None))
            graded[name] = error or self._judge(name, outputs)
        return graded, order, "\n".join(p for p in logs if p)

    def grade_student(self, student: str, notebooks: Sequence[LoadedNotebook]) -> StudentGrades:
        from fewclip_tutorial.course.exercises import get_exercise

        result = StudentGrades(student=student, notebooks=[str(n.path) for n in notebooks])
        logs: list[str] = []
        unreadable = [n.error for n in notebooks if n.error]
        for loaded in notebooks:
            if loaded.notebook is None:
                continue
            graded, order, log = self.run_notebook(loaded.notebook)
            if self.setup_problem:
                unreadable.append(f"{loaded.path.name}: {self.setup_problem}")
            if log:
                logs.append(f"--- {loaded.path.name}\n{log}")
            for name in order:
                if name in result.grades:
                    continue  # graded in an earlier notebook
                ex = get_exercise(name)
                error = graded[name]
                result.grades[name] = ExerciseGrade(
                    name, 0.0 if error else ex.points, ex.points, error
                )
        result.problems = unreadable
        result.log = "\n".join(logs)
        return result


def _complete(grades: list[StudentGrades], exercises: Sequence[str]) -> None:
    """Every student gets every column: zero with the reason where no check of theirs ran."""
    from fewclip_tutorial.course.exercises import get_exercise

    for g in grades:
        for name in exercises:
            if name not in g.grades:
                why = "no notebook checks this exercise"
                if g.problems:
                    why += f" (not graded: {'; '.join(g.problems)})"
                g.grades[name] = ExerciseGrade(name, 0.0, get_exercise(name).points, why)
        g.grades = {n: g.grades[n] for n in exercises}


def grade_notebooks(
    notebooks: Sequence[str | os.PathLike[str]],
    exercises: Sequence[str],
    config: GradeConfig,
    student: str = "",
    private: Sequence[str | os.PathLike[str]] = (),
) -> StudentGrades:
    """Grade one student's notebooks on ``exercises`` (see the module docstring)."""
    from fewclip_tutorial.course.exercises import get_exercise

    for name in exercises:
        get_exercise(name)
    loaded: list[LoadedNotebook] = []
    for p in map(Path, notebooks):
        try:
            loaded.append(LoadedNotebook(p, _read_notebook(p, config.max_notebook_bytes)))
        except (OSError, ValueError) as err:
            loaded.append(LoadedNotebook(p, None, f"{p.name}: {err}"))
    grader = _Grader(config, detect_isolation(config.sandbox), private, exercises)
    try:
        g = grader.grade_student(student, loaded)
    finally:
        grader.close()
    _complete([g], exercises)
    return g


def grade_directory(
    root: str | os.PathLike[str],
    config: GradeConfig | None = None,
    exercises: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    isolation: Isolation | None = None,
) -> list[StudentGrades]:
    """Grade every student under ``root`` (see :func:`find_submissions`).

    Every notebook is read and validated before the first one runs.  ``exercises``
    defaults to every exercise whose check ran in some submission, in order of
    first appearance.
    """
    from fewclip_tutorial.course.exercises import get_exercise

    config = config or GradeConfig()
    if exercises is not None:
        for name in exercises:
            get_exercise(name)  # an unknown name fails here, before any grading
    isolation = isolation or detect_isolation(config.sandbox)
    submissions = load_submissions(root, config.max_notebook_bytes)
    grader = _Grader(config, isolation, [Path(root).resolve()], exercises)
    grades: list[StudentGrades] = []
    try:
        try:
            grader.box.start()  # a sandbox that cannot start is the grader's problem: say so
        except (_SandboxDied, OSError) as err:
            tail = grader.box.take_output().strip()[-1500:]
            raise RuntimeError(
                f"the {isolation.kind} process did not start ({err}); its output:\n{tail}\n"
                "Fix the sandbox, or grade without it with --sandbox none "
                "(an in-process guard against accidents only)."
            ) from None
        for student, notebooks in submissions.items():
            if progress:
                progress(student)
            try:
                grades.append(grader.grade_student(student, notebooks))
            except Exception as err:  # noqa: BLE001 - one student never costs the others
                g = StudentGrades(student, notebooks=[str(n.path) for n in notebooks])
                g.problems = [f"the grader failed on this submission ({type(err).__name__}: {err})"]
                grades.append(g)
                grader.close()
            if config.sandbox_per_student:
                grader.close()
    finally:
        grader.close()
    names = list(exercises) if exercises is not None else []
    if exercises is None:
        for g in grades:
            names += [n for n in g.grades if n not in names]
    _complete(grades, names)
    return grades


# --------------------------------------------------------------------------- the CSV


def _fmt(x: float) -> str:
    return f"{x:g}"


def _cell(value: Any) -> str:
    """A CSV cell that no spreadsheet reads as a formula."""
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """The CSV path, checked before grading: ValueError for a FIFO, link, folder or device."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"--out {path} is a symbolic link; give the path of a plain file.")
    if path.exists() and not path.is_file():
        raise ValueError(f"--out {path} exists and is not a plain file (a folder or a FIFO?).")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"--out {path}: {parent} is not a folder.")
    return path


def write_grades_csv(
    grades: Iterable[StudentGrades], path: str | os.PathLike[str], seed: int, isolation: str = ""
) -> Path:
    """One row per student (``student``, a column per exercise, ``total``, ``max``, ``seed``,
    ``isolation``, ``notes``), written to a temporary file and then renamed over ``path``."""
    grades = list(grades)
    names: list[str] = []
    for g in grades:
        names += [n for n in g.grades if n not in names]
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["student", *names, "total", "max", "seed", "isolation", "notes"])
            for g in grades:
                notes = "; ".join(
                    [
                        f"{n}: {e.reason}"
                        for n, e in g.grades.items()
                        if e.reason and e.score < e.points
                    ]
                )
                w.writerow(
                    [
                        _cell(g.student),
                        *(_fmt(g.grades[n].score) if n in g.grades else "" for n in names),
                        _fmt(g.total),
                        _fmt(g.max_points),
                        seed,
                        _cell(isolation),
                        _cell(notes),
                    ]
                )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _printable(name: str) -> str:
    """A student's name for the terminal: control characters (escape sequences) replaced."""
    return "".join(c if c.isprintable() else "\ufffd" for c in name)


def log_name(student: str) -> str:
    """A log file name unique for every student name (any Unicode)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", unicodedata.normalize("NFKC", student))[:60].strip(".")
    digest = hashlib.sha256(student.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{safe or 'student'}-{digest}.log"


# --------------------------------------------------------------------------- command line


def build_parser() -> Any:
    """The parser of ``fewclip grade``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="fewclip grade",
        description=(
            "Grade a folder of submitted notebooks (one NAME.ipynb or one NAME/ folder per "
            "student): student code runs in a bubblewrap sandbox (or, without one, under an "
            "in-process guard), each exercise on fresh random inputs; one CSV row per student."
        ),
    )
    p.add_argument("submissions", help="folder of submissions")
    p.add_argument("--out", default="grades.csv", help="CSV to write (default: grades.csv)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: a fresh one)")
    p.add_argument(
        "--exercises",
        default=None,
        help="comma-separated exercise names (default: every exercise a submission checks)",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per exercise (default: 10)")
    p.add_argument(
        "--setup-timeout",
        type=float,
        default=60.0,
        help="seconds for a notebook's cells before its exercises (default: 60)",
    )
    p.add_argument(
        "--output-limit",
        type=int,
        default=1_000_000,
        help="bytes an exercise's function may print while graded (default: 1000000)",
    )
    p.add_argument(
        "--trials", type=int, default=None, help="trials per exercise (default: its own)"
    )
    p.add_argument(
        "--run-all", action="store_true", help="run every cell, not only definitions and exercises"
    )
    p.add_argument(
        "--sandbox",
        choices=("auto", "bwrap", "none"),
        default="auto",
        help="auto: bubblewrap when it works, else the in-process guard (default); "
        "bwrap: fail without it; none: the guard only",
    )
    p.add_argument(
        "--sandbox-per-student",
        action="store_true",
        help="a fresh sandbox for every student (each start imports torch: slower)",
    )
    p.add_argument("--logs", default=None, help="folder for one log per student (what it printed)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``fewclip grade``: returns the exit status (2 on bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2

    def fail(message: str) -> int:
        print(f"fewclip grade: error: {message}", file=sys.stderr)
        return 2

    if args.trials is not None and args.trials < 1:
        return fail("--trials must be at least 1")
    try:
        isolation = detect_isolation(args.sandbox)
    except ValueError as err:
        return fail(str(err))
    print(f"isolation: {isolation.description}", file=sys.stderr)
    seed = new_run_seed() if args.seed is None else args.seed
    config = GradeConfig(
        seed=seed,
        timeout=args.timeout,
        setup_timeout=args.setup_timeout,
        output_limit=args.output_limit,
        n_trials=args.trials,
        run_all=args.run_all,
        sandbox=args.sandbox,
        sandbox_per_student=args.sandbox_per_student,
    )
    names = [n.strip() for n in args.exercises.split(",") if n.strip()] if args.exercises else None
    try:
        out = check_output_path(args.out)
        if args.logs and (Path(args.logs).is_symlink() or Path(args.logs).is_file()):
            raise ValueError(f"--logs {args.logs} is not a folder")
    except ValueError as err:
        return fail(str(err))
    print(f"run seed {seed} (repeat this run with --seed {seed})", file=sys.stderr)
    try:
        grades = grade_directory(
            args.submissions,
            config,
            exercises=names,
            progress=lambda s: print(f"grading {_printable(s)} ...", file=sys.stderr),
            isolation=isolation,
        )
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        return fail(message)
    try:
        path = write_grades_csv(grades, out, seed, isolation.label)
    except (OSError, ValueError) as err:
        return fail(f"could not write {out}: {err}")
    if args.logs:
        logs = Path(args.logs)
        logs.mkdir(parents=True, exist_ok=True)
        for g in grades:
            text = g.log + ("\n" + "\n".join(g.problems) if g.problems else "")
            (logs / log_name(g.student)).write_text(text, encoding="utf-8")
    width = max(len(_printable(g.student)) for g in grades)
    for g in grades:
        print(f"{_printable(g.student).ljust(width)}  {_fmt(g.total)} / {_fmt(g.max_points)}")
    print(f"wrote {path}")
    return 0
