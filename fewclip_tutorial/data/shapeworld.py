"""ShapeWorld: a generated image world with known content and style factors.

Content is a shape (or, for one benchmark, a fill pattern).  Style is a set of named
factors (colour, size, image type / rendering domain, art style, background, position,
rotation), so
prompts can be built from them: the factor names deliberately match CLAP's prompt
attributes ``"a [art style] [image type] of a [object size] [object color] [class]"``.

Everything is deterministic from a seed and vectorised with numpy: a batch of
images is rendered at once, several thousand 32 px images per second on one core,
at any resolution (32 px for ``shapeworld-tiny``, 224 px for a real CLIP on Colab).

The world also writes the captions ``shapeworld-tiny`` was pretrained on: generated
from the factors with varied templates and realistic noise (attributes dropped,
order changed, some captions not naming the object).  Captions speak an *everyday*
vocabulary ("oval", "moon", "plus sign", "star", "heart") that is not always the vocabulary
a benchmark uses ("ellipse", "crescent", "cross", "pentagram", "cardioid"), always name the
rendering style ("a photo of ...", "a sketch of ..."), and mention fill patterns only
rarely and with synonyms.  Photos dominate pretraining (90.5%); paintings, cartoons and
sketches are rare (2-4% each) and blueprints almost absent (0.5%).  This is the regime
real CLIP lives in: image features that know more than the class names tell the text
prior, and shifted domains that are rarer than the training one.  :data:`TASKS` turns the
one world into a suite of few-shot benchmarks that span that regime (see
:func:`load_shapeworld`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fewclip_tutorial.data.base import DatasetSpec, LabeledSplit

# --------------------------------------------------------------------------- factors

#: Every shape the world draws (its *content* factor), by formal name.
SHAPES: list[str] = [
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
SIZE_RADIUS: dict[str, float] = {"large": 0.40, "normal sized": 0.32, "small": 0.25}
#: Fill patterns (a texture factor), drawn on the object in shape-local coordinates.
PATTERNS: list[str] = ["plain", "striped", "dotted", "checkered"]
#: How often each pattern is drawn, in pretraining and in every split (plain objects dominate).
PATTERN_PROBS: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
#: Objects are rotated uniformly in [-MAX_ROTATION, MAX_ROTATION] radians (about +-30 degrees):
#: upright-ish, as objects in photos are.  Full rotations made shape recognition too slow to
#: learn for a model trained on two CPU cores (see the appendix).
MAX_ROTATION: float = np.pi / 6
IMAGE_TYPES: list[str] = ["photo", "painting", "cartoon", "sketch", "blueprint"]
DOMAINS = IMAGE_TYPES
#: The domains a shape benchmark tests out of distribution by default (``blueprint``, almost
#: absent from pretraining, is a task of its own: ``shapeworld-blueprint``).
SHIFT_DOMAINS: list[str] = ["painting", "cartoon", "sketch"]
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


@dataclass
class Factors:
    """The factors of a batch of ``B`` images, as index arrays of shape ``(B,)``."""

    shape: np.ndarray  # index into SHAPES
    color: np.ndarray
    size: np.ndarray
    image_type: np.ndarray
    art_style: np.ndarray
    background: np.ndarray
    cx: np.ndarray  # centre, fraction of the image width
    cy: np.ndarray
    rotation: np.ndarray  # radians
    radius: np.ndarray  # fraction of the image width
    pattern: np.ndarray  # index into PATTERNS
    seed: np.ndarray  # noise seed; a render chunk seeds its noise from its first image

    def __len__(self) -> int:
        return int(len(self.shape))

    def take(self, idx: np.ndarray) -> Factors:
        return Factors(**{k: np.asarray(v)[idx] for k, v in self.__dict__.items()})

    def describe(self, i: int) -> dict[str, str]:
        """Human-readable factor names of image ``i``."""
        return {
            "shape": SHAPES[self.shape[i]],
            "pattern": PATTERNS[self.pattern[i]],
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
    patterns: np.ndarray | None = None,
) -> Factors:
    """Draw ``n`` factor tuples.

    Args:
        classes: ``(n,)`` shape indices into :data:`SHAPES` (balanced sampling is the
            caller's job); drawn uniformly when ``None``.  Same as ``shapes``.
        image_types: rendering domains to draw from (default: all).
        image_type_probs: their probabilities (default: uniform).
        spurious_color: probability that an image's colour is its shape's
            "spurious" colour ``COLORS[shape % 10]`` instead of a uniform draw.
        patterns: ``(n,)`` pattern indices into :data:`PATTERNS`; drawn with
            :data:`PATTERN_PROBS` when ``None``.
    """
    if classes is None:
        classes = rng.integers(0, len(SHAPES), n)
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
    image_type = types[rng.choice(len(types), n, p=p)]
    art_style = rng.integers(0, len(ART_STYLES), n)
    background = rng.integers(0, len(BACKGROUNDS), n)
    rotation = rng.uniform(-MAX_ROTATION, MAX_ROTATION, n)
    if patterns is None:
        pattern = rng.choice(len(PATTERNS), n, p=np.asarray(PATTERN_PROBS))
    else:
        pattern = np.asarray(patterns, dtype=np.int64)
        if pattern.shape != (n,):
            raise ValueError(f"patterns must have shape ({n},), got {pattern.shape}.")
    return Factors(
        shape=classes,
        color=color,
        size=size,
        image_type=image_type,
        art_style=art_style,
        background=background,
        cx=cx,
        cy=cy,
        rotation=rotation,
        radius=radius,
        pattern=pattern,
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
    name = SHAPES[k]
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
    * ``cartoon``: flat saturated fill with a thin outline in a darker tone, on a two-tone
      comic-panel background;
    * ``sketch``: a wobbly, broken graphite line and light hatching on paper, colour only
      as a faint tint;
    * ``blueprint``: a white line on blue paper with a grid.

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
    d_px = (d * r * s).astype(np.float32)  # signed distance in pixels (approximately)
    pat = _pattern_mask(f.pattern, u, v, r * s)

    img = np.empty((b, s, s, 3), dtype=np.float32)
    for t in np.unique(f.image_type):
        m = f.image_type == t
        img[m] = _render_domain(
            IMAGE_TYPES[int(t)],
            f.take(np.flatnonzero(m)),
            d_px[m],
            u[m],
            v[m],
            X[m],
            Y[m],
            rng,
            pat[m],
        )
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _pattern_mask(
    pattern: np.ndarray, u: np.ndarray, v: np.ndarray, r_px: np.ndarray
) -> np.ndarray:
    """Where the fill pattern darkens or lightens the object: ``(b, s, s)`` in [0, 1].

    Drawn in shape-local coordinates (units of the radius), so it turns with the object;
    periods of 0.6-0.75 radius keep stripes, dots and checks at least 5 px apart even for
    small objects at 32 px (the image tower's stem downsamples by 4).  ``r_px`` is the radius in pixels, ``(b, 1, 1)``.
    """
    f32 = np.float32
    out = np.zeros(u.shape, dtype=f32)
    for k in np.unique(pattern):
        name = PATTERNS[int(k)]
        m = pattern == k
        uu, vv, rp = u[m], v[m], r_px[m]
        if name == "striped":
            out[m] = np.clip(0.5 + 2.0 * np.sin(2 * np.pi * (uu + 0.3 * vv) / 0.7), 0, 1)
        elif name == "dotted":
            du = (uu % 0.75) - 0.375
            dv = (vv % 0.75) - 0.375
            dist = np.sqrt(du * du + dv * dv)
            out[m] = np.clip((0.22 - dist) * rp + 0.5, 0, 1)
        elif name == "checkered":
            parity = (np.floor(uu / 0.6) + np.floor(vv / 0.6)) % 2
            out[m] = parity.astype(f32)
    return out


def _apply_pattern(fill: np.ndarray, pat: np.ndarray, strength: float = 0.65) -> np.ndarray:
    """Mix a contrasting tone (dark on light fills, light on dark ones) into ``fill``."""
    lum = (fill * np.array([0.3, 0.59, 0.11], dtype=np.float32)).sum(-1, keepdims=True)
    tone = np.where(lum > 0.45, np.float32(0.08), np.float32(0.95))
    a = strength * pat[..., None]
    return fill * (1 - a) + tone * a


def _render_domain(
    domain: str,
    f: Factors,
    d_px: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    rng: np.random.Generator,
    pat: np.ndarray | None = None,
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
    if pat is not None and pat.any():
        fill = _apply_pattern(fill, pat)
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
        # a soft cast shadow, so that an object of the background's colour still has an edge
        k = max(1, round(s / 16))  # 2 px at 32 px
        shadow = np.clip(np.roll(d_px, (k, k), axis=(1, 2)) / 2.0 + 0.5, 0, 1)[..., None]
        bg_img = bg_img * (1 - 0.45 * shadow)
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
        # a comic-panel background: two flat tones split by a random wavy line, whose edge
        # competes with the object's
        phase = rng.uniform(0, 2 * np.pi, b)[:, None, None]
        tilt = rng.uniform(-0.6, 0.6, b)[:, None, None]
        split = (Y - 0.5 - tilt * (X - 0.5) - 0.12 * np.sin(X * 9 + phase)) > 0
        tone = np.where(split[..., None], 0.6 * bg + 0.4, 0.85 * (0.6 * bg + 0.4))
        bg_img = np.broadcast_to(tone, (b, s, s, 3))
        # a thin outline in a darker tone of the fill: no high-contrast black edge for free
        outline_w, line_col = 0.6, 0.55 * fill_img
    elif domain == "blueprint":
        paper = np.array([0.10, 0.26, 0.58], dtype=f32)
        grid = ((np.abs(((X * s) % 8) - 4) < 0.5) | (np.abs(((Y * s) % 8) - 4) < 0.5))[..., None]
        bg_img = np.broadcast_to(paper, (b, s, s, 3)) + 0.12 * grid.astype(f32)
        fill_img = bg_img + 0.12 * (fill - 0.5)  # colour survives only as a faint tint
        outline_w, line_col, noise_std = 0.6, np.float32(0.92), 0.02
    else:  # sketch
        paper = np.array([0.95, 0.94, 0.90], dtype=f32)
        grain = 0.05 * _smooth_noise(rng, b, s, 8)[..., None]
        bg_img = np.broadcast_to(0.92 * paper + 0.08 * bg, (b, s, s, 3)) + grain
        # hatching in a random direction per drawing, light, as a pencil shades
        angle = rng.uniform(0, np.pi, b)[:, None, None]
        hatch = np.sin((X * np.cos(angle) + Y * np.sin(angle))[..., None] * s * 2.2) > 0.4
        fill_img = bg_img * (1 - 0.25 * hatch) + 0.25 * hatch * (0.3 * fill + 0.7 * 0.45)
        # a hand-drawn line: it wobbles by about a pixel, breaks off in places, and is
        # graphite grey with only a trace of the object's colour
        d_px = d_px + 1.2 * _smooth_noise(rng, b, s, 3)
        strokes = np.clip(2.5 * _smooth_noise(rng, b, s, 5) + 0.9, 0, 1)[..., None]
        outline_w, noise_std = 0.55, 0.02
        line_col = 0.85 * np.float32(0.4) + 0.15 * fill
    if impress.any():
        blotch = 0.1 * _smooth_noise(rng, b, s, 8)[..., None]
        fill_img = np.where(impress, np.clip(fill_img + blotch, 0, 1), fill_img)
    alpha = np.clip(d_px / edge + 0.5, 0, 1)[..., None]
    img = alpha * fill_img + (1 - alpha) * bg_img
    if outline_w > 0:
        line = np.clip(outline_w + 0.5 - np.abs(d_px), 0, 1)[..., None]
        if domain == "sketch":
            line = line * strokes
        img = line * line_col + (1 - line) * img
    img = img + noise_std * rng.standard_normal((b, s, s, 3), dtype=f32)
    return img.astype(f32)


# --------------------------------------------------------------------------- captions

#: The everyday words captions use for each shape, with their probabilities.  Some match
#: the formal name in :data:`SHAPES`; some never do (an ellipse is always an "oval", a
#: crescent a "moon", a cross a "plus sign"; a star is never a "pentagram", a heart never a
#: "cardioid").
CAPTION_NAMES: dict[str, tuple[tuple[str, float], ...]] = {
    "circle": (("circle", 1.0),),
    "ellipse": (("oval", 1.0),),
    "triangle": (("triangle", 0.85), ("three-sided shape", 0.15)),
    "square": (("square", 0.85), ("four-sided shape", 0.15)),
    "pentagon": (("pentagon", 0.7), ("five-sided shape", 0.3)),
    "hexagon": (("hexagon", 0.7), ("six-sided shape", 0.3)),
    "octagon": (("octagon", 0.5), ("stop sign", 0.3), ("eight-sided shape", 0.2)),
    "star": (("star", 1.0),),
    "cross": (("plus sign", 0.7), ("plus", 0.3)),
    "heart": (("heart", 1.0),),
    "crescent": (("moon", 0.75), ("half moon", 0.25)),
    "arrow": (("arrow", 1.0),),
}
#: Probability that a caption names the object at all (else "shape", "thing", ...).
OBJECT_NAME_RATE: float = 0.9
#: Words for the fill patterns, and how rarely captions mention one: alt-text seldom
#: describes texture, and uses synonyms when it does.
PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid"),
    "striped": ("striped", "stripy", "pinstriped"),
    "dotted": ("dotted", "polka-dot", "spotted"),
    "checkered": ("checkered", "checked", "chequered"),
}
PATTERN_NAME_RATE: dict[str, float] = {
    "plain": 0.05,
    "striped": 0.3,
    "dotted": 0.3,
    "checkered": 0.3,
}
#: Probability that a caption names the rendering style ("a photo of ..."): always, so a
#: bare class name is a prompt unlike any caption (the prompt sensitivity CLAP addresses).
STYLE_NAME_RATE: float = 1.0
_TYPE_WORDS: dict[str, list[str]] = {
    "photo": ["photo", "photo", "photograph", "picture"],
    "painting": ["painting", "painting", "oil painting", "artwork"],
    "cartoon": ["cartoon", "cartoon", "clipart", "illustration"],
    "sketch": ["sketch", "sketch", "pencil drawing", "drawing"],
    "blueprint": ["blueprint", "blueprint", "technical drawing", "schematic"],
}


#: The seven phrasings of a caption that names the rendering style (``tword``).
_STYLED_FORMS: tuple[str, ...] = (
    "a {tword} of {art} {np}",
    "{sart} {style} {tword} of {art} {np}",
    "{art} {np}, {tword}",
    "{tword}: {np} {bgp}",
    "my {tword} of {art} {np} {bgp}",
    "{tword} of {art} {np}",
    "{art} {np} in a {style} style, {tword}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: tuple[tuple[str, float], ...]) -> str:
    if len(options) == 1:
        return options[0][0]
    p = np.array([w for _, w in options], dtype=float)
    return options[int(rng.choice(len(options), p=p / p.sum()))][0]


def caption(f: Factors, i: int, rng: np.random.Generator) -> str:
    """One noisy caption for image ``i`` of ``f``.

    The object is named with an everyday word (:data:`CAPTION_NAMES`) or, in one caption
    in ten, not at all; size, colour and pattern adjectives are dropped at random and
    their order changes; the rendering style is always named, in one of seven phrasings.
    """
    shape = SHAPES[f.shape[i]]
    color = COLORS[f.color[i]]
    size = SIZES[f.size[i]]
    itype = IMAGE_TYPES[f.image_type[i]]
    style = ART_STYLES[f.art_style[i]]
    pattern = PATTERNS[f.pattern[i]]
    bgp = BACKGROUND_PHRASES[BACKGROUNDS[f.background[i]]]
    tword = _TYPE_WORDS[itype][rng.integers(0, 4)]
    if rng.random() < OBJECT_NAME_RATE:
        noun = _pick(rng, CAPTION_NAMES[shape])
    else:
        noun = ["shape", "thing", "object", "figure"][rng.integers(0, 4)]
    pword = PATTERN_WORDS[pattern][rng.integers(0, len(PATTERN_WORDS[pattern]))]
    adjs = [
        a
        for a, p in ((size, 0.45), (color, 0.6), (pword, PATTERN_NAME_RATE[pattern]))
        if rng.random() < p
    ]
    if len(adjs) >= 2 and rng.random() < 0.3:
        adjs.reverse()
    np_ = " ".join(adjs + [noun])
    art = _article(np_)
    sart = _article(style)
    if rng.random() < STYLE_NAME_RATE:
        form = _STYLED_FORMS[rng.integers(0, len(_STYLED_FORMS))]
        text = form.format(tword=tword, art=art, np=np_, sart=sart, style=style, bgp=bgp)
    else:
        text = f"{art} {np_} {bgp}" if rng.random() < 0.5 else f"{art} {np_}"
    if rng.random() < 0.4:  # alt-text sometimes ends with a full stop, as prompts do
        text += "."
    return text


def captions(f: Factors, rng: np.random.Generator) -> list[str]:
    return [caption(f, i, rng) for i in range(len(f))]


# --------------------------------------------------------------------------- splits


class ShapeWorldSplit(LabeledSplit):
    """A rendered split: images are generated once, kept as a uint8 array.

    ``labels`` are the task's labels (``(N,)`` int64); ``factors`` keeps every factor.
    """

    def __init__(
        self,
        factors: Factors,
        image_size: int,
        name: str,
        world_seed: int,
        labels: np.ndarray | None = None,
        task: str = "shapeworld",
    ) -> None:
        self.factors = factors
        self.image_size = image_size
        self.images = render(factors, image_size)
        self.labels = np.asarray(factors.shape if labels is None else labels, dtype=np.int64)
        self.domains = np.asarray([IMAGE_TYPES[t] for t in factors.image_type])
        self.name = name
        self.world_seed = world_seed
        self.task = task

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"{self.task}:{self.name}:{self.image_size}:{self.world_seed}".encode())
        h.update(self.images.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------- tasks

#: The ten shapes of the shape benchmarks: visually distinct at 32 px (hexagon and octagon,
#: a pixel away from a circle when small, are left to the fine-grained task).
MAIN_SHAPES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "triangle",
    "square",
    "pentagon",
    "star",
    "cross",
    "heart",
    "crescent",
    "arrow",
)
#: Formal (geometry-book) names, as a benchmark would write them; five of the ten main shapes'
#: formal names (ellipse, pentagram, cross, cardioid, crescent) never occur in a caption.
FORMAL_NAMES: dict[str, str] = {s: s for s in SHAPES} | {"star": "pentagram", "heart": "cardioid"}
#: The captions' most frequent word for each shape.
EVERYDAY_NAMES: dict[str, str] = {s: CAPTION_NAMES[s][0][0] for s in SHAPES}


def _style_templates(suffix: str = "") -> tuple[str, ...]:
    return tuple(f"a {t} of a {{}}{suffix}." for t in IMAGE_TYPES[:4]) + (f"a {{}}{suffix}.",)


@dataclass(frozen=True)
class Task:
    """One few-shot benchmark cut from the world.

    Attributes:
        name: registry name (``load_dataset(name)``).
        label_factor: the factor that is the class: ``"shape"`` or ``"pattern"``.
        values: the factor values of the ``C`` classes, in label order.
        classnames: the benchmark's ``C`` class names (what the text encoder is asked).
        train_domains: domains of the train, val and in-distribution test splits.
        ood_domains: one out-of-distribution test split each.
        templates: the benchmark's zero-shot prompt templates.
        regime: one line on what the task stands for.
    """

    name: str
    label_factor: str
    values: tuple[str, ...]
    classnames: tuple[str, ...]
    train_domains: tuple[str, ...]
    ood_domains: tuple[str, ...]
    templates: tuple[str, ...]
    regime: str

    @property
    def factor_names(self) -> list[str]:
        return SHAPES if self.label_factor == "shape" else PATTERNS


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "shapeworld",
            "shape",
            MAIN_SHAPES,
            tuple(FORMAL_NAMES[s] for s in MAIN_SHAPES),
            ("photo",),
            tuple(SHIFT_DOMAINS),
            _style_templates(),
            "main target: formal class names, five of which the captions never use "
            "(the regime of EuroSAT or FGVC-Aircraft for real CLIP)",
        ),
        Task(
            "shapeworld-everyday",
            "shape",
            MAIN_SHAPES,
            tuple(EVERYDAY_NAMES[s] for s in MAIN_SHAPES),
            ("photo",),
            tuple(SHIFT_DOMAINS),
            _style_templates(),
            "strong-prior control: the same images, named in the captions' own words "
            "(the regime of ImageNet for real CLIP)",
        ),
        Task(
            "shapeworld-polygons",
            "shape",
            ("triangle", "square", "pentagon", "hexagon", "octagon"),
            (
                "three-sided shape",
                "four-sided shape",
                "five-sided shape",
                "six-sided shape",
                "eight-sided shape",
            ),
            ("photo",),
            tuple(SHIFT_DOMAINS),
            _style_templates(),
            "fine-grained: polygons named by their number of sides, a phrasing captions "
            "use in one case in five or fewer",
        ),
        Task(
            "shapeworld-patterns",
            "pattern",
            tuple(PATTERNS),
            tuple(PATTERNS),
            ("photo",),
            tuple(SHIFT_DOMAINS),
            _style_templates(" shape"),
            "texture: fill patterns, which captions mention rarely and with synonyms "
            "(the regime of DTD)",
        ),
        Task(
            "shapeworld-blueprint",
            "shape",
            MAIN_SHAPES,
            tuple(EVERYDAY_NAMES[s] for s in MAIN_SHAPES),
            ("blueprint",),
            (),
            tuple(f"a {t} of a {{}}." for t in ("blueprint", "photo", "sketch")) + ("a {}.",),
            "a domain almost absent from pretraining (0.5% of its images), everyday names",
        ),
    ]
}


def list_tasks() -> list[str]:
    """Names of the ShapeWorld benchmarks, main target first."""
    return list(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"Unknown ShapeWorld task {name!r}.{hint} Tasks: {', '.join(TASKS)}.")
    return TASKS[name]


#: Zero-shot prompt templates for ShapeWorld.  They carry style words (rendering
#: domain, colour, size, ...), so FD-Align's spurious prototypes (one per template)
#: correspond to the world's known style factors.
TEMPLATES: list[str] = (
    [f"a {t} of a {{}}." for t in IMAGE_TYPES]
    + [f"a {c} {{}}." for c in COLORS]
    + [f"a {s} {{}}." for s in SIZES]
    + [
        f"{'an' if a[0] in 'aeiou' else 'a'} {a} {t} of a {{}}."
        for a in ART_STYLES
        for t in IMAGE_TYPES[:4]
    ]
    + [f"a {{}} {BACKGROUND_PHRASES[b]}." for b in BACKGROUNDS]
    + ["a {}.", "a picture of a {}.", "a drawing of a {}.", "a {} shape."]
)


def task_factors(
    task: Task,
    labels: np.ndarray,
    rng: np.random.Generator,
    domains: Sequence[str],
    spurious_color: float = 0.0,
) -> Factors:
    """Factors of images whose task labels are ``labels`` ``(n,)``, in ``domains``.

    The other factors are drawn as in pretraining; a pattern task draws its shapes from
    :data:`MAIN_SHAPES`.  ``spurious_color`` ties an image's colour to its *label*.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    world_idx = np.array([task.factor_names.index(v) for v in task.values])[labels]
    main = np.array([SHAPES.index(s) for s in MAIN_SHAPES])
    if task.label_factor == "shape":
        f = sample_factors(n, rng, classes=world_idx, image_types=domains)
    else:
        shapes = main[rng.integers(0, len(main), n)]
        f = sample_factors(n, rng, classes=shapes, image_types=domains, patterns=world_idx)
    if spurious_color > 0:
        tied = rng.random(n) < spurious_color
        f.color = np.where(tied, labels % len(COLORS), f.color)
    return f


def _balanced(n_classes: int, n_per_class: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.repeat(np.arange(n_classes), n_per_class)
    return classes[rng.permutation(len(classes))]


def load_shapeworld(
    *,
    task: str = "shapeworld",
    train_domains: Sequence[str] | None = None,
    ood_domains: Sequence[str] | None = None,
    image_size: int = 32,
    seed: int = 0,
    spurious_color: float = 0.0,
    train_per_class: int = 128,
    val_per_class: int = 16,
    test_per_class: int = 200,
    templates: Sequence[str] | None = None,
    classnames: Sequence[str] | None = None,
) -> DatasetSpec:
    """A ShapeWorld benchmark (default: the main target) as a :class:`DatasetSpec`.

    Args:
        task: a name of :data:`TASKS` (``list_tasks()``).
        train_domains: rendering domains of the train / val / in-distribution test
            splits (default: the task's).
        ood_domains: one out-of-distribution test split each (default: the task's when
            ``train_domains`` is the task's, else every shifted domain not trained on).
        image_size: output resolution (32 for ``shapeworld-tiny``, 224 for real CLIPs).
        seed: the world seed: the same seed gives the same images.
        spurious_color: in the train and val pools, probability that an object has
            its class's colour ``COLORS[label % 10]``; the test splits are never
            correlated, so a classifier that learnt colour pays for it at test time.
        train_per_class, val_per_class, test_per_class: pool sizes per class (the train
            pool bounds the shots; 200 test images per class make one image 0.05 points
            with ten classes).
        templates: prompt templates (default: the task's).
        classnames: rename the classes (default: the task's benchmark names).
    """
    t = get_task(task)
    if train_domains is None:
        train_domains = list(t.train_domains)
        default_ood = list(t.ood_domains)
    else:
        train_domains = list(train_domains)
        default_ood = [d for d in SHIFT_DOMAINS + ["photo"] if d not in train_domains]
    _index(IMAGE_TYPES, train_domains, "image type")
    if not train_domains:
        raise ValueError(f"train_domains is empty; pass at least one of {IMAGE_TYPES}.")
    ood_domains = default_ood if ood_domains is None else list(ood_domains)
    _index(IMAGE_TYPES, ood_domains, "image type")
    if set(ood_domains) & set(train_domains):
        raise ValueError(
            f"ood_domains {ood_domains} overlap train_domains {train_domains}; an "
            "out-of-distribution split must use a domain the task does not train on."
        )
    if not 0.0 <= spurious_color <= 1.0:
        raise ValueError(f"spurious_color={spurious_color} must be a probability in [0, 1].")
    for what, n in (("train", train_per_class), ("test", test_per_class)):
        if n < 1:
            raise ValueError(f"{what}_per_class={n} must be at least 1.")
    names = list(t.classnames) if classnames is None else list(classnames)
    if len(names) != len(t.values):
        raise ValueError(
            f"classnames has {len(names)} names but task {t.name!r} has {len(t.values)} "
            f"classes ({', '.join(t.values)})."
        )
    n_cls = len(t.values)
    ss = np.random.SeedSequence([seed, 20231, *t.name.encode()])
    r_train, r_val, r_test, r_ood = (np.random.default_rng(x) for x in ss.spawn(4))

    def make(
        rng: np.random.Generator, n: int, domains: Sequence[str], spur: float, name: str
    ) -> ShapeWorldSplit:
        labels = _balanced(n_cls, n, rng)
        f = task_factors(t, labels, rng, domains, spur)
        return ShapeWorldSplit(f, image_size, name, seed, labels=labels, task=t.name)

    train = make(r_train, train_per_class, train_domains, spurious_color, "train")
    val = (
        make(r_val, val_per_class, train_domains, spurious_color, "val")
        if val_per_class > 0
        else None
    )
    test = make(r_test, test_per_class, train_domains, 0.0, "test")
    ood = {d: make(r_ood, test_per_class, [d], 0.0, f"test:{d}") for d in ood_domains}
    return DatasetSpec(
        name=t.name,
        classnames=names,
        templates=list(templates) if templates is not None else list(t.templates),
        train=train,
        val=val,
        test=test,
        ood_test=ood,
        info={
            "task": t.name,
            "label_factor": t.label_factor,
            "factor_values": list(t.values),
            "regime": t.regime,
            "train_domains": train_domains,
            "ood_domains": list(ood),
            "spurious_color": spurious_color,
            "image_size": image_size,
            "seed": seed,
            # objects are upright within +-30 degrees, so a mirrored arrow or crescent points
            # where no image of the world does: augmented views must not flip
            "hflip_invariant": False,
        },
    )
