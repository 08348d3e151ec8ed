"""ShapeWorld: determinism, balance, the task suite, factors, captions, errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fewclip_tutorial.data import shapeworld as sw
from fewclip_tutorial.data.registry import list_datasets, load_dataset

SMALL = {"train_per_class": 4, "val_per_class": 3, "test_per_class": 5}


@pytest.fixture(scope="module")
def world():
    return sw.load_shapeworld(seed=3, **SMALL)


@pytest.fixture(scope="module")
def caption_sample():
    rng = np.random.default_rng(1)
    f = sw.sample_factors(4000, rng)
    return f, sw.captions(f, np.random.default_rng(2))


def test_deterministic_per_seed(world):
    again = sw.load_shapeworld(seed=3, **SMALL)
    other = sw.load_shapeworld(seed=4, **SMALL)
    assert np.array_equal(world.train.images, again.train.images)
    assert np.array_equal(world.ood_test["sketch"].images, again.ood_test["sketch"].images)
    assert not np.array_equal(world.train.images, other.train.images)
    assert world.test.fingerprint() == again.test.fingerprint() != other.test.fingerprint()


def test_default_pools_allow_128_shots_and_200_test_images_per_class():
    spec = sw.load_shapeworld(task="shapeworld-patterns", val_per_class=1)
    for split, n in [
        (spec.train, 128),
        (spec.test, 200),
        *((s, 200) for s in spec.ood_test.values()),
    ]:
        assert np.bincount(split.labels, minlength=spec.num_classes).tolist() == [n] * 4


@pytest.mark.parametrize("task", sw.list_tasks())
def test_every_task_is_balanced_and_its_labels_are_the_factor(task):
    spec = sw.load_shapeworld(task=task, **SMALL)
    t = sw.TASKS[task]
    assert spec.name == task and spec.num_classes == len(t.values) >= 4
    assert set(spec.ood_test) == set(t.ood_domains)
    for split, n in [(spec.train, 4), (spec.val, 3), (spec.test, 5)]:
        assert (np.bincount(split.labels, minlength=spec.num_classes) == n).all()
        assert set(split.domains) == set(t.train_domains)
        world_values = split.factors.shape if t.label_factor == "shape" else split.factors.pattern
        names = sw.SHAPES if t.label_factor == "shape" else sw.PATTERNS
        assert [names[v] for v in world_values] == [t.values[y] for y in split.labels]


def test_all_tasks_are_registered_datasets():
    names = list_datasets()
    assert names[: len(sw.TASKS)] == sw.list_tasks() and names[0] == "shapeworld"
    spec = load_dataset("shapeworld-polygons", **SMALL)
    assert spec.classnames[2] == "five-sided shape"
    with pytest.raises(ValueError, match="names two ShapeWorld tasks"):
        load_dataset("shapeworld", task="shapeworld-patterns")


def test_suite_spans_prior_regimes_by_construction():
    main, everyday = sw.TASKS["shapeworld"], sw.TASKS["shapeworld-everyday"]
    assert main.values == everyday.values  # the same images, named two ways
    renamed = [v for v, a, b in zip(main.values, main.classnames, everyday.classnames) if a != b]
    assert renamed == ["ellipse", "star", "cross", "heart", "crescent"]
    assert "blueprint" not in sw.TASKS["shapeworld"].ood_domains
    assert sw.TASKS["shapeworld-blueprint"].train_domains == ("blueprint",)


def _words(caption: str) -> str:
    return " " + re.sub(r"[,.:]", " ", caption) + " "


def test_formal_names_never_captioned_everyday_and_task_names_sometimes(caption_sample):
    _, caps = caption_sample
    text = [_words(c) for c in caps]
    for formal in ("ellipse", "pentagram", "cross", "cardioid", "crescent"):
        assert not any(f" {formal} " in t for t in text), formal
    # every class name a task asks about appears in some captions ("every factor is captioned")
    for task in ("shapeworld-everyday", "shapeworld-polygons", "shapeworld-patterns"):
        for name in sw.TASKS[task].classnames:
            assert any(f" {name} " in t for t in text), (task, name)


def test_captions_name_the_style_mostly_and_patterns_rarely(caption_sample):
    f, caps = caption_sample
    style_words = {w for ws in sw._TYPE_WORDS.values() for w in ws}
    named_style = np.mean([any(f" {w} " in _words(c) for w in style_words) for c in caps])
    assert named_style == 1.0  # every caption names the rendering style
    patterned = f.pattern != sw.PATTERNS.index("plain")
    said = np.array(
        [
            any(f" {w} " in _words(c) for w in sw.PATTERN_WORDS[sw.PATTERNS[p]])
            for c, p in zip(caps, f.pattern)
        ]
    )
    assert 0.15 < said[patterned].mean() < 0.35 and said[~patterned].mean() < 0.1


def test_captions_only_mention_true_factors(caption_sample):
    f, caps = caption_sample
    named = 0
    for i, c in enumerate(caps):
        text = _words(c)
        for phrase in sw.BACKGROUND_PHRASES.values():  # "white background" is not a colour claim
            text = text.replace(phrase, "")
        for k, shape in enumerate(sw.SHAPES):
            for word, _ in sw.CAPTION_NAMES[shape]:
                if f" {word} " in text and not any(
                    f" {word} " in f" {w} " and w != word
                    for s in sw.SHAPES
                    for w, _ in sw.CAPTION_NAMES[s]
                    if f" {w} " in text
                ):
                    assert k == f.shape[i], (c, f.describe(i))
        for k, col in enumerate(sw.COLORS):
            if f" {col} " in text:
                assert k == f.color[i], (c, f.describe(i))
        named += any(f" {w} " in text for w, _ in sw.CAPTION_NAMES[sw.SHAPES[f.shape[i]]])
    assert 0.85 < named / len(caps) < 0.95  # one caption in ten names no object


def test_render_any_resolution_and_factors_visible():
    rng = np.random.default_rng(0)
    f = sw.sample_factors(6, rng, classes=np.zeros(6, int), image_types=["cartoon"])
    f.color[:] = sw.COLORS.index("red")
    f.background[:] = sw.BACKGROUNDS.index("white")
    f.pattern[:] = sw.PATTERNS.index("plain")
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


def _object_std(pattern: str) -> float:
    rng = np.random.default_rng(5)
    f = sw.sample_factors(
        8, rng, classes=np.full(8, sw.SHAPES.index("square")), image_types=["photo"]
    )
    f.pattern[:] = sw.PATTERNS.index(pattern)
    f.color[:] = sw.COLORS.index("blue")
    f.size[:] = 0
    f.art_style[:] = 0
    img = sw.render(f, 32).astype(float)
    c = [
        img[
            i,
            int(f.cy[i] * 32) - 5 : int(f.cy[i] * 32) + 5,
            int(f.cx[i] * 32) - 5 : int(f.cx[i] * 32) + 5,
        ]
        for i in range(8)
    ]
    return float(np.mean([x.std(axis=(0, 1)).mean() for x in c]))


def test_fill_patterns_are_visible_at_32px():
    plain = _object_std("plain")
    for p in ("striped", "dotted", "checkered"):
        assert _object_std(p) > 2 * plain, p


def test_photo_objects_cast_a_shadow_so_white_on_white_has_an_edge():
    rng = np.random.default_rng(6)
    f = sw.sample_factors(
        8, rng, classes=np.full(8, sw.SHAPES.index("circle")), image_types=["photo"]
    )
    f.color[:] = sw.COLORS.index("white")
    f.background[:] = sw.BACKGROUNDS.index("white")
    f.pattern[:] = 0
    f.radius[:] = 0.3
    f.cx[:] = f.cy[:] = 0.5
    img = sw.render(f, 32).astype(float).mean(-1)
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    rho = np.hypot(yy - 16, xx - 16) / (0.3 * 32)  # in radii; the disc ends at 0.9
    near = (rho > 1.0) & (rho < 1.3) & (yy > 16) & (xx > 16)  # the shadow side
    far = rho > 1.6
    for i in range(8):
        assert img[i][near].min() < np.median(img[i][far]) - 40


def test_spurious_colour_in_train_only():
    spur = sw.load_shapeworld(
        spurious_color=1.0, train_per_class=6, val_per_class=4, test_per_class=20
    )
    f, y = spur.train.factors, spur.train.labels
    assert np.array_equal(f.color, y % len(sw.COLORS))
    t = spur.test.factors
    assert (t.color != spur.test.labels % len(sw.COLORS)).mean() > 0.5  # broken at test


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="Unknown ShapeWorld image type 'photograph'"):
        sw.load_shapeworld(train_domains=("photograph",))
    with pytest.raises(ValueError, match="probability"):
        sw.load_shapeworld(spurious_color=1.5)
    with pytest.raises(ValueError, match="train_domains is empty"):
        sw.load_shapeworld(train_domains=())
    with pytest.raises(KeyError, match="Did you mean 'shapeworld-patterns'"):
        sw.load_shapeworld(task="shapeworld-pattern")
    with pytest.raises(ValueError, match="has 3 names but task 'shapeworld' has 10 classes"):
        sw.load_shapeworld(classnames=["a", "b", "c"])
    with pytest.raises(ValueError, match="overlap train_domains"):
        sw.load_shapeworld(ood_domains=("photo", "sketch"))


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


def test_embedded_setup_compares_on_the_whole_suite():
    from fewclip_tutorial.settings import SHAPEWORLD_SUITE, get_setup

    assert SHAPEWORLD_SUITE == tuple(sw.list_tasks())
    assert get_setup("embedded").suite == SHAPEWORLD_SUITE
    assert get_setup("embedded").dataset == SHAPEWORLD_SUITE[0] == "shapeworld"
