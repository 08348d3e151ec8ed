"""Sweeps: the method x task table, shards, resumable results files, and the merge."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from fewclip_tutorial import cli
from fewclip_tutorial.sweep import (
    Cell,
    SweepResultsError,
    append_record,
    grid_id,
    merge_results,
    parse_method_spec,
    parse_shard,
    read_records,
    run_cells,
    run_sweep,
    shard_cells,
    summarise,
    sweep_cells,
    sweep_frame,
    task_table,
)

ROOT = Path(__file__).resolve().parents[1]


def _frame() -> pd.DataFrame:
    rows = []
    acc = {("b-task", "zs"): [50, 50], ("b-task", "lp"): [70, 74], ("a-task", "zs"): [90, 90]}
    acc[("a-task", "lp")] = [80, 82]
    for (dataset, label), values in acc.items():
        for seed, a in enumerate(values, start=1):
            rows.append(
                {
                    "label": label,
                    "dataset": dataset,
                    "shots": 16,
                    "seed": seed,
                    "test_accuracy": float(a),
                }
            )
    return pd.DataFrame(rows)


def test_task_table_means_over_seeds_and_averages_over_tasks():
    t = task_table(_frame())
    assert list(t.index) == ["b-task", "a-task", "average"]  # order of appearance, then average
    assert list(t.columns) == ["zs", "lp"]
    assert t.loc["b-task", "lp"] == pytest.approx(72.0)
    assert t.loc["average", "zs"] == pytest.approx(70.0)
    assert t.loc["average", "lp"] == pytest.approx((72.0 + 81.0) / 2)


def test_summarise_reports_mean_and_population_std_per_shot():
    out = summarise(_frame()[lambda f: f["dataset"] == "b-task"])
    assert out.loc["lp", "K=16"] == "72.0 ± 2.0" and out.loc["zs", "K=16"] == "50.0 ± 0.0"


# --------------------------------------------------------------------------- grid and shards

METHODS = {"zs": "zero-shot", "lp": ("linear-probe", {"max_iter": 100}), "tip": "tip-adapter"}


def _grid(**kw) -> list[Cell]:
    args = {"datasets": ["shapeworld", "shapeworld-everyday"], "shots": (1, 2, 4), "seeds": (1, 2)}
    return sweep_cells(METHODS, **{**args, **kw})


def test_grid_is_the_product_in_canonical_order():
    cells = _grid()
    assert len(cells) == 2 * 3 * 2 * 3
    assert [c.index for c in cells] == list(range(len(cells)))
    expected = [
        (d, k, s, label)
        for d in ["shapeworld", "shapeworld-everyday"]
        for k in (1, 2, 4)
        for s in (1, 2)
        for label in METHODS
    ]
    assert [(c.dataset, c.shots, c.seed, c.label) for c in cells] == expected
    assert len({c.key for c in cells}) == len(cells)
    assert dict(cells[1].options) == {"max_iter": 100}


def test_options_are_converted_so_cli_strings_and_python_values_give_one_key():
    from_cli = sweep_cells({"lp": ("linear-probe", {"max_iter": "100"})}, shots=(1,), seeds=(1,))
    from_py = sweep_cells({"lp": ("linear-probe", {"max_iter": 100})}, shots=(1,), seeds=(1,))
    assert from_cli[0].key == from_py[0].key
    with pytest.raises(ValueError, match="no option"):
        sweep_cells({"lp": ("linear-probe", {"iters": 3})}, shots=(1,), seeds=(1,))
    with pytest.raises(KeyError, match="Unknown method"):
        sweep_cells(["zero-shoot"], shots=(1,), seeds=(1,))
    with pytest.raises(ValueError, match="repeat"):
        sweep_cells(["zero-shot"], shots=(1, 1), seeds=(1,))


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 36, 40])
def test_shards_partition_the_cells_exactly(count: int):
    cells = _grid()
    shards = [shard_cells(cells, i, count) for i in range(count)]
    keys = [c.key for shard in shards for c in shard]
    assert Counter(keys) == Counter(c.key for c in cells)  # every cell once, none twice
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    for shard in shards:
        assert [c.index for c in shard] == sorted(c.index for c in shard)
    # Deterministic: the same shards from a list in another order, in another call.
    again = [shard_cells(list(reversed(cells)), i, count) for i in range(count)]
    assert again == shards


def test_shards_mix_methods_when_the_count_divides_the_methods():
    cells = _grid()
    for shard in (shard_cells(cells, i, 3) for i in range(3)):
        assert len({c.label for c in shard}) > 1


def test_parse_shard_and_method_specs():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 3/8 ") == (3, 8)
    for bad in ("8/8", "-1/4", "1/0", "1", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    assert parse_method_spec("zero-shot") == ("zero-shot", "zero-shot", {})
    assert parse_method_spec("lp=linear-probe") == ("lp", "linear-probe", {})
    assert parse_method_spec("cross-modal linear probe=cross-modal:iters=300,lr=0.001") == (
        "cross-modal linear probe",
        "cross-modal",
        {"iters": "300", "lr": "0.001"},
    )
    assert parse_method_spec("linear-probe:max-iter=5") == (
        "linear-probe",
        "linear-probe",
        {"max_iter": "5"},
    )
    for bad in ("=zero-shot", "lp=", "lp=linear-probe:max_iter"):
        with pytest.raises(ValueError, match="spec"):
            parse_method_spec(bad)


# --------------------------------------------------------------------------- resuming


class Killed(Exception):
    """Stands for SIGKILL in the in-process tests: the run stops between two cells."""


def _fake_result(cell: Cell) -> dict:
    # A result that depends on the cell only, like a seeded method.
    acc = 10.0 * cell.shots + cell.seed + (0.5 if cell.label == "lp" else 0.0)
    return {
        "method": cell.method,
        "dataset": cell.dataset,
        "backbone": cell.backbone,
        "shots": cell.shots,
        "seed": cell.seed,
        "val_accuracy": acc - 1,
        "test_accuracy": acc,
        "ood_accuracy": {"sketch": acc / 2},
        "history": [1, 2, 3],
    }


class CountingRunner:
    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_after = fail_after

    def __call__(self, cell: Cell) -> dict:
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise Killed
        self.calls.append(cell.key)
        return _fake_result(cell)


def test_killed_sweep_restarts_without_redoing_finished_cells(tmp_path: Path):
    cells = _grid()
    results = tmp_path / "r.jsonl"
    first = CountingRunner(fail_after=7)
    with pytest.raises(Killed):
        run_cells(cells, results=results, runner=first)
    assert len(first.calls) == 7 and len(read_records(results)) == 7

    second = CountingRunner()
    rows, _ = run_cells(cells, results=results, runner=second)
    assert len(second.calls) == len(cells) - 7
    assert not set(first.calls) & set(second.calls)  # no finished cell ran again
    assert sorted(first.calls + second.calls) == sorted(c.key for c in cells)
    assert [r["test_accuracy"] for r in rows] == [_fake_result(c)["test_accuracy"] for c in cells]

    third = CountingRunner()
    run_cells(cells, results=results, runner=third)
    assert third.calls == []  # a finished sweep reruns nothing
    assert len(read_records(results)) == len(cells)


def test_a_partial_last_line_from_a_kill_is_dropped_and_its_cell_redone(tmp_path: Path):
    cells = _grid(datasets=["shapeworld"], shots=(1,), seeds=(1,))
    results = tmp_path / "r.jsonl"
    run_cells(cells[:2], grid=cells, results=results, runner=CountingRunner())
    whole = results.read_bytes()
    line = json.dumps({"cell": cells[2].key, "grid": "x", "row": {}}).encode()
    results.write_bytes(whole + line[: len(line) // 2])  # killed in the middle of a write
    assert [r["cell"] for r in read_records(results)] == [c.key for c in cells[:2]]

    runner = CountingRunner()
    run_cells(cells, results=results, runner=runner)
    assert runner.calls == [cells[2].key]
    text = results.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3
    assert [json.loads(x)["cell"] for x in text.splitlines()] == [c.key for c in cells]


def test_a_corrupt_complete_line_is_an_error_naming_the_line(tmp_path: Path):
    results = tmp_path / "r.jsonl"
    results.write_text('{"cell": "a", "row": {}}\nnot json\n')
    with pytest.raises(SweepResultsError, match=r"r.jsonl:2 is not a JSON line"):
        read_records(results)


def _zero_shot_cells() -> list[Cell]:
    # Built directly (not with sweep_cells) so the child process need not import the methods.
    pairs = [(k, s) for k in (1, 2, 4) for s in (1, 2)]
    return [Cell(i, "shapeworld", k, s, "zero-shot", "zero-shot") for i, (k, s) in enumerate(pairs)]


_KILLED_CHILD = textwrap.dedent(
    """
    import sys, time
    from fewclip_tutorial.sweep import Cell, run_cells

    pairs = [(k, s) for k in (1, 2, 4) for s in (1, 2)]
    cells = [Cell(i, "shapeworld", k, s, "zero-shot", "zero-shot")
             for i, (k, s) in enumerate(pairs)]

    def runner(cell):
        if cell.index > 0:
            time.sleep(60)  # the parent kills us here, after the first line landed
        return {"method": cell.method, "dataset": cell.dataset, "shots": cell.shots,
                "seed": cell.seed, "val_accuracy": 1.0, "test_accuracy": 2.0}

    run_cells(cells, results=sys.argv[1], runner=runner)
    """
)


@pytest.mark.slow  # a child process imports torch: 5 s idle, 15+ s on a loaded machine
def test_sigkill_after_the_first_cell_then_restart(tmp_path: Path):
    results = tmp_path / "r.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(results)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and results.read_bytes().count(b"\n") >= 1):
            assert child.poll() is None, "the child sweep exited before its first cell landed"
            assert time.monotonic() < deadline, "no cell landed within 120 s"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    cells = _zero_shot_cells()
    assert [r["cell"] for r in read_records(results)] == [cells[0].key]
    runner = CountingRunner()
    run_cells(cells, results=results, runner=runner)
    assert runner.calls == [c.key for c in cells[1:]]


# --------------------------------------------------------------------------- merging


def test_merge_of_shards_equals_the_unsharded_frame_with_a_fake_runner(tmp_path: Path):
    grid = _grid()
    whole, _ = run_cells(grid, runner=CountingRunner())
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"r.{i}.jsonl")
        run_cells(shard_cells(grid, i, 4), grid=grid, results=paths[-1], runner=CountingRunner())
    merged = merge_results(paths)
    expected = sweep_frame(whole)
    pd.testing.assert_frame_equal(merged, expected)
    pd.testing.assert_frame_equal(task_table(merged), task_table(expected))
    assert list(task_table(merged).index) == ["shapeworld", "shapeworld-everyday", "average"]


def test_merge_refuses_an_incomplete_grid_unless_partial(tmp_path: Path):
    grid = _grid()
    paths = [tmp_path / f"r.{i}.jsonl" for i in range(3)]
    for i in range(2):  # the third shard never ran
        run_cells(shard_cells(grid, i, 3), grid=grid, results=paths[i], runner=CountingRunner())
    with pytest.raises(SweepResultsError, match=r"incomplete: 24 of 36 cells"):
        merge_results(paths[:2])
    assert len(merge_results(paths[:2], partial=True)) == 24


def test_adding_a_method_reruns_only_the_new_cells_and_merge_names_the_grids(tmp_path: Path):
    results = tmp_path / "r.jsonl"
    old = sweep_cells(["zero-shot"], shots=(1, 2), seeds=(1,))
    run_cells(old, results=results, runner=CountingRunner())
    new = sweep_cells(["zero-shot", "linear-probe"], shots=(1, 2), seeds=(1,))
    runner = CountingRunner()
    run_cells(new, results=results, runner=runner)
    assert runner.calls == [c.key for c in new if c.method == "linear-probe"]
    with pytest.raises(SweepResultsError, match="2 different grids"):
        merge_results([results])
    merged = merge_results([results], grid=grid_id(new))
    assert list(merged["label"]) == [c.label for c in new]


@pytest.mark.slow  # about 15 s on 2 cores: ShapeWorld episodes, 8 real cells run twice
def test_merge_equals_an_unsharded_run_of_real_methods(tmp_path: Path):
    methods = {"zero-shot": "zero-shot", "linear probe": ("linear-probe", {"max_iter": 100})}
    grid = {"methods": methods, "shots": (1, 2), "seeds": (1, 2), "progress": False}
    unsharded = run_sweep(**grid)
    paths = [tmp_path / f"r.{i}.jsonl" for i in range(3)]
    for i, path in enumerate(paths):
        run_sweep(**grid, shard=f"{i}/3", results=path)
    merged = merge_results(paths)
    pd.testing.assert_frame_equal(merged, unsharded)
    pd.testing.assert_frame_equal(task_table(merged), task_table(unsharded))

    # The command line: a resumed shard runs nothing; --merge writes the same table as CSV.
    args = ["--method", "zero-shot", "--method", "linear probe=linear-probe:max-iter=100"]
    args += ["--shots", "1", "2", "--seeds", "1", "2", "--no-progress"]
    for i, path in enumerate(paths):
        assert cli.main(["sweep", *args, "--shard", f"{i}/3", "--results", str(path)]) == 0
    assert sum(len(read_records(p)) for p in paths) == 8
    out = tmp_path / "table.csv"
    assert cli.main(["sweep", "--merge", *map(str, paths), "--out", str(out)]) == 0
    table = pd.read_csv(out, index_col=0)
    pd.testing.assert_frame_equal(table, task_table(unsharded), check_names=False)


def test_cli_sweep_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert cli.main(["sweep", "--shots", "1"]) == 2
    assert "at least one --method" in capsys.readouterr().err
    assert cli.main(["sweep", "--method", "zero-shot", "--shard", "4/4"]) == 2
    assert "numbered 0 to N-1" in capsys.readouterr().err
    assert cli.main(["sweep", "--method", "zero-shot"]) == 2
    assert "needs --results" in capsys.readouterr().err
    assert cli.main(["sweep", "--merge", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shard_error_uses_a_fixed_n_as_the_readme_does(capsys: pytest.CaptureFixture):
    """The Slurm example sizes N as the README's sbatch script does: fixed, = the --array size."""
    with pytest.raises(ValueError) as info:
        parse_shard("4/4")
    msg = str(info.value)
    assert "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" not in msg
    example = re.search(r"--array=0-(\d+): --shard \$SLURM_ARRAY_TASK_ID/(\d+)", msg)
    assert example, msg
    assert int(example.group(2)) == int(example.group(1)) + 1  # N = the size of --array
    readme = (ROOT / "README.md").read_text()
    assert '--shard "$SLURM_ARRAY_TASK_ID/$N"' in readme and "N=32" in readme


