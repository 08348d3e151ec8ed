"""Run methods over datasets, shots and seeds and collect the results in a table.

Every chapter's "accuracy against shots" figure comes from :func:`run_sweep`: one
:class:`~fewclip_tutorial.episode.Context` per ``(dataset, shots, seed)`` episode,
shared by all methods so they see the same few-shot images and the same cached features.

A sweep is a grid of *cells*, one method on one episode (:class:`Cell`).  The same grid
runs as a job array (``fewclip sweep --shard I/N``): :func:`shard_cells` splits the cells
into ``N`` disjoint shards, :func:`run_cells` appends one JSON line per finished cell to a
results file and skips the cells already in it (so a killed job resumes where it
stopped), and :func:`merge_results` rebuilds, from the results files of every shard, the
same frame an unsharded :func:`run_sweep` returns.

Within one build of the book the chapters share finished cells: with
``FEWCLIP_RESULTS_CACHE`` set to a folder (``make test`` and ``make notebooks`` set it
under ``_build/``), :func:`run_sweep` reads a cell that another chapter already ran
instead of running it again (:func:`results_cache_path`).  The cache is keyed by
everything a result depends on: the cell without its label, the package's own files
and the machine's numeric set-up, so a changed method or another CPU never reads an
old result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewclip_tutorial.episode import build_context
from fewclip_tutorial.methods.registry import run_method

__all__ = [
    "Cell",
    "MethodTable",
    "SweepResultsError",
    "append_record",
    "flatten_result",
    "grid_id",
    "merge_results",
    "parse_method_spec",
    "parse_shard",
    "read_records",
    "results_cache_path",
    "run_cells",
    "run_sweep",
    "shard_cells",
    "summarise",
    "sweep_cells",
    "sweep_frame",
    "task_table",
    "write_csv",
]

#: ``label -> (method name, options)``; a bare method name means default options.
MethodTable = Mapping[str, str | tuple[str, Mapping[str, Any]]]

#: Decimals of the accuracies (percent) in the CSV files of :func:`write_csv`.
CSV_DECIMALS = 2
#: Other floats (hyperparameters) keep this many significant digits: enough for any value a
#: method chose, without binary noise such as ``0.30000000000000004``.
CSV_SIGNIFICANT = 10

#: The leading columns of a sweep frame, in this order.
FIRST_COLUMNS = ["label", "method", "dataset", "shots", "seed", "val_accuracy", "test_accuracy"]


class SweepResultsError(ValueError):
    """A results file that cannot be used as it is (corrupt, mixed or incomplete grids)."""


def _normalise(methods: MethodTable | Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    if isinstance(methods, str):
        raise TypeError(f"methods must be a list or a dict of methods, got the string {methods!r}.")
    if not isinstance(methods, Mapping):
        methods = {m: m for m in methods}
    out = {}
    for label, spec in methods.items():
        if isinstance(spec, str):
            out[str(label)] = (spec, {})
        else:
            name, opts = spec
            out[str(label)] = (name, dict(opts))
    if not out:
        raise ValueError("A sweep needs at least one method.")
    return out


def flatten_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """One table row: nested ``ood_accuracy`` becomes ``ood:<domain>`` columns plus ``ood_mean``."""
    row = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    ood = result.get("ood_accuracy") or {}
    for d, acc in ood.items():
        row[f"ood:{d}"] = acc
    if ood:
        row["ood_mean"] = sum(ood.values()) / len(ood)
    return row


# --------------------------------------------------------------------------- cells and shards


@dataclass(frozen=True)
class Cell:
    """One method on one few-shot episode: the unit a sweep runs, records and skips.

    Attributes:
        index: position in the grid's canonical order (dataset, shots, seed, method label),
            the order of the rows of an unsharded :func:`run_sweep`.
        dataset, shots, seed: the episode.
        label: the method's column name in the tables.
        method: the registered method name.
        options: the method's options as sorted ``(name, value)`` pairs.
        backbone, pretrained, dataset_kwargs: the model and the dataset loader's arguments
            (sorted pairs), shared by the whole grid.
    """

    index: int
    dataset: str
    shots: int
    seed: int
    label: str
    method: str
    options: tuple[tuple[str, Any], ...] = ()
    backbone: str = "shapeworld-tiny"
    pretrained: str | None = "default"
    dataset_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """A canonical JSON string naming the cell: equal keys, same result."""
        return json.dumps(
            {
                "dataset": self.dataset,
                "shots": self.shots,
                "seed": self.seed,
                "label": self.label,
                "method": self.method,
                "options": dict(self.options),
                "backbone": self.backbone,
                "pretrained": self.pretrained,
                "dataset_kwargs": dict(self.dataset_kwargs),
            },
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )

    @property
    def episode(self) -> tuple:
        """What the cell's :class:`~fewclip_tutorial.episode.Context` depends on."""
        return (
            self.dataset,
            self.backbone,
            self.pretrained,
            self.dataset_kwargs,
            self.shots,
            self.seed,
        )

    def describe(self) -> str:
        return f"{self.dataset} K={self.shots} seed={self.seed} {self.label}"


