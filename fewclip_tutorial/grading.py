"""Grade a class's submitted notebooks: ``fewclip grade SUBMISSIONS_DIR --out grades.csv``.

A *submission* is a student's copy of a chapter notebook (the student edition of
``make assignments``) with the exercise functions filled in.  ``SUBMISSIONS_DIR``
holds one notebook per student (``alice.ipynb``) or one folder per student
(``alice/02_tip_adapter.ipynb``, ...).

How a notebook is graded
------------------------
1. Its code is run in a **separate process** (forked from a server that has
   already imported torch and the package, so a start costs milliseconds), in a
   fresh temporary folder that is also its ``HOME``.  By default only the
   imports, ``def`` and ``class`` statements of ordinary cells run, and the
   exercise cells (those that call ``get_exercise``) run in full: the chapters'
   training cells would take minutes and grade nothing.  ``--run-all`` runs every
   cell.  A cell that raises is reported and the next one runs (like nbgrader).
2. ``get_exercise(NAME).check(fn)`` is replaced by a recorder: the last function
   a notebook passes for ``NAME`` is its answer.
3. Each exercise's checker inputs are drawn fresh: trial ``t`` of exercise
   ``NAME`` uses seed ``seed(run, NAME) + t``, with a run seed drawn at random
   (printed, and in the CSV; ``--seed`` repeats a run).  The student process gets
   the inputs and sends back its outputs; the **reference outputs are computed in
   the grader's process only**, and the outputs are read back with
   ``torch.load(weights_only=True)`` (no code from the student runs in the grader).
4. Zero for the exercise, with a reason, when the function raises, returns a wrong
   value, changes its input in place, runs past ``--timeout`` seconds, prints more
   than ``--output-limit`` bytes, makes its process die, or **calls the package's
   own answer** (:meth:`~fewclip_tutorial.exercises.Exercise.forbidden_functions`,
   caught by a profiler hook however it was reached: imported, aliased, or fetched
   with ``get_exercise(...).reference_fn``), or is a copy of its code (the same
   names, local names and constants).  A process that dies or hangs is
   replaced by a fresh one for the remaining exercises, so one exercise never
   costs another.
5. The student process runs under a Python audit hook (:pep:`578`) that refuses
   to write, delete, rename or change any file outside its temporary folder, to
   start processes, to open sockets, to use ``ctypes``, to walk the garbage
   collector or to re-execute the package's modules (``importlib.reload``); a
   submission that removes the profiler hook gets zero.  An audit hook cannot be
   removed from Python code; still, this is a
   guard against accidents and casual cheating, not a security boundary: grade
   untrusted code in a container (as otter-grader does with Docker) when it
   matters.

The CSV has one row per student: ``student``, one score column per exercise,
``total``, ``max``, ``seed`` and ``notes`` (the reason for every lost point).
"""

from __future__ import annotations

