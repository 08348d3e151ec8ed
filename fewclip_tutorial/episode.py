"""One few-shot episode: :class:`Context`, :func:`build_context` and its in-process caches.

A *context* bundles everything a method needs for one episode: the frozen
backbone, the dataset, its K-shot splits for one seed, the zero-shot text
classifier, and cached image features.  Methods are registered and run by
:mod:`fewclip_tutorial.methods.registry`; the CLI, the notebooks and the tests
build a context here and hand it to :func:`~fewclip_tutorial.methods.registry.run_method`::

    from fewclip_tutorial.episode import build_context
    from fewclip_tutorial.methods.registry import run_method

    ctx = build_context("shapeworld", "shapeworld-tiny", shots=4, seed=1)
    run_method("zero-shot", context=ctx)
    run_method("linear-probe", dataset="shapeworld", shots=16, seed=2)

Backbones, datasets and text classifiers are cached in-process, so a notebook
looping over shots and seeds loads each of them once; image features are cached
on disk by :mod:`fewclip_tutorial.features`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fewclip_tutorial.backbones import EMBEDDED_BACKBONE, Backbone, load_backbone
from fewclip_tutorial.data.base import DatasetSpec, LabeledSplit
from fewclip_tutorial.device import get_device
from fewclip_tutorial.metrics import accuracy
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE

__all__ = ["Context", "build_context", "clear_caches"]

_PREDICT_CHUNK = 8192


# --------------------------------------------------------------------------- Context


@dataclass
class Context:
    """One few-shot episode: backbone + dataset + K-shot splits of one seed.

    Attributes:
        backbone: the frozen :class:`~fewclip_tutorial.backbones.Backbone`.
        dataset: the :class:`~fewclip_tutorial.data.base.DatasetSpec`.
        splits: the episode's ``train`` (K per class), ``val`` (min(K, 4) per
            class), ``test`` and ``ood_test`` splits.
        shots: ``K``.
        seed: the episode seed (few-shot sampling, augmentations, training).
        text_classifier: ``(C, D)`` zero-shot prompt-ensemble classifier ``W``
            (L2-normalised rows, on ``backbone.device``).
        cache_dir: feature cache folder (``"default"``, a path, or ``None``: no disk cache).
        progress: show progress bars.
    """

    backbone: Backbone
    dataset: DatasetSpec
    splits: Any  # data.splits.FewShotSplits
    shots: int
    seed: int
    text_classifier: Tensor
    cache_dir: str | os.PathLike | None = "default"
    progress: bool = True
    _memo: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def classnames(self) -> list[str]:
        return list(self.dataset.classnames)

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classnames)

    @property
    def ood_domains(self) -> list[str]:
        """Names of the shifted test domains (empty for datasets without any)."""
        return list(self.splits.ood_test)

    def split(self, name: str) -> LabeledSplit:
        """The split called ``name``: ``"train"``, ``"val"``, ``"test"`` or ``"ood:<domain>"``."""
        if name in ("train", "val", "test"):
            return getattr(self.splits, name)
        if name.startswith("ood:"):
            domain = name[len("ood:") :]
            if domain in self.splits.ood_test:
                return self.splits.ood_test[domain]
            raise KeyError(
                f"{self.dataset.name!r} has no OOD domain {domain!r}; "
                f"domains: {', '.join(self.splits.ood_test) or '(none)'}."
            )
        valid = ["train", "val", "test"] + [f"ood:{d}" for d in self.splits.ood_test]
        raise KeyError(f"Unknown split {name!r}; use one of {', '.join(valid)}.")

    def features(
        self,
        split: str,
        views: int = 1,
        augment: bool = False,
        seed: int | None = None,
        raw: bool = False,
    ) -> Any:
        """Image features of a split (memoised in-process, cached on disk).

        Args:
            split: ``"train"``, ``"val"``, ``"test"`` or ``"ood:<domain>"``.
            views: number of views ``V`` (Tip-Adapter averages 10 augmented ones).
            augment: a crop scaled to the resolution, plus a horizontal flip where the
                dataset's classes are mirror-invariant (``dataset.info["hflip_invariant"]``,
                default ``True``), instead of the eval transform.
            seed: augmentation seed (default: the episode seed).
            raw: the image tower's output, not L2-normalised (CoOp's linear probe).

        Returns:
            ``FeatureSet`` with ``features`` ``(N, D)`` (or ``(V, N, D)`` when
            ``views > 1`` or ``augment``) on the CPU, and ``labels`` ``(N,)``.
        """
        from fewclip_tutorial.features import extract_features

        seed = self.seed if seed is None else int(seed)
        key = (split, int(views), bool(augment), seed if augment else 0)
        if raw:  # normalised features keep their old memo key
            key += ("raw",)
        if key not in self._memo:
            self._memo[key] = extract_features(
                self.backbone,
                self.split(split),
                views=views,
                augment=augment,
                seed=seed if augment else 0,
                cache_dir=self.cache_dir,
                progress=self.progress,
                flip=bool(self.dataset.info.get("hflip_invariant", True)),
                raw=raw,
            )
        return self._memo[key]

    def zero_shot_logits(self, features: Tensor) -> Tensor:
        """``(N, D)`` features -> ``(N, C)`` zero-shot logits ``100 * f @ W.T``."""
        w = self.text_classifier.to(features.device, features.dtype)
        return CLIP_LOGIT_SCALE * features @ w.T

    def report(
        self,
        predict: Callable[[Tensor], Tensor],
        features_by_split: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Accuracy of ``predict`` on the validation, test and OOD splits.

        Args:
            predict: ``(N, D)`` features -> ``(N, C)`` logits (called in chunks, under
                ``torch.no_grad``; features are passed on the CPU as cached).
            features_by_split: optional replacement features, ``{"val": fs, "test": fs,
                "ood:<domain>": fs}`` where ``fs`` is a ``FeatureSet`` or a
                ``(features, labels)`` pair (for methods that change the image encoder).
                Splits not given use :meth:`features`.

        Returns:
            ``{"val_accuracy": %, "test_accuracy": %}`` plus ``"ood_accuracy":
            {domain: %}`` when the dataset has shifted test domains.
        """
        given = dict(features_by_split or {})
        names = ["val", "test"] + [f"ood:{d}" for d in self.splits.ood_test]
        unknown = set(given) - set(names)
        if unknown:
            raise KeyError(f"features_by_split has unknown splits {sorted(unknown)}; use {names}.")
        accs: dict[str, float] = {}
        for name in names:
            feats, labels = _unpack(given[name]) if name in given else _unpack(self.features(name))
            if feats.ndim == 3:
                feats = feats.mean(0)
            accs[name] = _evaluate(predict, feats, labels, self.num_classes, name)
        out: dict[str, Any] = {"val_accuracy": accs["val"], "test_accuracy": accs["test"]}
        if self.splits.ood_test:
            out["ood_accuracy"] = {d: accs[f"ood:{d}"] for d in self.splits.ood_test}
        return out


