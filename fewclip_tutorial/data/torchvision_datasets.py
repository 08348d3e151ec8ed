"""Real image datasets from ``torchvision.datasets`` as :class:`DatasetSpec` objects.

Nothing is downloaded unless you pass ``download=True`` (do it on Colab or a
machine with internet); the default world of this tutorial is ``shapeworld``.

Splits used (``seed`` of the fixed stratified splits: :data:`SPLIT_SEED`):

============  ====================================  ============  ===========
dataset       train pool                            val pool      test
============  ====================================  ============  ===========
eurosat       60% of each class (fixed split)       20%           20%
oxford_pets   ``trainval``                          (from train)  ``test``
dtd           ``train`` (partition 1)               ``val``       ``test``
flowers102    ``train`` + ``val`` (10 + 10 / class) (from train)  ``test``
caltech101    60% of each class (fixed split)       20%           20%
food101       ``train``                             (from train)  ``test``
cifar10/100   ``train``                             (from train)  ``test``
============  ====================================  ============  ===========

"(from train)" means the few-shot validation images are drawn from the train
pool, disjoint from the training shots (see :func:`~fewclip_tutorial.data.splits.make_few_shot`).
Flowers102's official train split has only 10 images per class, so its train
and val splits are pooled to allow 16 shots + 4 validation images per class.
Caltech101 drops ``Faces_easy`` (a duplicate of ``Faces``), as CoOp does: 100 classes.

Labels are read from the metadata torchvision already parsed (``_labels``,
``targets``, ``y``, ``samples``), never by decoding images.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import socket
import urllib.error
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fewclip_tutorial.data.base import DatasetSpec, LabeledSplit, SubsetSplit
from fewclip_tutorial.data.splits import stratified_split
from fewclip_tutorial.data.templates import get_templates

__all__ = [
    "DatasetDownloadError",
    "DatasetNotFoundError",
    "SPLIT_SEED",
    "TORCHVISION_LOADERS",
    "ConcatSplit",
    "TorchvisionSplit",
    "default_data_root",
    "load_caltech101",
    "load_cifar10",
    "load_cifar100",
    "load_dtd",
    "load_eurosat",
    "load_flowers102",
    "load_food101",
    "load_oxford_pets",
]

logger = logging.getLogger(__name__)

#: Seed of the fixed 60/20/20 stratified split of EuroSAT and Caltech101.
SPLIT_SEED = 0
#: Train/val/test fractions for datasets that ship a single set.
SINGLE_SET_FRACTIONS = (0.6, 0.2, 0.2)

#: Readable EuroSAT class names (CoOp style), keyed by torchvision's folder names.
EUROSAT_CLASSNAMES: dict[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

#: Caltech101 folder names that need more than ``_`` -> space to read well.
CALTECH101_RENAMES: dict[str, str] = {
    "Faces": "face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
    "airplanes": "airplane",
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not on disk and downloading is off.

    ``str(err)`` gives the advice in Python terms (``download=True``, ``root=``);
    ``err.cli_message`` the same advice in ``fewclip`` command-line terms (``--download``,
    ``--data-root``), which the command line prints instead.
    """

    def __init__(self, message: str, *, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message if cli_message is not None else message


class DatasetDownloadError(DatasetNotFoundError):
    """``download=True`` could not fetch the dataset (no network, host down, ...).

    What the failed download had created is removed; folders that existed before are kept.
    """


def default_data_root() -> Path:
    """Where datasets live by default: ``$FEWCLIP_DATA`` or ``~/.cache/fewclip_tutorial/data``."""
    env = os.environ.get("FEWCLIP_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/fewclip_tutorial/data").expanduser()


def _resolve_root(root: str | os.PathLike | None) -> Path:
    return default_data_root() if root is None else Path(root).expanduser()


def _not_found(
    name: str, looked_at: Sequence[Path], root: Path, detail: str = ""
) -> DatasetNotFoundError:
    where = ", ".join(str(p) for p in looked_at)
    return DatasetNotFoundError(
        f"Dataset {name!r} not found: looked for {where} (root={str(root)!r}){detail}. "
        "Downloads are off by default. Pass download=True (e.g. on Colab) to fetch it into "
        f"root, point root= at an existing copy, or use the embedded world: "
        "load_dataset('shapeworld').",
        cli_message=f"Dataset {name!r} not found: looked for {where} (--data-root {root}){detail}. "
        "Downloads are off by default. Add --download to fetch it into --data-root (needs "
        "network access), pass --data-root DIR to point at an existing copy, or use "
        "--dataset shapeworld, which needs no download.",
    )


def _require(name: str, root: Path, paths: Sequence[Path], download: bool) -> None:
    """Raise :class:`DatasetNotFoundError` unless downloading or all ``paths`` exist."""
    if download:
        return
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise _not_found(name, paths, root)


#: What a failed download raises: ``urlopen`` wraps socket errors in ``URLError``, a transfer
#: cut short raises the others.  Other ``OSError`` (a full disk, a read-only root) pass through.
_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    socket.gaierror,
)


