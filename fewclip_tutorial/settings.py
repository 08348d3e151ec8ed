"""One setting that switches every chapter between the embedded world and a real CLIP.

Each notebook starts with ``SETUP = "embedded"``; :func:`get_setup` turns that name
into a :class:`Setup` (dataset, backbone, pretrained tag, shots and seeds).  The
environment variable ``FEWCLIP_SETUP`` overrides the notebook's choice, so a whole
book can be rebuilt on a real backbone without editing any cell.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, replace

from fewclip_tutorial.data.shapeworld import TASKS


@dataclass(frozen=True)
class Setup:
    """What a chapter runs on.

    Attributes:
        dataset: a name of :func:`fewclip_tutorial.data.list_datasets`.
        backbone: ``"shapeworld-tiny"``, an open_clip architecture or a local checkpoint.
        pretrained: open_clip pretrained tag (``"default"``: the backbone's usual weights).
        shots: the K values of the accuracy-against-shots figures.
        seeds: few-shot seeds averaged in every figure.
        dataset_kwargs: passed to the dataset loader (e.g. ``download=True`` on Colab).
        suite: the datasets of the comparison chapter's method x task table.
    """

    name: str
    dataset: str
    backbone: str
    pretrained: str | None = "default"
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: tuple[int, ...] = (1, 2, 3)
    dataset_kwargs: dict = field(default_factory=dict)
    suite: tuple[str, ...] = ()


#: The embedded benchmarks, main target first (``fewclip_tutorial.data.shapeworld.TASKS``).
SHAPEWORLD_SUITE: tuple[str, ...] = tuple(TASKS)

PRESETS: dict[str, Setup] = {
    "embedded": Setup("embedded", "shapeworld", "shapeworld-tiny", suite=SHAPEWORLD_SUITE),
    "colab": Setup(
        "colab",
        "eurosat",
        "ViT-B-32",
        pretrained="openai",
        dataset_kwargs={"download": True},
        suite=("eurosat", "dtd", "oxford_pets"),
    ),
    "colab-pets": Setup(
        "colab-pets",
        "oxford_pets",
        "ViT-B-16",
        pretrained="openai",
        dataset_kwargs={"download": True},
    ),
    "colab-shapeworld": Setup(
        "colab-shapeworld",
        "shapeworld",
        "ViT-B-32",
        pretrained="openai",
        dataset_kwargs={"image_size": 224},
        suite=SHAPEWORLD_SUITE,
    ),
}


class UnknownSetupError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


#: the last setup :func:`get_setup` returned, ``(name, overridden fields)`` (None: none yet)
_LAST: tuple[str, frozenset[str]] | None = None

#: overriding one of these leaves the embedded default: committed numbers cannot hold
_WORLD_FIELDS = frozenset({"dataset", "backbone", "pretrained"})


def runs_embedded_default() -> bool:
    """True unless the last :func:`get_setup` asked for another preset or another
    dataset, backbone or checkpoint (no call yet counts as the embedded default)."""
    return _LAST is None or (_LAST[0] == "embedded" and not _LAST[1] & _WORLD_FIELDS)


def get_setup(name: str = "embedded", **overrides) -> Setup:
    """The preset ``name`` (``FEWCLIP_SETUP`` in the environment wins), with ``overrides``."""
    name = os.environ.get("FEWCLIP_SETUP", name)
    global _LAST  # noqa: PLW0603 - read by course.nbcheck: which setup the notebook runs
    _LAST = (name, frozenset(overrides))
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownSetupError(
            f"Unknown setup {name!r}.{hint} Choose one of {sorted(PRESETS)}, or pass dataset= "
            "and backbone= to get_setup('embedded', ...) to name them directly."
        )
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
