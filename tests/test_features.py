"""Feature extraction and its on-disk cache (fewclip_tutorial/features.py)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_data import FakeBackbone, make_list_split  # noqa: E402

from fewclip_tutorial.features import (  # noqa: E402
    FeatureSet,
    cache_key,
    cache_path,
    default_cache_dir,
    extract_features,
)


@pytest.fixture
def split():
    return make_list_split([3, 2, 2], name="toy:train")  # N = 7


class _Float64Backbone(FakeBackbone):
    """The fake linear encoder computed in float64 and returned in float32 (as the cache).

    Two batchings then differ by float64 rounding (~1e-15), so their float32 features differ
    by at most one float32 rounding step: 2^-24 for unit-vector entries (|f| <= 1).
    """

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        self.images_seen += int(images.shape[0])
        out = images.flatten(1).double() @ self.weight.double()
        return (out / out.norm(dim=-1, keepdim=True)).float()


ONE_FLOAT32_STEP = 2.0**-24  # float32 spacing below 1: unit-vector entries round by <= this

#: |norm - 1| of those float32 unit rows (D = 16, u = 2^-24): the float64 unit vector's cast
#: moves its norm by <= u, the float32 norm of 16 squares adds (D/2 + 1) u; one u more covers
#: the float64 normalisation (~1e-15): (D/2 + 3) u
UNIT_NORM = {"atol": (16 / 2 + 3) * 2.0**-24, "rtol": 0.0}


@pytest.fixture
def backbone():
    return _Float64Backbone()


def _feature_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.feat"))


def test_eval_features_match_hand_computation(split, backbone):
    fs = extract_features(backbone, split, cache_dir=None, progress=False, batch_size=3)
    assert isinstance(fs, FeatureSet)
    assert fs.features.shape == (7, 16) and fs.features.dtype == torch.float32
    assert fs.labels.dtype == torch.int64
    np.testing.assert_array_equal(fs.labels.numpy(), split.labels)
    expected = torch.stack([backbone.preprocess(split.load_image(i)) for i in range(len(split))])
    expected = expected.flatten(1).double() @ backbone.weight.double()
    expected = (expected / expected.norm(dim=-1, keepdim=True)).float()
    # float64 in batches of 3 vs 7, then float32: at most one float32 step apart
    torch.testing.assert_close(fs.features, expected, atol=ONE_FLOAT32_STEP, rtol=0)
    torch.testing.assert_close(fs.features.norm(dim=-1), torch.ones(7), **UNIT_NORM)
    assert backbone.encode_calls == 3  # ceil(7 / 3) batches
    assert len(fs) == 7 and fs.dim == 16 and fs.num_views is None


def test_features_are_normal_tensors_usable_in_autograd(split, backbone, tmp_path):
    for _ in range(2):  # computed, then loaded from the cache
        fs = extract_features(backbone, split, cache_dir=tmp_path, progress=False)
        assert not fs.features.is_inference()
        w = torch.randn(16, 3, requires_grad=True)
        (fs.features @ w).sum().backward()
        # float32 sums of the N = 7 entries (|f| <= 1) of a column, by the matmul's backward
        # and by sum(0): each within (N - 1) u N of the exact sum, u = 2^-24
        n = fs.features.shape[0]
        torch.testing.assert_close(
            w.grad,
            fs.features.sum(0)[:, None].expand(16, 3),
            atol=2 * (n - 1) * n * 2.0**-24,  # the bound above, for the two sums
            rtol=0,
        )


def test_second_call_loads_from_cache(split, backbone, tmp_path):
    first = extract_features(backbone, split, cache_dir=tmp_path, progress=False)
    calls = backbone.encode_calls
    assert calls > 0 and len(_feature_files(tmp_path)) == 1
    second = extract_features(backbone, split, cache_dir=tmp_path, progress=False)
    assert backbone.encode_calls == calls  # no recomputation
    assert torch.equal(first.features, second.features)
    assert torch.equal(first.labels, second.labels)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left no temp files


def test_cache_key_changes_with_every_setting(split, backbone, tmp_path):
    other_split = make_list_split([3, 2, 2], name="toy:train", offset=50)  # same labels, new images
    variants = [
        dict(backbone=backbone, split=split),
        dict(backbone=backbone, split=split, views=2, augment=True),
        dict(backbone=backbone, split=split, views=3, augment=True),
        dict(backbone=backbone, split=split, views=2, augment=True, seed=1),
        dict(backbone=backbone, split=split, augment=True),
        dict(backbone=backbone, split=split, views=2, augment=True, flip=False),
        dict(backbone=backbone, split=other_split),
        dict(backbone=FakeBackbone(identifier="fake-linear-v2"), split=split),
    ]
    keys = set()
    for kw in variants:
        bb, sp = kw.pop("backbone"), kw.pop("split")
        keys.add(cache_key(bb, sp, **kw))
        extract_features(bb, sp, cache_dir=tmp_path, progress=False, **kw)
    assert len(keys) == len(variants)
    assert len(_feature_files(tmp_path)) == len(variants)
    # The key is stable: a fresh, equal backbone gives the same key.
    assert cache_key(FakeBackbone(), split) == cache_key(backbone, split)


class _RawCapableBackbone(FakeBackbone):
    """The fake linear encoder with ``normalize=`` as ``Backbone.encode_images`` has it."""

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self.encode_calls += 1
        out = images.flatten(1).float() @ self.weight
        return out / out.norm(dim=-1, keepdim=True) if normalize else out


def test_raw_features_have_their_own_key_and_normalised_keys_are_unchanged(split, tmp_path):
    import hashlib
    import json

    from fewclip_tutorial.features import FEATURE_FORMAT_VERSION, _describe_transform

    bb = _RawCapableBackbone()
    # the key of normalised features as it was before raw features existed: caches stay valid
    payload = {"backbone": bb.identifier, "split": split.fingerprint(), "views": 1,
               "augment": False, "seed": 0, "transform": _describe_transform(bb, False, True),
               "version": FEATURE_FORMAT_VERSION}  # fmt: skip
    old = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert cache_key(bb, split) == cache_key(bb, split, raw=False) == old
    assert cache_key(bb, split, raw=True) != old
    unit = extract_features(bb, split, cache_dir=tmp_path, progress=False)
    raw = extract_features(bb, split, cache_dir=tmp_path, progress=False, raw=True)
    assert len(_feature_files(tmp_path)) == 2
    expected = torch.stack([bb.preprocess(split.load_image(i)) for i in range(len(split))])
    expected = expected.flatten(1).float() @ bb.weight
    torch.testing.assert_close(raw.features, expected, rtol=0, atol=0)  # one batch, same op
    # the fake's own normalisation, the same float32 ops on the same rows: equal
    torch.testing.assert_close(raw.features / raw.features.norm(dim=-1, keepdim=True),
                               unit.features, rtol=0, atol=0)  # fmt: skip
    calls = bb.encode_calls
    again = extract_features(bb, split, cache_dir=tmp_path, progress=False, raw=True)
    assert bb.encode_calls == calls and torch.equal(again.features, raw.features)  # cached


def test_augment_deterministic_per_seed(split, backbone):
    a = extract_features(
        backbone, split, views=2, augment=True, seed=0, cache_dir=None, progress=False
    )
    b = extract_features(
        backbone, split, views=2, augment=True, seed=0, cache_dir=None, progress=False
    )
    c = extract_features(
        backbone, split, views=2, augment=True, seed=1, cache_dir=None, progress=False
    )
    assert a.features.shape == (2, 7, 16) and a.num_views == 2
    assert torch.equal(a.features, b.features)  # deterministic per seed
    assert not torch.allclose(a.features, c.features)  # a new seed gives new crops
    assert not torch.allclose(a.features[0], a.features[1])  # views differ from each other
    torch.testing.assert_close(a.features.norm(dim=-1), torch.ones(2, 7), **UNIT_NORM)


def test_augment_independent_of_batch_size_and_global_rng(split, backbone):
    torch.manual_seed(123)
    a = extract_features(
        backbone, split, views=2, augment=True, batch_size=2, cache_dir=None, progress=False
    )
    marker = torch.rand(1)
    torch.manual_seed(999)
    b = extract_features(
        backbone, split, views=2, augment=True, batch_size=7, cache_dir=None, progress=False
    )
    # batches of 2 vs 7 (float64 encoder, float32 features): at most one float32 step apart
    torch.testing.assert_close(a.features, b.features, atol=ONE_FLOAT32_STEP, rtol=0)
    # The global torch RNG is left as it was (augmentation runs inside fork_rng).
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), marker)


def test_augment_same_with_dataloader_workers(split, backbone):
    kw = dict(views=2, augment=True, seed=3, cache_dir=None, progress=False, batch_size=4)
    a = extract_features(backbone, split, num_workers=0, **kw)
    b = extract_features(backbone, split, num_workers=1, **kw)
    # the same batches (float64 encoder, float32 features): at most one float32 step apart
    torch.testing.assert_close(a.features, b.features, atol=ONE_FLOAT32_STEP, rtol=0)


def test_augment_single_view_and_views_without_augment(split, backbone):
    one = extract_features(backbone, split, augment=True, cache_dir=None, progress=False)
    assert one.features.shape == (1, 7, 16)
    plain = extract_features(backbone, split, cache_dir=None, progress=False)
    copies = extract_features(backbone, split, views=3, cache_dir=None, progress=False)
    assert copies.features.shape == (3, 7, 16)
    for v in range(3):
        assert torch.equal(copies.features[v], plain.features)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip_byte", "empty"])
def test_corrupted_cache_is_detected_and_rebuilt(split, backbone, tmp_path, caplog, damage):
    good = extract_features(
        backbone, split, views=2, augment=True, cache_dir=tmp_path, progress=False
    )
    (path,) = _feature_files(tmp_path)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x80\x04garbage-not-a-cache" * 10)
    elif damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "flip_byte":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    else:
        path.write_bytes(b"")
    calls = backbone.encode_calls
    with caplog.at_level(logging.WARNING, logger="fewclip_tutorial.features"):
        rebuilt = extract_features(
            backbone, split, views=2, augment=True, cache_dir=tmp_path, progress=False
        )
    assert backbone.encode_calls > calls  # recomputed, not trusted
    assert any("recomputing" in r.getMessage() for r in caplog.records)
    assert torch.equal(rebuilt.features, good.features)
    # The rebuilt file is valid again: the next call is a cache hit.
    calls = backbone.encode_calls
    extract_features(backbone, split, views=2, augment=True, cache_dir=tmp_path, progress=False)
    assert backbone.encode_calls == calls


def test_stale_file_with_other_key_is_rebuilt(split, backbone, tmp_path, caplog):
    other = make_list_split([3, 2, 2], name="toy:train", offset=77)
    extract_features(backbone, other, cache_dir=tmp_path, progress=False)
    (other_path,) = _feature_files(tmp_path)
    target = cache_path(tmp_path, split, cache_key(backbone, split))
    other_path.rename(target)  # a file for other settings sitting at this key's path
    calls = backbone.encode_calls
    with caplog.at_level(logging.WARNING, logger="fewclip_tutorial.features"):
        fs = extract_features(backbone, split, cache_dir=tmp_path, progress=False)
    assert backbone.encode_calls > calls
    assert any("stale" in r.getMessage() for r in caplog.records)
    expected = extract_features(backbone, split, cache_dir=None, progress=False)
    assert torch.equal(fs.features, expected.features)


def test_cache_disabled_and_default_dir_from_env(split, backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWCLIP_CACHE", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    extract_features(backbone, split, cache_dir=None, progress=False)
    assert not (tmp_path / "envcache").exists()
    extract_features(backbone, split, progress=False)  # cache_dir="default"
    assert len(_feature_files(tmp_path / "envcache")) == 1


def test_bad_arguments(split, backbone):
    with pytest.raises(ValueError, match="views must be a positive integer"):
        extract_features(backbone, split, views=0, cache_dir=None, progress=False)
    empty = split.subset([], name="empty")
    with pytest.raises(ValueError, match="empty"):
        extract_features(backbone, empty, cache_dir=None, progress=False)


def test_small_image_views_are_translations_of_at_most_two_pixels():
    from PIL import Image

    from fewclip_tutorial.features import crop_transform

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    tf = crop_transform(32)
    torch.manual_seed(0)
    shifts = set()
    for _ in range(40):
        out = np.asarray(tf(Image.fromarray(img)))
        assert out.shape == img.shape
        # the interior of the view equals the image moved by (dy, dx), |dy|, |dx| <= 2
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(out[4:-4, 4:-4], img[4 - dy : 28 - dy, 4 - dx : 28 - dx])
        ]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 5  # the shift is random


def test_large_image_views_are_tip_adapters_resized_crops():
    from torchvision import transforms as T

    from fewclip_tutorial.features import AUGMENT_SCALE, crop_transform

    tf = crop_transform(224)
    assert isinstance(tf, T.RandomResizedCrop) and tf.scale == AUGMENT_SCALE == (0.5, 1.0)
