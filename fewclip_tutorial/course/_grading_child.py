"""The grader's side inside the sandbox: ``python -m fewclip_tutorial.course._grading_child``.

This process (the *zygote*) imports torch and the exercises once, then, for each
notebook the grader (:mod:`fewclip_tutorial.course.grading`) sends, forks a *student
process* that runs the notebook's code, records which exercises its checks ran,
and computes the student's outputs on the inputs the grader sends, one exercise
at a time.  The zygote only relays messages: the student process never holds the
grader's pipes.  When the student process ends, every process it left behind is
killed (in the sandbox: all of the sandbox's PID namespace but the zygote), the
sandbox's writable places, IPC objects and keyrings are emptied, and the zygote checks
that they are: the grader replaces a sandbox that is not clean before the next notebook.

Nothing here decides a grade: the reference outputs and the comparison live in the
grader's process, outside the sandbox.  Messages are frames: a 4-byte big-endian
length, then one JSON header line and an optional ``torch.save`` payload.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
import select
import signal
import struct
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MAX_FRAME = 64 << 20  # bytes of one message (the student's outputs included)
_HEAD = struct.Struct(">I")


# --------------------------------------------------------------------------- frames


def encode(header: Mapping[str, Any], payload: Any = None) -> bytes:
    """One frame: length, the JSON header line, then ``torch.save(payload)`` if any."""
    body = json.dumps(header).encode() + b"\n"
    if payload is not None:
        import torch

        buf = io.BytesIO()
        torch.save(payload, buf)
        body += buf.getvalue()
    return _HEAD.pack(len(body)) + body


def decode(body: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header, payload bytes)`` of a frame's body; ValueError if the header is not a dict."""
    head, _, payload = body.partition(b"\n")
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, payload


def load_payload(payload: bytes) -> Any:
    """Data only: tensors, numbers, strings and containers (``weights_only=True``)."""
    import torch

    return torch.load(io.BytesIO(payload), weights_only=True)


def load_inputs(payload: bytes) -> Any:
    """The exercise inputs the grader sent (a trusted sender: any picklable value, such as
    a dataclass of the package)."""
    import torch

    return torch.load(io.BytesIO(payload), weights_only=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks: list[bytes] = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> bytes | None:
    """A frame's body from a trusted sender (blocking); None at the end of the stream."""
    head = _read_exact(fd, _HEAD.size)
    if head is None:
        return None
    (n,) = _HEAD.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"a message of {n} bytes is over the limit")
    return _read_exact(fd, n)


