"""The package's reference solution is not inside the sandbox while its exercise is graded.

Inside the bubblewrap sandbox the package is a copy (:func:`grading.reference_view`) in
which every exercise's reference functions are stubs that raise ``ReferenceHiddenError``:
a student who switches the in-process detection off (the profiler's lists cleared through
``sys.getprofile().__closure__`` or through the frame stack) and then reaches for the
reference (directly, through the exercise's registry, ``importlib.reload``, re-executing
the package's source file, or any ``zeroshot`` file or ``.pyc`` on Python's path) finds
no code to run, and gets zero with the reason.  An honest notebook keeps full marks, also
one whose answer uses *another* exercise's reference as a building block (graded again
in a process where only its own exercise's references are stubs) and one whose cells use
the graded exercise's reference for the chapter's own data.
"""

from __future__ import annotations

import csv
import sys

import pytest
from test_grading import GOOD_PE, GOOD_ZS, ISOLATION, SANDBOXED, _submission

from fewclip_tutorial.course import _grading_child as child
from fewclip_tutorial.course import grading
from fewclip_tutorial.course.exercises import get_exercise, list_exercises
from fewclip_tutorial.course.grading import GradeConfig, grade_directory, write_grades_csv

RUN_SEED = 11
#: seconds per exercise and for the cells: honest ones take well under a second (the
#: path search below a few seconds), a margin of over 10x for a loaded machine; no
#: submission here loops
LIMIT = 120.0

needs_sandbox = pytest.mark.skipif(
    not SANDBOXED, reason=f"needs bubblewrap: {ISOLATION.description}"
)

#: switches the in-process detection off without an audit event: the profiler's lists
#: (its closure) and the student process's own frames
DISABLE = (
    "import sys\n"
    "def _switch_off():\n"
    "    for cell in sys.getprofile().__closure__ or ():\n"
    "        v = cell.cell_contents\n"
    "        if isinstance(v, list) and v and isinstance(v[0], dict):\n"
    "            v[0] = {}  # active: no reference to look for\n"
    "        elif isinstance(v, (list, dict)):\n"
    "            v.clear()  # hits, seen\n"
    "    f = sys._getframe()\n"
    "    while f is not None:\n"
    "        for key in ('forbidden', 'hits'):\n"
    "            if isinstance(f.f_locals.get(key), (dict, list)):\n"
    "                f.f_locals[key].clear()\n"
    "        f = f.f_back\n"
)

ROUTES = {
    "direct": "import fewclip_tutorial.zeroshot as z\nref = lambda: z.prompt_ensemble\n",
    "registry": "ref = lambda: get_exercise('prompt_ensemble').reference_fn\n",
    "sys_modules": "ref = lambda: sys.modules['fewclip_tutorial.zeroshot'].prompt_ensemble\n",
    "reload": "import importlib\nimport fewclip_tutorial.zeroshot as z\n"
    "ref = lambda: importlib.reload(z).prompt_ensemble\n",
    "source_file": "import fewclip_tutorial.zeroshot as z\n"
    "def ref():\n"
    "    ns = {'__name__': 'copied'}\n"
    "    exec(compile(open(z.__file__).read(), z.__file__, 'exec'), ns)\n"
    "    return ns['prompt_ensemble']\n",
    # every zeroshot*.py or *.pyc on Python's path (site-packages, the checkout), run
    "path_search": "import marshal, os\n"
    "_ns = {'__name__': 'found'}\n"
    "for _top in {p for p in sys.path if p and os.path.isdir(p)}:\n"
    "    for _folder, _dirs, _files in os.walk(_top):\n"
    "        for _f in _files:\n"
    "            if _f.startswith('zeroshot') and _f.endswith(('.py', '.pyc')):\n"
    "                _p = os.path.join(_folder, _f)\n"
    "                print('found', _p)\n"
    "                try:\n"
    "                    _data = open(_p, 'rb').read()\n"
    "                    _code = (marshal.loads(_data[16:]) if _p.endswith('.pyc')\n"
    "                             else compile(_data, _p, 'exec'))\n"
    "                    exec(_code, _ns)\n"
    "                except Exception as e:\n"
    "                    print('failed', _p, e)\n"
    "ref = lambda: _ns['prompt_ensemble']\n",
}


def _cheat(route: str) -> str:
    return (
        DISABLE + ROUTES[route] + "def my_prompt_ensemble(t):\n"
        "    _switch_off()\n"
        "    fn = ref()\n"
        "    _switch_off()\n"
        "    return fn(t)"
    )


#: the zero-shot answer built on the package's prompt_ensemble (another exercise's
#: reference): exact, since the rows it normalises are scaled back
BUILDING_BLOCK_ZS = (
    "import fewclip_tutorial.zeroshot as z\n"
    "def my_zero_shot_logits(f, W, logit_scale=100.0):\n"
    "    W = z.prompt_ensemble(W.unsqueeze(1)) * W.norm(dim=-1, keepdim=True)\n"
    "    return logit_scale * (f @ W.T)"
)
#: the graded exercise's reference used on the chapter's own data in an exercise cell
CHAPTER_DATA_PE = (
    "import fewclip_tutorial.zeroshot as z\n"
    "class_weights = z.prompt_ensemble(torch.randn(3, 4, 8))  # the chapter's data\n" + GOOD_PE
)

