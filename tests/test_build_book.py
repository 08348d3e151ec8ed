"""`make book` (scripts/build_book.py): a failed or timed-out cell fails the build; unchanged
chapters come from Jupyter Book's execution cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_book.py"


def _book(tmp_path: Path, cells: dict[str, str], timeout: int = 60) -> Path:
    """A book in ``tmp_path`` with our ``_config.yml`` (cell timeout changed) and one
    chapter per entry of ``cells`` (name -> the code of its one cell)."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["timeout"] = timeout
    config["bibtex_bibfiles"] = ["refs.bib"]
    (tmp_path / "refs.bib").write_text("")
    config["sphinx"] = {"config": {"suppress_warnings": ["mystnb.unknown_mime_type"]}}
    config.pop("repository", None)
    config.pop("html", None)
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "intro.md").write_text("# A test book\n")
    toc = {"format": "jb-book", "root": "intro", "chapters": [{"file": n} for n in cells]}
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump(toc))
    for name, code in cells.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), nbformat.v4.new_code_cell(code)]
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    return tmp_path


def _run(book: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(book), "--jobs", "2", *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_config_fails_the_build_on_a_cell_error_and_uses_the_cache():
    execute = yaml.safe_load((ROOT / "_config.yml").read_text())["execute"]
    assert execute["execute_notebooks"] == "cache"
    assert execute["allow_errors"] is False and execute["raise_on_error"] is True


@pytest.mark.slow
def test_a_failing_cell_stops_the_build_and_nothing_of_it_is_cached(tmp_path):
    book = _book(tmp_path, {"good": "print(6 * 7)", "bad": "raise ValueError('boom in a cell')"})
    proc = _run(book, "--execute-only")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bad.ipynb: a cell failed" in proc.stderr and "boom in a cell" in proc.stderr
    assert "good.ipynb: executed in" in proc.stdout
    # the good chapter was cached, the failed one was not: a rerun executes only the bad one
    again = _run(book, "--execute-only")
    assert "good.ipynb: unchanged, from the cache" in again.stdout
    assert "bad.ipynb: a cell failed" in again.stderr and again.returncode == 1


@pytest.mark.slow
def test_a_cell_that_times_out_stops_the_build(tmp_path):
    book = _book(tmp_path, {"slow": "import time\ntime.sleep(120)"}, timeout=3)
    proc = _run(book, "--execute-only")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "slow.ipynb: a cell timed out" in proc.stderr


@pytest.mark.slow
def test_unchanged_chapters_are_not_executed_again_and_the_book_builds(tmp_path):
    book = _book(tmp_path, {"one": "print('first chapter')", "two": "print(2 ** 10)"})
    first = _run(book)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.count("executed in") == 2
    # Jupyter Book found both in the cache the script filled: it executed nothing itself
    assert first.stdout.count("Using cached notebook") == 2
    assert "Executing notebook" not in first.stdout
    page = (book / "_build" / "html" / "two.html").read_text()
    assert "1024" in page
    second = _run(book)
    assert second.returncode == 0 and "executed in" not in second.stdout
    assert second.stdout.count("unchanged, from the cache") == 2
    timings = json.loads((book / "_build" / "book-timings.json").read_text())
    assert set(timings) == {"one.ipynb", "two.ipynb"}


@pytest.mark.slow
def test_jupyter_book_alone_fails_on_a_cell_error_with_our_config(tmp_path):
    """Without the script (``jupyter-book build`` run by hand), ``raise_on_error`` makes the
    build exit non-zero instead of publishing the traceback."""
    book = _book(tmp_path, {"bad": "raise RuntimeError('never published')"})
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run(
        [str(jb), "build", str(book)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0, proc.stdout[-3000:]


@pytest.mark.slow
def test_the_longest_chapter_starts_first(tmp_path):
    """A fresh clone orders the chapters by the times `make notebooks` recorded."""
    book = _book(tmp_path, {"short": "print(1)", "long": "print(2)"})
    (book / "book").mkdir()
    (book / "book" / "execution_seconds.json").write_text('{"long.ipynb": 300, "short.ipynb": 5}')
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(book), "--jobs", "1", "--execute-only"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed = [line.split(":")[0] for line in proc.stdout.splitlines() if "executed in" in line]
    assert executed == ["[book] long.ipynb", "[book] short.ipynb"]
