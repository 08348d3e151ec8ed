"""Cross-modal adaptation (Lin et al., CVPR 2023, "Multimodality helps unimodality").

A class name embedded by the text encoder is one more *training sample* of that class,
in the same space as the image features.  So a linear probe on CLIP features is trained
on images **and** texts at once:

* every class's per-template text embedding becomes a labelled sample
  (:func:`text_samples`);
* the head is bias-free and linear on L2-normalised features, with a fixed scale
  ``s``: ``logits = s * normalize(x) @ W.T`` (:class:`CrossModalHead`).  ``W`` starts
  as the class text prototypes (:func:`class_prototypes`), so the untrained head *is*
  the zero-shot classifier;
* each mini-batch is ``int(B * (1 - image_ratio))`` text samples and the rest images
  (half/half by default; an odd sample goes to the images), each half drawn by
  shuffling its pool without replacement, one permutation per epoch
  (:func:`mixed_batches`, which gathers every batch with :func:`build_mixed_batch`);
* one trainer, :func:`~.train.train_head`, runs :func:`fewclip_tutorial.training.fit` with AdamW,
  linear warm-up and cosine decay, and a pluggable image encoder: ``suffix=None`` for
  the linear probe, the trainable end of the image encoder for partial fine-tuning
  (:func:`split_visual_encoder`, :func:`train_partial_finetune`);
* the learning rate, the weight decay, the batch size and the stopping step are chosen
  on the few-shot **validation** split (:func:`train_cross_modal`), and so is the
  number of templates when several are tried (:func:`sweep_templates`);
* WiSE-FT averages the learned head with the zero-shot head (:func:`wise_ft`).

This module is the functional core (samples, head, batches, WiSE-FT); the trainers are
:mod:`.train`, the runner :mod:`.runner`, the options :mod:`.config`.  This follows the
authors' ``train.py`` (``train()``, ``main()``'s sweep and
``get_valid_batch_sizes``), ``engine/model/logit.py`` (``LogitHead``) and
``engine/optimizer/default.py`` (``HYPER_DICT``) in ``linzhiqiu/cross_modal_adaptation``.
Choices made here, each said again in the chapter:

* **Steps, not epochs.** Every configuration runs ``iters`` optimiser steps whatever
  the size of the training set, as the paper's 12,800 (the default here is
  :data:`DEFAULT_ITERS` = 1000, cheap on a CPU).  A small set is therefore seen many
  times: at 16 shots x 10 classes and 4 images a step (batch 8), 1000 steps are 25
  passes over the 160 images, and validation (every ``eval_every`` = 100 steps) has
  ten chances to move.
* **Selection.** Validation is scored by ``(accuracy, -cross-entropy)`` at step 0 (the
  zero-shot-initialised head) and every ``eval_every`` steps; a later state is kept only
  when it is strictly better, so a run can return its starting head.  The authors
  evaluate after the first step and compare accuracy only.
* **Grids.** ``"paper"``: lr {1e-3, 1e-4} x wd {0, 1e-2, 1e-4} x batch {8, 32}, the
  default on CUDA; ``"small"``: lr {1e-3, 1e-4} x wd {0, 1e-2} x batch {8}, the default
  on a CPU (batch 32 does not fit a one-shot, 10-class set: 16 image samples from a
  pool of 10).  As in ``get_valid_batch_sizes``, a batch size whose image or text half
  is not smaller than its pool is skipped.
* **Partial fine-tuning** uses the scale ``exp(4)`` as the paper, one configuration by
  default (lr 1e-4, wd 0, batch 8, the authors' partial batch size).
* **Prototypes** average the L2-normalised template embeddings (CLIP's ensemble); the
  authors' ``get_zero_shot_weights`` averages them unnormalised.  Both normalise the
  mean.
* **Image views**: the centre crop plus its horizontal flip, each one sample (as the
  authors concatenate the flipped features to the centre crops), except for datasets
  whose classes are not mirror-invariant, such as ShapeWorld.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewclip_tutorial.device import float32_or_64
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE, prompt_ensemble

__all__ = [
    "CrossModalHead",
    "MixedBatch",
    "build_mixed_batch",
    "class_prototypes",
    "epoch_batches",
    "mixed_batches",
    "text_samples",
    "wise_ft",
]


def _check_text_tensor(t: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim != 3 or min(t.shape) == 0:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"text features must be a non-empty (C, M, D) tensor (classes, templates, dim), "
            f"got {shape}; for one template per class use t.unsqueeze(1)."
        )
    return t


def _check_labels(labels: Tensor, num_classes: int, what: str) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"{what} labels must be a 1-D tensor, got shape {tuple(labels.shape)}.")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{what} labels range over [{int(labels.min())}, {int(labels.max())}] but there "
            f"are {num_classes} classes; labels must be in [0, {num_classes - 1}] and in the "
            "order of the class names used for the text features."
        )
    return labels.long()


def text_samples(text_features_per_template: Tensor) -> tuple[Tensor, Tensor]:
    """Turn per-template text embeddings into labelled training samples.

    Args:
        text_features_per_template: ``(C, M, D)``: class ``c`` under template ``m``.

    Returns:
        ``features`` ``(C*M, D)``, rows L2-normalised and class-major (row ``c*M + m``
        is template ``m`` of class ``c``), and ``labels`` ``(C*M,)`` int64 with
        ``labels[c*M + m] = c``.
    """
    t = _check_text_tensor(text_features_per_template)
    num_classes, num_templates, dim = t.shape
    features = F.normalize(float32_or_64(t.reshape(num_classes * num_templates, dim)), dim=-1)
    labels = torch.arange(num_classes, device=t.device).repeat_interleave(num_templates)
    return features, labels


def class_prototypes(text_features_per_template: Tensor) -> Tensor:
    """The zero-shot classifier: ``w_c = normalize(mean_m normalize(t_{c,m}))``.

    Args:
        text_features_per_template: ``(C, M, D)``.

    Returns:
        ``(C, D)`` unit rows (CLIP's prompt ensemble).
    """
    return prompt_ensemble(float32_or_64(_check_text_tensor(text_features_per_template)))


class CrossModalHead(nn.Module):
    """Bias-free linear head on L2-normalised features with a fixed logit scale.

    ``logits = logit_scale * normalize(x) @ W.T`` with ``x`` ``(N, D)`` and ``W``
    ``(C, D)``, as the authors' ``LogitHead`` around a bias-free ``nn.Linear`` (their
    scale is ``exp(4.60517) = 100``).  The rows of ``W`` are not re-normalised during
    training; ``logit_scale`` is a buffer, not a parameter.

    Args:
        weight: ``(C, D)`` initial weight (typically :func:`class_prototypes`).
        logit_scale: the fixed scale (100; ``exp(4)`` for partial fine-tuning).
    """

    def __init__(self, weight: Tensor, logit_scale: float = CLIP_LOGIT_SCALE) -> None:
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
            raise ValueError(
                f"CrossModalHead needs a (C, D) weight with C, D > 0, got shape "
                f"{tuple(weight.shape)}; pass the (C, D) class prototypes."
            )
        if not math.isfinite(logit_scale) or logit_scale <= 0:
            raise ValueError(f"logit_scale must be a positive number, got {logit_scale}.")
        self.weight = nn.Parameter(float32_or_64(weight.detach().clone()))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        """``(N, D)`` features -> ``(N, C)`` logits."""
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"features have dimension {x.shape[-1]} but the head expects {self.dim}; "
                "use features from the backbone the head was built for."
            )
        return self.logit_scale * F.normalize(x.to(self.weight.dtype), dim=-1) @ self.weight.T


class MixedBatch(NamedTuple):
    """One mini-batch: ``x`` ``(B, D)``, ``y`` ``(B,)``, ``is_text`` ``(B,)`` bool."""

    x: Tensor
    y: Tensor
    is_text: Tensor


def _split_counts(batch_size: int, image_ratio: float) -> tuple[int, int]:
    """Image and text samples of a batch: ``B - int(B * (1 - ratio))`` and ``int(B * (1 - ratio))``.

    As the authors' ``text_batch_size = int(batch_size * 0.5)``: an odd sample goes to
    the image half.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(image_ratio, bool) or not isinstance(image_ratio, (int, float)):
        raise TypeError(f"image_ratio must be a number in [0, 1], got {image_ratio!r}.")
    if not 0.0 <= float(image_ratio) <= 1.0:
        raise ValueError(
            f"image_ratio must be in [0, 1] (0: text only, 0.5: the paper's half/half, "
            f"1: images only), got {image_ratio}."
        )
    n_text = math.floor(batch_size * (1.0 - float(image_ratio)) + 1e-9)
    return batch_size - n_text, n_text


