"""Per-student isolation inside one sandbox: nothing an earlier student leaves reaches a
later one, and a student cannot take back what it reported against itself.

One class is graded with the isolation this machine has (its first three students only
with bubblewrap).  ``a_planter`` leaves what
it can in the sandbox: a package on the path Python searches (in a folder it made
read-only), a file in a folder it made unreadable, a file in ``/dev/shm``, a POSIX
message queue, a key in the user's keyring, a file in ``/dev``.  ``b_honest`` imports
the planted name as an optional extra and must keep full marks.  ``c_reader`` would
get its marks only if something of the planter's reached it.  ``d_clear_after`` calls
the package's answer and then empties the student process's own lists of what it saw.
``e_stopper`` stops (SIGSTOP) the process in the sandbox that forked it.

A second class checks the other way out: ``a_locker`` leaves a key in a keyring it made
impossible to clear (no write, setattr or read permission left for its user), so that the
sandbox cannot be emptied, and ``b_after``, graded next, must get a fresh sandbox that does
not hold the key.
"""

from __future__ import annotations

import csv
import errno
import os
import stat
from pathlib import Path

import pytest
from test_grading import (
    GOOD_PE,
    GOOD_ZS,
    ISOLATION,
    SANDBOXED,
    _grader_processes,
    _submission,
)

from fewclip_tutorial.course import _grading_child as child
from fewclip_tutorial.course import grading
from fewclip_tutorial.course.grading import GradeConfig, grade_directory, write_grades_csv

RUN_SEED = 7
#: seconds per exercise and for the cells: honest ones take well under a second, a
#: margin of over 100x for a loaded machine (no submission here loops)
LIMIT = 60.0

RIGHT_PE = (
    "    t = t / t.norm(dim=2, keepdim=True)\n"
    "    m = t.mean(1)\n"
    "    return m / m.norm(dim=1, keepdim=True)"
)

