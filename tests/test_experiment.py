"""Tests of fewclip_tutorial.episode, methods/registry.py, methods/baselines.py and methods/__init__.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from fixtures_data import TINY_CLIP_CONFIG
from PIL import Image

import fewclip_tutorial.methods as methods_pkg
from fewclip_tutorial import episode as exp
from fewclip_tutorial.backbones import Backbone, load_backbone
from fewclip_tutorial.data.base import DatasetSpec, ListSplit
from fewclip_tutorial.episode import Context, build_context
from fewclip_tutorial.linear_probe import DEFAULT_CS
from fewclip_tutorial.methods.registry import (
    METHODS,
    Option,
    UnknownMethodError,
    register_method,
    run_method,
)
from fewclip_tutorial.metrics import accuracy
from fewclip_tutorial.zeroshot import text_classifier, zero_shot_logits

TINY = "fewclip-test-tiny"
TINY_CONFIG = TINY_CLIP_CONFIG
CLASSNAMES = ["circle", "square", "star"]
TEMPLATES = ["a photo of a {}.", "a {}."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    path = tmp_path_factory.mktemp("cfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return load_backbone(TINY, pretrained=None, device="cpu", seed=0)


def _split(n_per_class: int, seed: int, name: str) -> ListSplit:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(len(CLASSNAMES)):
        for _ in range(n_per_class):
            base = np.zeros((16, 16, 3), dtype=np.uint8)
            base[..., c] = 200  # the class is the dominant colour channel
            noise = rng.integers(0, 40, size=(16, 16, 3), dtype=np.uint8)
            images.append(Image.fromarray(base + noise))
            labels.append(c)
    return ListSplit(images, labels, name=name)


@pytest.fixture(scope="module")
def spec() -> DatasetSpec:
    return DatasetSpec(
        name="toy",
        classnames=CLASSNAMES,
        templates=TEMPLATES,
        train=_split(4, 0, "toy-train"),
        val=None,
        test=_split(3, 1, "toy-test"),
        ood_test={"sketch": _split(2, 2, "toy-sketch")},
    )


@pytest.fixture(scope="module")
def ctx(tiny: Backbone, spec: DatasetSpec) -> Context:
    return build_context(spec, tiny, shots=2, seed=1, cache_dir=None, progress=False)


@pytest.fixture
def scratch_methods() -> Iterator[list[str]]:
    added: list[str] = []
    yield added
    for name in added:
        METHODS.pop(name, None)


def test_context_contents(ctx: Context, tiny: Backbone) -> None:
    assert ctx.shots == 2 and ctx.seed == 1
    assert len(ctx.splits.train) == 6 and len(ctx.splits.val) == 6
    assert not set(ctx.splits.train.indices) & set(ctx.splits.val.indices)
    assert ctx.ood_domains == ["sketch"]
    # build_context calls text_classifier on the same backbone: the same operations, exactly
    assert torch.equal(ctx.text_classifier, text_classifier(tiny, CLASSNAMES, TEMPLATES))
    train = ctx.features("train")
    assert train.features.shape == (6, 16)
    assert train.labels.tolist() == ctx.splits.train.labels.tolist()
    assert ctx.features("train") is train  # memoised in-process
    assert ctx.features("ood:sketch").features.shape == (6, 16)
    with pytest.raises(KeyError, match="no OOD domain 'photo'"):
        ctx.split("ood:photo")
    with pytest.raises(KeyError, match="ood:sketch"):
        ctx.split("validation")


def test_report_with_handmade_features(ctx: Context) -> None:
    # Features whose first C coordinates are one-hot labels; predict reads them off.
    def onehot(labels: list[int], wrong: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor(labels)
        pred = y.clone()
        pred[:wrong] = (pred[:wrong] + 1) % 3
        f = torch.zeros(len(labels), 16)
        f[torch.arange(len(labels)), pred] = 1.0
        return f, y

    given = {
        "val": onehot([0, 1, 2, 0], wrong=0),
        "test": onehot([0, 1, 2, 0], wrong=1),
        "ood:sketch": onehot([0, 1, 2, 0, 1], wrong=2),
    }
    out = ctx.report(lambda f: f[:, :3], features_by_split=given)
    assert out == {"val_accuracy": 100.0, "test_accuracy": 75.0, "ood_accuracy": {"sketch": 60.0}}
    with pytest.raises(KeyError, match="unknown splits"):
        ctx.report(lambda f: f[:, :3], features_by_split={"train": given["val"]})
    with pytest.raises(ValueError, match=r"\(4, 3\) logits"):
        ctx.report(lambda f: f[:, :2], features_by_split=given)


def test_zero_shot_method_matches_a_hand_computation(ctx: Context) -> None:
    result = run_method("zero-shot", context=ctx)
    assert list(result)[:5] == ["method", "dataset", "backbone", "shots", "seed"]
    assert result["method"] == "zero-shot" and result["dataset"] == "toy"
    assert result["backbone"] == TINY and result["shots"] == 2 and result["seed"] == 1
    test = ctx.features("test")
    # the method runs these operations (one chunk of the 9 test images, the same logits, the
    # same argmax and the same float64 mean): the accuracies are equal, not close
    expected = accuracy(zero_shot_logits(test.features, ctx.text_classifier), test.labels)
    assert result["test_accuracy"] == expected
    sketch = ctx.features("ood:sketch")
    assert result["ood_accuracy"]["sketch"] == accuracy(
        zero_shot_logits(sketch.features, ctx.text_classifier), sketch.labels
    )
    assert list(result["per_class_accuracy"]) == CLASSNAMES
    # 3 test images per class: the mean of the per-class accuracies is the accuracy, up to
    # float64 rounding, u = 2^-53: k/3 and x100 per class (<= 200 u each, 600 u), the two
    # sums (<= 300 u each), so <= 400 u after /3, plus that division (100 u); the accuracy's
    # k/9 and x100 (<= 200 u): 700 u
    mean_per_class = np.mean(list(result["per_class_accuracy"].values()))
    assert mean_per_class == pytest.approx(expected, abs=700 * 2.0**-53, rel=0)
    assert result["templates"] == 2 and "zero_shot_by_prompt" not in result

    by_prompt = run_method("zero-shot", context=ctx, by_prompt="true")
    assert set(by_prompt["zero_shot_by_prompt"]) == set(TEMPLATES)


def test_linear_probe_method(ctx: Context) -> None:
    # the package's earlier probe, now protocol "normalized"
    result = run_method("linear-probe", context=ctx, max_iter=200, protocol="normalized")
    assert result["C"] in DEFAULT_CS.tolist()  # an entry of the grid itself, not a rounding
    assert len(result["C_search"]) == len(DEFAULT_CS)
    assert result["val_accuracy"] == max(acc for _, acc in result["C_search"])
    assert 0.0 <= result["test_accuracy"] <= 100.0 and "sketch" in result["ood_accuracy"]


def test_linear_probe_normalized_protocol_is_the_earlier_probe(ctx: Context) -> None:
    """``protocol="normalized"``: the cached unit features, the 13-value grid, ties to the
    smaller C, exactly as the probe ran before the lpclip protocol became the default."""
    from fewclip_tutorial.linear_probe import fit_linear_probe

    result = run_method("linear-probe", context=ctx, protocol="normalized")
    train, val = ctx.features("train"), ctx.features("val")
    probe = fit_linear_probe(train.features, train.labels, val.features, val.labels,
                             Cs=DEFAULT_CS, seed=ctx.seed, num_classes=ctx.num_classes)  # fmt: skip
    assert result["C"] == probe.C
    assert result["C_search"] == [[c, acc] for c, acc in probe.search]
    want = ctx.report(probe.logits)
    assert (result["test_accuracy"], result["ood_accuracy"]) == (
        want["test_accuracy"],
        want["ood_accuracy"],
    )
    assert result["config"] == {"protocol": "normalized", "max_iter": 1000, "steps": 8}


def test_linear_probe_lpclip_protocol_uses_raw_features(ctx: Context) -> None:
    import torch.nn.functional as F

    from fewclip_tutorial.linear_probe import LPCLIP_CS, fit_linear_probe_lpclip

    raw, unit = ctx.features("train", raw=True), ctx.features("train")
    norms = raw.features.norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)  # not unit vectors
    # the same forward pass, normalised afterwards: float32 rounding of a unit vector's
    # entries (<= 2^-24 each) plus that of the division and norm (a few 2^-24 more)
    torch.testing.assert_close(F.normalize(raw.features, dim=-1), unit.features,
                               atol=8 * 2.0**-24, rtol=0)  # fmt: skip
    assert torch.equal(raw.labels, unit.labels)
    result = run_method("linear-probe", context=ctx)  # the default: CoOp's lpclip
    assert result["protocol"] == "lpclip"
    assert result["config"] == {"protocol": "lpclip", "max_iter": 1000, "steps": 8}
    val = ctx.features("val", raw=True)
    probe = fit_linear_probe_lpclip(raw.features, raw.labels, val.features, val.labels,
                                    seed=ctx.seed, num_classes=ctx.num_classes)  # fmt: skip
    assert result["C"] == probe.C and [c for c, _ in result["C_search"][:7]] == list(LPCLIP_CS)
    assert len(result["C_search"]) == 7 + 2 * 8
    names = ["val", "test"] + [f"ood:{d}" for d in ctx.ood_domains]
    want = ctx.report(probe.logits, {n: ctx.features(n, raw=True) for n in names})
    assert (result["val_accuracy"], result["test_accuracy"], result["ood_accuracy"]) == (
        want["val_accuracy"],
        want["test_accuracy"],
        want["ood_accuracy"],
    )


def test_register_and_run_a_method_with_options(ctx: Context, scratch_methods: list[str]) -> None:
    seen: dict = {}

    @register_method(
        "_test-method",
        options={
            "k": Option(int, 3, "an int"),
            "mode": Option(str, "a", "a choice", choices=["a", "b"]),
            "flag": Option(bool, False, "a flag"),
        },
        help="test only",
    )
    def _method(c: Context, k: int, mode: str, flag: bool) -> dict:
        seen.update(k=k, mode=mode, flag=flag, rand=torch.rand(1).item())
        return {"val_accuracy": 1.0, "test_accuracy": 2.0, "k": k}

    scratch_methods.append("_test-method")
    out = run_method("_test-method", context=ctx, k="5", flag="yes")
    assert seen["k"] == 5 and seen["mode"] == "a" and seen["flag"] is True
    assert out["k"] == 5 and out["test_accuracy"] == 2.0
    first = seen["rand"]
    run_method("_test-method", context=ctx)
    assert seen["rand"] == first  # seeded with the episode seed before every run
    with pytest.raises(ValueError, match="its options are: flag, k, mode"):
        run_method("_test-method", context=ctx, kk=1)
    with pytest.raises(ValueError, match=r"one of \['a', 'b'\]"):
        run_method("_test-method", context=ctx, mode="c")
    with pytest.raises(ValueError, match="expects int"):
        run_method("_test-method", context=ctx, k="many")
    with pytest.raises(ValueError, match="already registered"):
        register_method("_test-method")(lambda c: {})


def test_methods_must_return_accuracies(ctx: Context, scratch_methods: list[str]) -> None:
    @register_method("_test-bad")
    def _bad(c: Context) -> dict:
        return {"val_accuracy": 1.0}

    scratch_methods.append("_test-bad")
    with pytest.raises(ValueError, match="test_accuracy"):
        run_method("_test-bad", context=ctx)


def test_unknown_method() -> None:
    with pytest.raises(UnknownMethodError, match="Did you mean 'zero-shot'") as info:
        run_method("zero-shoot")
    assert isinstance(info.value, KeyError)
    assert "linear-probe" in str(info.value)


def test_build_context_validates_and_caches(
    tiny: Backbone, spec: DatasetSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fewclip_tutorial.data.registry as registry

    calls = {"backbone": 0, "dataset": 0}

    def fake_backbone(name: str, pretrained: str | None = "default", device=None) -> Backbone:
        calls["backbone"] += 1
        return tiny

    def fake_dataset(name: str, root=None, **kw: object) -> DatasetSpec:
        calls["dataset"] += 1
        return spec

    monkeypatch.setattr(exp, "load_backbone", fake_backbone)
    monkeypatch.setattr(registry, "load_dataset", fake_dataset)
    exp.clear_caches()
    try:
        a = build_context("toy", TINY, shots=1, seed=1, device="cpu", cache_dir=None)
        b = build_context("toy", TINY, shots=2, seed=3, device="cpu", cache_dir=None)
        assert calls == {"backbone": 1, "dataset": 1}
        assert a.backbone is b.backbone and a.dataset is b.dataset
        assert a.text_classifier is b.text_classifier
        assert b.shots == 2 and len(b.splits.train) == 6
        with pytest.raises(ValueError, match="shots"):
            build_context("toy", TINY, shots=0, device="cpu")
        with pytest.raises(ValueError, match="class"):  # 4 images per class: K=4 leaves no val
            build_context("toy", TINY, shots=4, device="cpu", cache_dir=None)
    finally:
        exp.clear_caches()


def test_method_modules_are_imported_and_missing_ones_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "zero-shot" in METHODS and "linear-probe" in METHODS
    assert "baselines" in methods_pkg.loaded_modules()
    monkeypatch.setattr(methods_pkg, "METHOD_MODULES", ("_does_not_exist",))
    methods_pkg._import_methods()  # skipped silently

    real_import = methods_pkg.importlib.import_module

    def broken(name: str, package: str | None = None):
        if name.endswith("_broken"):
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real_import(name, package)

    monkeypatch.setattr(methods_pkg.importlib, "import_module", broken)
    monkeypatch.setattr(methods_pkg, "METHOD_MODULES", ("_broken",))
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        methods_pkg._import_methods()


def test_build_context_from_a_local_checkpoint(
    tiny: Backbone, spec: DatasetSpec, tmp_path: Path
) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    exp.clear_caches()
    try:
        ctx = build_context(
            spec, str(path), shots=1, seed=1, arch=TINY, device="cpu", cache_dir=None
        )
        assert ctx.backbone.identifier.startswith(f"{TINY}:file:")
        # equal weights loaded from the file, the same operations: exactly the same classifier
        assert torch.equal(ctx.text_classifier, text_classifier(tiny, CLASSNAMES, TEMPLATES))
    finally:
        exp.clear_caches()
