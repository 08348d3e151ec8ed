"""Tests of fewclip_tutorial.backbones and fewclip_tutorial.device (tiny random models only)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import socket
from pathlib import Path

import open_clip
import pytest
import torch
from fixtures_data import TINY_CLIP_CONFIG

from fewclip_tutorial import backbones as bbmod
from fewclip_tutorial.backbones import (
    EMBEDDED_BACKBONE,
    CheckpointIntegrityError,
    CheckpointNotFoundError,
    UnknownBackboneError,
    UnknownPretrainedTagError,
    WeightsUnavailableError,
    load_backbone,
    load_state_dict_file,
    resolve_pretrained_tag,
)
from fewclip_tutorial.device import autocast, get_device, seed_everything

TINY = "fewclip-test-tiny"
TINY_CONFIG = TINY_CLIP_CONFIG


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a 1-layer CLIP config with open_clip (independent of the shipped assets)."""
    path = tmp_path_factory.mktemp("cfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return TINY


@pytest.fixture(scope="module")
def tiny(tiny_arch: str) -> bbmod.Backbone:
    return load_backbone(tiny_arch, pretrained=None, device="cpu", seed=0)


@pytest.fixture(scope="module")
def tiny64(tiny: bbmod.Backbone) -> bbmod.Backbone:
    """``tiny`` with float64 towers: two batchings then differ by float64 rounding only."""
    return dataclasses.replace(tiny, model=copy.deepcopy(tiny.model).double())


U = 2.0**-24  # float32 unit roundoff


def unit_norm_atol(d: int) -> float:
    """|norm - 1| of a row of ``F.normalize`` in float32, D = ``d`` (recomputed in float32).

    A float32 sum of d squares is within d u of the exact one (any order), so a norm is
    within (d/2 + 1) u: F.normalize's norm (d/2 + 1) u, its division u, the test's norm
    (d/2 + 1) u: (d + 3) u in all, to first order in u (the rest is ~d^2 u^2 = 1e-13).
    """
    return (d + 3) * U


def batching_atol(d: int) -> float:
    """Entries (<= 1) of two float32 ``F.normalize`` outputs of float64 tower features that
    differ by float64 rounding only (~1e-15): the package casts them to float32 before
    normalising, so they are equal or one float32 step apart (relative 2u), which
    normalising at most doubles (4u); the two float32 normalisations then round apart by
    at most 2 (d/2 + 2) u.  (d + 8) u in all.
    """
    return (d + 8) * U


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- device


def test_get_device_prefers_argument_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEWCLIP_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("FEWCLIP_DEVICE", "not-a-device")
    with pytest.raises(ValueError, match="FEWCLIP_DEVICE"):
        get_device()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_get_device_rejects_missing_cuda() -> None:
    with pytest.raises(ValueError, match="no CUDA GPU"):
        get_device("cuda")


def test_autocast_is_a_no_op_on_cpu() -> None:
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu")):
        out = a @ a
    assert out.dtype == torch.float32
    assert torch.equal(out, a @ a)


def test_seed_everything_reproduces_all_generators() -> None:
    import random

    import numpy as np

    seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    with pytest.raises(TypeError):
        seed_everything(1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- random init


def test_random_init_backbone_is_frozen_and_normalises(
    tiny: bbmod.Backbone, tiny64: bbmod.Backbone
) -> None:
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.image_size == 16
    assert tiny.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert tiny.identifier == f"{TINY}:None:random-init-seed0"
    # the property computes this very exp (of a float32 parameter): exact
    assert tiny.logit_scale == float(tiny.model.logit_scale.exp())
    assert tiny.embed_dim == 16

    images = torch.randn(5, 3, 16, 16)
    f = tiny.encode_images(images)
    assert f.shape == (5, 16) and f.dtype == torch.float32
    # float32 unit rows, D = 16: see unit_norm_atol
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(5), atol=unit_norm_atol(16), rtol=0)
    # Chunked and unchunked passes agree (float64 towers: batching changes rounding only).
    f64 = tiny64.encode_images(images)
    assert f64.dtype == torch.float32
    # float64 towers, batches of 2 against all: see batching_atol
    torch.testing.assert_close(
        tiny64.encode_images(images, batch_size=2), f64, atol=batching_atol(16), rtol=0
    )
    # The features are normal tensors: usable in a graph that trains something else.
    w = torch.randn(16, 3, requires_grad=True)
    (f @ w).sum().backward()
    assert w.grad is not None

    t = tiny.encode_text(["a red circle", "a blue square", "a star"], batch_size=2)
    assert t.shape == (3, 16)
    # float32 unit rows, D = 16: see unit_norm_atol
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(3), atol=unit_norm_atol(16), rtol=0)
    # Same text, same embedding, whatever the batch (float64 towers: rounding only).
    t64 = tiny64.encode_text(["a red circle", "a blue square", "a star"], batch_size=2)
    alone, paired = tiny64.encode_text(["a star"])[0], tiny64.encode_text(["a", "a star"])[1]
    # "a star" alone, with another prompt, in a batch of 3 rows: see batching_atol
    torch.testing.assert_close(alone, t64[2], atol=batching_atol(16), rtol=0)
    torch.testing.assert_close(paired, t64[2], atol=batching_atol(16), rtol=0)


