"""CLAP's trainers: the disentangle network trained on prompts (the method) or on
augmented image views (the paper's Im.Aug baseline), through :func:`fewclip_tutorial.training.fit`.

The authors' trainer is ``main/trainer.py``; the network and the losses are :mod:`.core`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from fewclip_tutorial.device import autocast, get_device
from fewclip_tutorial.methods.clap.config import CLAPConfig
from fewclip_tutorial.methods.clap.core import (
    NOISE_POSITIONS,
    DisentangleNetwork,
    clap_loss,
    encode_text_raw,
    encode_text_with_noise,
    info_nce,
)
from fewclip_tutorial.methods.clap.prompts import (
    AugmentConfig,
    PromptAttributes,
    augment_prompt,
    authors_word_lists,
)
from fewclip_tutorial.training import FitResult, fit

__all__ = [
    "CLAPResult",
    "TextFeatureCache",
    "default_batch_size",
    "encode_images_raw",
    "image_augmentation",
    "train_clap",
    "train_clap_image",
    "train_clap_image_features",
]


def default_batch_size(num_classes: int) -> int:
    """The smallest multiple of 8 above ``num_classes``: the authors' batch rule.

    Their configs use a batch "larger than the number of class names": 8 for PACS (7
    classes) and VLCS (5), 96 for OfficeHome (65), 384 for DomainNet (345).  The rule
    gives 8, 8, 72 and 352 for those, and 16 for ShapeWorld's 10 classes.
    """
    return 8 * (max(int(num_classes), 1) // 8 + 1)


@dataclass
class CLAPResult(FitResult):
    """:class:`~fewclip_tutorial.training.FitResult` of a CLAP network, plus the network.

    Attributes:
        network: the kept :class:`DisentangleNetwork` (eval); the identity if ``best_step == 0``.
        cached_strings: distinct strings encoded by text training (``None`` for images).
    """

    network: DisentangleNetwork | None = None
    cached_strings: int | None = None


class TextFeatureCache:
    """Text features by string: each distinct string is encoded once.

    Prompt augmentations produce a finite set of strings, so training with IGN off
    never encodes a string twice.

    Args:
        encode_fn: ``list[str] -> (T, D)`` features (raw or normalised, as the caller encodes).
        device: where the returned features live.
    """

    def __init__(self, encode_fn: Callable[[list[str]], Tensor], device: torch.device) -> None:
        self.encode_fn = encode_fn
        self.device = device
        self._store: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def __call__(self, texts: Sequence[str]) -> Tensor:
        """``T`` strings -> ``(T, D)`` features."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._store))
        if missing:
            with torch.no_grad():
                feats = self.encode_fn(missing).detach().float().to(self.device)
            for t, f in zip(missing, feats, strict=True):
                self._store[t] = f
        return torch.stack([self._store[t] for t in texts])


#: Text-feature caches by (backbone identifier, device, raw or normalised): the text encoder
#: is frozen, so sweeps over shots and seeds encode each string once.
_TEXT_CACHES: dict[tuple[str, str, str], TextFeatureCache] = {}

_INPUTS = ("raw", "normalized")


def _check_input(input_features: str) -> None:
    if input_features not in _INPUTS:
        raise ValueError(
            f"input_features={input_features!r}: choose 'raw' (the authors' network input) or "
            "'normalized' (L2-normalised CLIP features)."
        )


def _is_backbone(text_encoder: Any) -> bool:
    return hasattr(text_encoder, "encode_text") and hasattr(text_encoder, "tokenizer")


def _text_cache_for(
    text_encoder: Any, device: torch.device, input_features: str = "raw"
) -> TextFeatureCache:
    _check_input(input_features)
    raw = input_features == "raw"
    if _is_backbone(text_encoder):
        if raw:
            encode = lambda texts: encode_text_raw(text_encoder, texts)  # noqa: E731
        else:
            encode = text_encoder.encode_text
    elif callable(text_encoder):
        if raw:
            encode = lambda texts: text_encoder(texts).float()  # noqa: E731
        else:
            encode = lambda texts: F.normalize(text_encoder(texts).float(), dim=-1)  # noqa: E731
    else:
        raise TypeError(
            "text_encoder must be a Backbone (with .encode_text and .tokenizer) or a function "
            "list[str] -> (T, D) features."
        )
    ident = getattr(text_encoder, "identifier", None)
    if not isinstance(ident, str):
        return TextFeatureCache(encode, device)
    key = (ident, str(device), input_features)
    return _TEXT_CACHES.setdefault(key, TextFeatureCache(encode, device))


