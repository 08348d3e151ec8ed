"""CLAP's prompts and the paper's prompt augmentations (Cai et al., ECCV 2024).

A prompt ``"a [art style] [image type] of a [size] [colour] [class]"`` is kept as
structure (:class:`PromptAttributes`).  Two forms of the text and its augmentations exist
(:data:`PROMPT_FORMS`):

* ``"authors"`` (the default of the trainers): the strings of the authors' code.  The prompt
  list is ``gen_prompts.py``'s (``itertools.product`` nesting image type > size > art style >
  colour, ``"an"`` when the whole phrase starts with a vowel letter:
  :meth:`PromptAttributes.authors_text`), and the augmentations edit the *string* as
  ``ImageTextDataset.__random_transform_prompt`` of ``utils/data_utils.py`` does
  (:func:`authors_augment`): deletions replace the first listed word found (with the authors'
  spacing quirks, :func:`authors_word_lists`) by a space, the swap turns ``"X of Y"`` into
  ``"Y in X style"`` keeping X's article, and double spaces are collapsed once.  Articles are
  not repaired, so ``"a large orange circle"`` loses its size as ``"a orange circle"``.
* ``"grammatical"``: the augmentations act on the attributes (:func:`augment_structure`) and
  the result is rendered grammatically (:meth:`PromptAttributes.render`); prompts are listed
  art style > image type > size > colour.
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
    "AUTHORS_AUGMENTATION_ORDER",
    "PROMPT_FORMS",
    "PAPER_ART_STYLES",
    "PAPER_COLORS",
    "PAPER_IMAGE_TYPES",
    "PAPER_SIZES",
    "AugmentConfig",
    "PromptAttributes",
    "augment_prompt",
    "augment_structure",
    "authors_augment",
    "authors_word_lists",
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

    def authors_text(self) -> str:
        """The prompt as the authors' ``gen_prompts.py`` writes it (``assemble_prompt``).

        ``"<a|an> [art style] [image type] of <a|an> [size] [colour] [class]"``, ``"an"`` when
        the phrase it precedes starts with a lower-case vowel letter.  The authors' generator
        always has all four attributes; an absent one (``None``) is left out here, and a
        prompt without image type and art style is ``"<a|an> [size] [colour] [class]"``.
        Ignores :attr:`swapped` (the authors swap strings, see :func:`authors_augment`).
        """

        def quantified(text: str) -> str:
            return ("an " if text[0] in "aeiou" else "a ") + text

        obj = quantified(self.object_phrase())
        medium = " ".join(w for w in (self.art_style, self.image_type) if w)
        return f"{quantified(medium)} of {obj}" if medium else obj

    def text(self, form: str = "grammatical") -> str:
        """:meth:`authors_text` (``form="authors"``) or :meth:`render` (``"grammatical"``)."""
        _check_form(form)
        return self.authors_text() if form == "authors" else self.render()

    def __str__(self) -> str:
        return self.render()


def _factor_values(values: Sequence[str] | None) -> list[str | None]:
    """An empty or ``None`` factor list means "factor absent" (a single ``None``)."""
    if values is None or len(values) == 0:
        return [None]
    if isinstance(values, str):
        raise TypeError(f"factor lists must be sequences of strings, got the string {values!r}.")
    return list(values)


#: The two prompt forms: the authors' strings (``gen_prompts.py``, ``utils/data_utils.py``)
#: and the structured, grammatical rendering.
PROMPT_FORMS: tuple[str, ...] = ("authors", "grammatical")


def _check_form(form: str) -> None:
    if form not in PROMPT_FORMS:
        raise ValueError(
            f"prompt form {form!r}: choose 'authors' (the authors' strings) or 'grammatical'."
        )


def clap_prompts(
    classname: str,
    colors: Sequence[str] | None = PAPER_COLORS,
    sizes: Sequence[str] | None = PAPER_SIZES,
    image_types: Sequence[str] | None = PAPER_IMAGE_TYPES,
    art_styles: Sequence[str] | None = PAPER_ART_STYLES,
    order: str = "authors",
) -> list[PromptAttributes]:
    """All prompts ``"a [art style] [image type] of a [size] [colour] [class]"`` for one class.

    The product of the factor lists (480 prompts per class with the paper's lists).  An
    empty list drops that factor.  ShapeWorld passes its own lists (``shapeworld.COLORS``,
    ``SIZES``, ``IMAGE_TYPES``, ``ART_STYLES``).

    Args:
        order: ``"authors"``: the order of the authors' ``gen_prompts.py``
            (``itertools.product`` nesting image type > size > art style > colour);
            ``"grammatical"``: art style > image type > size > colour (this package's
            order before the authors' became the default).
    """
    _check_form(order)
    values = {
        "art_style": _factor_values(art_styles),
        "image_type": _factor_values(image_types),
        "size": _factor_values(sizes),
        "color": _factor_values(colors),
    }
    nesting = (
        ("image_type", "size", "art_style", "color")
        if order == "authors"
        else ("art_style", "image_type", "size", "color")
    )
    return [
        PromptAttributes(classname, **dict(zip(nesting, combo, strict=True)))
        for combo in itertools.product(*(values[k] for k in nesting))
    ]


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


#: The paper's prompt augmentations by abbreviation, applied in this order in the
#: ``"grammatical"`` form (:func:`augment_structure`).
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


#: The authors' order of the prompt augmentations (``__random_transform_prompt`` of
#: ``utils/data_utils.py``): size, colour, art style, image type deletion, then the swap.
AUTHORS_AUGMENTATION_ORDER: tuple[str, ...] = ("osd", "ocd", "asd", "itd", "spo")

#: The authors' spacing of two words in their lists (``ImageTextDataset.__init__`` in
#: ``utils/data_utils.py``): ``" red"`` has no trailing space, ``"painting "`` no leading one.
#: Every other word is written ``" word "``.
_AUTHORS_SPACING: dict[tuple[str, str], str] = {
    ("color", "red"): " red",
    ("image_type", "painting"): "painting ",
}


def authors_word_lists(
    colors: Sequence[str] | None = PAPER_COLORS,
    sizes: Sequence[str] | None = PAPER_SIZES,
    image_types: Sequence[str] | None = PAPER_IMAGE_TYPES,
    art_styles: Sequence[str] | None = PAPER_ART_STYLES,
) -> dict[str, tuple[str, ...]]:
    """The words the authors' string augmentations look for, by attribute, in list order.

    Each word is padded ``" word "``, except the authors' two quirks (``" red"``,
    ``"painting "``); with the paper's lists this gives exactly the lists of
    ``ImageTextDataset.__init__`` (``utils/data_utils.py``).  Other datasets' words
    (ShapeWorld's ``"photo"``, ``"blueprint"``) get the regular padding.
    """
    lists = {"size": sizes, "color": colors, "art_style": art_styles, "image_type": image_types}
    out = {}
    for attr, values in lists.items():
        words = [v for v in _factor_values(values) if v is not None]
        out[attr] = tuple(_AUTHORS_SPACING.get((attr, w), f" {w} ") for w in words)
    return out


_AUTHORS_ATTRIBUTE = {"osd": "size", "ocd": "color", "asd": "art_style", "itd": "image_type"}


def authors_augment(
    text: str,
    probs: AugmentConfig | None = None,
    rng: random.Random | np.random.Generator | None = None,
    words: dict[str, Sequence[str]] | None = None,
) -> str:
    """The authors' prompt augmentation on a string (``ImageTextDataset.__random_transform_prompt``).

    In the order of :data:`AUTHORS_AUGMENTATION_ORDER` (size, colour, art style, image type
    deletion, then the order swap) one uniform number is drawn from ``rng`` per augmentation,
    five per call whatever fires, and the augmentation applies when it is below its
    probability.  (The authors draw ``torch.rand(1)`` each time from torch's global stream;
    here the caller's ``rng`` gives the same sequence of decisions for the same numbers.)

    * a deletion looks for the attribute's words in list order (:func:`authors_word_lists`);
      the first one found in the text is replaced, everywhere it occurs, by one space, and
      the others are not looked for;
    * the swap splits at the first ``" of "``: ``X of Y`` becomes ``Y in X style`` (X keeps
      its article: ``"a large red circle in a realistic painting style"``); without
      ``" of "`` the text is kept;
    * at the end every ``"  "`` becomes ``" "`` (one pass of ``str.replace``).

    Articles are not repaired (``"a orange circle"``).

    Args:
        text: the prompt as the authors write it (:meth:`PromptAttributes.authors_text`).
        probs: the probabilities (default :class:`AugmentConfig`); ``words``: the word lists
            (default :func:`authors_word_lists` of the paper's lists).
    """
    probs = AugmentConfig() if probs is None else probs
    rng = random.Random(0) if rng is None else rng
    words = authors_word_lists() if words is None else words
    for name in AUTHORS_AUGMENTATION_ORDER:
        if not float(rng.random()) < getattr(probs, name):
            continue
        if name == "spo":
            at = text.find(" of ")
            if at != -1:
                text = text[at + 4 :] + " in " + text[:at] + " style"
            continue
        for word in words.get(_AUTHORS_ATTRIBUTE[name], ()):
            if word in text:
                text = text.replace(word, " ")
                break
    return text.replace("  ", " ")


def augment_prompt(
    p: PromptAttributes,
    probs: AugmentConfig | None = None,
    rng: random.Random | np.random.Generator | None = None,
    form: str = "grammatical",
    words: dict[str, Sequence[str]] | None = None,
) -> str:
    """An augmented prompt as text.

    ``form="grammatical"``: :func:`augment_structure` then :meth:`PromptAttributes.render`;
    ``form="authors"``: :func:`authors_augment` of :meth:`PromptAttributes.authors_text`
    (``words``: the word lists, default the paper's).  Both draw five numbers from ``rng``.
    """
    _check_form(form)
    probs = AugmentConfig() if probs is None else probs
    rng = random.Random(0) if rng is None else rng
    if form == "authors":
        return authors_augment(p.authors_text(), probs, rng, words)
    return augment_structure(p, probs, rng).render()


def dataset_factors(dataset: Any) -> dict[str, Sequence[str]]:
    """Prompt factor lists CLAP uses for a dataset: ShapeWorld's own, else the paper's."""
    if str(getattr(dataset, "name", "")).startswith("shapeworld"):
        lists = (sw.COLORS, sw.SIZES, sw.IMAGE_TYPES, sw.ART_STYLES)
    else:
        lists = (PAPER_COLORS, PAPER_SIZES, PAPER_IMAGE_TYPES, PAPER_ART_STYLES)
    return dict(zip(("colors", "sizes", "image_types", "art_styles"), lists, strict=True))
