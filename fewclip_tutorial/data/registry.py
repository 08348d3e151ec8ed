"""One entry point for every dataset: ``load_dataset(name, root=None, **kwargs)``.

Names: ``"shapeworld"`` (the embedded, generated default world's main target) and the
other ShapeWorld benchmarks (``"shapeworld-everyday"``, ``"shapeworld-polygons"``,
``"shapeworld-patterns"``, ``"shapeworld-blueprint"``; see
:data:`fewclip_tutorial.data.shapeworld.TASKS`), the
torchvision datasets (``"eurosat"``, ``"oxford_pets"``, ``"dtd"``,
``"flowers102"``, ``"caltech101"``, ``"food101"``, ``"cifar10"``,
``"cifar100"``; downloads off unless ``download=True``) and
``"imagefolder:<path>"`` for any local folder of class sub-folders.
"""

from __future__ import annotations

import os

from fewclip_tutorial.data.base import DatasetSpec
from fewclip_tutorial.suggest import did_you_mean

__all__ = [
    "IMAGEFOLDER_PREFIX",
    "UnknownDatasetError",
    "check_dataset_name",
    "is_downloadable",
    "list_datasets",
    "load_dataset",
]

IMAGEFOLDER_PREFIX = "imagefolder:"
_TORCHVISION_NAMES = (
    "eurosat",
    "oxford_pets",
    "dtd",
    "flowers102",
    "caltech101",
    "food101",
    "cifar10",
    "cifar100",
)


class UnknownDatasetError(KeyError):
    """The dataset name is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _shapeworld_tasks() -> list[str]:
    from fewclip_tutorial.data.shapeworld import list_tasks

    return list_tasks()


def list_datasets() -> list[str]:
    """Registered dataset names (``"imagefolder:<path>"`` is listed as its prefix form)."""
    return [*_shapeworld_tasks(), *_TORCHVISION_NAMES, f"{IMAGEFOLDER_PREFIX}<path>"]


def load_dataset(name: str, root: str | os.PathLike | None = None, **kwargs) -> DatasetSpec:
    """Load dataset ``name`` as a :class:`DatasetSpec`.

    Args:
        name: a name from :func:`list_datasets`, or ``"imagefolder:/some/path"``.
        root: data folder for torchvision datasets (default ``$FEWCLIP_DATA`` or
            ``~/.cache/fewclip_tutorial/data``); ignored by ``shapeworld``.
        **kwargs: passed to the loader (``download=True``, ``seed=...``, ...).

    Raises:
        UnknownDatasetError: ``name`` is not registered (the message lists the
            known names and the closest match).
        ValueError: ``download=True`` for a dataset that is not downloaded (ShapeWorld is
            generated, an image folder is read where it is).
    """
    key = check_dataset_name(name)
    if "download" in kwargs and key not in _TORCHVISION_NAMES:
        if kwargs.pop("download"):
            raise ValueError(
                f"download=True applies to the torchvision datasets "
                f"({', '.join(_TORCHVISION_NAMES)}); {name!r} has nothing to download "
                "(ShapeWorld is generated in-process, an image folder is read in place)."
            )
    if key.startswith(IMAGEFOLDER_PREFIX):
        from fewclip_tutorial.data.imagefolder import load_imagefolder

        return load_imagefolder(key[len(IMAGEFOLDER_PREFIX) :], **kwargs)
    if key in _shapeworld_tasks():
        from fewclip_tutorial.data.shapeworld import load_shapeworld

        if "task" in kwargs and kwargs["task"] != key:
            raise ValueError(
                f"load_dataset({name!r}, task={kwargs['task']!r}) names two ShapeWorld tasks; "
                f"pass the task as the dataset name, e.g. load_dataset({kwargs['task']!r})."
            )
        kwargs.pop("task", None)
        return load_shapeworld(task=key, **kwargs)
    from fewclip_tutorial.data.torchvision_datasets import TORCHVISION_LOADERS

    return TORCHVISION_LOADERS[key](root=root, **kwargs)


def check_dataset_name(name: str) -> str:
    """Validate a dataset name without loading anything (cheap: call it before a backbone).

    Returns:
        The registry key: the lower-cased name, or ``"imagefolder:<path>"`` (path kept as given).

    Raises:
        TypeError: ``name`` is not a string.
        UnknownDatasetError: ``name`` is not registered (with the closest match and the list).
        ValueError: ``"imagefolder:"`` without a path.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}.")
    key = name.strip()
    if key.lower().startswith(IMAGEFOLDER_PREFIX):
        path = key[len(IMAGEFOLDER_PREFIX) :]
        if not path:
            raise ValueError(
                "'imagefolder:' needs a path after the colon, e.g. 'imagefolder:/data/my_photos'."
            )
        return IMAGEFOLDER_PREFIX + path
    key = key.lower()
    if key in _shapeworld_tasks() or key in _TORCHVISION_NAMES:
        return key
    known = list_datasets()
    hint = did_you_mean(key, [n for n in known if not n.endswith(">")])
    raise UnknownDatasetError(
        f"Unknown dataset {name!r}.{hint} Known datasets: {', '.join(known)}."
    )


def is_downloadable(name: str) -> bool:
    """Whether ``load_dataset(name, download=True)`` can fetch the dataset (torchvision ones)."""
    return check_dataset_name(name) in _TORCHVISION_NAMES