def _word_lists_of(prompts: Sequence[PromptAttributes]) -> dict[str, tuple[str, ...]]:
    """The authors' word lists from the attribute values of ``prompts``, in order of appearance."""
    attrs = {
        "colors": "color",
        "sizes": "size",
        "image_types": "image_type",
        "art_styles": "art_style",
    }
    lists = {k: dict.fromkeys(getattr(p, a) for p in prompts) for k, a in attrs.items()}
    return authors_word_lists(**{k: [v for v in lists[k] if v is not None] for k in attrs})


def _batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Index batches without replacement, a fresh permutation every pass (a short tail is dropped)."""
    batch_size = min(batch_size, n)
    while True:
        perm = rng.sample(range(n), n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def _train_network(
    dim: int,
    batch_loss: Callable[[DisentangleNetwork, list[int]], Tensor],
    n: int,
    num_classes: int,
    config: CLAPConfig,
    *,
    seed: int,
    val_fn: Callable[[DisentangleNetwork], Any] | None,
    device: torch.device,
    progress: bool,
    desc: str,
) -> CLAPResult:
    """A seeded identity network trained by Adam on ``batch_loss(network, indices)`` through ``fit``."""
    if n < 2:
        raise ValueError(f"{desc} needs at least 2 training samples, got {n}.")
    batch_size = config.batch_size or default_batch_size(num_classes)
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size} must be >= 2: InfoNCE needs negatives.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = DisentangleNetwork(dim, hidden=config.hidden).to(device)
    batches = _batches(n, batch_size, random.Random(seed))
    result = fit(
        network,
        lambda step: batch_loss(network, next(batches)),
        steps=config.steps,
        optimizer=torch.optim.Adam(network.parameters(), lr=config.lr),
        evaluate=None if val_fn is None else (lambda: val_fn(network)),
        eval_every=config.eval_every,
        patience=config.patience or None,
        select_best=config.select_best,
        device=device,
        progress=progress,
        desc=desc,
    )
    return CLAPResult(**vars(result), network=network)


def train_clap(
    text_encoder: Any,
    prompts: Sequence[PromptAttributes],
    config: CLAPConfig | None = None,
    *,
    aug: AugmentConfig | None = None,
    ign: bool | None = None,
    n_noise: int = 4,
    noise_std: float = 0.02,
    noise_positions: Sequence[str] = NOISE_POSITIONS,
    words: dict[str, Sequence[str]] | None = None,
    class_prompt: str = "{}",
    seed: int = 1,
    val_fn: Callable[[DisentangleNetwork], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> CLAPResult:
    """Train CLAP's network on text only (Cai et al., 2024; the authors' ``main/trainer.py``).

    Each step draws ``B`` prompts (a fresh permutation per pass), augments each
    (:func:`augment_prompt` in ``config.prompt_form``), encodes the original, the augmented
    and the class-name prompt with the frozen text encoder (raw or L2-normalised features,
    ``config.input_features``), refines all three with the network (``lam = 1``) and
    minimises :func:`clap_loss` (``config.loss_form``).  Without IGN every string is encoded
    once (:class:`TextFeatureCache`); with IGN the augmented prompts go through
    :func:`encode_text_with_noise` every step: one noise draw shared by the batch and one
    insertion position per batch drawn from ``noise_positions``, as the authors'
    ``__encode_noised_text`` does.

    Random draws: ``random.Random(seed + 1)`` gives, per prompt in batch order, the five
    augmentation numbers (:func:`authors_augment`; the authors draw ``torch.rand(1)`` each),
    then one choice of the noise position per batch; the noise comes from a
    ``torch.Generator`` seeded with ``seed``; batches from ``random.Random(seed)``.

    Selection: with ``val_fn(network) -> score`` (higher is better; a float, a tuple or a
    mapping with ``"score"``, see :func:`fewclip_tutorial.training.fit`) the state with the
    best score over evaluations every ``config.eval_every`` steps is kept, step 0 (the
    identity) included.  Never pass a test-set score.  Without ``val_fn`` the last state is kept.

    Args:
        text_encoder: a :class:`~fewclip_tutorial.backbones.Backbone` (needed for IGN), or a
            function ``list[str] -> (T, D)`` features.
        prompts: the structured training prompts (e.g. :func:`clap_prompts` for every class).
        config: :class:`CLAPConfig`; ``overrides`` replace single fields (``steps=80``).
        aug: augmentation probabilities (default :class:`AugmentConfig`).
        ign: Gaussian noise tokens on the augmented view.  ``None`` (default): on, as the
            authors train on PACS and VLCS, when ``text_encoder`` is a Backbone with its
            open_clip model; a plain function cannot take noise tokens, so ``None`` means off
            for it, and ``True`` raises.
        n_noise, noise_std: the noise tokens (the authors' ``noise_len`` 4, ``std`` 0.02).
        noise_positions: positions drawn from per batch (see :func:`encode_text_with_noise`).
        words: the authors' word lists for the ``"authors"`` prompt form (default: the
            attribute values of ``prompts``, see :func:`authors_word_lists`).
        class_prompt: format of the class-name prompt (``"{}"``: the bare class name).
        seed: seeds network init, batch order, augmentations and noise.

    Returns:
        :class:`CLAPResult`.
    """
    config = replace(config or CLAPConfig(), **overrides)
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError(
            f"train_clap needs at least 2 prompts (got {len(prompts)}); see clap_prompts()."
        )
    aug = AugmentConfig() if aug is None else aug
    dev = get_device(device if device is not None else getattr(text_encoder, "device", None))
    cache = _text_cache_for(text_encoder, dev, config.input_features)
    has_model = hasattr(text_encoder, "model") and hasattr(text_encoder, "tokenizer")
    if ign is None:
        ign = has_model
    if ign and not has_model:
        raise ValueError(
            "ign=True needs the open_clip model: pass the Backbone (with .model and "
            ".tokenizer) as text_encoder, or set ign=False."
        )
    bad = [p for p in noise_positions if p not in NOISE_POSITIONS + ("inside",)]
    if ign and (bad or not noise_positions):
        raise ValueError(f"noise_positions={list(noise_positions)}: use {NOISE_POSITIONS}.")
    form = config.prompt_form
    if form == "authors" and words is None:
        words = _word_lists_of(prompts)
    rng = random.Random(seed + 1)  # augmentations and noise positions (batches use seed)
    noise_gen = torch.Generator().manual_seed(seed)
    anchor_texts = [p.text(form) for p in prompts]
    class_texts = [class_prompt.format(p.classname) for p in prompts]
    raw = config.input_features == "raw"

    token_rows: dict[str, Tensor] = {}  # augmentations give a finite set of strings

    def tokenize(texts: list[str]) -> Tensor:
        """``tokenizer(texts)``, each distinct string tokenized once per run."""
        missing = [t for t in dict.fromkeys(texts) if t not in token_rows]
        if missing:
            token_rows.update(zip(missing, text_encoder.tokenizer(missing), strict=True))
        return torch.stack([token_rows[t] for t in texts]).to(text_encoder.device)

    def noisy(texts: list[str]) -> Tensor:
        tokens = tokenize(texts)
        position = rng.choice(list(noise_positions))
        with torch.no_grad(), autocast(dev):
            f = encode_text_with_noise(
                text_encoder.model, tokens, n_noise, noise_std, position, noise_gen
            )
        f = f.float() if raw else F.normalize(f.float(), dim=-1)
        return f.to(dev)

    def batch_loss(network: DisentangleNetwork, idx: list[int]) -> Tensor:
        augmented = [augment_prompt(prompts[i], aug, rng, form, words) for i in idx]
        f_anchor = cache([anchor_texts[i] for i in idx])
        f_aug = noisy(augmented) if ign and n_noise > 0 else cache(augmented)
        f_cls = cache([class_texts[i] for i in idx])
        z_anchor, z_aug, z_cls = network(torch.cat([f_anchor, f_aug, f_cls])).chunk(3)
        terms = (config.tau, config.tau_c, config.lambda_c, config.loss_form)
        return clap_loss(z_anchor, z_aug, z_cls, *terms)

    dim = int(cache(anchor_texts[:1]).shape[-1])
    num_classes = len({p.classname for p in prompts})
    result = _train_network(
        dim, batch_loss, len(prompts), num_classes, config, seed=seed, val_fn=val_fn,
        device=dev, progress=progress, desc="CLAP",
    )  # fmt: skip
    result.cached_strings = len(cache)
    return result


def image_augmentation(
    crop_scale: tuple[float, float] = (0.64, 1.0), brightness: float = 0.5, hue: float = 0.3
) -> Callable:
    """Im.Aug's view transform on PIL images: random resized crop + ColorJitter.

    The paper says each with p = 0.5; the authors' code applies both always, and so do we.
    The crop keeps the input size.
    """
    from torchvision import transforms as T

    def apply(img: Any) -> Any:
        size = img.size[::-1]
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=crop_scale, antialias=True),
                T.ColorJitter(brightness=brightness, hue=hue),
            ]
        )(img)

    return apply


def train_clap_image_features(
    view_features: Tensor,
    config: CLAPConfig | None = None,
    *,
    num_classes: int = 1,
    seed: int = 1,
    val_fn: Callable[[DisentangleNetwork], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> CLAPResult:
    """Im.Aug core: train the network on pairs of augmented views of the same image.

    Each step draws ``B`` images and two different views of each and minimises
    ``InfoNCE(view1, view2; tau)`` in ``config.loss_form``: the authors' Im.Aug loss
    (``main/trainer.py``, ``loss_image_modal``), with no class-name term.

    Args:
        view_features: ``(V, N, D)`` features of ``V >= 2`` augmented views of ``N`` images.
        num_classes: sets the default batch size (:func:`default_batch_size`).
        config, overrides, seed, val_fn: as in :func:`train_clap`.
    """
    config = replace(config or CLAPConfig(), **overrides)
    if view_features.dim() != 3 or view_features.shape[0] < 2:
        raise ValueError(
            f"view_features must be (V, N, D) with V >= 2 views, got {tuple(view_features.shape)}; "
            "encode at least two augmented views per image."
        )
    n_views, n, dim = view_features.shape
    dev = get_device(device)
    feats = view_features.to(dev).float()
    rng = random.Random(seed + 1)

    def batch_loss(network: DisentangleNetwork, idx: list[int]) -> Tensor:
        pairs = [rng.sample(range(n_views), 2) for _ in idx]
        i = torch.as_tensor(idx, device=dev)
        v1 = torch.as_tensor([p[0] for p in pairs], device=dev)
        v2 = torch.as_tensor([p[1] for p in pairs], device=dev)
        return info_nce(network(feats[v1, i]), network(feats[v2, i]), config.tau, config.loss_form)

    return _train_network(
        dim, batch_loss, n, num_classes, config, seed=seed, val_fn=val_fn, device=dev,
        progress=progress, desc="Im.Aug",
    )  # fmt: skip


@torch.no_grad()
def encode_images_raw(backbone: Any, images: Tensor, batch_size: int = 256) -> Tensor:
    """``(B, D)`` image features *before* L2 normalisation (``model.encode_image``), fp32.

    The authors' trainer and evaluation feed these to the network (``main/trainer.py``,
    ``__encode_img``; ``main/evaluate.py``).
    """
    dev = torch.device(backbone.device)
    dtype = backbone.dtype
    outs = []
    for chunk in torch.split(images, batch_size):
        with torch.inference_mode(), autocast(dev, enabled=dtype == torch.float32):
            outs.append(backbone.model.encode_image(chunk.to(dev, dtype)))
    return torch.cat(outs).float().clone()


def train_clap_image(
    backbone: Any,
    images: Any,
    config: CLAPConfig | None = None,
    *,
    n_views: int = 4,
    seed: int = 1,
    progress: bool = True,
    **kwargs: Any,
) -> CLAPResult:
    """Im.Aug: the same network trained on augmented views of images instead of prompts.

    ``n_views`` views of every image (:func:`image_augmentation`) are encoded once (raw or
    L2-normalised, ``config.input_features``; the authors' ``__encode_img`` gives raw ones);
    training samples view pairs (:func:`train_clap_image_features`).  The paper's images are one
    synthetic image per prompt; for ShapeWorld the runner renders them from the prompt factors.

    Args:
        backbone: a Backbone (``preprocess``, ``encode_images``).
        images: a :class:`~fewclip_tutorial.data.base.LabeledSplit` (PIL images + labels).
        kwargs: forwarded to :func:`train_clap_image_features` (``val_fn``, ``device``, overrides).
    """
    if n_views < 2:
        raise ValueError(f"n_views={n_views} must be >= 2 (pairs of views).")
    cfg = replace(
        config or CLAPConfig(), **{k: kwargs[k] for k in ("input_features",) if k in kwargs}
    )
    _check_input(cfg.input_features)
    transform = image_augmentation()
    views = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pil = [images.load_image(i) for i in range(len(images))]
        for _ in tqdm(range(n_views), desc="Im.Aug views", disable=not progress, leave=False):
            batch = torch.stack([backbone.preprocess(transform(img)) for img in pil])
            if cfg.input_features == "raw":
                views.append(encode_images_raw(backbone, batch, batch_size=256))
            else:
                views.append(backbone.encode_images(batch, batch_size=256).float())
    kwargs.setdefault("device", backbone.device)
    kwargs.setdefault("num_classes", len(set(np.asarray(images.labels).tolist())))
    return train_clap_image_features(
        torch.stack(views), config, seed=seed, progress=progress, **kwargs
    )