#: the keyring system calls (add_key, request_key) where their numbers are known
KEYS = (
    "import ctypes, os, platform\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "ADD_KEY, REQUEST_KEY = {'x86_64': (248, 249), 'aarch64': (217, 218)}.get(\n"
    "    platform.machine(), (0, 0))\n"
    "try:\n"
    "    mq_open = libc.mq_open  # in libc since glibc 2.34\n"
    "except AttributeError:\n"
    "    mq_open = ctypes.CDLL('librt.so.1').mq_open\n"
)

PLANTER = (
    KEYS + "os.makedirs('/tmp/fewclip_extras', exist_ok=True)\n"
    "with open('/tmp/fewclip_extras/__init__.py', 'w') as f:\n"
    "    f.write('import os\\nos._exit(9)\\n')  # ends any later student that imports it\n"
    "os.chmod('/tmp/fewclip_extras', 0o555)  # its files cannot be removed by name\n"
    "os.makedirs('/tmp/hide', exist_ok=True)\n"
    "open('/tmp/hide/answers', 'w').write('left for a classmate')\n"
    "os.chmod('/tmp/hide', 0)\n"
    "open('/dev/shm/answers', 'w').write('left for a classmate')\n"
    "print('mq_open', mq_open(b'/fewclip', 0o102, 0o600, None))  # O_CREAT | O_RDWR\n"
    "if ADD_KEY:\n"
    "    print('add_key', libc.syscall(ADD_KEY, b'user', b'fewclip', b'answers', 7, -4))\n"
    "try:\n"
    "    open('/dev/answers', 'w').write('left for a classmate')\n"
    "except OSError as e:\n"
    "    print('blocked:', e)\n"
    "os.chmod('/tmp', 0o555)  # the grader cannot empty them by name: it chmods them back\n"
    "os.chmod('/dev/shm', 0o555)\n" + GOOD_PE
)

HONEST = (
    "try:\n"
    "    import fewclip_extras  # an optional helper, absent on the grader\n"
    "except ImportError:\n"
    "    fewclip_extras = None\n" + GOOD_PE
)

READER = (
    KEYS + ""
    "def my_prompt_ensemble(t):\n"
    "    found = [p for p in ('/tmp/fewclip_extras', '/tmp/hide', '/dev/shm/answers',\n"
    "                         '/dev/answers') if os.path.lexists(p)]\n"
    "    mounts = [line.split()[4] for line in open('/proc/self/mountinfo')]\n"
    "    def structure(p):  # a checkout under /tmp is bound into the sandbox\n"
    "        return any(m == p or m.startswith(p + '/') for m in mounts)\n"
    "    found += [p for p in os.listdir('/tmp')\n"
    "              if p != 'work' and not structure('/tmp/' + p)]\n"
    "    found += [p for p in os.listdir('/tmp/work') if p != os.path.basename(os.getcwd())]\n"
    "    if mq_open(b'/fewclip', 0, 0, None) != -1:\n"
    "        found.append('message queue')\n"
    "    if REQUEST_KEY and libc.syscall(REQUEST_KEY, b'user', b'fewclip', None, 0) != -1:\n"
    "        found.append('key')\n"
    "    mine = {1, os.getpid(), os.getppid()}\n"
    "    found += [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in mine]\n"
    "    if not found:\n"
    "        raise LookupError('nothing from another student')\n"
    "    print('found', found)\n" + RIGHT_PE
)

CLEAR_AFTER = (
    "import sys\n"
    "import fewclip_tutorial.zeroshot as z\n"
    "def my_prompt_ensemble(t):\n"
    "    r = z.prompt_ensemble(t)\n"
    "    f = sys._getframe()\n"
    "    while f is not None:  # empty the grader's lists in the student process\n"
    "        for key in ('hits', 'tampered'):\n"
    "            if isinstance(f.f_locals.get(key), list):\n"
    "                f.f_locals[key].clear()\n"
    "        f = f.f_back\n"
    "    return r"
)

EXPECTED = {
    "a_planter": ("1", "1"),
    "b_honest": ("1", "1"),
    "c_reader": ("0", "1"),
    "d_clear_after": ("0", "1"),
    "e_stopper": ("1", "1"),
    "z_correct": ("1", "1"),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    subs = tmp_path_factory.mktemp("isolation")
    if SANDBOXED:  # without a sandbox these would plant things on this machine itself
        _submission(subs / "a_planter.ipynb", PLANTER, GOOD_ZS)
        _submission(subs / "b_honest.ipynb", HONEST, GOOD_ZS)
        _submission(subs / "c_reader.ipynb", READER, GOOD_ZS)
    _submission(subs / "d_clear_after.ipynb", CLEAR_AFTER, GOOD_ZS)
    _submission(
        subs / "e_stopper.ipynb",
        # stops the grader's process that forked it: the grader resumes it (else the class
        # would wait for the cells' time limit, and this student would get zero)
        "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n" + GOOD_PE,
        GOOD_ZS,
    )
    _submission(subs / "z_correct.ipynb", GOOD_PE, GOOD_ZS)
    config = GradeConfig(seed=RUN_SEED, timeout=LIMIT, setup_timeout=LIMIT)
    grades = grade_directory(subs, config, isolation=ISOLATION)
    out = write_grades_csv(grades, subs.parent / "isolation.csv", RUN_SEED, ISOLATION.label)
    with open(out, newline="", encoding="utf-8") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    return {"rows": rows, "grades": {g.student: g for g in grades}}


#: the students graded only with a sandbox
SANDBOX_ONLY = ("a_planter", "b_honest", "c_reader")
needs_sandbox = pytest.mark.skipif(
    not SANDBOXED, reason=f"needs bubblewrap: {ISOLATION.description}"
)


def test_every_student_keeps_the_right_score(graded: dict) -> None:
    scores = {s: (r["prompt_ensemble"], r["zero_shot_logits"]) for s, r in graded["rows"].items()}
    expected = {s: v for s, v in EXPECTED.items() if SANDBOXED or s not in SANDBOX_ONLY}
    assert scores == expected, {s: r["notes"] for s, r in graded["rows"].items()}
    assert all(r["isolation"] == ISOLATION.label for r in graded["rows"].values())
    if SANDBOXED:
        assert "blocked:" in graded["grades"]["a_planter"].log  # /dev is read-only


@needs_sandbox
def test_nothing_an_earlier_student_left_reaches_a_later_one(graded: dict) -> None:
    reason = graded["grades"]["c_reader"].grades["prompt_ensemble"].reason
    assert "LookupError: nothing from another student" in reason
    assert graded["rows"]["b_honest"]["notes"] == ""
    # ... because one sandbox was emptied between them, not replaced: the cleaning reached
    # everything they left, and did not mistake the sandbox's own mounts (a checkout under
    # /tmp) for a student's files
    logs = "".join(g.log for g in graded["grades"].values())
    assert "a fresh sandbox follows" not in logs


def test_a_reported_call_of_the_reference_cannot_be_taken_back(graded: dict) -> None:
    reason = graded["grades"]["d_clear_after"].grades["prompt_ensemble"].reason
    assert "reference solution" in reason and "prompt_ensemble" in reason


def test_no_process_is_left_behind(graded: dict) -> None:
    assert _grader_processes() == []


def test_emptying_reaches_below_folders_made_unreadable(tmp_path: Path) -> None:
    top = tmp_path / "scratch"
    (top / "locked" / "deeper").mkdir(parents=True)
    (top / "locked" / "deeper" / "f").write_text("x")
    (top / "readonly").mkdir()
    (top / "readonly" / "g").write_text("x")
    (top / "file").write_text("x")
    os.symlink("/nonexistent", top / "link")
    (top / "readonly").chmod(stat.S_IRUSR | stat.S_IXUSR)
    (top / "locked").chmod(0)
    child._empty(top)
    assert list(top.iterdir()) == []


def test_the_sandbox_shows_dev_read_only_but_its_own_shm_and_queues() -> None:
    cmd = grading._bwrap_prefix()
    assert cmd[cmd.index("--remount-ro") + 1] == "/dev"
    assert cmd.index("--remount-ro") > cmd.index("/dev/shm")
    assert cmd[cmd.index("/dev/shm") - 1] == "--tmpfs"


#: ``KEYS`` plus keyctl's number (``KEYCTL_SETPERM`` is 5)
KEYCTL = "KEYCTL = {'x86_64': 250, 'aarch64': 219}.get(platform.machine(), 0)\n"
LOCKER = (
    KEYS
    + KEYCTL
    + "print('add_key', libc.syscall(ADD_KEY, b'user', b'fewclip', b'answers', 7, -4))\n"
    "# the user keyring: view and search only, for its possessor and its user\n"
    "print('setperm', libc.syscall(KEYCTL, 5, -4, 0x09 << 24 | 0x09 << 16))\n" + GOOD_PE
)
AFTER = (
    KEYS + "def my_prompt_ensemble(t):\n"
    "    if libc.syscall(REQUEST_KEY, b'user', b'fewclip', None, 0) != -1:\n"
    "        raise LookupError('a key from another student')\n" + RIGHT_PE
)
needs_keyctl = pytest.mark.skipif(
    not SANDBOXED or child.keyctl_number() not in (250, 219),
    reason="needs bubblewrap on x86_64 or aarch64 (the keyring calls the test makes)",
)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    subs = tmp_path_factory.mktemp("locked")
    _submission(subs / "a_locker.ipynb", LOCKER, GOOD_ZS)
    _submission(subs / "b_after.ipynb", AFTER, GOOD_ZS)
    _submission(subs / "c_last.ipynb", GOOD_PE, GOOD_ZS)
    config = GradeConfig(seed=RUN_SEED, timeout=LIMIT, setup_timeout=LIMIT)
    grades = grade_directory(subs, config, isolation=ISOLATION)
    return {g.student: g for g in grades}


@needs_keyctl
def test_a_sandbox_left_unclean_is_replaced_before_the_next_student(locked: dict) -> None:
    assert {s: g.total for s, g in locked.items()} == {
        "a_locker": 2.0,
        "b_after": 2.0,
        "c_last": 2.0,
    }, {s: g.log[-600:] for s, g in locked.items()}
    assert "setperm 0" in locked["a_locker"].log  # the lock took
    assert "a fresh sandbox follows" in locked["a_locker"].log
    assert "keyring" in locked["a_locker"].log
    for student in ("b_after", "c_last"):  # the fresh sandbox is cleaned as usual after
        assert "a fresh sandbox follows" not in locked[student].log
    assert _grader_processes() == []


def test_keyctl_numbers_and_what_other_architectures_get(monkeypatch: pytest.MonkeyPatch) -> None:
    assert child.keyctl_number("x86_64", 64) == 250
    assert child.keyctl_number("x86_64", 32) == 288
    assert child.keyctl_number("aarch64", 64) == child.keyctl_number("riscv64", 64) == 219
    assert child.keyctl_number("ppc64le", 64) == 271  # not s390's 280
    assert child.keyctl_number("s390x", 64) == 280
    assert child.keyctl_number("sparc64", 64) is None
    # elsewhere: said on the grader's first line, and every student gets a fresh sandbox
    monkeypatch.setattr(child, "keyctl_number", lambda *a: None)
    assert child._keyctl(11, -4, None, 0) == (-1, errno.ENOSYS)
    assert child._clear_keyrings() is False
    why = child.keyrings_unchecked()
    assert "fresh sandbox for every student" in why
    assert any(why in x for x in child._leftovers_in_sandbox())
    if SANDBOXED:
        assert why in grading.detect_isolation("auto").description