def _sorted_pairs(mapping: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    pairs = tuple(sorted(dict(mapping or {}).items()))
    for name, value in pairs:
        try:
            json.dumps(value)
        except TypeError as err:
            raise ValueError(
                f"Sweep option {name!r}={value!r} is not a JSON value (a number, string, bool "
                "or list of them); results files could not record it."
            ) from err
    return pairs


def sweep_cells(
    methods: MethodTable | Sequence[str],
    *,
    datasets: str | Sequence[str] = "shapeworld",
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    backbone: str = "shapeworld-tiny",
    pretrained: str | None = "default",
    dataset_kwargs: Mapping[str, Any] | None = None,
) -> list[Cell]:
    """Every cell of the grid, in canonical order: dataset, shots, seed, then method label.

    Args:
        methods: ``{"label": "method"}``, ``{"label": ("method", {options})}`` or a list of
            method names.
        datasets: one dataset name or several (the comparison chapter's suite).
        shots, seeds: the grid.
        backbone, pretrained, dataset_kwargs: the model and the dataset loader's arguments.

    Raises:
        ValueError: an empty axis, a repeated value on an axis, or an option value that
            is not JSON.
    """
    table = _normalise(methods)
    names = [datasets] if isinstance(datasets, str) else [str(d) for d in datasets]
    axes = {"datasets": names, "shots": [int(k) for k in shots], "seeds": [int(s) for s in seeds]}
    for axis, values in axes.items():
        if not values:
            raise ValueError(f"The sweep's {axis} are empty; give at least one.")
        if len(set(values)) != len(values):
            raise ValueError(f"The sweep's {axis} repeat a value: {values}.")
    kwargs = _sorted_pairs(dataset_kwargs)
    opts = {label: _sorted_pairs(_coerce_options(n, o)) for label, (n, o) in table.items()}
    cells = []
    for dataset in names:
        for k in axes["shots"]:
            for seed in axes["seeds"]:
                for label, (name, _) in table.items():
                    cells.append(
                        Cell(
                            len(cells),
                            dataset,
                            k,
                            seed,
                            label,
                            name,
                            opts[label],
                            str(backbone),
                            pretrained,
                            kwargs,
                        )
                    )
    return cells


def _coerce_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The given options converted to their declared types (``"300"`` -> ``300``), so a
    cell's key does not depend on whether it came from the command line or from Python.

    Raises:
        UnknownMethodError, ValueError: unknown method, unknown option or invalid value.
    """
    from fewclip_tutorial.methods.registry import get_method, resolve_options

    spec = get_method(method)
    resolve_options(spec, options)  # unknown names and bad values fail here, before any run
    return {name: spec.options[name].coerce(name, value) for name, value in options.items()}


def grid_id(cells: Sequence[Cell]) -> str:
    """A short digest of the whole grid (its cell keys in order)."""
    digest = hashlib.sha256("\n".join(c.key for c in cells).encode()).hexdigest()
    return digest[:12]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, with ``0 <= I < N`` (Slurm's ``$SLURM_ARRAY_TASK_ID``).

    Raises:
        ValueError: not of the form ``I/N`` or ``I`` out of range.
    """
    parts = str(text).strip().split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"--shard expects I/N with integers, e.g. 0/8 for the first of 8 shards; got {text!r}."
        ) from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"--shard {text}: shards are numbered 0 to N-1 (N >= 1), e.g. in a Slurm array "
            "submitted with --array=0-31: --shard $SLURM_ARRAY_TASK_ID/32 (N fixed to the size "
            "of --array; not $SLURM_ARRAY_TASK_COUNT, which shrinks on a partial resubmit)."
        )
    return index, count


