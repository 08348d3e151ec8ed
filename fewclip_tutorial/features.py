"""Image features from a frozen backbone, with an on-disk cache.

Training-free methods (zero-shot CLIP, Tip-Adapter, linear probes, cross-modal
heads) only need the frozen image embeddings ``f = E_img(x) / ||E_img(x)||``.
:func:`extract_features` computes them once per (backbone, split, views,
augmentation, seed) and stores them on disk, so notebooks and the CLI re-run in
seconds.  ``raw=True`` gives ``E_img(x)`` itself, not normalised (CoOp's linear
probe), cached under its own key.

Augmented views follow Tip-Adapter's cache construction (Zhang et al., 2022):
each of the ``V`` views (10 in the paper) passes every training image through a
random resized crop (scale 0.5-1) and a random horizontal flip; the method then
averages the ``(V, N, D)`` view features into one key per image and
re-normalises it.  Each image of each view gets its own seed derived from
``(seed, view, index)``, so results do not depend on batch size or workers.

Cache files are written atomically and checked on load (key, size, SHA-256 of
the tensor bytes); a stale or corrupted file is reported and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fewclip_tutorial.data.base import LabeledSplit
from fewclip_tutorial.device import default_num_workers, loader_kwargs

__all__ = [
    "CACHE_ENV_VAR",
    "FEATURE_FORMAT_VERSION",
    "FeatureSet",
    "ViewDataset",
    "augment_transform",
    "cache_key",
    "cache_path",
    "default_cache_dir",
    "extract_features",
]

logger = logging.getLogger(__name__)

#: Bump when the way features are computed or stored changes (invalidates caches).
FEATURE_FORMAT_VERSION = 1
#: Environment variable that overrides the default cache folder.
CACHE_ENV_VAR = "FEWCLIP_CACHE"
#: Scale range (area fraction) of the random resized crop used for augmented views at
#: CLIP's resolutions, as in Tip-Adapter's code (224 px: the crop keeps objects whole).
AUGMENT_SCALE = (0.5, 1.0)
#: Below this size (px) augmented views are small translations instead of resized crops.
SMALL_IMAGE_SIZE = 96


def small_image_padding(image_size: int) -> int:
    """Translation range (px) of small-image views: 2 px at 32 px (``image_size // 16``)."""
    return max(1, image_size // 16)


def crop_transform(image_size: int, scale: tuple[float, float] = AUGMENT_SCALE) -> Any:
    """The random crop of augmented views, scaled to the resolution.

    * At CLIP's resolutions (``image_size >= 96``): ``RandomResizedCrop`` with ``scale``
      (default :data:`AUGMENT_SCALE`, as Tip-Adapter's code does at 224 px), bicubic.
    * Below: a translation by at most :func:`small_image_padding` px (edge padding, then a
      random crop at the same size), as is usual for 32 px images.  A half-area resized crop
      of a 32 px ShapeWorld image cuts up to 9 px off a side, as much as an object's radius,
      and resamples what is left; measured on the shipped model, it made Tip-Adapter's
      cache-only accuracy several points worse than clean keys, and translations do not.
    """
    from torchvision import transforms as T

    if image_size >= SMALL_IMAGE_SIZE:
        return T.RandomResizedCrop(
            image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC
        )
    pad = small_image_padding(image_size)
    return T.Compose(
        [
            # images of another size are first brought to image_size (a no-op at that size)
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.RandomCrop(image_size, padding=pad, padding_mode="edge"),
        ]
    )


_MAGIC = b"FEWCLIPFEAT\x00"
_LEN = struct.Struct("<Q")


@dataclass
class FeatureSet:
    """Features of one split.

    Attributes:
        features: ``(N, D)`` L2-normalised fp32 features (raw ones when extracted with
            ``raw=True``), or ``(V, N, D)`` for ``V`` views (``views > 1`` or
            ``augment=True``).
        labels: ``(N,)`` int64 labels.
    """

    features: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.features.shape[-1])

    @property
    def num_views(self) -> int | None:
        """``V`` for ``(V, N, D)`` features, ``None`` for ``(N, D)``."""
        return int(self.features.shape[0]) if self.features.dim() == 3 else None


class _CacheError(Exception):
    """A cache file that must not be trusted."""


def default_cache_dir() -> Path:
    """``$FEWCLIP_CACHE`` or ``~/.cache/fewclip_tutorial/features``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/fewclip_tutorial/features").expanduser()


def augment_transform(
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    flip: bool = True,
) -> Any:
    """The training-view augmentation: :func:`crop_transform`, then a horizontal flip.

    ``flip=False`` leaves the flip out, for datasets whose classes are not mirror-invariant
    (``DatasetSpec.info["hflip_invariant"]``).  PIL image -> ``(3, image_size, image_size)``
    normalised tensor.
    """
    from torchvision import transforms as T

    steps = [crop_transform(image_size)]
    if flip:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean=mean, std=std)])


def _describe_transform(backbone: Any, augment: bool, flip: bool = True) -> str:
    """A stable text description of the image transform (part of the cache key)."""
    size, mean, std = backbone.image_size, tuple(backbone.mean), tuple(backbone.std)
    if augment:
        crop = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(crop_transform(size)))
        return f"augment:{crop}+flip={bool(flip)}+ToTensor+Normalize({mean},{std})"
    # repr of a torchvision Compose lists its steps and parameters; drop memory addresses.
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(backbone.preprocess))
    return f"eval:{text}|size={size}|mean={mean}|std={std}"


def cache_key(
    backbone: Any,
    split: LabeledSplit,
    *,
    views: int = 1,
    augment: bool = False,
    seed: int = 0,
    flip: bool = True,
    raw: bool = False,
) -> str:
    """SHA-256 (hex) identifying the features of ``split`` under these settings.

    Hashes the backbone identifier, the split fingerprint, ``views``,
    ``augment``, ``seed``, the transform description (with ``flip``) and
    :data:`FEATURE_FORMAT_VERSION`; ``raw=True`` adds ``"raw": true`` (so the keys of
    normalised features, and the caches written before raw ones existed, are unchanged).
    """
    payload = {
        "backbone": str(backbone.identifier),
        "split": split.fingerprint(),
        "views": int(views),
        "augment": bool(augment),
        "seed": int(seed),
        "transform": _describe_transform(backbone, augment, flip),
        "version": FEATURE_FORMAT_VERSION,
    }
    if raw:
        payload["raw"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, split: LabeledSplit, key: str) -> Path:
    """The cache file for ``key``: ``<cache_dir>/<split name>-<key>.feat``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", split.name).strip("_")[:60] or "split"
    return Path(cache_dir) / f"{safe}-{key}.feat"


# --------------------------------------------------------------------------- cache I/O


def _write_cache(path: Path, key: str, features: Tensor, labels: Tensor) -> None:
    """Write atomically: temp file in the same folder, then ``os.replace``."""
    feats = np.ascontiguousarray(features.detach().cpu().numpy().astype(np.float32))
    labs = np.ascontiguousarray(labels.detach().cpu().numpy().astype(np.int64))
    payload = feats.tobytes() + labs.tobytes()
    header = json.dumps(
        {
            "version": FEATURE_FORMAT_VERSION,
            "key": key,
            "features_shape": list(feats.shape),
            "labels_shape": list(labs.shape),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".feat", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_MAGIC + _LEN.pack(len(header)) + header + payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_cache(path: Path, key: str) -> FeatureSet:
    """Read and verify a cache file; raise :class:`_CacheError` if it cannot be trusted."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _CacheError(f"unreadable ({err})") from err
    start = len(_MAGIC) + _LEN.size
    if len(data) < start or not data.startswith(_MAGIC):
        raise _CacheError("not a feature-cache file (bad magic bytes or truncated header)")
    (header_len,) = _LEN.unpack(data[len(_MAGIC) : start])
    if header_len > len(data) - start:
        raise _CacheError("truncated header")
    try:
        header = json.loads(data[start : start + header_len].decode())
        f_shape = tuple(int(s) for s in header["features_shape"])
        l_shape = tuple(int(s) for s in header["labels_shape"])
        version, stored_key, checksum = header["version"], header["key"], header["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise _CacheError(f"corrupted header ({err})") from err
    if version != FEATURE_FORMAT_VERSION or stored_key != key:
        raise _CacheError("stale: it was written for different settings or package version")
    payload = data[start + header_len :]
    n_feat = 4 * math.prod(f_shape)
    n_lab = 8 * math.prod(l_shape)
    if len(payload) != n_feat + n_lab:
        raise _CacheError(f"truncated or padded: {len(payload)} bytes, expected {n_feat + n_lab}")
    if hashlib.sha256(payload).hexdigest() != checksum:
        raise _CacheError("checksum mismatch (corrupted tensor bytes)")
    feats = np.frombuffer(payload, dtype=np.float32, count=n_feat // 4).reshape(f_shape)
    labs = np.frombuffer(payload, dtype=np.int64, offset=n_feat).reshape(l_shape)
    return FeatureSet(torch.from_numpy(feats.copy()), torch.from_numpy(labs.copy()))


# --------------------------------------------------------------------------- extraction


class ViewDataset(Dataset):
    """``views`` passes over the ``split`` images through ``transform``: item ``v * N + i`` is
    image ``i`` of view ``v``.  With ``seed`` set, it is transformed under its own torch seed
    derived from ``(seed, v, i)``, so the result depends neither on the batch size nor on the
    number of workers.  One dataset for every view means one ``DataLoader``: its workers start
    once per extraction, not once per view."""

    def __init__(
        self,
        split: LabeledSplit,
        transform: Any,
        seed: int | None,
        view: int = 0,
        *,
        views: int = 1,
    ) -> None:
        self.split = split
        self.transform = transform
        self.seed = seed
        self.view = view  # index of the first view (its seeds)
        self.views = views
        self.n = len(split)

    def __len__(self) -> int:
        return self.views * self.n

    def __getitem__(self, item: int) -> Tensor:
        offset, index = divmod(int(item), self.n)
        view = self.view + offset
        image = self.split.load_image(index)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.seed is None:
            return self.transform(image)
        state = np.random.SeedSequence([int(self.seed), int(view), int(index)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))
            return self.transform(image)


def _encode_view(
    backbone: Any,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    pbar: Any,
    raw: bool = False,
) -> Tensor:
    device = torch.device(backbone.device)
    kwargs = {"normalize": False} if raw else {}
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        generator=torch.Generator().manual_seed(0),  # leave the global torch RNG untouched
        **loader_kwargs(device, num_workers),
    )
    chunks: list[Tensor] = []
    with torch.inference_mode():
        for batch in loader:
            out = backbone.encode_images(batch.to(device, non_blocking=True), **kwargs)
            if out.dim() != 2 or out.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"backbone.encode_images returned shape {tuple(out.shape)} for a batch of "
                    f"{batch.shape[0]} images; it must return (B, D)."
                )
            chunks.append(out.float().cpu())
            pbar.update(1)
    # Outside inference mode, so the result is a normal tensor usable in autograd graphs.
    result = torch.cat(chunks)
    return result.clone() if result.is_inference() else result


def extract_features(
    backbone: Any,
    split: LabeledSplit,
    *,
    views: int = 1,
    augment: bool = False,
    batch_size: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = "default",
    progress: bool = True,
    num_workers: int | None = None,
    flip: bool = True,
    raw: bool = False,
) -> FeatureSet:
    """Encode every image of ``split`` with the frozen ``backbone``.

    Args:
        backbone: a :class:`~fewclip_tutorial.backbones.Backbone` (needs
            ``preprocess``, ``image_size``, ``mean``, ``std``, ``device``,
            ``identifier`` and ``encode_images``).
        split: the images to encode.
        views: number of views ``V``.  With ``augment=True`` each view is a new
            random augmentation (Tip-Adapter uses 10); without augmentation the
            views are identical copies of the single eval-transform pass.
        augment: :func:`augment_transform` (a crop scaled to the resolution, and a
            horizontal flip) instead of the backbone's eval preprocessing.
        batch_size: images per forward pass (default 1024 on CUDA, 256 otherwise).
        seed: seeds the augmentations; the same seed gives the same features.
        cache_dir: ``"default"`` (``$FEWCLIP_CACHE`` or
            ``~/.cache/fewclip_tutorial/features``), a folder, or ``None`` (no cache).
        progress: show a tqdm progress bar.
        num_workers: DataLoader processes decoding images (``None``:
            :func:`~fewclip_tutorial.device.default_num_workers`, i.e. up to 8 on CUDA and
            0 on CPU; ``$FEWCLIP_NUM_WORKERS`` overrides).  The features do not depend on it
            (each image has its own augmentation seed), so it is not part of the cache key.
        flip: with ``augment``, flip views horizontally at random (``False`` for datasets
            whose classes are not mirror-invariant).
        raw: the image tower's output as it is, not L2-normalised
            (``backbone.encode_images(..., normalize=False)``), as CoOp's linear probe
            uses it; cached under its own key (:func:`cache_key`).

    Returns:
        :class:`FeatureSet` with features ``(N, D)`` when ``views == 1`` and not
        ``augment``, else ``(V, N, D)``; labels ``(N,)`` int64.
    """
    from tqdm.auto import tqdm

    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or views < 1:
        raise ValueError(f"views must be a positive integer, got {views!r}.")
    views = int(views)
    n = len(split)
    if n == 0:
        raise ValueError(f"split {split.name!r} is empty; there are no images to encode.")
    labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.int64)
    stacked = views > 1 or augment

    path: Path | None = None
    key = ""
    if cache_dir is not None:
        if getattr(backbone, "identifier", None) is None:
            logger.warning("backbone has no `identifier`; feature caching is disabled.")
        else:
            folder = default_cache_dir() if cache_dir == "default" else Path(cache_dir).expanduser()
            key = cache_key(
                backbone, split, views=views, augment=augment, seed=seed, flip=flip, raw=raw
            )
            path = cache_path(folder, split, key)
            if path.exists():
                try:
                    cached = _read_cache(path, key)
                    if not torch.equal(cached.labels, labels):
                        raise _CacheError("stale: labels differ from the split's labels")
                    return cached
                except _CacheError as err:
                    logger.warning("Feature cache %s is %s; recomputing it.", path, err)

    device = torch.device(backbone.device)
    if batch_size is None:
        batch_size = 1024 if device.type == "cuda" else 256
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if num_workers is None:
        num_workers = default_num_workers(device)
    passes = views if augment else 1
    pbar = tqdm(
        total=math.ceil(passes * n / batch_size),
        desc=f"features {split.name}",
        disable=not progress,
        unit="batch",
    )
    with pbar:
        if augment:
            tf = augment_transform(
                backbone.image_size, tuple(backbone.mean), tuple(backbone.std), flip=flip
            )
            ds = ViewDataset(split, tf, seed=seed, views=views)
        else:
            ds = ViewDataset(split, backbone.preprocess, seed=None)
        encoded = _encode_view(backbone, ds, batch_size, num_workers, pbar, raw=raw)

    if augment:
        features = encoded.reshape(views, n, -1)
    elif stacked:
        features = encoded.unsqueeze(0).repeat(views, 1, 1)
    else:
        features = encoded
    result = FeatureSet(features.contiguous(), labels)

    if path is not None:
        try:
            _write_cache(path, key, result.features, result.labels)
        except OSError as err:
            logger.warning(
                "Could not write feature cache %s (%s); continuing without it.", path, err
            )
    return result
