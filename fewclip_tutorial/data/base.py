"""The dataset interface shared by the embedded world and real datasets.

Every dataset the package knows is exposed as a :class:`DatasetSpec`: class
names, prompt templates, and splits.  A split is a plain
``torch.utils.data.Dataset`` that yields ``(PIL.Image, int)`` pairs and also
carries its labels as an array, so few-shot sampling never has to decode an
image.  Datasets with shifted domains (ShapeWorld) put each shifted test set
in ``ood_test``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class LabeledSplit(Dataset):
    """A split of a dataset: ``(image, label)`` pairs with labels known up front.

    Subclasses implement :meth:`load_image`.  ``labels`` is an ``(N,)`` int64
    array; ``domains`` is an optional ``(N,)`` array of domain names.
    """

    labels: np.ndarray
    domains: np.ndarray | None = None
    name: str = "split"

    def __len__(self) -> int:
        return int(len(self.labels))

    def load_image(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load_image(int(index)), int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> SubsetSplit:
        """A view of this split restricted to ``indices`` (order kept)."""
        return SubsetSplit(self, np.asarray(indices, dtype=np.int64), name=name)

    def fingerprint(self) -> str:
        """A short string that changes whenever the content of the split changes.

        Used in feature-cache keys.  The default hashes the split name, its
        length and its labels; subclasses with more identity (a root folder,
        a generator seed) should include it.
        """
        import hashlib

        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


class SubsetSplit(LabeledSplit):
    """A subset of another split, by index."""

    def __init__(self, parent: LabeledSplit, indices: np.ndarray, name: str | None = None) -> None:
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(parent.labels)[self.indices]
        self.domains = None if parent.domains is None else np.asarray(parent.domains)[self.indices]
        self.name = name or f"{parent.name}[subset]"

    def load_image(self, index: int) -> Image.Image:
        return self.parent.load_image(int(self.indices[index]))

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        h.update(self.parent.fingerprint().encode())
        h.update(self.indices.tobytes())
        return h.hexdigest()[:16]


class ListSplit(LabeledSplit):
    """A split backed by an in-memory list of PIL images (handy for tests)."""

    def __init__(
        self,
        images: Sequence[Image.Image],
        labels: Sequence[int],
        name: str = "list",
        domains: Sequence[str] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(
                f"ListSplit got {len(images)} images but {len(labels)} labels; "
                "pass one label per image."
            )
        self.images = list(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.domains = None if domains is None else np.asarray(domains)
        self.name = name

    def load_image(self, index: int) -> Image.Image:
        return self.images[index]

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(super().fingerprint().encode())
        for img in self.images:
            h.update(np.asarray(img).tobytes())
        return h.hexdigest()[:16]


@dataclass
class DatasetSpec:
    """A dataset ready for few-shot experiments.

    Attributes:
        name: registry name, e.g. ``"shapeworld"`` or ``"eurosat"``.
        classnames: ``C`` human-readable class names, index = label.
        templates: prompt templates with one ``"{}"`` placeholder for the class name.
        train: the pool the K-shot training set is drawn from.
        val: the pool the few-shot validation set is drawn from (``None``:
            drawn from ``train``, disjoint from the training shots).
        test: the in-distribution test split.
        ood_test: shifted test splits by domain name (empty when the dataset has none).
        info: free-form facts (domains, spurious correlation, ...).
    """

    name: str
    classnames: list[str]
    templates: list[str]
    train: LabeledSplit
    val: LabeledSplit | None
    test: LabeledSplit
    ood_test: dict[str, LabeledSplit] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)