def _failed_url(err: BaseException) -> str | None:
    """The URL a torchvision download was fetching when ``err`` was raised (best effort).

    torchvision's ``download_url`` and ``_urlretrieve`` keep it in a local ``url``; the
    innermost frame of the traceback that has one is the request that failed.
    """
    url = None
    tb = err.__traceback__
    while tb is not None:
        value = tb.tb_frame.f_locals.get("url")
        if isinstance(value, str) and "://" in value:
            url = value
        tb = tb.tb_next
    return url


def _network_reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        reason = str(err.reason)
    else:
        reason = str(err) or type(err).__name__
    return " ".join(reason.split())  # one line


def _download_failed(name: str, err: BaseException) -> DatasetDownloadError:
    url = _failed_url(err)
    source = f" from {url}" if url else ""
    what = f"Could not download dataset {name!r}{source}: {_network_reason(err)}."
    return DatasetDownloadError(
        f"{what} If this machine has no network access, download it on one that has "
        f"(load_dataset({name!r}, root=DIR, download=True)), copy DIR here and pass root=DIR; "
        "or use the embedded world, which needs no download: load_dataset('shapeworld').",
        cli_message=f"{what} If this machine has no network access, run the same command with "
        "--download on one that has, copy its --data-root folder here and pass --data-root DIR "
        "(an existing copy); or use --dataset shapeworld, which needs no download.",
    )