def test_merge_writes_rounded_csv(tmp_path: Path, capsys: pytest.CaptureFixture):
    """`sweep --merge --rows/--out` write 71.4, not 71.39999999999999."""

    def runner(cell: Cell) -> dict:
        return {
            "method": cell.method,
            "dataset": cell.dataset,
            "shots": cell.shots,
            "seed": cell.seed,
            "val_accuracy": 100 * 0.714,  # 71.39999999999999
            "test_accuracy": 100 * 2 / 3,  # 66.66666666666667
            "ood_accuracy": {"sketch": 100 * 0.714},
            "alpha": 0.1 + 0.2,  # 0.30000000000000004
            "C": 1e-5,
        }

    assert 100 * 0.714 == 71.39999999999999  # the float noise the CSV must not show
    results = tmp_path / "r.jsonl"
    run_cells(sweep_cells(["zero-shot"], shots=(1,), seeds=(1, 2)), results=results, runner=runner)
    rows, out = tmp_path / "rows.csv", tmp_path / "table.csv"
    argv = ["sweep", "--merge", str(results), "--rows", str(rows), "--out", str(out)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    text = rows.read_text()
    assert "71.39999" not in text and "66.6666" not in text and "0.30000000000000004" not in text
    frame = pd.read_csv(rows)
    assert list(frame["val_accuracy"]) == [71.4, 71.4]
    assert list(frame["test_accuracy"]) == [66.67, 66.67]  # 2 decimals
    assert list(frame["ood:sketch"]) == [71.4, 71.4] and list(frame["ood_mean"]) == [71.4, 71.4]
    assert list(frame["alpha"]) == [0.3, 0.3] and list(frame["C"]) == [1e-5, 1e-5]
    assert list(frame["shots"]) == [1, 1]  # integers stay integers
    assert out.read_text().splitlines() == [",zero-shot", "shapeworld,66.7", "average,66.7"]


def test_append_record_writes_whole_lines(tmp_path: Path):
    path = tmp_path / "sub" / "r.jsonl"
    append_record(path, {"cell": "a", "row": {"x": float("nan")}})
    append_record(path, {"cell": "b", "row": {"x": 1.5}})
    lines = path.read_text().splitlines()
    assert [json.loads(x)["cell"] for x in lines] == ["a", "b"]


# --------------------------------------------------------------------------- the shared cache


def test_the_cache_serves_a_cell_under_another_label_and_never_raw_results(tmp_path: Path):
    cache = tmp_path / "cache.jsonl"
    first = sweep_cells({"zero-shot": "zero-shot"}, shots=(1, 2), seeds=(1,))
    other = sweep_cells({"CLIP": "zero-shot"}, shots=(1, 2), seeds=(1,))
    runner = CountingRunner()
    rows_first, _ = run_cells(first, runner=runner, cache=cache)
    assert len(runner.calls) == 2 and len(read_records(cache)) == 2
    runner = CountingRunner()
    rows_other, _ = run_cells(other, runner=runner, cache=cache)
    assert runner.calls == []  # the same runs under another label
    assert [{**r, "label": "zero-shot"} for r in rows_other] == rows_first
    assert {r["label"] for r in rows_other} == {"CLIP"}
    # other options are another run
    runner = CountingRunner()
    changed = sweep_cells({"zero-shot": ("zero-shot", {"by_prompt": True})}, shots=(1,), seeds=(1,))
    run_cells(changed, runner=runner, cache=cache)
    assert len(runner.calls) == 1
    # raw results are never cached: keep_results runs every cell, and adds its rows
    runner = CountingRunner()
    _, raw = run_cells(first, runner=runner, cache=cache, keep_results=True)
    assert len(runner.calls) == 2 and len(raw) == 2
    kept = sweep_cells({"zero-shot": "zero-shot"}, shots=(4,), seeds=(1,))
    run_cells(kept, runner=CountingRunner(), cache=cache, keep_results=True)
    runner = CountingRunner()
    run_cells(kept, runner=runner, cache=cache)
    assert runner.calls == []


def test_run_sweep_reads_the_cache_named_by_the_environment_with_the_same_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from fewclip_tutorial import sweep as sweep_module

    grid = {"shots": (1,), "seeds": (1, 2), "progress": False}
    fresh = run_sweep({"linear probe": ("linear-probe", {"max_iter": 100})}, **grid)
    monkeypatch.setenv("FEWCLIP_RESULTS_CACHE", str(tmp_path))
    path = sweep_module.results_cache_path()
    assert path is not None and path.parent == tmp_path
    first = run_sweep({"linear probe": ("linear-probe", {"max_iter": 100})}, **grid)
    assert len(read_records(path)) == 2
    calls = []
    monkeypatch.setattr(
        sweep_module, "run_method", lambda *a, **k: calls.append(a) or {}, raising=True
    )
    again = run_sweep({"probe": ("linear-probe", {"max_iter": 100})}, **grid)
    assert calls == []  # served from the cache
    pd.testing.assert_frame_equal(first, fresh)
    pd.testing.assert_frame_equal(again.assign(label="linear probe"), fresh)


def test_the_cache_file_depends_on_the_thread_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import torch

    from fewclip_tutorial import sweep as sweep_module

    monkeypatch.setenv("FEWCLIP_RESULTS_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        names = []
        for n in (1, 2):
            torch.set_num_threads(n)
            monkeypatch.setattr(sweep_module, "_FINGERPRINT", [])
            names.append(sweep_module.results_cache_path())
    finally:
        torch.set_num_threads(threads)
    assert names[0] != names[1]
    monkeypatch.delenv("FEWCLIP_RESULTS_CACHE")
    assert sweep_module.results_cache_path() is None


def test_a_sweep_in_two_processes_equals_one_process(tmp_path: Path):
    methods = {"zero-shot": "zero-shot", "linear probe": ("linear-probe", {"max_iter": 100})}
    grid = {"methods": methods, "shots": (1,), "seeds": (1, 2), "progress": False}
    one = run_sweep(**grid)
    two = run_sweep(**grid, jobs=2)
    pd.testing.assert_frame_equal(two, one)
    # into the caller's results file: a second call reads every cell back
    results = tmp_path / "r.jsonl"
    pd.testing.assert_frame_equal(run_sweep(**grid, jobs=2, results=results), one)
    assert len(read_records(results)) == 4
    with pytest.raises(ValueError, match="keep_results"):
        run_sweep(**grid, jobs=2, keep_results=True)
    with pytest.raises(ValueError, match="whole number"):
        run_sweep(**grid, jobs=0)