EXPECTED = {
    "honest": ("1", "1"),
    "honest_building_block": ("1", "1"),
    "honest_chapter_data": ("1", "1"),
    **{f"cheat_{route}": ("0", "1") for route in ROUTES},
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    subs = tmp_path_factory.mktemp("reference")
    _submission(subs / "honest.ipynb", GOOD_PE, GOOD_ZS)
    _submission(subs / "honest_building_block.ipynb", GOOD_PE, BUILDING_BLOCK_ZS)
    _submission(subs / "honest_chapter_data.ipynb", CHAPTER_DATA_PE, GOOD_ZS)
    for route in ROUTES:
        _submission(subs / f"cheat_{route}.ipynb", _cheat(route), GOOD_ZS)
    config = GradeConfig(seed=RUN_SEED, timeout=LIMIT, setup_timeout=LIMIT)
    grades = grade_directory(subs, config, isolation=ISOLATION)
    out = write_grades_csv(grades, subs.parent / "reference.csv", RUN_SEED, ISOLATION.label)
    with open(out, newline="", encoding="utf-8") as f:
        rows = {r["student"]: r for r in csv.DictReader(f)}
    return {"rows": rows, "grades": {g.student: g for g in grades}}


@needs_sandbox
def test_the_reference_is_not_there_to_call_once_the_checks_are_off(graded: dict) -> None:
    scores = {s: (r["prompt_ensemble"], r["zero_shot_logits"]) for s, r in graded["rows"].items()}
    assert scores == EXPECTED, {s: r["notes"] for s, r in graded["rows"].items()}
    for route in ROUTES:
        reason = graded["grades"][f"cheat_{route}"].grades["prompt_ensemble"].reason
        assert "reference solution" in reason and "prompt_ensemble" in reason, (route, reason)
    direct = graded["grades"]["cheat_direct"].grades["prompt_ensemble"].reason
    assert "not available while grading prompt_ensemble" in direct
    # the path search found the sandbox's copy of zeroshot.py only, and no .pyc
    log = graded["grades"]["cheat_path_search"].log
    assert "found " in log and ".pyc" not in log


@needs_sandbox
def test_honest_notebooks_keep_their_marks(graded: dict) -> None:
    for student in ("honest", "honest_building_block", "honest_chapter_data"):
        assert graded["rows"][student]["notes"] == "", graded["grades"][student].log
    # the chapter's data made with the graded exercise's reference: a logged failure only
    assert "not available while grading" in graded["grades"]["honest_chapter_data"].log


def test_the_view_stubs_every_reference_at_its_modules_top_level() -> None:
    view = grading.reference_view()
    for name in list_exercises():
        for fn in get_exercise(name).forbidden_functions():
            if "<" in fn.__qualname__:  # a catalog lambda: it calls a stubbed function
                continue
            assert name in view.stubs[fn.__module__, fn.__qualname__], (name, fn)
            path = view.root / fn.__code__.co_filename.split("fewclip_tutorial/", 1)[1]
            text = path.read_text()
            assert f"raise _h('{fn.__module__}.{fn.__qualname__}'" in text
    assert not list(view.root.rglob("__pycache__")) and not list(view.root.rglob("*.pyc"))
    assert all("<lambda>" in s for s in view.skipped), view.skipped
    # a process grading prompt_ensemble alone gets every reference back but its own
    restored = {(m, n) for m, n, _ in view.restore_for("prompt_ensemble")}
    assert ("fewclip_tutorial.zeroshot", "zero_shot_logits") in restored
    assert ("fewclip_tutorial.zeroshot", "prompt_ensemble") not in restored


def test_a_stubbed_module_keeps_its_signatures_and_decorators() -> None:
    src = (
        "import functools\n"
        "@functools.lru_cache\n"
        "def f(x: int,\n"
        "      y: int = 2) -> int:\n"
        '    """Doc."""\n'
        "    return x + y\n"
        "def g(x): return x\n"
        "def h(x):\n"
        "    return f(x, 1)\n"
    )
    stubbed, real = grading.stub_module_source(src, "m", {"f": ["ex_f"], "g": ["ex_g"]})
    assert real["f"].startswith("@functools.lru_cache\ndef f(") and "return x + y" in real["f"]
    assert real["g"] == "def g(x): return x\n"
    assert "return x + y" not in stubbed and "return f(x, 1)" in stubbed
    ns: dict = {}
    exec(stubbed, ns)
    assert ns["f"].__wrapped__.__defaults__ == (2,)
    for call in (lambda: ns["f"](1), lambda: ns["g"](1), lambda: ns["h"](1)):
        with pytest.raises(RuntimeError, match="reference solution"):
            call()


def test_code_keys_match_a_renamed_copy() -> None:
    from fewclip_tutorial.zeroshot import prompt_ensemble

    keys = child.code_keys([prompt_ensemble])
    assert child._same_code(prompt_ensemble.__code__, keys).endswith("prompt_ensemble")
    assert child._same_code((lambda t: t).__code__, keys) == ""
    assert child._same_code(None, keys) == ""
    assert sys.modules["fewclip_tutorial.zeroshot"].prompt_ensemble is prompt_ensemble
