"""ShapeWorld: determinism, balance, factors, captions, errors."""

from __future__ import annotations

import numpy as np
import pytest

from fewclip_tutorial.data import shapeworld as sw


@pytest.fixture(scope="module")
def world():
    return sw.load_shapeworld(train_per_class=4, val_per_class=3, test_per_class=5, seed=3)


def test_deterministic_per_seed(world):
    again = sw.load_shapeworld(train_per_class=4, val_per_class=3, test_per_class=5, seed=3)
    other = sw.load_shapeworld(train_per_class=4, val_per_class=3, test_per_class=5, seed=4)
    assert np.array_equal(world.train.images, again.train.images)
    assert np.array_equal(world.ood_test["sketch"].images, again.ood_test["sketch"].images)
    assert not np.array_equal(world.train.images, other.train.images)
    assert world.test.fingerprint() == again.test.fingerprint() != other.test.fingerprint()


def test_balanced_per_class(world):
    for split, n in [(world.train, 4), (world.val, 3), (world.test, 5)]:
        counts = np.bincount(split.labels, minlength=len(sw.CLASSNAMES))
        assert (counts == n).all(), counts
    assert len(sw.CLASSNAMES) >= 12
    assert {"pentagon", "hexagon", "octagon"} <= set(sw.CLASSNAMES)


def test_domains_as_specified(world):
    assert set(world.train.domains) == {"photo"}
    assert set(world.ood_test) == {"painting", "cartoon", "sketch"}
    for d, split in world.ood_test.items():
        assert set(split.domains) == {d}
    two = sw.load_shapeworld(
        train_domains=("photo", "cartoon"), train_per_class=4, test_per_class=2
    )
    assert set(two.train.domains) <= {"photo", "cartoon"}
    assert set(two.ood_test) == {"painting", "sketch"}


def test_factor_lists_match_clap_prompt_slots():
    assert len(sw.COLORS) == 10 and len(sw.SIZES) == 3
    assert len(sw.IMAGE_TYPES) >= 4 and len(sw.ART_STYLES) >= 2
    assert len(sw.BACKGROUNDS) >= 2


def test_spurious_colour_in_train_only():
    spur = sw.load_shapeworld(
        spurious_color=1.0, train_per_class=6, val_per_class=4, test_per_class=20
    )
    f = spur.train.factors
    assert np.array_equal(f.color, f.shape % len(sw.COLORS))
    t = spur.test.factors
    assert (t.color != t.shape % len(sw.COLORS)).mean() > 0.5  # broken at test


def test_render_any_resolution_and_factors_visible():
    rng = np.random.default_rng(0)
    f = sw.sample_factors(6, rng, classes=np.zeros(6, int), image_types=["cartoon"])
    f.color[:] = sw.COLORS.index("red")
    f.background[:] = sw.BACKGROUNDS.index("white")
    f.size[:] = 0
    for size in (32, 224):
        img = sw.render(f, size)
        assert img.shape == (6, size, size, 3) and img.dtype == np.uint8
    img = sw.render(f, 64).astype(float)
    # the shape's centre pixel is red, the corner is the (light) background
    for i in range(6):
        cy, cx = int(f.cy[i] * 64), int(f.cx[i] * 64)
        r, g, b = img[i, cy, cx]
        assert r > 150 and g < 100 and b < 100
        assert img[i, 0, 0].mean() > 150 or img[i, -1, -1].mean() > 150


def test_captions_only_mention_true_factors():
    rng = np.random.default_rng(1)
    f = sw.sample_factors(400, rng)
    caps = sw.captions(f, np.random.default_rng(2))
    named = 0
    for i, c in enumerate(caps):
        text = c
        for phrase in sw.BACKGROUND_PHRASES.values():  # "white background" is not a colour claim
            text = text.replace(phrase, "")
        words = text.replace(",", " ").replace(":", " ").split()
        for k, cls in enumerate(sw.CLASSNAMES):
            if cls in words:
                assert k == f.shape[i], (c, f.describe(i))
        for k, col in enumerate(sw.COLORS):
            if col in words:
                assert k == f.color[i], (c, f.describe(i))
        named += sw.CLASSNAMES[f.shape[i]] in words
    # some captions do not name the class, most do
    assert 0.6 < named / len(caps) < 0.97


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="Unknown ShapeWorld image type 'photograph'"):
        sw.load_shapeworld(train_domains=("photograph",))
    with pytest.raises(ValueError, match="probability"):
        sw.load_shapeworld(spurious_color=1.5)
    with pytest.raises(ValueError, match="train_domains is empty"):
        sw.load_shapeworld(train_domains=())