def _unpack(fs: Any) -> tuple[Tensor, Tensor]:
    if isinstance(fs, (tuple, list)) and len(fs) == 2:
        feats, labels = fs
    else:
        feats, labels = fs.features, fs.labels
    return torch.as_tensor(feats), torch.as_tensor(labels)


def _evaluate(
    predict: Callable[[Tensor], Tensor], feats: Tensor, labels: Tensor, num_classes: int, name: str
) -> float:
    outs = []
    with torch.no_grad():
        for chunk in torch.split(feats, _PREDICT_CHUNK):
            logits = predict(chunk)
            if logits.ndim != 2 or logits.shape != (chunk.shape[0], num_classes):
                raise ValueError(
                    f"predict must map ({chunk.shape[0]}, D) features to "
                    f"({chunk.shape[0]}, {num_classes}) logits; on split {name!r} it returned "
                    f"shape {tuple(logits.shape)}."
                )
            outs.append(logits.argmax(dim=1).cpu())
    return accuracy(torch.cat(outs), labels.cpu())


# --------------------------------------------------------------------------- in-process caches

_lock = threading.RLock()
_backbones: dict[tuple, Backbone] = {}
_datasets: dict[tuple, DatasetSpec] = {}
_classifiers: dict[tuple, Tensor] = {}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    hash(value)
    return value