class FrameBuffer:
    """Frames from an untrusted sender, read without blocking."""

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self.data = bytearray()
        self.limit = limit

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add bytes; the complete frames so far.  ValueError for an oversized frame."""
        self.data += chunk
        frames: list[bytes] = []
        while len(self.data) >= _HEAD.size:
            (n,) = _HEAD.unpack(self.data[: _HEAD.size])
            if n > self.limit:
                raise ValueError(f"sent a message of {n} bytes (the limit is {self.limit})")
            if len(self.data) < _HEAD.size + n:
                break
            frames.append(bytes(self.data[_HEAD.size : _HEAD.size + n]))
            del self.data[: _HEAD.size + n]
        return frames


# --------------------------------------------------------------------------- outputs as data


def sanitize(x: Any, depth: int = 0) -> Any:
    """Tensors, numbers, strings and containers of them; anything else as a description."""
    import numpy as np
    import torch

    from fewclip_tutorial.course.exercises import _describe

    if depth > 20:
        return {"__opaque__": "a structure nested too deeply"}
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.layout != torch.strided:
            return {"__opaque__": f"a {t.layout} tensor (a dense torch.Tensor is expected)"}
        return t.clone().as_subclass(torch.Tensor)
    if x is None or type(x) in (bool, int, float, str, complex):
        return x
    if isinstance(x, np.ndarray) and x.dtype != object:
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(x).copy())}
    if isinstance(x, np.generic):
        return x.item()
    if type(x) in (list, tuple):
        return type(x)(sanitize(v, depth + 1) for v in x)
    if type(x) is dict and all(isinstance(k, str) for k in x):
        if "__opaque__" in x or "__ndarray__" in x:
            return {"__opaque__": "a dict with a reserved key"}
        return {k: sanitize(v, depth + 1) for k, v in x.items()}
    try:
        desc = _describe(x)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not break grading
        desc = "an object"
    return {"__opaque__": desc[:200]}


# --------------------------------------------------------------------------- the guard (no sandbox)

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
    """A submission tried something the in-process guard does not allow."""


def install_guard(work: Path, package_files: set[str], private: Sequence[str] = ()) -> None:
    """The fallback without an OS sandbox: a :pep:`578` audit hook (against accidents only)."""
    root = os.path.realpath(work)
    hidden = [os.path.realpath(p) for p in private]

    def under(real: str, top: str) -> bool:
        return real == top or real.startswith(top + os.sep)

    def inside(path: Any) -> bool:
        if isinstance(path, int):
            return True
        try:
            return under(os.path.realpath(os.fsdecode(path)), root)
        except (TypeError, ValueError):
            return False

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
            raise SandboxViolation(f"guard: {event} is not allowed in a graded submission")
        if event in ("open", "os.listdir", "os.scandir") and args and is_private(args[0]):
            raise SandboxViolation("guard: the submissions are not readable from a submission")
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and mode is None and flags & _WRITE_FLAGS
            )
            if writing and not inside(path):
                raise SandboxViolation(f"guard: writing {path!r} is not allowed")
            return
        n_paths = _PATH_EVENTS.get(event)
        if n_paths:
            for path in args[:n_paths]:
                if path is not None and not inside(path):
                    raise SandboxViolation(f"guard: {event} on {path!r} is not allowed")
            return
        if event == "exec" and args:
            filename = getattr(args[0], "co_filename", "")
            if filename in package_files:
                raise SandboxViolation(
                    "guard: re-executing the package's own code "
                    f"({os.path.basename(filename)}) is not allowed"
                )
        if event == "object.__setattr__" and len(args) >= 2 and args[1] == "__code__":
            raise SandboxViolation("guard: replacing a function's __code__ is not allowed")

    sys.addaudithook(hook)


# --------------------------------------------------------------------------- the student process


#: below this many bytes of bytecode a function is short enough that an honest answer may
#: compile to the reference's code under other local names: those must match too
_COPY_MIN_BYTES = 100


def _code_key(c: Any) -> tuple[Any, ...]:
    """What a copy keeps: constants (the docstring aside), global and attribute names, the
    argument and local counts; local names too for a short function."""
    consts = tuple(k for k in c.co_consts[1:] if not hasattr(k, "co_code"))
    key = (c.co_names, consts, c.co_argcount, c.co_nlocals)
    return key if len(c.co_code) >= _COPY_MIN_BYTES else (*key, c.co_varnames)


def code_keys(functions: Sequence[Any]) -> dict[str, str]:
    """``{repr of the code key: "module.qualname"}`` of ``functions`` (see :func:`_code_key`)."""
    return {repr(_code_key(fn.__code__)): f"{fn.__module__}.{fn.__qualname__}" for fn in functions}


def _same_code(code: Any, forbidden: Mapping[str, str]) -> str:
    """The name of the forbidden function whose code ``code`` repeats (renamed or not), or "".

    ``forbidden``: :func:`code_keys` of the forbidden functions, computed by the grader
    outside the sandbox (inside, the package's references are stubs).
    """
    if code is None:
        return ""
    try:
        return forbidden.get(repr(_code_key(code)), "")
    except Exception:  # noqa: BLE001 - an odd code object is simply not a copy
        return ""


def _restore_references(restore: Sequence[Any]) -> None:
    """Give the stubbed functions in ``restore`` (``[module, name, source]``) their real code
    back, in place: every alias, closure and registry entry sees it.  The grader sends the
    building blocks a student process grading one exercise may use: never its own reference.
    """
    import importlib
    import inspect

    for module, name, source in restore:
        mod = importlib.import_module(str(module))
        namespace = dict(vars(mod))
        exec(compile(str(source), f"<{module}.{name}>", "exec"), namespace)  # noqa: S102
        live = inspect.unwrap(getattr(mod, str(name)))
        real = inspect.unwrap(namespace[str(name)])
        live.__code__ = real.__code__
        live.__defaults__ = real.__defaults__
        live.__kwdefaults__ = real.__kwdefaults__


def _statements(src: str) -> list[str]:
    """A cell's top-level statements, to run one by one (a failing one does not stop the rest)."""
    import ast

    try:
        tree = ast.parse(src)
    except SyntaxError:
        return [src]
    lines = src.splitlines(keepends=True)
    out: list[str] = []
    for node in tree.body:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        last = node.end_lineno or node.lineno
        out.append("\n" * (first - 1) + "".join(lines[first - 1 : last]))
    return out


def student_main(
    msg_in: int, msg_out: int, request: Mapping[str, Any], guard: bool
) -> None:  # pragma: no cover - runs in the forked student process (covered by the tests)
    """Run one notebook's code, report the checks that ran, answer the grader's inputs."""
    import _thread
    import threading

    import fewclip_tutorial
    import fewclip_tutorial.course.exercises as exmod

    work = Path(str(request["work"]))
    code = [(str(a), str(b)) for a, b in request["code"]]
    exmod.set_edition("student")
    solo = request.get("solo")  # grading this exercise only: other references made real
    _restore_references(request.get("restore") or [])

    answers: dict[str, Any] = {}

    def recording_check(self: Any, student_fn: Any, *args: Any, **kwargs: Any) -> bool:
        answers[self.name] = student_fn
        return True

    exmod.Exercise.check = recording_check  # type: ignore[method-assign]

    forbidden: dict[str, dict[str, str]] = {
        str(name): {str(key): str(label) for label, key in pairs}
        for name, pairs in (request.get("copy_keys") or {}).items()
    }
    if not forbidden:  # the package's own code is here (no sandbox): ask it
        for name in exmod.list_exercises():
            with contextlib.suppress(Exception):
                forbidden[name] = code_keys(exmod.get_exercise(name).forbidden_functions())

    def flag(what: str) -> None:
        """Tell the grader at once (one atomic pipe write): what the student's code does
        afterwards, such as clearing the lists here, cannot take it back."""
        with contextlib.suppress(Exception):
            os.write(msg_out, encode({"event": "flag", "what": what[:300]}))

    hits: list[str] = []
    active: list[dict[str, str]] = [{}]  # the code keys of the running exercise's references
    seen: dict[Any, str] = {}  # code object -> the forbidden function it copies, or ""

    def profiler(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and active[0]:
            code = frame.f_code
            label = seen.get(code)
            if label is None:
                label = seen[code] = _same_code(code, active[0])
            if label:
                hits.append(label)
                flag(f"uses the package's reference solution: it calls {label}")

    # tampering with the checks is noted (not blocked): the profiler switched, the C API
    # reached through ctypes or cffi, threads started around the profiler
    class _Noted(list):  # type: ignore[type-arg]
        def append(self, what: str) -> None:
            super().append(what)
            flag(f"tampered with the grader's checks: {what}")

    tampered: list[str] = _Noted()

    class _HiddenCalls(list):  # type: ignore[type-arg]
        """The stubs of references called: one of the running exercise's is reported at
        once (a function that then hangs, or calls it from a thread, is still named)."""

        def append(self, item: Any) -> None:
            super().append(item)
            with contextlib.suppress(Exception):
                function, owners = item
                if exmod.GRADING[0] in owners:
                    flag(
                        f"uses the package's reference solution: it calls {function}, which "
                        f"is not available while grading {exmod.GRADING[0]}"
                    )

    exmod.HIDDEN_CALLS = _HiddenCalls()
    raw_start = _thread.start_new_thread
    allowed_callers = {threading.Thread._bootstrap_inner.__code__}

    def start_new_thread(fn: Any, args: Any, kwargs: Any = None) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            sys.setprofile(profiler)
            return fn(*a, **k)

        allowed_callers.add(run.__code__)
        return raw_start(run, args, kwargs or {})

    _thread.start_new_thread = start_new_thread
    threading._start_new_thread = start_new_thread  # type: ignore[attr-defined]

    def watch(event: str, args: tuple[Any, ...]) -> None:
        if event == "sys.setprofile" and armed:
            caller = sys._getframe(1).f_code
            if caller not in allowed_callers or (
                caller is threading.Thread._bootstrap_inner.__code__
                and threading._profile_hook is not profiler  # type: ignore[attr-defined]
            ):
                tampered.append("it switched the grader's profiler (sys.setprofile)")
        elif event == "ctypes.dlsym" and len(args) > 1 and isinstance(args[1], str):
            if args[1].lstrip("_").startswith("Py"):
                tampered.append(f"it called the interpreter's C API through ctypes ({args[1]})")
        elif event == "import" and args and args[0] in ("_cffi_backend", "_thread", "_ctypes"):
            tampered.append(f"it imported {args[0]} afresh (a way around the grader's checks)")

    def arm() -> None:
        """The profiler on again before each exercise (a function that switched it off and
        then failed is flagged against its own exercise, not the next one)."""
        sys.setprofile(profiler)
        threading.setprofile(profiler)

    allowed_callers.add(arm.__code__)
    armed = False
    sys.addaudithook(watch)
    get_profile = sys.getprofile
    sys.setprofile(profiler)
    threading.setprofile(profiler)
    armed = True
    if guard:
        package_dir = os.path.dirname(fewclip_tutorial.__file__)
        package_files = {
            m.__file__
            for m in list(sys.modules.values())
            if getattr(m, "__file__", None) and str(m.__file__).startswith(package_dir)
        }
        install_guard(work, package_files, request.get("private", []))

    def send(header: Mapping[str, Any], payload: Any = None) -> None:
        _write_all(msg_out, encode(header, payload))

    namespace: dict[str, Any] = {"__name__": "__main__", "display": print}
    for label, src in code:
        for stmt in _statements(src):
            try:
                exec(compile(stmt, f"<{label}>", "exec"), namespace)  # noqa: S102
            except BaseException:  # noqa: BLE001 - reported; the next statement runs
                print(f"[grader] {label} raised:\n{traceback.format_exc(limit=3)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    send({"event": "answers", "names": list(answers)})
    in_cells = list(tampered)  # counts against every exercise; later, against its own

    while True:
        body = read_frame(msg_in)
        if body is None:
            break
        header, payload = decode(body)
        if header.get("event") != "run":
            break
        name = str(header["name"])
        trials = load_inputs(payload)
        fn = answers.get(name)
        del hits[:]
        exmod.GRADING[0] = name
        arm()
        first_hidden = len(exmod.HIDDEN_CALLS)
        active[0] = forbidden.get(name, {})
        seen.clear()
        first_tamper = len(tampered)
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
            outputs.append(sanitize(got))
        active[0] = {}
        hidden = list(exmod.HIDDEN_CALLS)
        own = [f for f, owners in hidden[first_hidden:] if name in owners]
        if own:  # a stub of this exercise's reference: its code is not in this process
            error = (
                f"uses the package's reference solution: it calls {own[0]}, which is not "
                f"available while grading {name}"
            )
        # a stub of another exercise's reference (a building block) was called, here or in
        # the cells: a wrong answer is graded again in a process where those are real
        retry = bool(error) and not solo and any(name not in o for _, o in hidden)
        if get_profile() is not profiler or hits or own:
            retry = False
        if get_profile() is not profiler:
            error = "removed the grader's profiler (sys.setprofile): not allowed"
        if hits:
            error = f"uses the package's reference solution: it calls {hits[0]}"
        mine = in_cells + tampered[first_tamper:]
        if mine:
            error = f"tampered with the grader's checks: {mine[0]}"
            retry = False
        sys.stdout.flush()
        sys.stderr.flush()
        exmod.GRADING[0] = None
        send(
            {"event": "result", "name": name, "error": error, "retry": retry},
            None if error else outputs,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- the zygote


def _set_not_dumpable() -> None:
    """Other processes of the same user may not ptrace this one or read its memory."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4


def _other_pids() -> list[int]:
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me)]


def _kill_leftovers(child: int, sandboxed: bool, bound: float = 60.0) -> tuple[bool, bool]:
    """Kill what the student process left: ``(something was still running, none is now)``.

    In the sandbox every process of its PID namespace but the zygote (and bwrap's init) is
    killed with ``kill(-1)``, which is atomic against ``fork``, until ``/proc`` lists no
    other process; ``bound`` seconds is far more than a loaded machine takes to end them.
    """
    if sandboxed:
        left = bool(_other_pids())
        deadline = time.monotonic() + bound
        while True:
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            if not _other_pids():
                return left, True
            if time.monotonic() > deadline:
                return left, False
            time.sleep(0.01)
    with contextlib.suppress(OSError):
        os.killpg(child, signal.SIGKILL)
    return False, True


def _remove_sysv_ipc() -> None:
    """Remove the sandbox's System V shared memory, semaphores and message queues."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, ImportError):
        return
    ipc_rmid = 0
    for kind, remove in (("shm", libc.shmctl), ("sem", libc.semctl), ("msg", libc.msgctl)):
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 1 and fields[1].isdigit():
                with contextlib.suppress(Exception):
                    if kind == "sem":
                        remove(int(fields[1]), 0, ipc_rmid)
                    else:
                        remove(int(fields[1]), ipc_rmid, None)


def _mount_points() -> frozenset[str]:
    """The sandbox's mount points (``/proc/self/mountinfo``, field 5): its own structure."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(line.split()[4] for line in lines if len(line.split()) > 4)


def _holds_structure(path: Path, mounts: frozenset[str]) -> tuple[bool, bool]:
    """``(path is a mount point, a mount point lies below path)``.

    A read-only bind below a writable place (a checkout under ``/tmp``: its interpreter and
    package are bound at their own paths) is the sandbox's structure, not a student's file:
    emptying leaves it, and the folders that hold it, in place.
    """
    text = str(path)
    return text in mounts, any(m.startswith(text + "/") for m in mounts)


def _empty(folder: Path, mounts: frozenset[str] = frozenset()) -> None:
    """Remove everything under ``folder``, also below folders the student made unreadable or
    unwritable (it owned them: the same user may chmod them back); mount points in
    ``mounts`` and the folders that hold them stay."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        is_mount, holds_mount = _holds_structure(path, mounts)
        if is_mount:
            continue
        try:
            if holds_mount:
                _empty(path, mounts)
            elif entry.is_dir(follow_symlinks=False):
                os.chmod(path, 0o700)
                _empty(path)
                path.rmdir()
            else:
                path.unlink()
        except OSError:
            pass


def _student_files(folder: Path, mounts: frozenset[str]) -> list[str]:
    """What lies under ``folder`` that is not the sandbox's structure (see :func:`_empty`)."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            path = folder / name
            is_mount, holds_mount = _holds_structure(path, mounts)
            if holds_mount and not is_mount:
                found += _student_files(path, mounts)
            elif not is_mount:
                found.append(str(path))
    return found


#: the writable places of the sandbox, emptied between students
SCRATCH = (Path("/tmp"), Path("/dev/shm"), Path("/dev/mqueue"))

#: the number of the ``keyctl`` system call, by ``platform.machine()`` (Linux's syscall
#: tables: x86_64 250, i386 288, arm EABI 311, powerpc 271, s390 280; arm64, riscv64 and
#: loongarch64 use the generic table, 219).  Elsewhere the grader cannot clear or check the
#: user's keyrings, which outlive processes: every student then gets a fresh sandbox (a
#: fresh user namespace, so fresh keyrings), and the grader says so on its first line.
_KEYCTL = {
    "x86_64": 250,
    "amd64": 250,
    "i386": 288,
    "i486": 288,
    "i586": 288,
    "i686": 288,
    "aarch64": 219,
    "arm64": 219,
    "riscv64": 219,
    "loongarch64": 219,
    "armv6l": 311,
    "armv7l": 311,
    "armv8l": 311,
    "ppc64le": 271,
    "ppc64": 271,
    "ppc": 271,
    "s390x": 280,
}
#: a 32-bit interpreter on a 64-bit kernel calls through the 32-bit table
_KEYCTL_32 = {"x86_64": "i686", "amd64": "i686", "aarch64": "armv7l", "arm64": "armv7l"}


def keyctl_number(machine: str | None = None, bits: int | None = None) -> int | None:
    """The ``keyctl`` system call's number here (None where the grader does not know it)."""
    import platform

    machine = (machine if machine is not None else platform.machine()).lower()
    bits = bits if bits is not None else struct.calcsize("P") * 8
    if bits == 32:
        machine = _KEYCTL_32.get(machine, machine)
    return _KEYCTL.get(machine)


def keyrings_unchecked() -> str:
    """Why the user's keyrings cannot be cleared between students here ("" when they can)."""
    import platform

    if keyctl_number() is not None:
        return ""
    return (
        f"the user's keyrings cannot be cleared or checked on {platform.machine() or 'this'} "
        "(no keyctl system call number known): a fresh sandbox for every student"
    )


def _keyctl(*args: Any) -> tuple[int, int]:
    """``(result, errno)`` of ``keyctl(*args)``; ``(-1, ENOSYS)`` where its number is unknown."""
    import ctypes

    number = keyctl_number()
    if number is None:
        return -1, errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    ctypes.set_errno(0)
    return int(libc.syscall(number, *args)), ctypes.get_errno()


def _clear_keyrings() -> bool:
    """Clear the user's keyrings (they outlive processes); True when both are empty after.

    False where they cannot be checked (:func:`keyrings_unchecked`), and when a keyring
    cannot be read (a student took the permissions away: it may hold a key).
    """
    if keyctl_number() is None:
        return False
    keyctl_clear, keyctl_read = 7, 11
    empty = True
    for ring in (-4, -5):  # KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING
        try:
            _keyctl(keyctl_clear, ring)
            size, err = _keyctl(keyctl_read, ring, None, 0)  # bytes of the list of keys
        except Exception:  # noqa: BLE001 - no ctypes: unchecked, so not known to be empty
            return False
        if size > 0 or (size < 0 and err not in (errno.ENOSYS, errno.ENOKEY)):
            empty = False
    return empty


#: the modes of the writable places when the sandbox started (a student may chmod them)
_SCRATCH_MODES: dict[Path, int] = {}


def _record_scratch_modes() -> None:
    for folder in SCRATCH:
        with contextlib.suppress(OSError):
            _SCRATCH_MODES[folder] = os.stat(folder).st_mode & 0o7777


def _leftovers_in_sandbox() -> list[str]:
    """What a student left that would reach the next one (empty when the sandbox is clean)."""
    found = [f"process {pid}" for pid in _other_pids()]
    mounts = _mount_points()
    for folder in SCRATCH:
        found += _student_files(folder, mounts)
        with contextlib.suppress(OSError):
            mode = os.stat(folder).st_mode & 0o7777
            if folder in _SCRATCH_MODES and mode != _SCRATCH_MODES[folder]:
                found.append(f"{folder} with mode {mode:o}")
    for kind in ("shm", "sem", "msg"):
        with contextlib.suppress(OSError):
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
            found += [f"System V {kind} {line.split()[1]}" for line in lines if line.split()]
    if not _clear_keyrings():
        found.append(keyrings_unchecked() or "a key in the user's keyring")
    return found


def _clean_sandbox(bound: float = 60.0) -> list[str]:
    """Empty the sandbox's writable places, IPC objects and keyrings; what is still there."""
    mounts = _mount_points()
    for folder in SCRATCH:
        if folder in _SCRATCH_MODES:  # writable again, for the sandbox's user, if it was
            with contextlib.suppress(OSError):
                os.chmod(folder, _SCRATCH_MODES[folder])
        _empty(folder, mounts)
    _remove_sysv_ipc()
    _clear_keyrings()
    return _leftovers_in_sandbox()


def _run_student(request: Mapping[str, Any], sandboxed: bool, guard: bool) -> None:
    """Fork the student process and relay its frames until it ends (fd 0/1: the grader)."""
    import resource

    # a fresh folder per student, under a name no earlier student could know
    work = Path(str(request["work"])) / f"s-{secrets.token_hex(8)}"
    work.mkdir(parents=True, mode=0o700)
    request = {**request, "work": str(work)}
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the student process
        try:
            os.setsid()
            os.dup2(to_child_r, 0)
            os.dup2(_OUTPUT_FD[0], 1)  # the output pipe, read by the grader
            os.dup2(_OUTPUT_FD[0], 2)
            os.dup2(from_child_w, 3)
            os.closerange(4, 1 << 16)
            cpu = int(request.get("cpu_limit", 600))
            with contextlib.suppress(Exception):
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.chdir(work)
            for var in ("HOME", "TMPDIR", "TEMP", "TMP", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
                os.environ[var] = str(work)
            import tempfile

            tempfile.tempdir = str(work)
            student_main(0, 3, request, guard)
        except BaseException:  # noqa: BLE001
            with contextlib.suppress(Exception):
                traceback.print_exc()
        os._exit(70)
    os.close(to_child_r)
    os.close(from_child_w)
    os.set_blocking(from_child_r, False)
    os.set_blocking(to_child_w, False)
    to_child = bytearray()
    buffer = FrameBuffer()
    status: int | None = None
    child_open = True
    problem = ""
    while status is None:
        fds = [0] + ([from_child_r] if child_open else [])
        writable = [to_child_w] if to_child and child_open else []
        ready, can_write, _ = select.select(fds, writable, [], 0.05)
        if can_write:  # a student process that does not read never blocks the zygote
            try:
                del to_child[: os.write(to_child_w, to_child[: 1 << 16])]
            except BlockingIOError:
                pass
            except OSError:
                to_child.clear()
        if from_child_r in ready:
            try:
                chunk = os.read(from_child_r, 1 << 20)
            except BlockingIOError:
                chunk = b"-"
            if not chunk:
                child_open = False
            elif chunk != b"-":
                try:
                    for frame in buffer.feed(chunk):
                        _write_all(1, _HEAD.pack(len(frame) + 1) + b"C" + frame)
                except ValueError as err:
                    problem = str(err)
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
        if 0 in ready:
            body = read_frame(0)
            if body is None:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                _kill_leftovers(pid, sandboxed)
                os._exit(0)
            header, _ = decode(body)
            if header.get("event") == "kill":
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            elif child_open:  # an exercise's inputs: pass them on
                to_child += _HEAD.pack(len(body)) + body
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = code
    os.close(to_child_w)
    with contextlib.suppress(OSError):
        while True:  # the frames it wrote just before it ended
            chunk = os.read(from_child_r, 1 << 20)
            if not chunk:
                break
            for frame in buffer.feed(chunk):
                _write_all(1, _HEAD.pack(len(frame) + 1) + b"C" + frame)
    os.close(from_child_r)
    leftover, _ = _kill_leftovers(pid, sandboxed)
    remains: list[str] = []
    if sandboxed:  # the sandbox's own namespaces: nothing may pass to the next student
        remains = _clean_sandbox()
    else:
        _empty(work.parent)
    exit_code = os.waitstatus_to_exitcode(status)
    header = {
        "event": "done",
        "exit": exit_code,
        "leftover": leftover,
        "problem": problem,
        "clean": not remains,  # else the grader starts a fresh sandbox for the next student
        "remains": remains[:5],
    }
    body = json.dumps(header).encode() + b"\n"
    _write_all(1, _HEAD.pack(len(body) + 1) + b"Z" + body)


_OUTPUT_FD = [2]


def zygote_main(argv: Sequence[str]) -> int:  # pragma: no cover - runs in its own process
    """fd 0: requests from the grader; fd 1: frames to it; ``--output-fd``: what students print."""
    sandboxed = "--sandboxed" in argv
    guard = "--guard" in argv
    if "--output-fd" in argv:
        _OUTPUT_FD[0] = int(argv[list(argv).index("--output-fd") + 1])
    if sandboxed and os.getpid() > 3:  # kill(-1) is only safe in the sandbox's PID namespace
        sandboxed = False
    if sandboxed:  # ``-m`` put the working folder (/tmp) first on sys.path: students write there
        sys.path[:] = [p for p in sys.path if p not in ("", ".", "/tmp")]
    _set_not_dumpable()
    os.environ["FEWCLIP_EDITION"] = "student"
    import torch

    import fewclip_tutorial.course.exercises as exmod

    if sandboxed:
        _record_scratch_modes()
        if keyrings_unchecked():
            print(f"[grader] {keyrings_unchecked()}", file=sys.stderr)
    torch.set_num_threads(1)
    exmod.list_exercises()
    body = json.dumps({"event": "ready", "pid": os.getpid()}).encode() + b"\n"
    _write_all(1, _HEAD.pack(len(body) + 1) + b"Z" + body)
    while True:
        body = read_frame(0)
        if body is None:
            return 0
        header, _ = decode(body)
        if header.get("event") == "student":
            _run_student(header, sandboxed, guard)


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(zygote_main(sys.argv[1:]))
    sys.exit(errno.EPIPE)
