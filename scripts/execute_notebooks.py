"""Execute notebooks in place (outputs are committed and checked by nbval in CI).

Usage: python scripts/execute_notebooks.py book/02_tip_adapter.ipynb [...]
"""

from __future__ import annotations

import json
import os
import sys
import time

import nbformat
from nbclient import NotebookClient


def drop_widget_state(nb) -> None:
    """Remove the saved widget state: it is stale on the static page (tests/test_book_static.py)."""
    nb.metadata.pop("widgets", None)


def execute(path: str, timeout: int = 1800) -> float:
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault("TQDM_DISABLE", "1")
    # same thread count as `make test` (nbval): CPU training is bit-reproducible only at a
    # fixed number of threads
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    os.environ.setdefault("PYTHONHASHSEED", "0")
    # re-executing for a commit refreshes the README's figure (fewclip_tutorial.plots)
    os.environ["FEWCLIP_WRITE_README_FIGURE"] = "1"
    # chapters share finished sweep cells (keyed by the package's files and the set-up)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("FEWCLIP_RESULTS_CACHE", os.path.join(repo, "_build", "results-cache"))
    start = time.time()
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}},
    )
    client.execute()
    drop_widget_state(nb)
    nbformat.write(nb, path)
    return time.time() - start


TIMES = os.path.join(os.path.dirname(__file__), "..", "book", "execution_seconds.json")


def record_time(path: str, seconds: float) -> None:
    """Keep the chapter's time in book/execution_seconds.json: `make book` starts the
    longest chapters first (scripts/build_book.py)."""
    try:
        with open(TIMES) as fh:
            times = json.load(fh)
    except (OSError, ValueError):
        times = {}
    times[os.path.basename(path)] = round(seconds)
    with open(TIMES, "w") as fh:
        json.dump(dict(sorted(times.items())), fh, indent=1)
        fh.write("\n")


def main(paths: list[str]) -> int:
    for p in paths:
        seconds = execute(p)
        record_time(p, seconds)
        print(f"executed {p} in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