def shard_cells(cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """The cells of shard ``index`` of ``count``, in canonical order.

    Cells are ordered by a hash of their key and dealt round-robin, so every cell is in
    exactly one shard, shard sizes differ by at most one, and each shard gets a mix of
    cheap and expensive methods and of episodes (dealing in grid order would give one
    shard every zero-shot cell when ``count`` divides the number of methods).
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"Shard {index} of {count} does not exist; use 0 <= index < count.")
    by_hash = sorted(cells, key=lambda c: hashlib.sha256(c.key.encode()).hexdigest())
    mine = by_hash[index::count]
    return sorted(mine, key=lambda c: c.index)


def parse_method_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"LABEL=METHOD:opt=value,opt=value"`` -> ``(label, method, options)``.

    ``METHOD`` alone labels the column with the method name; ``METHOD:opt=value`` sets
    options without a label.  Option values stay strings here; the method's declared
    :class:`~fewclip_tutorial.methods.registry.Option` converts them (``resolve_options``).
    """
    text = spec.strip()
    eq, colon = text.find("="), text.find(":")
    label = None
    if eq != -1 and (colon == -1 or eq < colon):
        label, text = text[:eq].strip(), text[eq + 1 :].strip()
    method, _, rest = text.partition(":")
    method = method.strip()
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(
                f"Method spec {spec!r}: option {item!r} is not name=value; write e.g. "
                "'cross-modal linear probe=cross-modal:iters=300'."
            )
        options[name.strip().replace("-", "_")] = value.strip()
    if not method or label == "":
        raise ValueError(
            f"Method spec {spec!r} names no method; write METHOD, LABEL=METHOD or "
            "LABEL=METHOD:option=value,option=value."
        )
    return label or method, method, options


# --------------------------------------------------------------------------- results files


def _json_value(obj: Any) -> Any:
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def _lock(fd: int) -> contextlib.AbstractContextManager:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: single writer per file
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def locked():
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    return locked()


def _drop_partial_tail(fd: int) -> int:
    """Cut a last line without its newline (a writer killed mid-write); bytes dropped."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    end = size
    block = 4096
    while end > 0:
        start = max(0, end - block)
        chunk = os.pread(fd, end - start, start)
        if end == size and chunk.endswith(b"\n"):
            return 0
        cut = chunk.rfind(b"\n")
        if cut != -1:
            keep = start + cut + 1
            os.ftruncate(fd, keep)
            return size - keep
        end = start
    os.ftruncate(fd, 0)
    return size


def append_record(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path``, atomically and durably.

    The line is written with one ``write`` on a file opened with ``O_APPEND`` under an
    exclusive ``flock``, then ``fsync``-ed, so concurrent writers never interleave and a
    line is on disk before the cell counts as done.  A partial last line left by a
    killed writer is cut off first.
    """
    data = (json.dumps(dict(record), default=_json_value, allow_nan=True) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with _lock(fd):
            _drop_partial_tail(fd)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a results file (missing file: none).

    A last line without its newline (a writer killed mid-write) is ignored.

    Raises:
        SweepResultsError: a complete line that is not a JSON object.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if not raw.endswith(b"\n"):
        lines = lines[:-1]  # partial tail, or b"" for an empty file
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SweepResultsError(
                f"{path}:{number} is not a JSON line ({err.msg}); the file is corrupt. Delete "
                "that line and rerun the shard: it redoes the cells that are missing."
            ) from None
        if not isinstance(record, dict) or "cell" not in record or "row" not in record:
            raise SweepResultsError(
                f"{path}:{number} is not a sweep record (no 'cell' and 'row'); is this a "
                "results file written by `fewclip sweep`?"
            )
        records.append(record)
    return records


# --------------------------------------------------------------------------- the cache

#: The folder of the cache of finished cells shared by the chapters (unset: no cache).
RESULTS_CACHE_ENV = "FEWCLIP_RESULTS_CACHE"
_FINGERPRINT: list[str] = []


def code_fingerprint() -> str:
    """A digest of what a result depends on besides its cell: every file of the installed
    package (code and the embedded checkpoint) and the numeric set-up (torch, numpy and
    scikit-learn versions, CPU kernels, thread count)."""
    if not _FINGERPRINT:
        import numpy
        import sklearn
        import torch

        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        setup = (
            torch.__version__,
            numpy.__version__,
            sklearn.__version__,
            torch.backends.cpu.get_cpu_capability(),
            str(torch.get_num_threads()),
            str(torch.cuda.is_available()),
        )
        h.update("\0".join(setup).encode())
        _FINGERPRINT.append(h.hexdigest()[:20])
    return _FINGERPRINT[0]


def results_cache_path() -> Path | None:
    """``$FEWCLIP_RESULTS_CACHE/<fingerprint>.jsonl``, or ``None`` when the variable is unset."""
    root = os.environ.get(RESULTS_CACHE_ENV, "").strip()
    return Path(root) / f"{code_fingerprint()}.jsonl" if root else None


def _cache_key(cell: Cell) -> str:
    """The cell's key without its label: two chapters' labels for one run share it."""
    key = json.loads(cell.key)
    del key["label"]
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- running


def _default_runner(progress: bool) -> Callable[[Cell], dict[str, Any]]:
    """Run a cell with :func:`run_method`, building each episode's context once."""
    current: dict[tuple, Any] = {}

    def run(cell: Cell) -> dict[str, Any]:
        if cell.episode not in current:
            current.clear()  # cells arrive grouped by episode: keep one context alive
            current[cell.episode] = build_context(
                cell.dataset,
                cell.backbone,
                cell.shots,
                cell.seed,
                pretrained=cell.pretrained,
                progress=progress,
                **dict(cell.dataset_kwargs),
            )
        ctx = current[cell.episode]
        return run_method(cell.method, context=ctx, progress=progress, **dict(cell.options))

    return run


def _row(result: Mapping[str, Any], cell: Cell) -> dict[str, Any]:
    return {"dataset": cell.dataset, **flatten_result(result), "label": cell.label}


def run_cells(
    cells: Sequence[Cell],
    *,
    grid: Sequence[Cell] | None = None,
    results: str | os.PathLike | None = None,
    shard: str = "0/1",
    runner: Callable[[Cell], dict[str, Any]] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    keep_results: bool = False,
    cache: str | os.PathLike | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``cells`` (skipping those already in ``results``) and record each one.

    Args:
        cells: what to run, in canonical order (one shard of ``grid``).
        grid: the whole grid the cells belong to (default: ``cells``); recorded with each
            result so :func:`merge_results` can tell when a grid is complete.
        results: a JSON-lines file; each finished cell is appended as it finishes, cells
            whose key is already there are not run again.  ``None``: nothing is recorded.
        shard: recorded with each line (``"I/N"``).
        runner: ``cell -> result dict`` (default: :func:`run_method` on a context built once
            per episode).
        progress: progress bars of the default runner.
        log: called with one line per cell (e.g. ``print``); ``None``: silent.
        keep_results: also return the raw result dicts of the cells run here.
        cache: a JSON-lines file of rows shared across labels and calls (see
            :func:`results_cache_path`): a cell found there is not run; each cell run is
            added.  With ``keep_results`` every cell runs (raw results are not cached),
            and its row is still added.

    Returns:
        ``(rows, raw)``: one row per cell of ``cells`` in order (recorded ones read back
        from ``results``), and the raw results of the cells run in this call.
    """
    grid = list(cells) if grid is None else list(grid)
    gid, size = grid_id(grid), len(grid)
    runner = runner or _default_runner(progress)
    done: dict[str, dict[str, Any]] = {}
    if results is not None:
        for record in read_records(results):
            done.setdefault(record["cell"], record)
    todo = [c for c in cells if c.key not in done]
    if log is not None:
        where = f" already in {results}" if results is not None else " skipped"
        log(
            f"shard {shard}: {len(cells)} cells, {len(cells) - len(todo)}{where}, {len(todo)} to run"
        )
    rows: dict[str, dict[str, Any]] = {}
    raw: list[dict[str, Any]] = []
    for cell in cells:
        record = done.get(cell.key)
        if record is not None:
            rows[cell.key] = record["row"]
            if record.get("grid") != gid and results is not None:
                # Same cell, new grid (a method or seed was added): record it under this
                # grid too, so the grid's lines in the file are complete; nothing reruns.
                append_record(
                    results, {**record, "grid": gid, "grid_cells": size, "index": cell.index}
                )
    cached: dict[str, dict[str, Any]] = {}
    if cache is not None and not keep_results:  # raw results are never read back
        cached = {r["cell"]: r["row"] for r in read_records(cache)}
    for number, cell in enumerate(todo, start=1):
        start = time.perf_counter()
        hit = cached.get(_cache_key(cell))
        if hit is not None:
            row = {**hit, "label": cell.label}
        else:
            result = runner(cell)
            if keep_results:
                raw.append({**result, "label": cell.label})
            row = _row(result, cell)
            if cache is not None:
                append_record(cache, {"cell": _cache_key(cell), "row": row})
        seconds = time.perf_counter() - start
        rows[cell.key] = row
        if results is not None:
            append_record(
                results,
                {
                    "cell": cell.key,
                    "grid": gid,
                    "grid_cells": size,
                    "index": cell.index,
                    "shard": shard,
                    "seconds": round(seconds, 3),
                    "row": row,
                },
            )
        if log is not None:
            test = row.get("test_accuracy")
            score = f"test {test:.1f}" if isinstance(test, (int, float)) else "done"
            how = " (from the cache)" if hit is not None else ""
            log(f"[{number}/{len(todo)}] {cell.describe()}: {score} ({seconds:.1f} s){how}")
    return [rows[c.key] for c in cells], raw


def sweep_frame(rows: Iterable[Mapping[str, Any]]):
    """Rows (dicts) -> the sweep ``DataFrame``, :data:`FIRST_COLUMNS` first."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    missing = [c for c in FIRST_COLUMNS if c not in frame.columns]
    if missing:
        raise SweepResultsError(f"Sweep rows lack the columns {missing}.")
    return frame[FIRST_COLUMNS + [c for c in frame.columns if c not in FIRST_COLUMNS]]


def run_sweep(
    methods: MethodTable | Sequence[str],
    *,
    dataset: str | Sequence[str] = "shapeworld",
    backbone: str = "shapeworld-tiny",
    pretrained: str | None = "default",
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    progress: bool = False,
    dataset_kwargs: Mapping[str, Any] | None = None,
    keep_results: bool = False,
    results: str | os.PathLike | None = None,
    shard: str | tuple[int, int] | None = None,
    jobs: int = 1,
):
    """Run every method on every ``(dataset, shots, seed)`` episode.

    Args:
        methods: ``{"label": "method"}`` or ``{"label": ("method", {options})}``, or a
            list of method names.
        dataset: one dataset name, or several (rows of :func:`task_table`).
        backbone, pretrained, dataset_kwargs: the episode's model and data.
        shots, seeds: the grid.
        keep_results: also return the raw result dicts (for method-specific keys) of the
            cells run in this call.
        results: a results file (JSON lines): finished cells are appended, cells already
            there are read back instead of run (see :func:`run_cells`).
        shard: ``"I/N"`` or ``(I, N)``: run only that shard of the grid.
        jobs: run the grid as ``jobs`` shards in as many processes at once, then merge
            them (:func:`merge_results`): the same frame as one process, since every
            cell is seeded on its own.  For a CPU with several cores; each process
            keeps the thread settings of the environment (``OMP_NUM_THREADS``).

    With ``FEWCLIP_RESULTS_CACHE`` set (and without ``keep_results``), cells another
    call already ran with the same code on the same set-up are read from
    :func:`results_cache_path` instead of run.

    Returns:
        A ``pandas.DataFrame`` with one row per (label, dataset, shots, seed) of the shard
        (the whole grid by default): ``label``, ``method``, ``dataset``, ``shots``,
        ``seed``, ``val_accuracy``, ``test_accuracy``, ``ood:<domain>`` and ``ood_mean``
        columns (percent), plus scalar extras.  With ``keep_results``, a
        ``(frame, list_of_dicts)`` pair.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} must be a whole number >= 1.")
    if jobs > 1:
        if shard is not None or keep_results:
            raise ValueError(
                "jobs > 1 runs the whole grid in shards and returns no raw results: "
                "drop shard= and keep_results=, or use jobs=1."
            )
        grid_args = dict(
            methods=methods, dataset=dataset, backbone=backbone, pretrained=pretrained,
            shots=shots, seeds=seeds, dataset_kwargs=dataset_kwargs,
        )  # fmt: skip
        return _run_in_processes(grid_args, jobs, results)
    grid = sweep_cells(
        methods,
        datasets=dataset,
        shots=shots,
        seeds=seeds,
        backbone=backbone,
        pretrained=pretrained,
        dataset_kwargs=dataset_kwargs,
    )
    index, count = (0, 1) if shard is None else _shard_pair(shard)
    cells = shard_cells(grid, index, count)
    rows, raw = run_cells(
        cells,
        grid=grid,
        results=results,
        shard=f"{index}/{count}",
        progress=progress,
        keep_results=keep_results,
        cache=results_cache_path(),
    )
    frame = sweep_frame(rows)
    return (frame, raw) if keep_results else frame


def _run_shard(grid_args: dict[str, Any], shard: str, path: str) -> None:
    """One shard of :func:`run_sweep` (``jobs > 1``), in a worker process."""
    run_sweep(**grid_args, shard=shard, results=path)


def _run_in_processes(grid_args: dict[str, Any], jobs: int, results: Any) -> Any:
    """``jobs`` shards in as many spawned processes, merged into one frame."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    with tempfile.TemporaryDirectory(prefix="fewclip-sweep-") as tmp:
        # one results file per shard, or the caller's file shared by all (appends are locked)
        shard_files = [os.path.join(tmp, f"shard{i}.jsonl") for i in range(jobs)]
        out = [str(results)] * jobs if results is not None else shard_files
        spawn = multiprocessing.get_context("spawn")  # no forked torch state in workers
        with ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
            done = [pool.submit(_run_shard, grid_args, f"{i}/{jobs}", out[i]) for i in range(jobs)]
            for future in done:
                future.result()
        grid = grid_id(
            sweep_cells(
                grid_args["methods"],
                datasets=grid_args["dataset"],
                shots=grid_args["shots"],
                seeds=grid_args["seeds"],
                backbone=grid_args["backbone"],
                pretrained=grid_args["pretrained"],
                dataset_kwargs=grid_args["dataset_kwargs"],
            )
        )
        return merge_results(sorted(set(out)), grid=grid)


def _shard_pair(shard: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(shard, str):
        return parse_shard(shard)
    index, count = shard
    return parse_shard(f"{int(index)}/{int(count)}")


# --------------------------------------------------------------------------- merging


def merge_results(
    paths: Sequence[str | os.PathLike],
    *,
    grid: str | None = None,
    partial: bool = False,
    log: Callable[[str], None] | None = None,
):
    """The sweep frame of a grid, rebuilt from the results files of its shards.

    Args:
        paths: results files (one per shard, or one shared file).
        grid: which grid to merge when the files hold several (the id printed in the
            error message); default: the only one.
        partial: merge an incomplete grid (its tables then average fewer seeds or shots).
        log: called with a one-line summary.

    Returns:
        The ``pandas.DataFrame`` an unsharded :func:`run_sweep` of the grid returns, rows
        in the same order.

    Raises:
        SweepResultsError: no records, several grids and no ``grid``, or an incomplete
            grid without ``partial``.
    """
    records = []
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"Results file {path} does not exist.")
        records.extend(read_records(path))
    if not records:
        raise SweepResultsError(f"No results in {', '.join(map(str, paths))}.")
    grids: dict[str, int] = {}
    for r in records:
        grids.setdefault(r["grid"], r["grid_cells"])
    if grid is None:
        if len(grids) > 1:
            listing = ", ".join(f"{g} ({n} cells)" for g, n in grids.items())
            raise SweepResultsError(
                f"The results hold {len(grids)} different grids: {listing}. Pass --grid ID "
                "to merge one of them (each run records its grid's id with every line)."
            )
        grid = next(iter(grids))
    if grid not in grids:
        raise SweepResultsError(f"No results of grid {grid!r}; the files hold {sorted(grids)}.")
    by_index: dict[int, dict[str, Any]] = {}
    duplicates = 0
    for r in records:
        if r["grid"] != grid:
            continue
        if r["index"] in by_index:
            duplicates += 1
            continue
        by_index[r["index"]] = r
    size = grids[grid]
    if len(by_index) < size and not partial:
        missing = sorted(set(range(size)) - set(by_index))
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise SweepResultsError(
            f"Grid {grid} is incomplete: {len(by_index)} of {size} cells are in the results "
            f"(missing cell indices {shown}). Rerun the shards that did not finish (each skips "
            "its finished cells), or pass --partial to merge what is there."
        )
    if log is not None:
        log(
            f"merged grid {grid}: {len(by_index)} of {size} cells from {len(paths)} file(s)"
            + (f", {duplicates} duplicate line(s) ignored" if duplicates else "")
        )
    return sweep_frame(by_index[i]["row"] for i in sorted(by_index))


# --------------------------------------------------------------------------- tables


def summarise(frame, metric: str = "test_accuracy", ndigits: int = 1):
    """Mean and standard deviation over seeds: rows ``label``, columns ``shots``."""
    g = frame.groupby(["label", "shots"], sort=False)[metric]
    mean = g.mean().unstack("shots")
    std = g.std(ddof=0).unstack("shots")
    out = mean.round(ndigits).astype(str) + " ± " + std.round(ndigits).astype(str)
    out.columns = [f"K={k}" for k in out.columns]
    return out


def task_table(frame, metric: str = "test_accuracy", ndigits: int = 1):
    """Method x task table: rows are datasets plus an ``"average"`` row, columns are labels.

    Each cell is the mean of ``metric`` over the seeds (and shots) in ``frame``; the average
    row is the plain mean over the datasets, as CoOp's and Tip-Adapter's tables report.
    ``frame`` is one or more :func:`run_sweep` frames concatenated.
    """
    import pandas as pd

    labels = list(dict.fromkeys(frame["label"]))
    datasets = list(dict.fromkeys(frame["dataset"]))
    table = frame.groupby(["dataset", "label"], sort=False)[metric].mean().unstack("label")
    table = table.loc[datasets, labels]
    table.loc["average"] = table.mean(axis=0)
    table.columns.name = None
    table.index.name = None
    return pd.DataFrame(table).round(ndigits)


def _is_accuracy_column(name: Any) -> bool:
    name = str(name)
    return "accuracy" in name or name == "ood_mean" or name.startswith("ood:")


def write_csv(table, path: str | os.PathLike, *, index: bool = True) -> None:
    """Write a sweep frame or table as CSV, accuracies rounded to :data:`CSV_DECIMALS`.

    Accuracy columns (``val_accuracy``, ``test_accuracy``, ``ood:<domain>``, ``ood_mean``) are
    rounded to :data:`CSV_DECIMALS` decimals, so that ``71.39999999999999`` is written
    ``71.4``; other floats keep :data:`CSV_SIGNIFICANT` significant digits.  The tables of
    :func:`task_table` (already rounded) are written as they print.
    """
    out = table.copy()
    for column in out.columns:
        if out[column].dtype.kind != "f":
            continue
        if _is_accuracy_column(column):
            out[column] = out[column].round(CSV_DECIMALS)
        else:
            out[column] = out[column].map(lambda v: float(f"{v:.{CSV_SIGNIFICANT}g}"))
    out.to_csv(path, index=index)