def _topmost_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its ancestors that does not exist (None if ``path`` does)."""
    top = None
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        top = p
    return top


def _remove_failed_download(root: Path, fresh: Sequence[Path], top_missing: Path | None) -> None:
    """Remove what a failed download created: the ``fresh`` entries (absent before it) and the
    folders it made above them, up to ``top_missing``, where they are left empty.  Nothing that
    existed before the download is touched."""
    for p in fresh:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            with contextlib.suppress(OSError):
                p.unlink()
    if top_missing is None:
        return
    for folder in (root, *root.parents):
        try:
            folder.rmdir()  # only if empty: never another process's files
        except OSError:
            break
        if folder == top_missing:
            break


def _build(
    name: str,
    root: Path,
    factory: Callable[[], Any],
    download: bool = False,
    creates: Sequence[str] = (),
) -> Any:
    """Call a torchvision constructor, turning its 'not found' RuntimeError into ours.

    With ``download``: ``creates`` names the entries of ``root`` the download writes (its
    folder, its archive).  When the download fails, those that did not exist before are
    removed (with ``root`` and its parents when it made them and they are left empty), and a
    network error becomes a :class:`DatasetDownloadError`.
    """
    if not download:
        return _construct(name, root, factory)
    top_missing = _topmost_missing(root)
    fresh = [root / c for c in creates if not os.path.lexists(root / c)]
    try:
        return _construct(name, root, factory)
    except BaseException as err:
        _remove_failed_download(root, fresh, top_missing)
        if isinstance(err, _NETWORK_ERRORS) and not isinstance(err, DatasetNotFoundError):
            raise _download_failed(name, err) from err
        raise


def _construct(name: str, root: Path, factory: Callable[[], Any]) -> Any:
    try:
        return factory()
    except RuntimeError as err:
        if "not found" in str(err).lower():
            detail = f"; torchvision said: {err}"
            raise _not_found(name, [root], root, detail) from err
        raise


def _labels_of(dataset: Any) -> np.ndarray:
    """``(N,)`` int64 labels of a torchvision dataset, without decoding images if possible."""
    for attr in ("_labels", "targets", "y", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None and len(value) == len(dataset):
            return np.asarray(value, dtype=np.int64)
    for attr in ("_samples", "samples"):
        value = getattr(dataset, attr, None)
        if value is not None and len(value) == len(dataset):
            return np.asarray([int(s[1]) for s in value], dtype=np.int64)
    logger.warning(
        "%s exposes no label attribute; reading labels by iterating (slow).",
        type(dataset).__name__,
    )
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


class TorchvisionSplit(LabeledSplit):
    """A :class:`LabeledSplit` view of a torchvision dataset (transform-free).

    ``labels`` may be remapped (``label_map``) and the dataset restricted to
    ``indices``; images are converted to RGB.
    """

    def __init__(
        self,
        dataset: Any,
        name: str,
        identity: str,
        indices: np.ndarray | None = None,
        label_map: np.ndarray | None = None,
    ) -> None:
        self.dataset = dataset
        raw = _labels_of(dataset)
        self.indices = np.arange(len(raw), dtype=np.int64) if indices is None else indices
        self.indices = np.asarray(self.indices, dtype=np.int64)
        labels = raw[self.indices]
        if label_map is not None:
            labels = np.asarray(label_map, dtype=np.int64)[labels]
        self.labels = labels
        self.domains = None
        self.name = name
        self.identity = identity

    def load_image(self, index: int) -> Image.Image:
        image = self.dataset[int(self.indices[index])][0]
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"{type(self.dataset).__name__} returned {type(image).__name__}, not a PIL image; "
                "build it without a transform."
            )
        return image if image.mode == "RGB" else image.convert("RGB")

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(self.identity.encode())
        h.update(self.indices.tobytes())
        return h.hexdigest()[:16]


class ConcatSplit(LabeledSplit):
    """Several splits back to back (labels concatenated in order)."""

    def __init__(self, parts: Sequence[LabeledSplit], name: str) -> None:
        if not parts:
            raise ValueError("ConcatSplit needs at least one split to concatenate.")
        self.parts = list(parts)
        self.labels = np.concatenate([np.asarray(p.labels, dtype=np.int64) for p in self.parts])
        self.domains = None
        self.name = name
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def load_image(self, index: int) -> Image.Image:
        part = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self.parts[part].load_image(int(index - self._offsets[part]))

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        for part in self.parts:
            h.update(part.fingerprint().encode())
        return h.hexdigest()[:16]


def _spec(
    name: str,
    classnames: list[str],
    train: LabeledSplit,
    val: LabeledSplit | None,
    test: LabeledSplit,
    root: Path,
    **info: Any,
) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        classnames=classnames,
        templates=get_templates(name),
        train=train,
        val=val,
        test=test,
        info={"root": str(root), "source": "torchvision", **info},
    )


def _single_set_spec(
    name: str, full: TorchvisionSplit, classnames: list[str], root: Path
) -> DatasetSpec:
    """Split one labelled set 60/20/20 per class with the fixed :data:`SPLIT_SEED`."""
    train_idx, val_idx, test_idx = stratified_split(full.labels, SINGLE_SET_FRACTIONS, SPLIT_SEED)
    return _spec(
        name,
        classnames,
        SubsetSplit(full, train_idx, name=f"{name}:train"),
        SubsetSplit(full, val_idx, name=f"{name}:val"),
        SubsetSplit(full, test_idx, name=f"{name}:test"),
        root,
        split=f"stratified {SINGLE_SET_FRACTIONS} per class, seed {SPLIT_SEED}",
    )


def _clean(name: str) -> str:
    return name.replace("_", " ").strip()


# --------------------------------------------------------------------------- loaders


def load_eurosat(root: str | os.PathLike | None = None, download: bool = False) -> DatasetSpec:
    """EuroSAT RGB (10 land-use classes, 27,000 64x64 images), split 60/20/20 per class."""
    from torchvision.datasets import EuroSAT

    base = _resolve_root(root)
    _require("eurosat", base, [base / "eurosat" / "2750"], download)
    ds = _build(
        "eurosat",
        base,
        lambda: EuroSAT(str(base), download=download),
        download,
        ["eurosat"],
    )
    classnames = [EUROSAT_CLASSNAMES.get(c, _clean(c)) for c in ds.classes]
    full = TorchvisionSplit(ds, "eurosat:all", identity=f"EuroSAT|{base}")
    return _single_set_spec("eurosat", full, classnames, base)


def load_oxford_pets(root: str | os.PathLike | None = None, download: bool = False) -> DatasetSpec:
    """Oxford-IIIT Pet (37 breeds): train pool = ``trainval``, test = ``test``."""
    from torchvision.datasets import OxfordIIITPet

    base = _resolve_root(root)
    folder = base / "oxford-iiit-pet"
    _require("oxford_pets", base, [folder / "images", folder / "annotations"], download)
    trainval = _build(
        "oxford_pets",
        base,
        lambda: OxfordIIITPet(str(base), "trainval", download=download),
        download,
        ["oxford-iiit-pet"],
    )
    test = _build("oxford_pets", base, lambda: OxfordIIITPet(str(base), "test", download=False))
    classnames = [c.lower() for c in trainval.classes]
    return _spec(
        "oxford_pets",
        classnames,
        TorchvisionSplit(trainval, "oxford_pets:train", identity=f"OxfordIIITPet|{base}|trainval"),
        None,
        TorchvisionSplit(test, "oxford_pets:test", identity=f"OxfordIIITPet|{base}|test"),
        base,
        split="official trainval / test",
    )


def load_dtd(
    root: str | os.PathLike | None = None, download: bool = False, partition: int = 1
) -> DatasetSpec:
    """Describable Textures (47 classes), official train / val / test of ``partition``."""
    from torchvision.datasets import DTD

    base = _resolve_root(root)
    _require("dtd", base, [base / "dtd" / "dtd"], download)
    splits = {}
    for i, split in enumerate(("train", "val", "test")):
        splits[split] = _build(
            "dtd",
            base,
            lambda s=split, d=(download and i == 0): DTD(str(base), s, partition, download=d),
            download and i == 0,
            ["dtd"],
        )
    classnames = [_clean(c) for c in splits["train"].classes]
    return _spec(
        "dtd",
        classnames,
        *(
            TorchvisionSplit(splits[s], f"dtd:{s}", identity=f"DTD|{base}|{s}{partition}")
            for s in ("train", "val", "test")
        ),
        base,
        split=f"official partition {partition}",
    )


def load_flowers102(root: str | os.PathLike | None = None, download: bool = False) -> DatasetSpec:
    """Oxford Flowers 102: train pool = official train + val (20 / class), test = ``test``."""
    from torchvision.datasets import Flowers102

    base = _resolve_root(root)
    _require("flowers102", base, [base / "flowers-102" / "jpg"], download)
    parts = {
        s: _build(
            "flowers102",
            base,
            lambda s=s, d=(download and s == "train"): Flowers102(str(base), s, download=d),
            download and s == "train",
            ["flowers-102"],
        )
        for s in ("train", "val", "test")
    }
    names = getattr(Flowers102, "classes", None)
    if names is None or len(names) != 102:  # older torchvision: no class names shipped
        names = [f"flower {i + 1}" for i in range(102)]
    tv = {
        s: TorchvisionSplit(parts[s], f"flowers102:{s}", identity=f"Flowers102|{base}|{s}")
        for s in parts
    }
    return _spec(
        "flowers102",
        [_clean(n).rstrip("?") for n in names],
        ConcatSplit([tv["train"], tv["val"]], name="flowers102:train+val"),
        None,
        tv["test"],
        base,
        split="official train+val pooled / official test",
    )


def load_caltech101(root: str | os.PathLike | None = None, download: bool = False) -> DatasetSpec:
    """Caltech101 without ``Faces_easy`` (100 classes), split 60/20/20 per class."""
    from torchvision.datasets import Caltech101

    base = _resolve_root(root)
    _require("caltech101", base, [base / "caltech101" / "101_ObjectCategories"], download)
    ds = _build(
        "caltech101",
        base,
        lambda: Caltech101(str(base), download=download),
        download,
        ["caltech101"],
    )
    raw = _labels_of(ds)
    keep_classes = [i for i, c in enumerate(ds.categories) if c != "Faces_easy"]
    label_map = np.full(len(ds.categories), -1, dtype=np.int64)
    label_map[keep_classes] = np.arange(len(keep_classes))
    keep = np.flatnonzero(label_map[raw] >= 0)
    classnames = [
        CALTECH101_RENAMES.get(ds.categories[i], _clean(ds.categories[i])) for i in keep_classes
    ]
    full = TorchvisionSplit(
        ds, "caltech101:all", identity=f"Caltech101|{base}", indices=keep, label_map=label_map
    )
    return _single_set_spec("caltech101", full, classnames, base)


def load_food101(root: str | os.PathLike | None = None, download: bool = False) -> DatasetSpec:
    """Food-101 (101 dishes): official ``train`` (750 / class) and ``test`` (250 / class)."""
    from torchvision.datasets import Food101

    base = _resolve_root(root)
    folder = base / "food-101"
    _require("food101", base, [folder / "meta", folder / "images"], download)
    train = _build(
        "food101",
        base,
        lambda: Food101(str(base), "train", download=download),
        download,
        ["food-101", "food-101.tar.gz"],
    )
    test = _build("food101", base, lambda: Food101(str(base), "test", download=False))
    return _spec(
        "food101",
        [_clean(c) for c in train.classes],
        TorchvisionSplit(train, "food101:train", identity=f"Food101|{base}|train"),
        None,
        TorchvisionSplit(test, "food101:test", identity=f"Food101|{base}|test"),
        base,
        split="official train / test",
    )


def _load_cifar(name: str, cls: Any, folder: str, root: Any, download: bool) -> DatasetSpec:
    base = _resolve_root(root)
    _require(name, base, [base / folder], download)
    archive = getattr(cls, "filename", None)  # the tarball, downloaded next to the folder
    train = _build(
        name,
        base,
        lambda: cls(str(base), train=True, download=download),
        download,
        [folder, *([archive] if archive else [])],
    )
    test = _build(name, base, lambda: cls(str(base), train=False, download=False))
    return _spec(
        name,
        [_clean(c) for c in train.classes],
        TorchvisionSplit(train, f"{name}:train", identity=f"{cls.__name__}|{base}|train"),
        None,
        TorchvisionSplit(test, f"{name}:test", identity=f"{cls.__name__}|{base}|test"),
        base,
        split="official train / test",
    )


def load_cifar10(root: str | os.PathLike | None = None, download: bool = False) -> DatasetSpec:
    """CIFAR-10 (10 classes, 32x32): official train (50,000) / test (10,000)."""
    from torchvision.datasets import CIFAR10

    return _load_cifar("cifar10", CIFAR10, "cifar-10-batches-py", root, download)


def load_cifar100(root: str | os.PathLike | None = None, download: bool = False) -> DatasetSpec:
    """CIFAR-100 (100 fine classes, 32x32): official train (50,000) / test (10,000)."""
    from torchvision.datasets import CIFAR100

    return _load_cifar("cifar100", CIFAR100, "cifar-100-python", root, download)


#: Registry name -> loader ``(root=None, download=False, **kw) -> DatasetSpec``.
TORCHVISION_LOADERS: dict[str, Callable[..., DatasetSpec]] = {
    "eurosat": load_eurosat,
    "oxford_pets": load_oxford_pets,
    "dtd": load_dtd,
    "flowers102": load_flowers102,
    "caltech101": load_caltech101,
    "food101": load_food101,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}
