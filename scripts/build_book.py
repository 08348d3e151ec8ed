"""`make book`: execute the chapters that changed, two at a time, then build the book.

Jupyter Book executes notebooks one after another while Sphinx reads them, prints nothing
per chapter until the end, and (in 1.x) turns a failed or timed-out cell into a warning.
This script fills Jupyter Book's own execution cache (jupyter-cache, the one
``execute_notebooks: cache`` reads, in ``_build/.jupyter_cache``) first:

* a chapter whose code cells are unchanged since its last successful run is a cache hit
  and is not executed again (a second ``make book`` takes seconds);
* the others run in ``--jobs`` parallel kernels (default 2, one per core), longest first
  (by their last recorded time), each single-threaded like ``make test``, with the cell
  timeout of ``_config.yml``; a line per chapter says its name, its time and the time so far;
* a cell that raises or times out stops the build with a non-zero exit and the cell's
  error: nothing is cached for that chapter, so no traceback or stale output can reach a
  page. (``_config.yml`` also sets ``raise_on_error``, so ``jupyter-book build`` alone fails
  the same way.)

Then ``jupyter-book build`` runs with every chapter a cache hit.

Usage: python scripts/build_book.py [--root .] [--jobs 2] [--execute-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import nbformat
import yaml

#: the thread setting of `make test` (scripts/test.sh): CPU training is bit-reproducible
#: only at a fixed thread count, and two kernels share two cores
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


#: seconds per chapter when `make notebooks` last executed it (one thread): the order in
#: which a fresh clone's `make book` starts the chapters, longest first
EXECUTION_TIMES = Path("book") / "execution_seconds.json"


class ChapterFailed(RuntimeError):
    """A chapter's cell raised or timed out."""


def chapters(root: Path) -> list[Path]:
    """The notebooks of ``_toc.yml`` (root, parts, chapters, sections), in book order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(str(node["file"]))
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    files.append(str(toc["root"]))
    walk(toc)
    out = []
    for f in files:
        path = root / f if f.endswith(".ipynb") else root / f"{f}.ipynb"
        if path.is_file() and path not in out:
            out.append(path)
    return out


def execution_settings(root: Path) -> dict:
    """``execute:`` of ``_config.yml`` (timeout per cell, allow_errors)."""
    config = yaml.safe_load((root / "_config.yml").read_text()) or {}
    execute = config.get("execute", {}) or {}
    return {
        "timeout": int(execute.get("timeout", 30)),
        "allow_errors": bool(execute.get("allow_errors", False)),
    }


def _fmt(seconds: float) -> str:
    return (
        f"{seconds:.0f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
    )


def _cell_error(exc_string: str | None, err: BaseException) -> str:
    text = (exc_string or repr(err)).strip().splitlines()
    return "\n".join(text[-25:])


def execute_chapters(root: Path, jobs: int, log=print) -> dict[str, float]:
    """Execute every chapter that is not in the cache; return ``{chapter: seconds}``.

    Raises :class:`ChapterFailed` (after the running chapters stop) when a cell fails.
    """
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from jupyter_cache.executors.utils import single_nb_execution

    settings = execution_settings(root)
    cache = get_cache(str(root / "_build" / ".jupyter_cache"))
    timings_path = root / "_build" / "book-timings.json"
    last: dict[str, float] = {}
    # this machine's last times, else the ones `make notebooks` recorded (book/EXECUTION_TIMES)
    for source in (root / EXECUTION_TIMES, timings_path):
        try:
            last.update(json.loads(source.read_text()))
        except (OSError, ValueError):
            pass
    todo = []
    for path in chapters(root):
        nb = nbformat.read(path, as_version=4)
        try:
            cache.match_cache_notebook(nb)
            log(f"[book] {path.name}: unchanged, from the cache")
        except KeyError:
            todo.append((path, nb))
    if not todo:
        return {}
    # longest first (by the last recorded time) keeps both cores busy to the end
    todo.sort(key=lambda item: (-last.get(item[0].name, 0.0), -item[0].stat().st_size))
    os.environ.update(THREAD_ENV)
    os.environ.setdefault("TQDM_DISABLE", "1")
    # chapters share finished sweep cells (fewclip_tutorial.sweep.results_cache_path)
    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("FEWCLIP_RESULTS_CACHE", str(root / "_build" / "results-cache"))
    start = time.time()
    times: dict[str, float] = {}

    def run(path: Path, nb: nbformat.NotebookNode):  # in a worker thread: execution only
        return (
            path,
            nb,
            single_nb_execution(
                nb,
                cwd=str(path.parent.resolve()),
                timeout=settings["timeout"],
                allow_errors=settings["allow_errors"],
            ),
        )

    log(f"[book] executing {len(todo)} chapter(s), {jobs} at a time, one thread each")
    failure: ChapterFailed | None = None
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run, path, nb) for path, nb in todo]
        for future in as_completed(futures):  # the cache (SQLite) is written from here only
            if future.cancelled():
                continue
            path, nb, result = future.result()
            if result.err is not None:
                kind = "timed out" if "Timeout" in type(result.err).__name__ else "failed"
                failure = failure or ChapterFailed(
                    f"[book] {path.name}: a cell {kind} after {_fmt(result.time)} "
                    f"(timeout {settings['timeout']} s per cell); nothing of this chapter is "
                    f"published. The error:\n{_cell_error(result.exc_string, result.err)}"
                )
                log(f"[book] {path.name}: FAILED after {_fmt(result.time)}")
                for other in futures:  # chapters not yet started are not started
                    other.cancel()
                continue
            nb.metadata.pop("widgets", None)
            cache.cache_notebook_bundle(
                CacheBundleIn(nb, str(path.resolve()), data={"execution_seconds": result.time}),
                check_validity=False,
                overwrite=True,
            )
            times[path.name] = result.time
            log(
                f"[book] {path.name}: executed in {_fmt(result.time)} "
                f"({_fmt(time.time() - start)} so far, {len(times)}/{len(todo)} chapters)"
            )
    timings_path.parent.mkdir(parents=True, exist_ok=True)
    timings_path.write_text(json.dumps({**last, **times}, indent=1, sort_keys=True))
    if failure is not None:
        raise failure
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the book's root (with _config.yml)")
    parser.add_argument("--jobs", type=int, default=2, help="chapters executed at once")
    parser.add_argument(
        "--execute-only", action="store_true", help="fill the cache, do not build the HTML"
    )
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    t0 = time.time()
    try:
        execute_chapters(root, args.jobs, log=lambda s: print(s, flush=True))
    except ChapterFailed as exc:
        print(exc, file=sys.stderr, flush=True)
        print("[book] build stopped: fix the chapter, then run `make book` again", file=sys.stderr)
        return 1
    if args.execute_only:
        return 0
    print(f"[book] building the HTML ({_fmt(time.time() - t0)} so far)", flush=True)
    jb = Path(sys.executable).with_name("jupyter-book")
    build = subprocess.run(
        [str(jb) if jb.exists() else "jupyter-book", "build", str(root), "--all"],
        env={**os.environ, **THREAD_ENV},
    )
    if build.returncode != 0:
        print("[book] jupyter-book build failed (above)", file=sys.stderr)
        return build.returncode
    print(f"[book] done in {_fmt(time.time() - t0)}: {root / '_build' / 'html' / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