def epoch_batches(
    num_samples: int, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[Tensor]:
    """Endless index batches drawn without replacement, one permutation per epoch.

    Each epoch is ``randperm(num_samples)`` cut into consecutive batches of
    ``batch_size``; a last piece smaller than a batch is dropped and a new epoch begins
    (``DataLoader(shuffle=True, drop_last=True)``, as the authors' loaders).  So within
    an epoch every sample appears at most once, and exactly once when ``batch_size``
    divides ``num_samples``.  A batch larger than the pool (which the authors' grid
    never trains) is filled from consecutive permutations.  ``batch_size = 0`` yields
    empty batches.

    Yields:
        ``(batch_size,)`` int64 indices into the pool.
    """
    if batch_size > 0 and num_samples < 1:
        raise ValueError(f"a batch needs {batch_size} samples but the pool is empty.")
    if batch_size <= num_samples:
        while True:
            perm = torch.randperm(num_samples, generator=generator)
            for start in range(0, num_samples - batch_size + 1, max(batch_size, 1)):
                yield perm[start : start + batch_size]
    chained = torch.zeros(0, dtype=torch.long)
    while True:
        while len(chained) < batch_size:
            chained = torch.cat([chained, torch.randperm(num_samples, generator=generator)])
        yield chained[:batch_size]
        chained = chained[batch_size:]


def _image_pool(image_features: Tensor, image_labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(V, N, ...)`` views and ``(N,)`` labels -> ``(V*N, ...)`` samples and labels."""
    views, n = image_features.shape[0], image_features.shape[1]
    if len(image_labels) != n:
        raise ValueError(
            f"{n} images but {len(image_labels)} image labels; pass one label per image "
            "(views share labels)."
        )
    pool = image_features.reshape(views * n, *image_features.shape[2:])
    return pool, torch.as_tensor(image_labels).long().repeat(views)


def mixed_batches(
    image_features: Tensor | None,
    image_labels: Tensor | None,
    text_features: Tensor,
    text_labels: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    image_ratio: float = 0.5,
    num_batches: int | None = None,
    image_encoder: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[MixedBatch]:
    """The stream of mixed image/text mini-batches that training draws from.

    Each batch holds ``n_image = B - int(B * (1 - image_ratio))`` image samples then
    ``B - n_image`` text samples.  Each half comes from its own :func:`epoch_batches`
    stream (shuffled without replacement, one permutation per epoch), and the batch is
    gathered by :func:`build_mixed_batch`.

    Args:
        image_features: image samples ``(N, D)``, or ``(V, N, D)`` views (each view one
            more sample, labelled as its image); with ``image_encoder``, ``(N, ...)``
            encoder inputs.  ``None`` only with ``image_ratio = 0``.
        image_labels: ``(N,)`` int labels.
        text_features: ``(T, D)`` text samples (see :func:`text_samples`);
            ``text_labels`` ``(T,)``.
        batch_size: ``B``.
        generator: a seeded CPU ``torch.Generator`` for reproducible batches.
        image_ratio: image fraction in ``[0, 1]`` (0: text only, 1: images only).
        num_batches: stop after this many (``None``: never).
        image_encoder: maps the gathered image rows to ``(n_image, D)`` features (the
            trainable end of the image encoder in partial fine-tuning).

    Yields:
        :class:`MixedBatch`.
    """
    n_image, n_text = _split_counts(batch_size, image_ratio)
    if image_features is None:
        image_features = text_features.new_zeros(0, text_features.shape[-1])
        image_labels = torch.zeros(0, dtype=torch.long)
    if image_labels is None:
        raise ValueError("image_labels is None but image features were given; pass (N,) labels.")
    if image_encoder is None and image_features.ndim == 3:
        image_features, image_labels = _image_pool(image_features, image_labels)
    if image_encoder is None and image_features.shape[-1] != text_features.shape[-1]:
        raise ValueError(
            f"image features have dimension {image_features.shape[-1]} but text features "
            f"{text_features.shape[-1]}; encode both with the same backbone."
        )
    if n_image and len(image_features) == 0:
        raise ValueError(
            "the batch needs image samples but there are no images; give K-shot image "
            "features, or set image_ratio=0 to train on text only."
        )
    if n_text and len(text_features) == 0:
        raise ValueError(
            "the batch needs text samples but there are no text samples; give per-template "
            "text features, or set image_ratio=1 (modality='image')."
        )
    images = epoch_batches(len(image_features), n_image, generator)
    texts = epoch_batches(len(text_features), n_text, generator)
    count = 0
    while num_batches is None or count < num_batches:
        yield build_mixed_batch(
            image_features,
            image_labels,
            text_features,
            text_labels,
            next(images),
            next(texts),
            image_encoder=image_encoder,
        )
        count += 1


def build_mixed_batch(
    image_features: Tensor,
    image_labels: Tensor,
    text_features: Tensor,
    text_labels: Tensor,
    image_index: Tensor,
    text_index: Tensor,
    image_encoder: Callable[[Tensor], Tensor] | None = None,
) -> MixedBatch:
    """Gather one mixed batch: the chosen image samples first, then the chosen texts.

    Args:
        image_features: ``(N, D)`` (or ``(N, ...)`` inputs of ``image_encoder``);
            ``image_labels`` ``(N,)``.
        text_features: ``(T, D)``; ``text_labels`` ``(T,)``.
        image_index: ``(B_img,)`` rows of the image pool; ``text_index`` ``(B_txt,)``
            rows of the text pool.
        image_encoder: applied to the gathered image rows (``None``: they are features).

    Returns:
        :class:`MixedBatch` with ``x = cat(f[image_index], t[text_index])``
        ``(B_img + B_txt, D)`` float32 on the text features' device, ``y`` int64 and
        ``is_text`` (``False`` on the first ``B_img`` rows).
    """
    device = text_features.device
    x_txt = text_features[text_index.to(device)]
    x_img = image_features[image_index.to(image_features.device)].to(device)
    if image_encoder is not None:
        x_img = image_encoder(x_img) if len(image_index) else x_txt.new_zeros(0, x_txt.shape[-1])
    labels = torch.as_tensor(image_labels)
    y_img = labels[image_index.to(labels.device)].to(device)
    is_text = torch.arange(len(image_index) + len(text_index), device=device) >= len(image_index)
    return MixedBatch(
        torch.cat([x_img.float(), x_txt.float()]),
        torch.cat([y_img.long(), text_labels[text_index.to(text_labels.device)].to(device).long()]),
        is_text,
    )


def wise_ft(head_weight: Tensor, zero_shot_weight: Tensor, weight: float) -> Tensor:
    """WiSE-FT weight-space ensemble of a learned head and the zero-shot head.

    ``W = (1 - weight) * zero_shot_weight + weight * head_weight`` (Wortsman et al.;
    Lin et al. use ``weight = 0.5``; the authors' ``get_wiseft`` names the zero-shot
    share ``wiseft_ratio``, the same at 0.5).  ``weight = 0`` returns the zero-shot
    head exactly, ``weight = 1`` the learned head exactly.

    Args:
        head_weight: ``(C, D)`` learned weight.
        zero_shot_weight: ``(C, D)`` zero-shot (text prototype) weight.
        weight: the learned head's share, in ``[0, 1]``.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"the WiSE-FT weight must be a number in [0, 1], got {weight!r}.")
    if not 0.0 <= float(weight) <= 1.0 or math.isnan(float(weight)):
        raise ValueError(
            f"the WiSE-FT weight must be in [0, 1] (0: zero-shot head, 1: learned head), "
            f"got {weight}."
        )
    if head_weight.shape != zero_shot_weight.shape:
        raise ValueError(
            f"learned head {tuple(head_weight.shape)} and zero-shot head "
            f"{tuple(zero_shot_weight.shape)} differ in shape; both must be (C, D) for the "
            "same classes and backbone."
        )
    w = float(weight)
    if w == 0.0:
        return zero_shot_weight.detach().clone()
    if w == 1.0:
        return head_weight.detach().clone()
    return (1.0 - w) * zero_shot_weight.detach().to(head_weight.dtype) + w * head_weight.detach()
