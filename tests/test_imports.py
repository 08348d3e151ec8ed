"""The package's import graph: no circle, and the layers of ARCHITECTURE.md.

Edges are read with ``ast`` from every ``import`` and ``from ... import`` in the package,
those inside functions included (a deferred import is an edge all the same).  ``from
package import name`` points at the submodule ``package.name`` when there is one, else at
``package``.  Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; those
implicit parent imports are not edges (every package would otherwise be a circle with its
own submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "fewclip_tutorial"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
METHODS = ("tip_adapter", "cross_modal", "fd_align", "clap")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module ``name`` refers to: itself, or its nearest enclosing package module."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(_target(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else _target(base))
    return {m for m in found if m is not None and m != module and m.startswith(PACKAGE)}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_the_graph_reads_imports_inside_functions() -> None:
    assert f"{PACKAGE}.methods.registry" in GRAPH[f"{PACKAGE}.cli"]  # deferred imports
    assert f"{PACKAGE}.course.grading" in GRAPH[f"{PACKAGE}.cli"]
    assert f"{PACKAGE}.methods.tip_adapter.core" in GRAPH[f"{PACKAGE}.methods.fd_align.runner"]


def test_no_import_circle() -> None:
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("method", METHODS)
def test_a_method_folder_and_its_core(method: str) -> None:
    folder = ROOT / "methods" / method
    assert (folder / "config.py").is_file() and (folder / "core.py").is_file()
    assert (folder / "runner.py").is_file()
    assert (folder / "train.py").is_file() or (folder / "search.py").is_file()
    core = GRAPH[f"{PACKAGE}.methods.{method}.core"]
    forbidden = (f"{PACKAGE}.methods.registry", f"{PACKAGE}.episode", f"{PACKAGE}.course")
    assert not [m for m in core if m.startswith(forbidden)], core


def test_methods_never_import_the_course_nor_call_each_other_by_name() -> None:
    for module, imports in GRAPH.items():
        if not module.startswith(f"{PACKAGE}.methods"):
            continue
        assert not [m for m in imports if m.startswith(f"{PACKAGE}.course")], module
        text = MODULES[module].read_text()
        assert "register_exercises" not in text, module
        if module == f"{PACKAGE}.methods.registry":
            continue
        calls = [
            n.func.id if isinstance(n.func, ast.Name) else n.func.attr
            for n in ast.walk(ast.parse(text))
            if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
        ]
        assert "run_method" not in calls, f"{module} runs a method through the registry"


def test_no_method_file_over_600_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "methods").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, long
