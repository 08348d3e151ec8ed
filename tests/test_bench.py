"""The benchmark harness (benchmarks/bench.py): its output format, not the speeds."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = [
    "tip_search_shapeworld",
    "tip_search_imagenet_sized",
    "tip_f_epoch",
    "clap_step",
    "feature_extraction",
    "grading_isolation",
]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_fewclip_bench", ROOT / "benchmarks/bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _lines(out: str) -> list[dict]:
    lines = out.splitlines()
    assert lines, "the harness printed nothing"
    return [json.loads(line) for line in lines]  # every stdout line is one JSON object


def _check_measured(record: dict, bench: ModuleType) -> None:
    missing = [k for k in bench.REQUIRED_KEYS if k not in record]
    assert not missing, f"{record['benchmark']} lacks {missing}"
    assert isinstance(record["ratio"], float) and math.isfinite(record["ratio"])
    assert record["ratio"] > 0


def _check_limit(record: dict) -> None:
    """A tip_search line: this CPU's limit, its parts, and the fraction of it reached."""
    parts = record["limit_parts"]
    assert set(parts) == {"gemm_s", "exp_s", "segment_sum_s", "combine_s"}
    assert all(v > 0 for v in parts.values()), parts
    # every float of a line is printed to 4 significant digits (bench._round: <= 5e-4
    # relative each), so the printed sum of the parts and the printed total differ by <= 1e-3
    assert record["limit_s"] == pytest.approx(sum(parts.values()), rel=1e-3)
    assert 0 < record["fraction_of_limit"] <= 1.5  # above 1 only by fusing what it times
    # fraction_of_limit is rounded to 3 decimals (<= 5e-4 absolute); limit_s and ours_s to
    # 4 significant digits (<= 5e-4 relative each, so their quotient <= 1e-3 relative)
    quotient = record["limit_s"] / record["ours_s"]
    assert abs(record["fraction_of_limit"] - quotient) <= 5e-4 + 1e-3 * quotient
    assert record["same_choice"] is True and record["same_accuracy_grid"] is True


def test_the_harness_lists_the_issue_benchmarks(bench: ModuleType):
    assert list(bench.BENCHMARKS) == EXPECTED


def test_lines_are_json_and_a_failure_is_a_line_not_a_crash(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    def good(cfg):
        print("chatter that must not reach stdout")
        assert cfg.full is True  # --full reaches the benchmarks
        return {"ratio": 3.0, "ratio_means": "a / b", "ours": "x", "baseline": "y", "s": 1 / 3}

    def bad(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench, "BENCHMARKS", {"good": good, "bad": bad})
    assert bench.main(["--device", "cpu", "--tiny", "--full"]) == 1  # a failure: status 1
    out = capsys.readouterr()
    good_line, bad_line = _lines(out.out)
    assert good_line["benchmark"] == "good" and good_line["device"] == "cpu"
    assert good_line["tiny"] is True and good_line["s"] == 0.3333  # four significant digits
    _check_measured(good_line, bench)
    # Every line names the CPU: its instruction set and torch's thread count.
    for line in (good_line, bad_line):
        assert line["cpu_capability"] == bench.torch.backends.cpu.get_cpu_capability()
        assert line["threads"] == bench.torch.get_num_threads() and line["cpu_model"]
    assert bad_line == {**bad_line, "benchmark": "bad", "error": "RuntimeError: boom"}
    assert "chatter" in out.err and "boom" in out.err


def test_tip_search_is_called_lazily_and_skipped_when_missing(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
):
    cfg = bench.Config(device=bench.torch.device("cpu"), tiny=True)
    monkeypatch.setattr(bench, "_load_tip_module", lambda: ModuleType("empty"))
    assert "no bench_tip_search" in bench.tip_search("shapeworld")(cfg)["skipped"]

    calls = []
    fake = ModuleType("fake")

    def bench_tip_search(case: str) -> dict:
        calls.append(case)
        return {"speedup": 60.0, "identical": True}

    fake.bench_tip_search = bench_tip_search
    monkeypatch.setattr(bench, "_load_tip_module", lambda: fake)
    out = bench.tip_search("shapeworld")(cfg)
    assert out["ratio"] == 60.0 and out["identical"] is True and calls == ["shapeworld"]
    # No tiny size for the ImageNet-sized case: skipped in --tiny rather than run for minutes.
    assert "no tiny size" in bench.tip_search("imagenet_sized")(cfg)["skipped"]


def test_vit_b32_flops_match_the_published_count(bench: ModuleType):
    # ViT-B/32 at 224 px: 4.4 GMAC per image (Dosovitskiy et al. 2021 report 4.4 "GFLOPs",
    # counting multiply-adds); here 2 FLOPs per multiply-add.
    assert bench.vit_flops_per_image("ViT-B-32") / 2e9 == pytest.approx(4.4, abs=0.05)
    assert bench.spec_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.spec_peak_flops("NVIDIA H200") == 989e12
    assert bench.spec_peak_flops("NVIDIA L40S") is None  # not the L4


@pytest.mark.slow  # builds ShapeWorld, shapeworld-tiny and a random ViT-B-32: ~20 s on 2 cores
def test_tiny_run_prints_one_line_per_benchmark_with_the_required_keys(
    bench: ModuleType, capsys: pytest.CaptureFixture
):
    status = bench.main(["--tiny", "--device", "cpu"])
    records = _lines(capsys.readouterr().out)
    assert [r["benchmark"] for r in records] == EXPECTED
    assert status == 0, [r for r in records if "error" in r]
    for record in records:
        assert record["device"] == "cpu" and record["tiny"] is True
        if "skipped" in record:  # grading_isolation: where bubblewrap cannot run
            assert record["benchmark"].startswith("tip_search") or (
                record["benchmark"] == "grading_isolation" and "NO OS SANDBOX" in record["skipped"]
            ), record
            continue
        _check_measured(record, bench)
    by_name = {r["benchmark"]: r for r in records}
    for name in ("tip_search_shapeworld", "tip_search_imagenet_sized"):
        _check_limit(by_name[name])
    assert by_name["clap_step"]["cache_misses_while_timed"] == 0
    assert by_name["feature_extraction"]["image_size"] == 224