import ast
import contextlib
import csv
import errno
import hashlib
import io
import json
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ExerciseGrade",
    "GradeConfig",
    "StudentGrades",
    "exercise_seed",
    "build_parser",
    "find_submissions",
    "main",
    "new_run_seed",
    "grade_directory",
    "grade_notebooks",
    "notebook_code",
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
        output_limit: bytes a student process may print (stdout + stderr together).
        memory_limit: bytes of address space the student process may add (Linux).
        n_trials: trials per exercise (default: the exercise's own ``n_trials``).
        run_all: run every cell, not only imports, definitions and exercise cells.
    """

    seed: int = 0
    timeout: float = 10.0
    setup_timeout: float = 60.0
    output_limit: int = 1_000_000
    memory_limit: int = 4 << 30
    n_trials: int | None = None
    run_all: bool = False


def exercise_seed(run_seed: int, name: str) -> int:
    """The first trial seed of exercise ``name`` in run ``run_seed`` (stable across machines)."""
    digest = hashlib.sha256(f"{run_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x3FFFFFFF


# --------------------------------------------------------------------------- notebooks

_MAGIC = re.compile(r"^\s*[%!]")
_EXERCISE_CALL = re.compile(r"get_exercise\s*\(\s*['\"]([A-Za-z0-9_]+)['\"]\s*\)")
_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _read_notebook(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path} is not a Jupyter notebook (no 'cells' list).")
    return nb


def _cell_source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def notebook_code(nb: Mapping[str, Any], run_all: bool = False) -> list[tuple[str, str]]:
    """The code a graded notebook runs, as ``(label, code)`` pairs in cell order.

    IPython magics (``%...``, ``!...``) are dropped.  Unless ``run_all``, a cell
    that does not call ``get_exercise(...)`` keeps only its top-level imports,
    functions and classes; a cell that does not parse is kept as it is (running it
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
        except SyntaxError:
            out.append((label, src))
            continue
        kept = [node for node in tree.body if isinstance(node, _KEEP)]
        if kept:
            out.append((label, "\n\n".join(ast.get_source_segment(src, k) or "" for k in kept)))
    return out


def exercises_in(nb: Mapping[str, Any]) -> list[str]:
    """Names a notebook's code passes to ``get_exercise``, in order of first appearance."""
    names: list[str] = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            for name in _EXERCISE_CALL.findall(_cell_source(cell)):
                if name not in names:
                    names.append(name)
    return names


def find_submissions(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """``{student: [notebooks]}``: ``root/NAME.ipynb`` or every notebook under ``root/NAME/``.

    Checkpoint folders (``.ipynb_checkpoints``) and hidden files are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Submissions folder {root} does not exist or is not a folder.")
    found: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".ipynb":
            found[entry.stem] = [entry]
        elif entry.is_dir():
            notebooks = sorted(
                p
                for p in entry.rglob("*.ipynb")
                if not any(part.startswith(".") for part in p.relative_to(entry).parts)
            )
            if notebooks:
                found[entry.name] = notebooks
    if not found:
        raise FileNotFoundError(
            f"No notebooks in {root}: put one NAME.ipynb per student, or one folder per student."
        )
    return found


# --------------------------------------------------------------------------- the student process
#
# Everything below ``_child_main`` runs in the forked student process.  Messages to
# the grader are bytes: one JSON header line, then (for results) a torch.save payload.

_FORBIDDEN_EVENTS_PREFIX = (
    "subprocess.",
    "os.system",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "pty.spawn",
    "socket.",
    "ctypes.",
    "gc.get_",
    "sys.addaudithook",
    "winreg.",
    "webbrowser.",
    "urllib.Request",
)
_PATH_EVENTS = {
    "os.remove": 1,
    "os.rmdir": 1,
    "os.rename": 2,
    "os.truncate": 1,
    "os.chmod": 1,
    "os.chown": 1,
    "os.chflags": 1,
    "os.lchflags": 1,
    "os.mkdir": 1,
    "os.link": 2,
    "os.symlink": 2,
    "os.utime": 1,
    "os.setxattr": 1,
    "os.removexattr": 1,
    "shutil.rmtree": 1,
    "shutil.copyfile": 2,
    "shutil.copytree": 2,
    "shutil.move": 2,
    "shutil.unpack_archive": 2,
    "shutil.make_archive": 1,
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxViolation(PermissionError):
    """A submission tried something the grader does not allow."""


def _install_sandbox(sandbox: Path, package_files: set[str], private: Sequence[str] = ()) -> None:
    """Install the audit hook: writes only under ``sandbox``, nothing at all under ``private``."""
    root = os.path.realpath(sandbox)
    hidden = [os.path.realpath(p) for p in private]

    def under(real: str, top: str) -> bool:
        return real == top or real.startswith(top + os.sep)

    def inside(path: Any) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return under(real, root)

    def is_private(path: Any) -> bool:
        if isinstance(path, int) or path is None:
            return False
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return any(under(real, top) for top in hidden)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event.startswith(_FORBIDDEN_EVENTS_PREFIX):
            raise SandboxViolation(f"sandbox: {event} is not allowed in a graded submission")
        if event in ("open", "os.listdir", "os.scandir") and args and is_private(args[0]):
            raise SandboxViolation("sandbox: the submissions are not readable from a submission")
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and mode is None and flags & _WRITE_FLAGS
            )
            if writing and not inside(path):
                raise SandboxViolation(f"sandbox: writing {path!r} is not allowed")
            return
        n_paths = _PATH_EVENTS.get(event)
        if n_paths:
            for path in args[:n_paths]:
                if path is not None and not inside(path):
                    raise SandboxViolation(f"sandbox: {event} on {path!r} is not allowed")
            return
        if event == "exec" and args:
            filename = getattr(args[0], "co_filename", "")
            if filename in package_files:
                raise SandboxViolation(
                    "sandbox: re-executing the package's own code "
                    f"({os.path.basename(filename)}) is not allowed"
                )
        if event == "object.__setattr__" and len(args) >= 2 and args[1] == "__code__":
            raise SandboxViolation("sandbox: replacing a function's __code__ is not allowed")

    sys.addaudithook(hook)


def _sanitize(x: Any, depth: int = 0) -> Any:
    """Tensors, numbers, strings and containers of them; anything else as a description."""
    import numpy as np
    import torch

    from fewclip_tutorial.exercises import _describe

    if depth > 20:
        return {"__opaque__": "a structure nested too deeply"}
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone().as_subclass(torch.Tensor)
    if x is None or isinstance(x, (bool, int, float, str, complex)):
        return x
    if isinstance(x, np.ndarray) and x.dtype != object:
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(x).copy())}
    if isinstance(x, np.generic):
        return x.item()
    if type(x) in (list, tuple):
        return type(x)(_sanitize(v, depth + 1) for v in x)
    if type(x) is dict and all(isinstance(k, str) for k in x):
        if "__opaque__" in x or "__ndarray__" in x:
            return {"__opaque__": "a dict with a reserved key"}
        return {k: _sanitize(v, depth + 1) for k, v in x.items()}
    try:
        desc = _describe(x)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not break grading
        desc = "an object"
    return {"__opaque__": desc}


def _restore(x: Any) -> Any:
    from fewclip_tutorial.exercises import Opaque

    if isinstance(x, dict):
        if set(x) == {"__opaque__"}:
            return Opaque(str(x["__opaque__"]))
        if set(x) == {"__ndarray__"}:
            return x["__ndarray__"].numpy()
        return {k: _restore(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_restore(v) for v in x)
    return x


def _pack(header: Mapping[str, Any], payload: Any = None) -> bytes:
    import torch

    buf = io.BytesIO()
    if payload is not None:
        torch.save(payload, buf)
    return json.dumps(header).encode() + b"\n" + buf.getvalue()


def _child_main(
    conn: Any,
    sandbox: str,
    code: list[tuple[str, str]],
    jobs: list[tuple[str, list[Any]]],
    output_limit: int,
    memory_limit: int,
    private: Sequence[str] = (),
) -> None:  # pragma: no cover - runs in the forked student process (covered by the tests)
    import resource
    import threading

    os.setsid()
    sandbox_path = Path(sandbox)
    out_fd = os.open(sandbox_path / "output.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.chdir(sandbox_path)
    for var in ("HOME", "TMPDIR", "TEMP", "TMP", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        os.environ[var] = sandbox
    os.environ["FEWCLIP_EDITION"] = "student"
    tempfile.tempdir = sandbox
    with contextlib.suppress(Exception):
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_limit, output_limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(Exception):
        vm = _vm_size()
        if vm:
            resource.setrlimit(resource.RLIMIT_AS, (vm + memory_limit, vm + memory_limit))

    import torch

    import fewclip_tutorial
    import fewclip_tutorial.exercises as exmod

    torch.set_num_threads(1)
    exmod.list_exercises()  # import every chapter's exercises before the student code
    exmod.set_edition("student")

    answers: dict[str, Any] = {}

    def recording_check(self: Any, student_fn: Any, *args: Any, **kwargs: Any) -> bool:
        answers[self.name] = student_fn
        return True

    exmod.Exercise.check = recording_check  # type: ignore[method-assign]

    forbidden: dict[str, dict[Any, str]] = {}
    for name, _ in jobs:
        with contextlib.suppress(KeyError):
            forbidden[name] = {
                fn.__code__: f"{fn.__module__}.{fn.__qualname__}"
                for fn in exmod.get_exercise(name).forbidden_functions()
            }
    active: list[dict[Any, str]] = [{}]  # the forbidden code objects of the running exercise
    hits: list[str] = []

    def profiler(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in active[0]:
            hits.append(active[0][frame.f_code])

    package_dir = os.path.dirname(fewclip_tutorial.__file__)
    package_files = {
        m.__file__
        for m in list(sys.modules.values())
        if getattr(m, "__file__", None) and str(m.__file__).startswith(package_dir)
    }
    get_profile = sys.getprofile  # kept before the student's code can replace it
    sys.setprofile(profiler)
    threading.setprofile(profiler)
    _install_sandbox(sandbox_path, package_files, private)

    conn.send_bytes(_pack({"event": "setup"}))
    namespace: dict[str, Any] = {"__name__": "__main__", "display": print}
    for label, src in code:
        try:
            exec(compile(src, f"<{label}>", "exec"), namespace)  # noqa: S102
        except BaseException:  # noqa: BLE001 - a failing cell is reported, the next one runs
            print(f"[grader] {label} raised:\n{traceback.format_exc(limit=3)}", file=sys.stderr)
    sys.stdout.flush()

    for name, trials in jobs:
        conn.send_bytes(_pack({"event": "start", "name": name}))
        fn = answers.get(name)
        if fn is None:
            conn.send_bytes(
                _pack(
                    {
                        "event": "result",
                        "name": name,
                        "error": f"no answer: no cell calls get_exercise({name!r}).check(...)",
                    }
                )
            )
            continue
        del hits[:]
        active[0] = forbidden.get(name, {})
        outputs: list[Any] = []
        error = ""
        module = getattr(fn, "__module__", "") or ""
        if module.startswith("fewclip_tutorial"):
            error = (
                "uses the package's reference solution: the answer is "
                f"{module}.{getattr(fn, '__qualname__', fn)}"
            )
        copied = _same_code(getattr(fn, "__code__", None), forbidden.get(name, {}))
        if copied and not error:
            error = f"uses the package's reference solution: a copy of {copied}"
        for t, inputs in enumerate(trials if not error else []):
            before = exmod._clone(inputs)
            try:
                got = exmod._call(fn, inputs)
            except BaseException as err:  # noqa: BLE001 - any error is the student's
                if isinstance(err, OSError) and err.errno == errno.EFBIG:
                    error = f"printed more than the output limit ({output_limit} bytes)"
                else:
                    try:
                        message = str(err)
                    except BaseException:  # noqa: BLE001 - a hostile __str__
                        message = "(no message)"
                    error = f"trial {t + 1} raised {type(err).__name__}: {message}"[:500]
                break
            if hits or get_profile() is not profiler:
                break
            if exmod.compare_outputs(inputs, before, atol=0, rtol=0):
                error = f"trial {t + 1}: the function modified its input in place; work on a copy"
                break
            outputs.append(_sanitize(got))
        active[0] = {}
        if get_profile() is not profiler:
            error = "removed the grader's profiler (sys.setprofile): not allowed"
        if hits:
            error = f"uses the package's reference solution: it calls {hits[0]}"
        header = {"event": "result", "name": name, "error": error}
        conn.send_bytes(_pack(header, None if error else outputs))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _same_code(code: Any, forbidden: Mapping[Any, str]) -> str:
    """The name of the forbidden function whose bytecode ``code`` repeats, or ""."""
    if code is None:
        return ""

    def key(c: Any) -> tuple[Any, ...]:
        # names, local names, constants (the docstring aside) and arguments: the compiler
        # does not emit the same bytecode for the package's file and for an exec'd copy
        return (c.co_names, c.co_varnames, c.co_consts[1:], c.co_argcount)

    try:
        mine = key(code)
        return next((label for ref, label in forbidden.items() if key(ref) == mine), "")
    except Exception:  # noqa: BLE001 - an odd code object is simply not a copy
        return ""


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- the grader process

_CONTEXT: Any = None


def _context() -> Any:
    """A forkserver context whose server has imported torch and every exercise."""
    global _CONTEXT
    if _CONTEXT is None:
        if sys.platform == "win32":
            raise RuntimeError(
                "fewclip grade needs fork (Linux or macOS); on Windows run it in WSL."
            )
        ctx = multiprocessing.get_context("forkserver")
        from fewclip_tutorial.exercises import EXERCISE_MODULES

        ctx.set_forkserver_preload(
            ["torch", "numpy", "fewclip_tutorial.exercises", *EXERCISE_MODULES]
        )
        _CONTEXT = ctx
    return _CONTEXT


@contextlib.contextmanager
def _without_main_module() -> Any:
    """Start a process without it re-importing the grader's ``__main__`` script.

    multiprocessing's forkserver children import the parent's main module (a
    script without an ``if __name__ == "__main__"`` guard would run again); the
    student process needs nothing from it.
    """
    import types

    real = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if real is not None:
            sys.modules["__main__"] = real


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not finish"
    if code < 0:
        sig = -code
        if sig == getattr(signal, "SIGXFSZ", -1):
            return "printed or wrote too much (output limit reached)"
        try:
            return f"the process died ({signal.Signals(sig).name})"
        except ValueError:
            return f"the process died (signal {sig})"
    return f"the process exited with status {code} before finishing"


def _kill(proc: Any) -> None:
    with contextlib.suppress(Exception):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()
    proc.join(5)


def _run_notebook(
    nb: Mapping[str, Any],
    jobs: list[tuple[str, list[Any]]],
    config: GradeConfig,
    private: Sequence[str] = (),
) -> tuple[dict[str, tuple[str, Any]], str]:
    """Run one notebook's code and its exercises; ``{name: (error, outputs)}`` and the log."""
    ctx = _context()
    code = notebook_code(nb, run_all=config.run_all)
    results: dict[str, tuple[str, Any]] = {}
    log_parts: list[str] = []
    remaining = list(jobs)
    while remaining:
        sandbox = tempfile.mkdtemp(prefix="fewclip-grade-")
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child_main,
            args=(
                child_conn,
                sandbox,
                code,
                remaining,
                config.output_limit,
                config.memory_limit,
                list(private),
            ),
            daemon=True,
        )
        with _without_main_module():
            proc.start()
        child_conn.close()
        current: str | None = None
        deadline = time.monotonic() + config.setup_timeout + 30.0  # +30 s: process start
        problem = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                problem = (
                    f"ran past the time limit ({config.timeout:g} s)"
                    if current
                    else f"the notebook's cells ran past the time limit ({config.setup_timeout:g} s)"
                )
                break
            if not parent_conn.poll(min(left, 0.5)):
                if not proc.is_alive() and not parent_conn.poll(0):
                    proc.join(1)
                    problem = _describe_exit(proc.exitcode)
                    break
                continue
            try:
                raw = parent_conn.recv_bytes(maxlength=64 << 20)
            except OSError:
                problem = "returned more data than the grader accepts (64 MiB)"
                break
            except EOFError:
                proc.join(1)
                problem = _describe_exit(proc.exitcode)
                break
            head, _, payload = raw.partition(b"\n")
            try:
                msg = json.loads(head)
            except ValueError:
                problem = "sent a message the grader cannot read"
                break
            event = msg.get("event")
            if event == "setup":
                deadline = time.monotonic() + config.setup_timeout
            elif event == "start":
                current = str(msg.get("name"))
                deadline = time.monotonic() + config.timeout
            elif event == "result":
                name = str(msg.get("name"))
                outputs = None
                if not msg.get("error"):
                    try:
                        outputs = _load_outputs(payload)
                    except Exception as err:  # noqa: BLE001
                        msg["error"] = f"returned something the grader cannot read ({err})"[:300]
                results[name] = (str(msg.get("error") or ""), outputs)
                remaining = [j for j in remaining if j[0] != name]
                current = None
                if not remaining:
                    break
        _kill(proc)
        parent_conn.close()
        log_parts.append(_read_log(Path(sandbox) / "output.txt"))
        shutil.rmtree(sandbox, ignore_errors=True)
        if not remaining:
            break
        if current is None:  # the cells themselves failed: nothing more can run
            for name, _ in remaining:
                results.setdefault(name, (problem, None))
            break
        results[current] = (problem, None)
        remaining = [j for j in remaining if j[0] != current]
    return results, "\n".join(p for p in log_parts if p)


def _load_outputs(payload: bytes) -> Any:
    import torch

    return _restore(torch.load(io.BytesIO(payload), weights_only=True))


def _read_log(path: Path, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""
    return text


def grade_notebooks(
    notebooks: Sequence[str | os.PathLike[str]],
    exercises: Sequence[str],
    config: GradeConfig,
    student: str = "",
    private: Sequence[str | os.PathLike[str]] = (),
) -> StudentGrades:
    """Grade one student's notebooks on ``exercises`` (see the module docstring).

    An exercise answered in several notebooks is graded in the first one that
    checks it.  A notebook that cannot be read gives zero with the reason.
    ``private``: folders the student's code may not even read or list (the class's
    submissions).
    """
    from fewclip_tutorial.exercises import _call, _clone, compare_outputs, get_exercise

    result = StudentGrades(student=student, notebooks=[str(p) for p in notebooks])
    inputs: dict[str, list[Any]] = {}
    for name in exercises:
        ex = get_exercise(name)
        inputs[name] = ex.trial_inputs(exercise_seed(config.seed, name), config.n_trials)
    expected: dict[str, list[Any]] = {}  # reference outputs, computed here only when needed
    todo = list(exercises)
    logs: list[str] = []
    unreadable: list[str] = []
    for path in notebooks:
        try:
            nb = _read_notebook(Path(path))
        except (OSError, ValueError) as err:
            unreadable.append(f"{Path(path).name}: {err}")
            continue
        checked = [n for n in exercises_in(nb) if n in todo]
        if not checked:
            continue
        jobs = [(n, [_clone(x) for x in inputs[n]]) for n in checked]
        outcomes, log = _run_notebook(nb, jobs, config, [os.fspath(p) for p in private])
        if log:
            logs.append(f"--- {Path(path).name}\n{log}")
        for name in checked:
            ex = get_exercise(name)
            error, outputs = outcomes.get(name, ("not graded", None))
            if not error:
                if name not in expected:
                    expected[name] = [_call(ex.reference_fn, _clone(x)) for x in inputs[name]]
                for t, (want, got) in enumerate(zip(expected[name], outputs, strict=False)):
                    problem = compare_outputs(got, want, atol=ex.atol, rtol=ex.rtol)
                    if problem:
                        error = f"trial {t + 1}: {problem}"
                        break
                else:
                    if len(outputs) != len(inputs[name]):
                        error = "did not return an output for every trial"
            score = 0.0 if error else ex.points
            result.grades[name] = ExerciseGrade(name, score, ex.points, error)
            todo.remove(name)
    for name in todo:
        why = "no notebook checks this exercise"
        if unreadable:
            why += f" (unreadable: {'; '.join(unreadable)})"
        result.grades[name] = ExerciseGrade(name, 0.0, get_exercise(name).points, why)
    result.grades = {n: result.grades[n] for n in exercises}
    result.log = "\n".join(logs)
    return result


def grade_directory(
    root: str | os.PathLike[str],
    config: GradeConfig | None = None,
    exercises: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[StudentGrades]:
    """Grade every student under ``root`` (see :func:`find_submissions`).

    Every notebook is read before the first one runs, so a submission that
    deletes files cannot change what the others hand in.  ``exercises`` defaults
    to every exercise that any submission checks, in order of first appearance.
    """
    from fewclip_tutorial.exercises import get_exercise

    config = config or GradeConfig()
    submissions = find_submissions(root)
    staged = Path(tempfile.mkdtemp(prefix="fewclip-submissions-"))
    try:
        copies: dict[str, list[Path]] = {}
        for student, paths in submissions.items():
            folder = staged / _safe_name(student)
            folder.mkdir()
            copies[student] = []
            for i, p in enumerate(paths):
                dest = folder / f"{i:03d}_{_safe_name(p.name)}"
                shutil.copyfile(p, dest)
                copies[student].append(dest)
        if exercises is None:
            names: list[str] = []
            for paths in copies.values():
                for p in paths:
                    with contextlib.suppress(Exception):
                        for n in exercises_in(_read_notebook(p)):
                            if n not in names:
                                names.append(n)
            exercises = names
        exercises = list(exercises)
        for name in exercises:
            get_exercise(name)  # an unknown name fails here, before any grading
        grades: list[StudentGrades] = []
        for student, paths in copies.items():
            if progress:
                progress(student)
            g = grade_notebooks(
                paths, exercises, config, student=student, private=[staged, Path(root)]
            )
            g.notebooks = [str(p) for p in submissions[student]]
            grades.append(g)
        return grades
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100] or "_"


def _fmt(x: float) -> str:
    return f"{x:g}"


def write_grades_csv(
    grades: Iterable[StudentGrades], path: str | os.PathLike[str], seed: int
) -> Path:
    """One row per student: ``student``, a column per exercise, ``total``, ``max``, ``seed``, ``notes``."""
    grades = list(grades)
    names: list[str] = []
    for g in grades:
        for n in g.grades:
            if n not in names:
                names.append(n)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student", *names, "total", "max", "seed", "notes"])
        for g in grades:
            notes = "; ".join(
                f"{n}: {e.reason}" for n, e in g.grades.items() if e.reason and e.score < e.points
            )
            w.writerow(
                [
                    g.student,
                    *(_fmt(g.grades[n].score) if n in g.grades else "" for n in names),
                    _fmt(g.total),
                    _fmt(g.max_points),
                    seed,
                    notes,
                ]
            )
    return path


def new_run_seed() -> int:
    """A fresh run seed (so that no list of inputs can be learnt in advance)."""
    return secrets.randbits(30)


# --------------------------------------------------------------------------- command line


def build_parser() -> Any:
    """The parser of ``fewclip grade``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="fewclip grade",
        description=(
            "Grade a folder of submitted notebooks (one NAME.ipynb or one NAME/ folder per "
            "student): each notebook runs in its own sandboxed process, each exercise on fresh "
            "random inputs; one CSV row per student."
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
        help="bytes a submission may print (default: 1000000)",
    )
    p.add_argument(
        "--trials", type=int, default=None, help="trials per exercise (default: its own)"
    )
    p.add_argument(
        "--run-all", action="store_true", help="run every cell, not only definitions and exercises"
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
    if args.trials is not None and args.trials < 1:
        print("fewclip grade: error: --trials must be at least 1", file=sys.stderr)
        return 2
    seed = new_run_seed() if args.seed is None else args.seed
    config = GradeConfig(
        seed=seed,
        timeout=args.timeout,
        setup_timeout=args.setup_timeout,
        output_limit=args.output_limit,
        n_trials=args.trials,
        run_all=args.run_all,
    )
    names = [n.strip() for n in args.exercises.split(",") if n.strip()] if args.exercises else None
    print(f"run seed {seed} (repeat this run with --seed {seed})", file=sys.stderr)
    try:
        grades = grade_directory(
            args.submissions,
            config,
            exercises=names,
            progress=lambda s: print(f"grading {s} ...", file=sys.stderr),
        )
    except (FileNotFoundError, KeyError, ValueError) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"fewclip grade: error: {message}", file=sys.stderr)
        return 2
    path = write_grades_csv(grades, args.out, seed)
    if args.logs:
        logs = Path(args.logs)
        logs.mkdir(parents=True, exist_ok=True)
        for g in grades:
            (logs / f"{_safe_name(g.student)}.log").write_text(g.log, encoding="utf-8")
    width = max(len(g.student) for g in grades)
    for g in grades:
        print(f"{g.student.ljust(width)}  {_fmt(g.total)} / {_fmt(g.max_points)}")
    print(f"wrote {path}")
    return 0
