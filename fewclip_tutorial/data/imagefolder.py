"""Any local folder of images, one sub-folder per class, as a :class:`DatasetSpec`.

Two layouts are accepted::

    root/                       root/
      golden_retriever/           train/
        a.jpg ...                   golden_retriever/ a.jpg ...
      tabby_cat/                    tabby_cat/ ...
        b.png ...                 val/   (optional)
                                  test/

In the flat layout the images of each class are split into train/val/test with
:func:`~fewclip_tutorial.data.splits.stratified_split` (fixed ``seed``).  Class
names come from the folder names with ``_`` replaced by spaces.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fewclip_tutorial.data.base import DatasetSpec, LabeledSplit, SubsetSplit
from fewclip_tutorial.data.splits import stratified_split
from fewclip_tutorial.data.templates import DEFAULT_TEMPLATES

__all__ = [
    "IMAGE_EXTENSIONS",
    "EmptyImageFolderError",
    "FileListSplit",
    "load_imagefolder",
]

#: File suffixes treated as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_SPLIT_DIRS = ("train", "val", "test")


class EmptyImageFolderError(ValueError):
    """The folder (or one of its classes) holds no images."""


class FileListSplit(LabeledSplit):
    """A split backed by image files on disk: ``paths[i]`` has label ``labels[i]``."""

    def __init__(
        self, paths: Sequence[str | os.PathLike], labels: Sequence[int], name: str
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} paths but {len(labels)} labels; pass one per file.")
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.domains = None
        self.name = name

    def load_image(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as img:
            return img.convert("RGB")

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        for p in self.paths:
            h.update(str(p.resolve()).encode())
            try:
                stat = p.stat()
                h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
        return h.hexdigest()[:16]


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(folder: Path, class_folders: list[str]) -> tuple[list[Path], list[int]]:
    """All images under ``folder/<class>/`` for the given class folder names."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(class_folders):
        cdir = folder / cls
        files = _images_in(cdir) if cdir.is_dir() else []
        if not files:
            raise EmptyImageFolderError(
                f"Class folder {str(cdir)!r} has no images "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder."
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    return paths, labels


def load_imagefolder(
    root: str | os.PathLike,
    name: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    templates: Sequence[str] | None = None,
) -> DatasetSpec:
    """Load a local image folder as a :class:`DatasetSpec`.

    Args:
        root: folder with one sub-folder per class, or with ``train/`` and
            ``test/`` (and optionally ``val/``) each holding class sub-folders.
        name: dataset name (default: the folder's name).
        val_fraction, test_fraction: per-class fractions for the flat layout;
            ignored when split folders exist (a missing ``val/`` means the
            few-shot validation set is drawn from the train pool).
        seed: seed of the fixed flat-layout split.
        templates: prompt templates (default ``["a photo of a {}."]``).

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        EmptyImageFolderError: no class folders, or a class without images.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(
            f"Image folder {str(base)!r} does not exist or is not a directory; "
            "pass the path of a folder with one sub-folder of images per class."
        )
    name = name or base.name
    templates = list(templates) if templates is not None else list(DEFAULT_TEMPLATES)
    has_splits = (base / "train").is_dir() and (base / "test").is_dir()
    class_root = base / "train" if has_splits else base
    class_folders = [p.name for p in _class_dirs(class_root)]
    if not class_folders:
        raise EmptyImageFolderError(
            f"No class sub-folders found in {str(class_root)!r}. Put the images of each class in "
            "their own sub-folder, e.g. root/cat/1.jpg, root/dog/2.jpg."
        )
    classnames = [c.replace("_", " ").strip() for c in class_folders]
    info = {"root": str(base), "source": "imagefolder", "class_folders": class_folders}

    if has_splits:
        for split in ("val", "test"):
            if (base / split).is_dir():
                extra = sorted(set(p.name for p in _class_dirs(base / split)) - set(class_folders))
                if extra:
                    raise EmptyImageFolderError(
                        f"{str(base / split)!r} has class folders {extra} that train/ lacks; "
                        "every class needs training images in train/<class>/."
                    )
        splits: dict[str, LabeledSplit | None] = {}
        for split in _SPLIT_DIRS:
            folder = base / split
            if not folder.is_dir():
                splits[split] = None
                continue
            present = [c for c in class_folders if (folder / c).is_dir()]
            paths, labels = _scan(folder, present)
            labels = [class_folders.index(present[lab]) for lab in labels]
            splits[split] = FileListSplit(paths, labels, name=f"{name}:{split}")
        assert splits["train"] is not None and splits["test"] is not None
        return DatasetSpec(
            name=name,
            classnames=classnames,
            templates=templates,
            train=splits["train"],
            val=splits["val"],
            test=splits["test"],
            info={**info, "split": "folders"},
        )

    paths, labels = _scan(base, class_folders)
    full = FileListSplit(paths, labels, name=f"{name}:all")
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    if min(fractions) < 0 or fractions[0] <= 0:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training "
            "images; use fractions that sum to less than 1."
        )
    train_idx, val_idx, test_idx = stratified_split(full.labels, fractions, seed)
    return DatasetSpec(
        name=name,
        classnames=classnames,
        templates=templates,
        train=SubsetSplit(full, train_idx, name=f"{name}:train"),
        val=SubsetSplit(full, val_idx, name=f"{name}:val") if len(val_idx) else None,
        test=SubsetSplit(full, test_idx, name=f"{name}:test"),
        info={**info, "split": f"stratified {fractions} per class, seed {seed}"},
    )
