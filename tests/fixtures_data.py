"""Helpers for the data / features tests: tiny fake datasets on disk and a fake backbone.

Imported explicitly by tests/test_datasets.py, tests/test_splits.py and
tests/test_features.py (kept out of conftest.py on purpose).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from fewclip_tutorial.data.base import DatasetSpec, ListSplit

#: A 1-layer ViT CLIP small enough to build in milliseconds (the backbone, zero-shot,
#: experiment and GPU-path tests register it with open_clip under their own names).
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

EUROSAT_FOLDERS = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
]


def solid_image(value: int, size: int = 8) -> Image.Image:
    """A ``size x size`` RGB image whose pixels encode ``value`` (distinct per value)."""
    rng = np.random.default_rng(value)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def write_images(folder: Path, n: int, start: int = 0, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{start + i:04d}{suffix}"
        solid_image(start + i).save(p)
        paths.append(p)
    return paths


def make_list_split(per_class: list[int], name: str = "list", offset: int = 0) -> ListSplit:
    """A ListSplit with ``per_class[c]`` images of class ``c`` (labels interleaved)."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
    labels = labels[np.random.default_rng(123).permutation(len(labels))]
    images = [solid_image(offset + i) for i in range(len(labels))]
    return ListSplit(images, labels.tolist(), name=name)


def make_spec(
    train_per_class: list[int], val_per_class: list[int] | None = None, test_per_class=None
) -> DatasetSpec:
    c = len(train_per_class)
    return DatasetSpec(
        name="toy",
        classnames=[f"class{i}" for i in range(c)],
        templates=["a photo of a {}."],
        train=make_list_split(train_per_class, "train"),
        val=None if val_per_class is None else make_list_split(val_per_class, "val", 1000),
        test=make_list_split(test_per_class or [2] * c, "test", 2000),
        ood_test={"sketch": make_list_split([1] * c, "ood", 3000)},
    )


# --------------------------------------------------------------------------- fake datasets


def write_fake_cifar10(root: Path, n_train_per_batch: int = 6, n_test: int = 5) -> dict:
    """CIFAR-10 python-format batch files with random pixels; returns the arrays written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written: dict = {"train_data": [], "train_labels": []}
    for b in range(1, 6):
        data = rng.integers(0, 256, size=(n_train_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_train_per_batch).tolist()
        with open(folder / f"data_batch_{b}", "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
        written["train_data"].append(data)
        written["train_labels"].extend(labels)
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=n_test).tolist()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": test, "labels": test_labels}, fh)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names}, fh)
    written["train_data"] = np.vstack(written["train_data"])
    written["test_data"], written["test_labels"] = test, test_labels
    return written


def write_fake_eurosat(root: Path, per_class: int = 5) -> None:
    base = root / "eurosat" / "2750"
    for c, folder in enumerate(EUROSAT_FOLDERS):
        write_images(base / folder, per_class, start=100 * c, suffix=".jpg")


def write_fake_dtd(root: Path, classes=("banded", "zig_zagged"), per_split: int = 3) -> None:
    data = root / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True)
    for s_i, split in enumerate(("train", "val", "test")):
        lines = []
        for c_i, cls in enumerate(classes):
            for i in range(per_split):
                name = f"{cls}_{s_i}{i}.jpg"
                folder = data / "images" / cls
                folder.mkdir(parents=True, exist_ok=True)
                solid_image(1000 * s_i + 10 * c_i + i).save(folder / name)
                lines.append(f"{cls}/{name}")
        (data / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def write_fake_food101(root: Path, classes=("apple_pie", "baby_back_ribs")) -> None:
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    for s_i, (split, n) in enumerate((("train", 4), ("test", 2))):
        meta = {}
        for c_i, cls in enumerate(classes):
            folder = base / "images" / cls
            folder.mkdir(parents=True, exist_ok=True)
            ids = []
            for i in range(n):
                solid_image(500 * s_i + 10 * c_i + i).save(folder / f"{s_i}{i}.jpg")
                ids.append(f"{cls}/{s_i}{i}")
            meta[cls] = ids
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))


def write_fake_caltech101(root: Path, per_class: int = 5) -> list[str]:
    """Caltech101 layout: 101_ObjectCategories/<cat>/image_0001.jpg ..."""
    cats = ["BACKGROUND_Google", "Faces", "Faces_easy", "airplanes", "cougar_body"]
    base = root / "caltech101" / "101_ObjectCategories"
    for c_i, cat in enumerate(cats):
        folder = base / cat
        folder.mkdir(parents=True)
        for i in range(1, per_class + 1):
            solid_image(100 * c_i + i).save(folder / f"image_{i:04d}.jpg")
    return cats


def write_fake_pets(root: Path) -> None:
    """Oxford-IIIT Pet layout: images/<Breed_n>.jpg + annotations/{trainval,test}.txt."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir(parents=True)
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2)]
    for split, ids in (("trainval", (1, 2, 3)), ("test", (4, 5))):
        lines = []
        for breed, label, species in breeds:
            for i in ids:
                solid_image(10 * label + i).save(base / "images" / f"{breed}_{i}.jpg")
                lines.append(f"{breed}_{i} {label} {species} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- fake backbone


class FakeBackbone:
    """A stand-in for ``backbones.Backbone``: a fixed random linear map on 8x8 pixels.

    ``encode_calls`` counts calls of :meth:`encode_images` and ``images_seen``
    counts images, so tests can tell a cache hit from a recomputation.
    """

    def __init__(self, identifier: str = "fake-linear-v1", dim: int = 16, size: int = 8) -> None:
        self.identifier = identifier
        self.image_size = size
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.25, 0.25, 0.25)
        self.device = torch.device("cpu")
        self.preprocess = T.Compose(
            [
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.randn(3 * size * size, dim, generator=gen)
        self.encode_calls = 0
        self.images_seen = 0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        self.images_seen += int(images.shape[0])
        out = images.flatten(1).float() @ self.weight
        return out / out.norm(dim=-1, keepdim=True)
