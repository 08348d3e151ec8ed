"""CLAP's structured prompts and the paper's prompt augmentations (Cai et al., ECCV 2024).

A prompt ``"a [art style] [image type] of a [size] [colour] [class]"`` is kept as
structure (:class:`PromptAttributes`), so the augmentations (OSD, OCD, ITD, ASD, SPO) act
on attributes, not on text.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from fewclip_tutorial.data import shapeworld as sw

__all__ = [
    "AUGMENTATIONS",
    "PAPER_ART_STYLES",
    "PAPER_COLORS",
    "PAPER_IMAGE_TYPES",
    "PAPER_SIZES",
    "AugmentConfig",
    "PromptAttributes",
    "augment_prompt",
    "augment_structure",
    "clap_prompts",
    "dataset_factors",
    "delete_art_style",
    "delete_color",
    "delete_image_type",
    "delete_size",
    "swap_order",
]

#: Object colours and sizes of the paper's prompt set (ShapeWorld was built with the same lists).
PAPER_COLORS: tuple[str, ...] = tuple(sw.COLORS)
PAPER_SIZES: tuple[str, ...] = tuple(sw.SIZES)
#: Image types of the paper's prompt set.
PAPER_IMAGE_TYPES: tuple[str, ...] = (
    "painting", "sketch", "cartoon", "clipart", "photograph", "infograph", "mosaic art", "sculpture",
)  # fmt: skip
#: Art styles of the paper's prompt set (10 x 3 x 8 x 2 = 480 prompts per class).
PAPER_ART_STYLES: tuple[str, ...] = tuple(sw.ART_STYLES)


# ----------------------------------------------------------------------------- prompts


def _article(phrase: str) -> str:
    """``"an"`` before a vowel letter, else ``"a"``."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _clean(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"PromptAttributes.{what} must be a string or None, got {value!r}.")
    value = " ".join(value.split())
    return value or None


@dataclass(frozen=True)
class PromptAttributes:
    """A CLAP prompt kept as structure, so augmentations act on attributes, not on text.

    Rendered (:meth:`render`) as ``"a [art style] [image type] of a [size] [colour] [class]"``
    or, once swapped by SPO, ``"a [size] [colour] [class] in [art style] [image type] style"``.
    Missing attributes (``None``) are left out; articles become ``"an"`` before a vowel.
    If the image type was deleted but an art style remains, the unswapped form uses the
    neutral noun ``"image"`` (``"a realistic image of a red circle"``) to stay grammatical.

    Attributes:
        classname: the class name (never removed by any augmentation).
        size, color, image_type, art_style: style attributes, ``None`` when absent.
        swapped: ``True`` after SPO (swapping prompt order).
    """

    classname: str
    size: str | None = None
    color: str | None = None
    image_type: str | None = None
    art_style: str | None = None
    swapped: bool = False

    def __post_init__(self) -> None:
        name = _clean(self.classname, "classname")
        if not name:
            raise ValueError("PromptAttributes needs a non-empty classname; pass e.g. 'circle'.")
        object.__setattr__(self, "classname", name)
        for attr in ("size", "color", "image_type", "art_style"):
            object.__setattr__(self, attr, _clean(getattr(self, attr), attr))

    def object_phrase(self) -> str:
        """``"[size] [colour] [class]"`` without the article."""
        return " ".join(w for w in (self.size, self.color, self.classname) if w)

    def render(self) -> str:
        """The prompt as text (single spaces, never empty, always contains the class name)."""
        obj = self.object_phrase()
        obj_np = f"{_article(obj)} {obj}"
        if self.image_type is None and self.art_style is None:
            return obj_np
        if self.swapped:
            medium = " ".join(w for w in (self.art_style, self.image_type) if w)
            return f"{obj_np} in {medium} style"
        medium = " ".join(w for w in (self.art_style, self.image_type or "image") if w)
        return f"{_article(medium)} {medium} of {obj_np}"

    def __str__(self) -> str:
        return self.render()


def _factor_values(values: Sequence[str] | None) -> list[str | None]:
    """An empty or ``None`` factor list means "factor absent" (a single ``None``)."""
    if values is None or len(values) == 0:
        return [None]
    if isinstance(values, str):
        raise TypeError(f"factor lists must be sequences of strings, got the string {values!r}.")
    return list(values)