def clear_caches() -> None:
    """Forget the in-process backbones, datasets and text classifiers."""
    with _lock:
        _backbones.clear()
        _datasets.clear()
        _classifiers.clear()


def _cached_backbone(
    name: str, pretrained: str | None, device: torch.device, arch: str | None = None
) -> Backbone:
    key = (name, pretrained, str(device), arch)
    with _lock:
        if key not in _backbones:
            kwargs = {"arch": arch} if arch is not None else {}
            _backbones[key] = load_backbone(name, pretrained=pretrained, device=device, **kwargs)
        return _backbones[key]


def _cached_dataset(name: str, root: str | os.PathLike | None, kwargs: dict) -> DatasetSpec:
    from fewclip_tutorial.data.registry import load_dataset

    try:
        key: tuple | None = (name, None if root is None else str(root), _freeze(kwargs))
    except TypeError:  # unhashable keyword arguments: no caching
        key = None
    if key is None:
        return load_dataset(name, root=root, **kwargs)
    with _lock:
        if key not in _datasets:
            _datasets[key] = load_dataset(name, root=root, **kwargs)
        return _datasets[key]


def _cached_classifier(backbone: Backbone, dataset: DatasetSpec, progress: bool) -> Tensor:
    from fewclip_tutorial.zeroshot import text_classifier

    key = (
        backbone.identifier,
        str(backbone.device),
        tuple(dataset.classnames),
        tuple(dataset.templates),
    )
    with _lock:
        if key not in _classifiers:
            _classifiers[key] = text_classifier(
                backbone, dataset.classnames, dataset.templates, progress=progress
            )
        return _classifiers[key]


def build_context(
    dataset: str = "shapeworld",
    backbone: str | Backbone = EMBEDDED_BACKBONE,
    shots: int = 16,
    seed: int = 1,
    *,
    pretrained: str | None = "default",
    arch: str | None = None,
    root: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = "default",
    progress: bool = True,
    **dataset_kwargs: Any,
) -> Context:
    """Build the context of one few-shot episode.

    Args:
        dataset: a registered dataset name (see ``data.registry.list_datasets``) or a
            ready :class:`DatasetSpec`.
        backbone: a backbone name for :func:`~fewclip_tutorial.backbones.load_backbone`
            or a ready :class:`Backbone`.
        shots: ``K`` training images per class.
        seed: the episode seed (few-shot draw; methods seed their training with it).
        pretrained: the backbone's weights (``"default"``, a tag, a file, ``None``).
        arch: the open_clip architecture when ``backbone`` is a checkpoint file.
        root: data folder of downloadable datasets.
        device: compute device (default :func:`~fewclip_tutorial.device.get_device`).
        cache_dir: feature cache (``"default"``, a folder, or ``None`` for none).
        progress: show progress bars.
        **dataset_kwargs: passed to ``load_dataset``.

    Raises:
        ValueError: ``shots`` or ``seed`` is not a positive/valid integer, or the dataset
            has fewer than ``shots`` images in a class.
        KeyError: unknown dataset or backbone (messages list the valid names).
    """
    from fewclip_tutorial.data.splits import make_few_shot

    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive integer (images per class), got {shots!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    dev = device if isinstance(device, torch.device) else get_device(device)
    if isinstance(backbone, Backbone):
        bb = backbone
    else:
        bb = _cached_backbone(backbone, pretrained, dev, arch)
    if isinstance(dataset, DatasetSpec):
        spec = dataset
    else:
        spec = _cached_dataset(dataset, root, dataset_kwargs)
    splits = make_few_shot(spec, shots, seed)
    classifier = _cached_classifier(bb, spec, progress=False)
    return Context(
        backbone=bb,
        dataset=spec,
        splits=splits,
        shots=shots,
        seed=seed,
        text_classifier=classifier,
        cache_dir=cache_dir,
        progress=progress,
    )