def test_encoders_reject_bad_input(tiny: bbmod.Backbone) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode_images(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="list of strings"):
        tiny.encode_text("a star")  # type: ignore[arg-type]


def test_seeded_random_init_is_reproducible_and_leaves_global_rng(tiny_arch: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = load_backbone(tiny_arch, pretrained=None, device="cpu", seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    b = load_backbone(tiny_arch, pretrained=None, device="cpu", seed=7)
    c = load_backbone(tiny_arch, pretrained=None, device="cpu", seed=8)
    assert _state_equal(a.model, b.model)
    assert not _state_equal(a.model, c.model)
    assert a.identifier != c.identifier
    # Unseeded random init: the identifier is a digest of the weights.
    d = load_backbone(tiny_arch, pretrained=None, device="cpu")
    assert d.identifier.startswith(f"{TINY}:None:random-init-")
    assert d.identifier != a.identifier


# --------------------------------------------------------------------------- local files


def test_local_checkpoint_round_trip(tiny: bbmod.Backbone, tiny_arch: str, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = load_backbone(str(path), arch=tiny_arch, device="cpu")
    assert _state_equal(loaded.model, tiny.model)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.identifier == f"{TINY}:file:{sha[:12]}"
    assert not any(p.requires_grad for p in loaded.model.parameters())
    # `pretrained` may be the path too.
    again = load_backbone(tiny_arch, pretrained=str(path), device="cpu")
    assert _state_equal(again.model, tiny.model)
    images = torch.randn(2, 3, 16, 16)
    # equal weights, the same operations on the same images: exactly the same features
    assert torch.equal(loaded.encode_images(images), tiny.encode_images(images))


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_load_state_dict_file_unwraps_and_casts(
    tiny: bbmod.Backbone, tiny_arch: str, tmp_path: Path, wrapper: str
) -> None:
    sd = {f"module.{k}": v.half() for k, v in tiny.model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: sd, "step": 10}, path)
    fresh = load_backbone(tiny_arch, pretrained=None, device="cpu", seed=99)
    load_state_dict_file(fresh.model, path)
    for key, value in fresh.model.state_dict().items():
        assert value.dtype == tiny.model.state_dict()[key].dtype
        assert torch.equal(value, tiny.model.state_dict()[key].half().to(value.dtype))


def test_load_state_dict_file_errors(tiny: bbmod.Backbone, tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_state_dict_file(tiny.model, tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    torch.save([1, 2, 3], bad)
    with pytest.raises(ValueError, match="does not contain a state dict"):
        load_state_dict_file(tiny.model, bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="arch="):
        load_state_dict_file(tiny.model, wrong)


def test_missing_local_file_and_missing_arch(tiny_arch: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_backbone(str(tmp_path / "missing.pt"), arch=tiny_arch, device="cpu")
    with pytest.raises(CheckpointNotFoundError):
        load_backbone(str(tmp_path / "missing.bin"), device="cpu")
    exists = tmp_path / "exists.pt"
    exists.write_bytes(b"x")
    with pytest.raises(ValueError, match="arch="):
        load_backbone(str(exists), device="cpu")


# --------------------------------------------------------------------------- names and tags


def test_unknown_backbone_suggests_and_lists_names() -> None:
    with pytest.raises(UnknownBackboneError) as info:
        load_backbone("ViT-B-23", device="cpu")
    assert isinstance(info.value, KeyError)
    msg = str(info.value)
    assert not msg.startswith("'")  # not KeyError's quoted repr
    assert "Did you mean" in msg and "'ViT-B-32'" in msg
    assert EMBEDDED_BACKBONE in msg and "RN50" in msg


def test_resolve_pretrained_tag() -> None:
    assert resolve_pretrained_tag("ViT-B-32", "default") == "openai"
    no_openai = next(
        m
        for m in open_clip.list_models()
        if open_clip.list_pretrained_tags_by_model(m)
        and "openai" not in open_clip.list_pretrained_tags_by_model(m)
    )
    assert (
        resolve_pretrained_tag(no_openai, "default")
        == open_clip.list_pretrained_tags_by_model(no_openai)[0]
    )
    with pytest.raises(UnknownPretrainedTagError, match="Did you mean 'openai'") as info:
        resolve_pretrained_tag("ViT-B-32", "opnai")
    assert "laion2b_s34b_b79k" in str(info.value)


def test_unknown_tag_is_rejected_before_any_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bbmod, "_hub_reachable", _fail_if_called)
    with pytest.raises(UnknownPretrainedTagError):
        load_backbone("ViT-B-32", pretrained="no-such-tag", device="cpu")


def _fail_if_called(*args: object, **kwargs: object) -> bool:
    raise AssertionError("must not be called")


def test_quickgelu_swap_for_openai_weights() -> None:
    assert bbmod._quickgelu_arch("ViT-B-32", "openai") == "ViT-B-32-quickgelu"
    assert bbmod._quickgelu_arch("RN50", "openai") == "RN50-quickgelu"
    assert bbmod._quickgelu_arch("ViT-B-32-quickgelu", "openai") == "ViT-B-32-quickgelu"
    assert bbmod._quickgelu_arch("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32"


# --------------------------------------------------------------------------- offline behaviour


def test_offline_env_fails_fast_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bbmod, "_find_cached_weights", lambda cfg: None)
    monkeypatch.setattr(bbmod, "_hub_reachable", _fail_if_called)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", _fail_if_called)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("ViT-B-32", pretrained="openai", device="cpu")
    msg = str(info.value)
    assert "HF_HUB_OFFLINE=1" in msg
    assert "'shapeworld-tiny'" in msg
    assert 'load_backbone("/path/to/weights.bin", arch="ViT-B-32-quickgelu")' in msg


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    def unreachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
        calls.append((host, port, timeout))
        return False

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(bbmod, "_find_cached_weights", lambda cfg: None)
    monkeypatch.setattr(bbmod, "_hub_reachable", unreachable)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", _fail_if_called)
    with pytest.raises(WeightsUnavailableError, match="huggingface.co:443 is unreachable"):
        load_backbone("ViT-B-32", device="cpu")
    assert [c[:2] for c in calls] == [("huggingface.co", 443)]  # one quick probe, no retries
    assert bbmod._HUB_TIMEOUT_S <= 2.0


def test_hub_reachable_false_on_closed_port() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more
    assert bbmod._hub_reachable("127.0.0.1", port, timeout=0.5) is False


def test_find_cached_weights_prefers_safetensors_in_hf_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub

    safe = tmp_path / "open_clip_model.safetensors"
    safe.write_bytes(b"w")
    asked: list[tuple[str, str]] = []

    def fake_cache(repo_id: str, filename: str, **kw: object) -> str | None:
        asked.append((repo_id, filename))
        return str(safe) if filename == "open_clip_model.safetensors" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", fake_cache)
    cfg = {"hf_hub": "timm/some_model/", "url": ""}
    assert bbmod._find_cached_weights(cfg) == str(safe)
    assert asked[0] == ("timm/some_model", "open_clip_model.safetensors")


def test_find_cached_weights_openai_url_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = {"url": "https://example.com/clip/models/abc/ViT-B-32.pt"}
    assert bbmod._find_cached_weights(cfg) is None
    target = tmp_path / ".cache" / "clip" / "ViT-B-32.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"w")
    assert bbmod._find_cached_weights(cfg) == str(target)


def test_weights_short_id_uses_blob_name_or_hash(tmp_path: Path) -> None:
    blob = tmp_path / ("ab" * 32)
    blob.write_bytes(b"anything")
    assert bbmod._weights_short_id(blob) == "ab" * 6
    other = tmp_path / "w.bin"
    other.write_bytes(b"content")
    assert bbmod._weights_short_id(other) == hashlib.sha256(b"content").hexdigest()[:12]


# --------------------------------------------------------------------------- shipped checkpoint

needs_embedded_config = pytest.mark.skipif(
    not (bbmod.ASSETS_DIR / f"{EMBEDDED_BACKBONE}.json").is_file(),
    reason="fewclip_tutorial/assets/shapeworld-tiny.json is not there yet",
)


def _fake_shipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sha: str | None) -> Path:
    model = load_backbone(EMBEDDED_BACKBONE, pretrained=None, device="cpu", seed=5).model
    ckpt = tmp_path / "shapeworld-tiny.pt"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, ckpt
    )
    info = tmp_path / "shapeworld-tiny.train.json"
    actual = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    info.write_text(json.dumps({"sha256": actual if sha is None else sha}))
    monkeypatch.setattr(bbmod, "_EMBEDDED_CHECKPOINT", ckpt)
    monkeypatch.setattr(bbmod, "_EMBEDDED_TRAIN_INFO", info)
    return ckpt


@needs_embedded_config
def test_shipped_checkpoint_is_verified_and_cast_to_fp32(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ckpt = _fake_shipped(monkeypatch, tmp_path, sha=None)
    bb = load_backbone(EMBEDDED_BACKBONE, device="cpu")
    saved = torch.load(ckpt)
    for key, value in bb.model.state_dict().items():
        if not value.is_floating_point():  # e.g. batch-norm step counters
            assert torch.equal(value, saved[key])
            continue
        assert value.dtype == torch.float32
        assert torch.equal(value, saved[key].float())
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert bb.identifier == f"{EMBEDDED_BACKBONE}:default:{sha[:12]}"


@needs_embedded_config
def test_shipped_checkpoint_hash_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ckpt = _fake_shipped(monkeypatch, tmp_path, sha="0" * 64)
    with pytest.raises(CheckpointIntegrityError) as info:
        load_backbone(EMBEDDED_BACKBONE, device="cpu")
    msg = str(info.value)
    actual = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert str(ckpt) in msg and "0" * 64 in msg and actual in msg
    assert "fewclip pretrain" in msg and "Reinstall" in msg


def test_shipped_checkpoint_missing_metadata(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    monkeypatch.setattr(bbmod, "_EMBEDDED_TRAIN_INFO", tmp_path / "missing.json")
    with pytest.raises(CheckpointIntegrityError, match="Cannot verify"):
        bbmod._verify_embedded_checkpoint(ckpt)
    with pytest.raises(CheckpointNotFoundError, match="fewclip pretrain"):
        bbmod._verify_embedded_checkpoint(tmp_path / "absent.pt")


@pytest.mark.skipif(
    not bbmod.embedded_checkpoint_path().is_file(),
    reason="the shipped shapeworld-tiny checkpoint has not been trained/committed yet",
)
def test_real_shipped_checkpoint_loads() -> None:
    bb = load_backbone(EMBEDDED_BACKBONE, device="cpu")
    assert bb.identifier.startswith(f"{EMBEDDED_BACKBONE}:default:")
    f = bb.encode_images(torch.zeros(1, 3, bb.image_size, bb.image_size))
    # a float32 unit row: see unit_norm_atol
    torch.testing.assert_close(
        f.norm(dim=-1), torch.ones(1), atol=unit_norm_atol(f.shape[1]), rtol=0
    )
