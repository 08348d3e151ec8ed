"""ShapeWorld: a generated image world with known content and style factors.

Content is the class (a shape).  Style is a set of named factors (colour, size,
image type / rendering domain, art style, background, position, rotation), so
prompts can be built from them: the factor names deliberately match CLAP's prompt
attributes ``"a [art style] [image type] of a [object size] [object color] [class]"``.

Everything is deterministic from a seed and vectorised with numpy: a batch of
images is rendered at once, several thousand 32 px images per second on one core,
at any resolution (32 px for ``shapeworld-tiny``, 224 px for a real CLIP on Colab).

The world also writes the captions ``shapeworld-tiny`` was pretrained on: generated
from the factors with varied templates and realistic noise (attributes dropped,
order changed, some captions not naming the class, some class names rarer than
others), so zero-shot transfer is good but imperfect.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fewclip_tutorial.data.base import DatasetSpec, LabeledSplit

# --------------------------------------------------------------------------- factors

CLASSNAMES: list[str] = [
    "circle",
    "ellipse",
    "triangle",
    "square",
    "pentagon",
    "hexagon",
    "octagon",
    "star",
    "cross",
    "heart",
    "crescent",
    "arrow",
]
COLORS: list[str] = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "brown",
    "multicolored",
]
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "blue": (0.12, 0.25, 0.86),
    "green": (0.12, 0.62, 0.18),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.55, 0.16, 0.70),
    "orange": (0.96, 0.52, 0.06),
    "black": (0.06, 0.06, 0.06),
    "white": (0.97, 0.97, 0.97),
    "brown": (0.50, 0.30, 0.10),
    "multicolored": (0.5, 0.5, 0.5),  # rendered as a hue gradient
}
SIZES: list[str] = ["large", "normal sized", "small"]
SIZE_RADIUS: dict[str, float] = {"large": 0.40, "normal sized": 0.31, "small": 0.23}
#: Objects are rotated uniformly in [-MAX_ROTATION, MAX_ROTATION] radians (about +-30 degrees):
#: upright-ish, as objects in photos are.  Full rotations made shape recognition too slow to
#: learn for a model trained on two CPU cores (see the appendix).
MAX_ROTATION: float = np.pi / 6
IMAGE_TYPES: list[str] = ["photo", "painting", "cartoon", "sketch"]
DOMAINS = IMAGE_TYPES
ART_STYLES: list[str] = ["realistic", "impressionistic"]
BACKGROUNDS: list[str] = ["white", "dark", "grass", "sky"]
BACKGROUND_RGB: dict[str, tuple[float, float, float]] = {
    "white": (0.90, 0.90, 0.88),
    "dark": (0.16, 0.16, 0.18),
    "grass": (0.36, 0.58, 0.28),
    "sky": (0.55, 0.75, 0.95),
}
BACKGROUND_PHRASES: dict[str, str] = {
    "white": "on a white background",
    "dark": "on a dark background",
    "grass": "on the grass",
    "sky": "in the sky",
}

#: Zero-shot prompt templates for ShapeWorld.  They carry style words (rendering
#: domain, colour, size), so FD-Align's spurious prototypes (one per template)
#: correspond to the world's known style factors.
TEMPLATES: list[str] = (
    [f"a {t} of a {{}}." for t in IMAGE_TYPES]
    + [f"a {c} {{}}." for c in COLORS]
    + [f"a {s} {{}}." for s in SIZES]
    + [
        f"{'an' if a[0] in 'aeiou' else 'a'} {a} {t} of a {{}}."
        for a in ART_STYLES
        for t in IMAGE_TYPES
    ]
    + [f"a {{}} {BACKGROUND_PHRASES[b]}." for b in BACKGROUNDS]
    + ["a {}.", "a picture of a {}.", "a drawing of a {}.", "a {} shape."]
)
#: A short ensemble used by default for zero-shot classification.
DEFAULT_TEMPLATES: list[str] = [f"a {t} of a {{}}." for t in IMAGE_TYPES] + ["a {}."]


@dataclass
class Factors:
    """The factors of a batch of ``B`` images, as index arrays of shape ``(B,)``."""

    shape: np.ndarray  # class index
    color: np.ndarray
    size: np.ndarray
    image_type: np.ndarray
    art_style: np.ndarray
    background: np.ndarray
    cx: np.ndarray  # centre, fraction of the image width
    cy: np.ndarray
    rotation: np.ndarray  # radians
    radius: np.ndarray  # fraction of the image width
    seed: np.ndarray  # noise seed; a render chunk seeds its noise from its first image

    def __len__(self) -> int:
        return int(len(self.shape))

    def take(self, idx: np.ndarray) -> Factors:
        return Factors(**{k: np.asarray(v)[idx] for k, v in self.__dict__.items()})

    def describe(self, i: int) -> dict[str, str]:
        """Human-readable factor names of image ``i``."""
        return {
            "class": CLASSNAMES[self.shape[i]],
            "color": COLORS[self.color[i]],
            "size": SIZES[self.size[i]],
            "image_type": IMAGE_TYPES[self.image_type[i]],
            "art_style": ART_STYLES[self.art_style[i]],
            "background": BACKGROUNDS[self.background[i]],
        }


def _index(names: Sequence[str], values: Sequence[str] | None, what: str) -> np.ndarray:
    if values is None:
        return np.arange(len(names))
    out = []
    for v in values:
        if v not in names:
            raise ValueError(f"Unknown ShapeWorld {what} {v!r}; choose from {list(names)}.")
        out.append(names.index(v))
    return np.asarray(out)


def sample_factors(
    n: int,
    rng: np.random.Generator,
    *,
    classes: np.ndarray | None = None,
    image_types: Sequence[str] | None = None,
    image_type_probs: Sequence[float] | None = None,
    spurious_color: float = 0.0,
) -> Factors:
    """Draw ``n`` factor tuples.

    Args:
        classes: ``(n,)`` class indices (balanced sampling is the caller's job);
            drawn uniformly when ``None``.
        image_types: rendering domains to draw from (default: all).
        image_type_probs: their probabilities (default: uniform).
        spurious_color: probability that an image's colour is its class's
            "spurious" colour ``COLORS[class % 10]`` instead of a uniform draw.
    """
    if classes is None:
        classes = rng.integers(0, len(CLASSNAMES), n)
    classes = np.asarray(classes, dtype=np.int64)
    types = _index(IMAGE_TYPES, image_types, "image type")
    p = None if image_type_probs is None else np.asarray(image_type_probs, float)
    if p is not None:
        if len(p) != len(types):
            raise ValueError("image_type_probs needs one probability per image type.")
        p = p / p.sum()
    color = rng.integers(0, len(COLORS), n)
    if spurious_color > 0:
        tied = rng.random(n) < spurious_color
        color = np.where(tied, classes % len(COLORS), color)
    size = rng.integers(0, len(SIZES), n)
    radius = np.array([SIZE_RADIUS[SIZES[s]] for s in size]) * rng.uniform(0.9, 1.1, n)
    margin = radius * 1.05
    cx = rng.uniform(margin, 1 - margin)
    cy = rng.uniform(margin, 1 - margin)
    return Factors(
        shape=classes,
        color=color,
        size=size,
        image_type=types[rng.choice(len(types), n, p=p)],
        art_style=rng.integers(0, len(ART_STYLES), n),
        background=rng.integers(0, len(BACKGROUNDS), n),
        cx=cx,
        cy=cy,
        rotation=rng.uniform(-MAX_ROTATION, MAX_ROTATION, n),
        radius=radius,
        seed=rng.integers(0, 2**31 - 1, n),
    )


# --------------------------------------------------------------------------- shapes
# Each shape is a signed "inside" function d(u, v) on shape-local coordinates in
# units of the radius: d > 0 inside, d < 0 outside, |d| roughly a distance.


def _polygon(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    angles = np.pi / 2 + 2 * np.pi * (np.arange(n) + 0.5) / n
    proj = u[..., None] * np.cos(angles) + v[..., None] * np.sin(angles)
    return np.cos(np.pi / n) - proj.max(-1)


def _rect(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.minimum(a - np.abs(u), b - np.abs(v))


def _shape_sdf(k: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    name = CLASSNAMES[k]
    rho = np.sqrt(u * u + v * v)
    if name == "circle":
        return 0.9 - rho
    if name == "ellipse":
        return 1.0 - np.sqrt((u / 1.0) ** 2 + (v / 0.55) ** 2)
    if name == "triangle":
        return _polygon(u, v, 3)
    if name == "square":
        return _polygon(u, v, 4)
    if name == "pentagon":
        return _polygon(u, v, 5)
    if name == "hexagon":
        return _polygon(u, v, 6)
    if name == "octagon":
        return _polygon(u, v, 8)
    if name == "star":
        theta = np.arctan2(v, u) - np.pi / 2
        phase = np.abs(((theta / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at tips, 0 between
        r = 0.42 + 0.58 * phase**1.5
        return (r - rho) * 0.7
    if name == "cross":
        return np.maximum(_rect(u, v, 0.3, 0.95), _rect(u, v, 0.95, 0.3))
    if name == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.25
        f = (x * x + y * y - 1) ** 3 - x * x * y**3
        return -np.cbrt(f) * 0.6
    if name == "crescent":
        inner = np.sqrt((u - 0.42) ** 2 + (v + 0.1) ** 2)
        return np.minimum(0.95 - rho, inner - 0.72)
    if name == "arrow":
        shaft = _rect(u + 0.4, v, 0.55, 0.2)
        head = np.minimum(u + 0.1, np.minimum(-(u - 0.95) * 0.55 - v, -(u - 0.95) * 0.55 + v))
        return np.maximum(shaft, head * 0.85)
    raise KeyError(name)  # pragma: no cover


# --------------------------------------------------------------------------- rendering


def _hsv_to_rgb(h: np.ndarray) -> np.ndarray:
    """Fully saturated colours for hue ``h`` in [0, 1): returns ``h.shape + (3,)``."""
    k = (np.stack([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    return 1 - np.clip(np.minimum(k, 4 - k), 0, 1) * 0.85


def _smooth_noise(rng: np.random.Generator, b: int, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], shape ``(b, size, size)`` (bilinear upsampling)."""
    grid = rng.uniform(-1, 1, (b, cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, size, dtype=np.float32)
    i0 = np.clip(np.floor(t).astype(int), 0, cells - 1)
    w = (t - i0)[None, :]
    rows = grid[:, i0, :] * (1 - w[..., None]) + grid[:, i0 + 1, :] * w[..., None]
    out = rows[:, :, i0] * (1 - w[:, None, :]) + rows[:, :, i0 + 1] * w[:, None, :]
    return out


def render(factors: Factors, image_size: int = 32) -> np.ndarray:
    """Render images for ``factors``: returns ``(B, H, W, 3)`` uint8 with ``H = W = image_size``.

    The rendering domain (``image_type``) changes how the shape is drawn:

    * ``photo``: shaded fill under a directional light, textured background, sensor noise;
    * ``painting``: blotchy colour, soft edges and brush-stroke texture;
    * ``cartoon``: flat saturated fill with a thick dark outline on a flat background;
    * ``sketch``: pencil outline and hatching on paper, colour only as a faint tint.

    ``impressionistic`` art style wobbles the outline and adds colour blotches.
    """
    b = len(factors)
    s = image_size
    out = np.empty((b, s, s, 3), dtype=np.uint8)
    # render in chunks to bound memory at large resolutions
    chunk = max(1, int(2_000_000 // (s * s)))
    for start in range(0, b, chunk):
        idx = np.arange(start, min(b, start + chunk))
        out[idx] = _render_chunk(factors.take(idx), s)
    return out


def _render_chunk(f: Factors, s: int) -> np.ndarray:
    b = len(f)
    rng = np.random.default_rng(int(f.seed[0]) if b else 0)
    # One generator per image would be slow: the chunk's noise is seeded from its first image,
    # so a batch renders deterministically given its factors and the chunking (which depends
    # only on the image size), not image by image.
    px = ((np.arange(s) + 0.5) / s).astype(np.float32)
    X = np.broadcast_to(px[None, None, :], (b, s, s))
    Y = np.broadcast_to(px[None, :, None], (b, s, s))
    f32 = np.float32
    dx = X - f.cx.astype(f32)[:, None, None]
    dy = Y - f.cy.astype(f32)[:, None, None]
    rot = f.rotation.astype(f32)
    c, sn = np.cos(-rot)[:, None, None], np.sin(-rot)[:, None, None]
    r = f.radius.astype(f32)[:, None, None]
    u = (dx * c - dy * sn) / r
    v = (dx * sn + dy * c) / r
    impress = f.art_style == ART_STYLES.index("impressionistic")
    if impress.any():
        n_imp = int(impress.sum())
        u[impress] += _smooth_noise(rng, n_imp, s, 4) * 0.12
        v[impress] += _smooth_noise(rng, n_imp, s, 4) * 0.12

    d = np.empty((b, s, s), dtype=f32)
    for k in np.unique(f.shape):
        m = f.shape == k
        d[m] = _shape_sdf(int(k), u[m], v[m])
    d_px = d * r * s  # signed distance in pixels (approximately)

    d_px = d_px.astype(np.float32)
    img = np.empty((b, s, s, 3), dtype=np.float32)
    for t in np.unique(f.image_type):
        m = f.image_type == t
        img[m] = _render_domain(
            IMAGE_TYPES[int(t)], f.take(np.flatnonzero(m)), d_px[m], u[m], v[m], X[m], Y[m], rng
        )
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _render_domain(
    domain: str,
    f: Factors,
    d_px: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Fill, background, outline and noise of one rendering domain: ``(b, s, s, 3)`` float32."""
    b, s = d_px.shape[0], d_px.shape[1]
    f32 = np.float32
    base = np.array([COLOR_RGB[COLORS[i]] for i in f.color], dtype=f32)[:, None, None, :]
    fill = np.broadcast_to(base, (b, s, s, 3))
    multi = f.color == COLORS.index("multicolored")
    if multi.any():
        fill = fill.copy()
        hue = (
            u[multi] * 0.25 + v[multi] * 0.25 + rng.uniform(0, 1, multi.sum())[:, None, None]
        ) % 1.0
        fill[multi] = _hsv_to_rgb(hue)
    bg = np.array([BACKGROUND_RGB[BACKGROUNDS[i]] for i in f.background], dtype=f32)[
        :, None, None, :
    ]
    impress = (f.art_style == ART_STYLES.index("impressionistic"))[:, None, None, None]
    light = rng.uniform(0, 2 * np.pi, b)[:, None, None]
    edge, outline_w, noise_std = 0.6, 0.0, 0.01
    line_col = None
    if domain == "photo":
        shade = (0.78 + 0.35 * np.clip(u * np.cos(light) + v * np.sin(light), -1, 1))[..., None]
        fill_img = np.clip(fill * shade + 0.04 * (shade - 0.78), 0, 1)
        bg_img = bg * (0.9 + 0.15 * Y[..., None]) + 0.05 * _smooth_noise(rng, b, s, 3)[..., None]
        noise_std = 0.03
    elif domain == "painting":
        blot = _smooth_noise(rng, b, s, 6)[..., None]
        phase = rng.uniform(0, 6, b)[:, None, None, None]
        strokes = np.sin((X * np.cos(light) + Y * np.sin(light))[..., None] * s * 1.3 + phase)
        fill_img = np.clip(fill + 0.16 * blot + 0.06 * strokes, 0, 1)
        paper = np.array([0.93, 0.88, 0.78], dtype=f32)
        bg_img = np.clip(0.75 * bg + 0.25 * paper + 0.12 * blot + 0.05 * strokes, 0, 1)
        edge = 1.6
    elif domain == "cartoon":
        fill_img = np.clip((fill - 0.5) * 1.25 + 0.5, 0, 1)
        bg_img = np.broadcast_to(0.6 * bg + 0.4, (b, s, s, 3))
        outline_w, line_col = 1.1, np.float32(0.05)
    else:  # sketch
        paper = np.array([0.95, 0.94, 0.90], dtype=f32)
        bg_img = np.broadcast_to(0.92 * paper + 0.08 * bg, (b, s, s, 3))
        hatch = (np.sin((X + Y)[..., None] * s * 2.2) > 0.3).astype(f32)
        fill_img = bg_img * (1 - 0.35 * hatch) + 0.35 * hatch * (0.55 * fill + 0.45 * 0.3)
        outline_w, line_col, noise_std = 0.7, 0.35 * fill + 0.15, 0.015
    if impress.any():
        blotch = 0.1 * _smooth_noise(rng, b, s, 8)[..., None]
        fill_img = np.where(impress, np.clip(fill_img + blotch, 0, 1), fill_img)
    alpha = np.clip(d_px / edge + 0.5, 0, 1)[..., None]
    img = alpha * fill_img + (1 - alpha) * bg_img
    if outline_w > 0:
        line = np.clip(outline_w + 0.5 - np.abs(d_px), 0, 1)[..., None]
        img = line * line_col + (1 - line) * img
    img = img + noise_std * rng.standard_normal((b, s, s, 3), dtype=f32)
    return img.astype(f32)


# --------------------------------------------------------------------------- captions

#: How often each class name is used in captions (some shapes are "rarer words").
CLASS_NAME_RATE: dict[str, float] = {
    "circle": 0.95,
    "ellipse": 0.75,
    "triangle": 0.95,
    "square": 0.95,
    "pentagon": 0.8,
    "hexagon": 0.75,
    "octagon": 0.6,
    "star": 0.95,
    "cross": 0.9,
    "heart": 0.95,
    "crescent": 0.65,
    "arrow": 0.9,
}
_TYPE_WORDS: dict[str, list[str]] = {
    "photo": ["photo", "photo", "photograph", "picture"],
    "painting": ["painting", "painting", "oil painting", "artwork"],
    "cartoon": ["cartoon", "cartoon", "clipart", "illustration"],
    "sketch": ["sketch", "sketch", "pencil drawing", "drawing"],
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(f: Factors, i: int, rng: np.random.Generator) -> str:
    """One noisy caption for image ``i`` of ``f``.

    Attributes are dropped at random, their order changes, a fraction of captions
    do not name the class at all (more often for "rare" class names), and the
    rendering domain is named with synonyms.
    """
    cls = CLASSNAMES[f.shape[i]]
    color = COLORS[f.color[i]]
    size = SIZES[f.size[i]]
    itype = IMAGE_TYPES[f.image_type[i]]
    style = ART_STYLES[f.art_style[i]]
    bgp = BACKGROUND_PHRASES[BACKGROUNDS[f.background[i]]]
    tword = _TYPE_WORDS[itype][rng.integers(0, 4)]
    name_it = rng.random() < CLASS_NAME_RATE[cls]
    noun = cls if name_it else ["shape", "thing", "object", "figure"][rng.integers(0, 4)]
    adjs = [a for a, p in ((size, 0.45), (color, 0.6)) if rng.random() < p]
    if len(adjs) == 2 and rng.random() < 0.3:
        adjs.reverse()
    np_ = " ".join(adjs + [noun])
    art = _article(np_)
    sart = _article(style)
    form = rng.integers(0, 9)
    if form == 0:
        text = f"{art} {np_}"
    elif form == 1:
        text = f"a {tword} of {art} {np_}"
    elif form == 2:
        text = f"{sart} {style} {tword} of {art} {np_}"
    elif form == 3:
        text = f"{np_} {bgp}"
    elif form == 4:
        text = f"{art} {np_}, {tword}"
    elif form == 5:
        text = f"{tword}: {np_} {bgp}"
    elif form == 6:
        text = f"{art} {np_} in a {style} style"
    elif form == 7:
        text = f"{np_}"
    else:
        text = f"my {tword} of {art} {np_} {bgp}"
    if rng.random() < 0.4:  # alt-text sometimes ends with a full stop, as prompts do
        text += "."
    return text


def captions(f: Factors, rng: np.random.Generator) -> list[str]:
    return [caption(f, i, rng) for i in range(len(f))]


# --------------------------------------------------------------------------- splits


class ShapeWorldSplit(LabeledSplit):
    """A rendered split: images are generated once, kept as a uint8 array."""

    def __init__(self, factors: Factors, image_size: int, name: str, world_seed: int) -> None:
        self.factors = factors
        self.image_size = image_size
        self.images = render(factors, image_size)
        self.labels = np.asarray(factors.shape, dtype=np.int64)
        self.domains = np.asarray([IMAGE_TYPES[t] for t in factors.image_type])
        self.name = name
        self.world_seed = world_seed

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"shapeworld:{self.name}:{self.image_size}:{self.world_seed}".encode())
        h.update(self.images.tobytes())
        return h.hexdigest()[:16]


def _balanced_classes(n_per_class: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.repeat(np.arange(len(CLASSNAMES)), n_per_class)
    return classes[rng.permutation(len(classes))]


def load_shapeworld(
    *,
    train_domains: Sequence[str] = ("photo",),
    image_size: int = 32,
    seed: int = 0,
    spurious_color: float = 0.0,
    train_per_class: int = 32,
    val_per_class: int = 16,
    test_per_class: int = 50,
    templates: Sequence[str] | None = None,
) -> DatasetSpec:
    """The ShapeWorld few-shot task as a :class:`DatasetSpec`.

    Args:
        train_domains: rendering domains of the train / val / in-distribution test
            splits; every other domain becomes an out-of-distribution test split.
        image_size: output resolution (32 for ``shapeworld-tiny``, 224 for real CLIPs).
        seed: the world seed: the same seed gives the same images.
        spurious_color: in the train and val pools, probability that an object has
            its class's colour ``COLORS[class % 10]``; the test splits are never
            correlated, so a classifier that learnt colour pays for it at test time.
        train_per_class, val_per_class, test_per_class: pool sizes per class.
        templates: prompt templates (default :data:`DEFAULT_TEMPLATES`).
    """
    train_domains = list(train_domains)
    _index(IMAGE_TYPES, train_domains, "image type")
    if not train_domains:
        raise ValueError(f"train_domains is empty; pass at least one of {IMAGE_TYPES}.")
    if not 0.0 <= spurious_color <= 1.0:
        raise ValueError(f"spurious_color={spurious_color} must be a probability in [0, 1].")
    ss = np.random.SeedSequence([seed, 20231])
    r_train, r_val, r_test, r_ood = (np.random.default_rng(x) for x in ss.spawn(4))

    def make(
        rng: np.random.Generator, n: int, domains: Sequence[str], spur: float, name: str
    ) -> ShapeWorldSplit:
        f = sample_factors(
            n * len(CLASSNAMES),
            rng,
            classes=_balanced_classes(n, rng),
            image_types=domains,
            spurious_color=spur,
        )
        return ShapeWorldSplit(f, image_size, name, seed)

    train = make(r_train, train_per_class, train_domains, spurious_color, "train")
    val = make(r_val, val_per_class, train_domains, spurious_color, "val")
    test = make(r_test, test_per_class, train_domains, 0.0, "test")
    ood = {
        d: make(r_ood, test_per_class, [d], 0.0, f"test:{d}")
        for d in IMAGE_TYPES
        if d not in train_domains
    }
    return DatasetSpec(
        name="shapeworld",
        classnames=list(CLASSNAMES),
        templates=list(templates) if templates is not None else list(DEFAULT_TEMPLATES),
        train=train,
        val=val,
        test=test,
        ood_test=ood,
        info={
            "train_domains": train_domains,
            "ood_domains": list(ood),
            "spurious_color": spurious_color,
            "image_size": image_size,
            "seed": seed,
        },
    )