def clap_prompts(
    classname: str,
    colors: Sequence[str] | None = PAPER_COLORS,
    sizes: Sequence[str] | None = PAPER_SIZES,
    image_types: Sequence[str] | None = PAPER_IMAGE_TYPES,
    art_styles: Sequence[str] | None = PAPER_ART_STYLES,
) -> list[PromptAttributes]:
    """All prompts ``"a [art style] [image type] of a [size] [colour] [class]"`` for one class.

    The product of the factor lists, ordered art style > image type > size > colour
    (480 prompts per class with the paper's lists).  An empty list drops that factor.
    ShapeWorld passes its own lists (``shapeworld.COLORS``, ``SIZES``, ``IMAGE_TYPES``,
    ``ART_STYLES``).
    """
    out = []
    for style, itype, size, color in itertools.product(
        _factor_values(art_styles),
        _factor_values(image_types),
        _factor_values(sizes),
        _factor_values(colors),
    ):
        out.append(
            PromptAttributes(classname, size=size, color=color, image_type=itype, art_style=style)
        )
    return out


# ----------------------------------------------------------------------------- augmentations


def delete_size(p: PromptAttributes) -> PromptAttributes:
    """OSD, object size deletion: drop the ``size`` attribute."""
    return replace(p, size=None)


def delete_color(p: PromptAttributes) -> PromptAttributes:
    """OCD, object colour deletion: drop the ``color`` attribute."""
    return replace(p, color=None)


def delete_image_type(p: PromptAttributes) -> PromptAttributes:
    """ITD, image type deletion: drop the ``image_type`` attribute."""
    return replace(p, image_type=None)


def delete_art_style(p: PromptAttributes) -> PromptAttributes:
    """ASD, art style deletion: drop the ``art_style`` attribute."""
    return replace(p, art_style=None)


def swap_order(p: PromptAttributes) -> PromptAttributes:
    """SPO, swapping prompt order: ``"a X of a Y"`` -> ``"a Y in X style"``."""
    return replace(p, swapped=True)


#: The paper's prompt augmentations by abbreviation, applied in this order.
AUGMENTATIONS: dict[str, Callable[[PromptAttributes], PromptAttributes]] = {
    "osd": delete_size,
    "ocd": delete_color,
    "itd": delete_image_type,
    "asd": delete_art_style,
    "spo": swap_order,
}


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities of the prompt augmentations (paper: OSD, OCD, SPO at 0.5; ITD, ASD off)."""

    osd: float = 0.5
    ocd: float = 0.5
    itd: float = 0.0
    asd: float = 0.0
    spo: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"AugmentConfig.{f.name}={v} must be a probability in [0, 1].")


def augment_structure(
    p: PromptAttributes, probs: AugmentConfig, rng: random.Random | np.random.Generator
) -> PromptAttributes:
    """Apply each augmentation of :data:`AUGMENTATIONS` independently with its probability.

    Exactly one uniform number is drawn per augmentation (five per call), so the
    random stream does not depend on which augmentations fired.
    """
    for name, fn in AUGMENTATIONS.items():
        if float(rng.random()) < getattr(probs, name):
            p = fn(p)
    return p


def augment_prompt(
    p: PromptAttributes,
    probs: AugmentConfig | None = None,
    rng: random.Random | np.random.Generator | None = None,
) -> str:
    """An augmented prompt as text: :func:`augment_structure` then :meth:`PromptAttributes.render`."""
    probs = AugmentConfig() if probs is None else probs
    rng = random.Random(0) if rng is None else rng
    return augment_structure(p, probs, rng).render()


def dataset_factors(dataset: Any) -> dict[str, Sequence[str]]:
    """Prompt factor lists CLAP uses for a dataset: ShapeWorld's own, else the paper's."""
    if str(getattr(dataset, "name", "")).startswith("shapeworld"):
        lists = (sw.COLORS, sw.SIZES, sw.IMAGE_TYPES, sw.ART_STYLES)
    else:
        lists = (PAPER_COLORS, PAPER_SIZES, PAPER_IMAGE_TYPES, PAPER_ART_STYLES)
    return dict(zip(("colors", "sizes", "image_types", "art_styles"), lists, strict=True))
