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
* one trainer, :func:`fit_head`, runs :func:`fewclip_tutorial.training.fit` with AdamW,
  linear warm-up and cosine decay, and a pluggable image encoder: ``suffix=None`` for
  the linear probe, the trainable end of the image encoder for partial fine-tuning
  (:func:`split_visual_encoder`, :func:`train_partial_finetune`);
* the learning rate, the weight decay, the batch size and the stopping step are chosen
  on the few-shot **validation** split (:func:`train_cross_modal`), and so is the
  number of templates when several are tried (:func:`sweep_templates`);
* WiSE-FT averages the learned head with the zero-shot head (:func:`wise_ft`).

This follows the authors' ``train.py`` (``train()``, ``main()``'s sweep and
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

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewclip_tutorial.device import autocast, float32_or_64, get_device
from fewclip_tutorial.experiment import Context, Option, register_method
from fewclip_tutorial.features import FeatureSet
from fewclip_tutorial.training import FitResult, fit
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE, prompt_ensemble, prompt_text_features

__all__ = [
    "DEFAULT_ITERS",
    "GRIDS",
    "PARTIAL_FT_LOGIT_SCALE",
    "CrossModalHead",
    "CrossModalResult",
    "MixedBatch",
    "VisualSplit",
    "build_mixed_batch",
    "class_prototypes",
    "encode_split_through",
    "epoch_batches",
    "fit_head",
    "mixed_batches",
    "register_exercises",
    "split_visual_encoder",
    "sweep_templates",
    "text_samples",
    "train_cross_modal",
    "train_partial_finetune",
    "wise_ft",
]

#: Logit scale of partial fine-tuning in the paper: exp(4) ≈ 54.6.
PARTIAL_FT_LOGIT_SCALE: float = math.exp(4.0)
#: Optimiser steps per configuration (the paper: 12,800).
DEFAULT_ITERS: int = 1000

#: Hyperparameter grids (the authors' ``HYPER_DICT["linear"]`` is "paper").
GRIDS: dict[str, dict[str, tuple[float, ...] | tuple[int, ...]]] = {
    "paper": {"lrs": (1e-3, 1e-4), "weight_decays": (0.0, 1e-2, 1e-4), "batch_sizes": (8, 32)},
    "small": {"lrs": (1e-3, 1e-4), "weight_decays": (0.0, 1e-2), "batch_sizes": (8,)},
}


# --------------------------------------------------------------------------------------
# Samples, head, batches
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# The trainer (one loop for the linear probe and partial fine-tuning) and the searches
# --------------------------------------------------------------------------------------


@dataclass
class CrossModalResult:
    """Outcome of :func:`train_cross_modal` / :func:`train_partial_finetune`.

    Attributes:
        head: the selected head, holding the state of its best validation step.
        hparams: the chosen ``{"lr", "weight_decay", "batch_size"}``.
        best_step: the step of the kept state (0: the initial, zero-shot head).
        val_accuracy, val_loss: its validation accuracy (percent) and cross-entropy.
        history: the selected run's :class:`~fewclip_tutorial.training.FitResult` history
            (``"loss"`` per step; ``"val_step"``, ``"val_accuracy"``, ``"val_loss"``).
        grid: one entry per configuration trained, with its kept validation scores.
        zero_shot_weight: ``(C, D)`` text prototypes (for WiSE-FT).
        modality: ``"cross"`` (image + text samples) or ``"image"`` (images only).
        image_ratio: the image fraction of every batch.
        suffix: partial fine-tuning's trained end of the image encoder (maps prefix
            activations to features); ``None`` for linear heads.
    """

    head: CrossModalHead
    hparams: dict[str, Any]
    best_step: int
    val_accuracy: float
    val_loss: float
    history: dict[str, list]
    grid: list[dict[str, Any]]
    zero_shot_weight: Tensor
    modality: str = "cross"
    image_ratio: float = 0.5
    suffix: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def predict(self, features: Tensor) -> Tensor:
        """``(N, D)`` frozen-backbone features -> ``(N, C)`` logits (linear variants)."""
        with torch.no_grad():
            return self.head(features.to(self.head.weight.device)).cpu()

    def wise_ft_head(self, weight: float = 0.5) -> CrossModalHead:
        """A copy of the head with WiSE-FT weights (see :func:`wise_ft`)."""
        w = wise_ft(self.head.weight, self.zero_shot_weight.to(self.head.weight), weight)
        return CrossModalHead(w, logit_scale=float(self.head.logit_scale))


def fit_head(
    head: CrossModalHead,
    image_source: Tensor,
    image_labels: Tensor,
    text_features: Tensor,
    text_labels: Tensor,
    val_source: Tensor,
    val_labels: Tensor,
    *,
    lr: float,
    weight_decay: float,
    batch_size: int,
    iters: int = DEFAULT_ITERS,
    warmup: int = 50,
    eval_every: int = 100,
    image_ratio: float = 0.5,
    seed: int = 1,
    suffix: nn.Module | None = None,
    patience: int | None = None,
    select_best: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "cross-modal",
) -> FitResult:
    """Train one configuration in place: the authors' ``train()`` on the shared loop.

    Step ``k`` draws the next :func:`mixed_batches` batch ``(x, y)`` (the image half
    through ``suffix`` when given) and takes one AdamW step on
    ``L = mean_i -log softmax(s * normalize(x_i) @ W.T)[y_i]``, learning rate
    ``lr * schedule_factor(k - 1, iters, "cosine", warmup)``.  Validation is scored by
    ``(accuracy, -cross-entropy)`` at step 0 and every ``eval_every`` steps, and the best
    state of ``head`` (and ``suffix``) is restored; the start stays unless strictly
    beaten (:func:`fewclip_tutorial.training.fit`).

    Args:
        head: the head to train (modified in place).
        image_source: ``(V, N, D)`` or ``(N, D)`` image features; with ``suffix``,
            ``(V, N, ...)`` inputs of the suffix (cached prefix activations).
        image_labels: ``(N,)``.
        text_features: ``(T, D)`` text samples; ``text_labels`` ``(T,)``.
        val_source: ``(N_val, D)`` validation features (or suffix inputs);
            ``val_labels`` ``(N_val,)``.
        lr, weight_decay, batch_size: the configuration.
        iters: optimiser steps; warmup: linear warm-up steps; eval_every: validation interval.
        image_ratio: image fraction of each batch; seed: seeds the batch stream.
        suffix: trainable module mapping ``image_source`` rows to ``(B, D)`` features.
        patience: stop after this many evaluations without improvement.
        select_best: restore the best validated state (``False``: keep the last).

    Returns:
        :class:`~fewclip_tutorial.training.FitResult`; ``best_score`` is
        ``(accuracy, -loss)`` of the kept state.
    """
    device = get_device(device)
    if suffix is None and image_source.ndim == 2:
        image_source = image_source.unsqueeze(0)
    if text_features.ndim != 2 or text_features.shape[-1] != head.dim:
        raise ValueError(
            f"text samples have shape {tuple(text_features.shape)} but the head expects "
            f"(T, {head.dim}); encode text and images with the backbone the head was built for."
        )
    text_labels = _check_labels(text_labels, head.num_classes, "text").to(device)
    pool, pool_labels = _image_pool(
        image_source, _check_labels(image_labels, head.num_classes, "image")
    )
    val_labels = _check_labels(val_labels, head.num_classes, "validation").to(device)
    modules: list[nn.Module] = [head.to(device)]
    params = list(head.parameters())
    if suffix is not None:
        modules.append(suffix.to(device))
        params += [p for p in suffix.parameters() if p.requires_grad]
    batches = mixed_batches(
        pool.to(device),
        pool_labels.to(device),
        text_features.to(device).float(),
        text_labels,
        batch_size,
        torch.Generator().manual_seed(int(seed)),
        image_ratio,
        image_encoder=suffix,
    )

    def step_loss(step: int) -> Tensor:
        batch = next(batches)
        return F.cross_entropy(head(batch.x), batch.y)

    def evaluate() -> dict[str, Any]:
        correct, loss_sum = 0, 0.0
        for x, y in zip(val_source.split(1024), val_labels.split(1024), strict=True):
            x = x.to(device)
            if suffix is not None:
                with autocast(device):
                    x = suffix(x)
            logits = head(x.float())
            correct += int((logits.argmax(-1) == y).sum())
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        acc, loss = 100.0 * correct / len(val_labels), loss_sum / len(val_labels)
        return {"score": (acc, -loss), "accuracy": acc, "loss": loss}

    return fit(
        modules,
        step_loss,
        steps=iters,
        optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
        schedule="cosine",
        warmup=warmup,
        evaluate=evaluate,
        eval_every=eval_every,
        patience=patience,
        select_best=select_best,
        device=device,
        amp=None if suffix is not None else False,
        progress=progress,
        desc=desc,
    )


def _resolve_image_ratio(modality: str, image_ratio: float | None) -> float:
    if modality not in ("cross", "image"):
        raise ValueError(
            f"modality must be 'cross' (image + text samples) or 'image' (uni-modal probe), "
            f"got {modality!r}."
        )
    if image_ratio is None:
        return 0.5 if modality == "cross" else 1.0
    if modality == "image" and float(image_ratio) != 1.0:
        raise ValueError(
            f"modality='image' trains on images only, so image_ratio must be 1 (or None), "
            f"got {image_ratio}; use modality='cross' to mix in text."
        )
    _split_counts(1, image_ratio)
    return float(image_ratio)


def _grid_configs(
    grid: str | dict[str, Sequence[float]],
    lrs: Sequence[float] | None,
    weight_decays: Sequence[float] | None,
    batch_sizes: Sequence[int] | None,
    device: torch.device,
    num_images: int,
    num_text: int,
    image_ratio: float,
) -> tuple[list[dict[str, Any]], list[int]]:
    """The configurations to train, and the batch sizes skipped because a half is too big.

    A batch size is kept when each half is empty or smaller than its pool (the authors'
    ``get_valid_batch_sizes``).  Where none is, the smallest is kept, with a warning.
    """
    if isinstance(grid, str):
        if grid == "auto":
            grid = "paper" if device.type == "cuda" else "small"
        if grid not in GRIDS:
            raise ValueError(f"grid must be 'auto', 'paper' or 'small', got {grid!r}.")
        grid = GRIDS[grid]
    lrs = tuple(grid["lrs"] if lrs is None else lrs)
    wds = tuple(grid["weight_decays"] if weight_decays is None else weight_decays)
    sizes = tuple(grid["batch_sizes"] if batch_sizes is None else batch_sizes)
    if not lrs or not wds or not sizes:
        raise ValueError("the hyperparameter grid is empty; give at least one lr, wd and batch.")
    if any(not lr >= 0 for lr in lrs):
        raise ValueError(f"learning rates must be >= 0, got {lrs}.")
    valid, skipped = [], []
    for bs in sizes:
        n_image, n_text = _split_counts(int(bs), image_ratio)
        fits = (n_image == 0 or n_image < num_images) and (n_text == 0 or n_text < num_text)
        (valid if fits else skipped).append(int(bs))
    if not valid:
        valid, skipped = [min(sizes)], sorted(set(sizes) - {min(sizes)})
        warnings.warn(
            f"no batch size in {list(sizes)} fits the authors' rule (with image_ratio="
            f"{image_ratio} each half smaller than its pool of {num_images} image and "
            f"{num_text} text samples); training with batch {valid[0]}, whose halves repeat "
            "samples. Pass smaller batch_sizes, or more templates.",
            stacklevel=3,
        )
    configs = [
        {"lr": float(lr), "weight_decay": float(wd), "batch_size": bs}
        for lr in lrs
        for wd in wds
        for bs in valid
    ]
    return configs, skipped


def _check_val(val_source: Tensor, val_labels: Tensor, num_classes: int) -> Tensor:
    val_labels = _check_labels(val_labels, num_classes, "validation")
    if len(val_labels) != len(val_source) or len(val_labels) == 0:
        raise ValueError(
            f"{len(val_source)} validation samples and {len(val_labels)} labels; need the "
            "same non-zero number (selection needs a few-shot validation split)."
        )
    return val_labels


def _train_grid(
    configs: Sequence[dict[str, Any]],
    init_weight: Tensor,
    logit_scale: float,
    suffix: nn.Module | None,
    desc: str,
    *data: Tensor,
    **fit_kw: Any,
) -> tuple[dict[str, Any], CrossModalHead, nn.Module | None, FitResult, list[dict[str, Any]]]:
    """:func:`fit_head` once per configuration; keep the best by validation.

    Each configuration trains a fresh head (and a fresh copy of ``suffix``) from
    ``init_weight``.  The kept configuration has the highest ``(accuracy, -loss)``;
    ties go to the earlier one.
    """
    best: tuple | None = None
    log = []
    for i, cfg in enumerate(configs):
        head = CrossModalHead(init_weight, logit_scale=logit_scale)
        trained = copy.deepcopy(suffix) if suffix is not None else None
        res = fit_head(head, *data, suffix=trained, desc=f"{desc} {i + 1}/{len(configs)}",
                       **cfg, **fit_kw)  # fmt: skip
        acc, neg_loss = res.best_score
        log.append({**cfg, "val_accuracy": acc, "val_loss": -neg_loss, "best_step": res.best_step})
        if best is None or res.best_score > best[3].best_score:
            best = (cfg, head, trained, res)
    assert best is not None
    return (*best, log)


def _result(
    best: tuple, zero_shot: Tensor, modality: str, ratio: float, extra: dict[str, Any]
) -> CrossModalResult:
    cfg, head, suffix, res, log = best
    acc, neg_loss = res.best_score
    # fields in CrossModalResult's order
    return CrossModalResult(head.eval(), dict(cfg), res.best_step, acc, -neg_loss, res.history,
                            log, zero_shot, modality, ratio, suffix, extra)  # fmt: skip


def train_cross_modal(
    image_features: Tensor | None,
    image_labels: Tensor | None,
    text_features_per_template: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    *,
    modality: str = "cross",
    image_ratio: float | None = None,
    init: str = "text",
    iters: int = DEFAULT_ITERS,
    warmup: int = 50,
    eval_every: int = 100,
    grid: str = "auto",
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
    batch_sizes: Sequence[int] | None = None,
    logit_scale: float = CLIP_LOGIT_SCALE,
    patience: int | None = None,
    seed: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CrossModalResult:
    """Cross-modal (or image-only) linear probe with a grid search on validation.

    Every ``(lr, weight_decay, batch_size)`` of the grid trains a head from the same
    initialisation with :func:`fit_head`; the configuration and step with the best
    validation ``(accuracy, -loss)`` are kept (ties: the earlier configuration).  No test
    data enters this function.

    Args:
        image_features: ``(N, D)`` or ``(V, N, D)`` K-shot training features (``None``
            with ``image_ratio=0``: text only).
        image_labels: ``(N,)``.
        text_features_per_template: ``(C, M, D)`` per-class, per-template text features.
        val_features: ``(N_val, D)`` few-shot validation features; ``val_labels`` ``(N_val,)``.
        modality: ``"cross"`` (image + text samples, half/half) or ``"image"`` (images only).
        image_ratio: override the image fraction of each batch (``0``: text only).
        init: ``"text"`` (the prototypes: the zero-shot head) or ``"random"`` (random
            unit rows, the paper's ablation).
        iters, warmup, eval_every: see :func:`fit_head` (the paper: 12,800, 50, 100).
        grid: ``"auto"`` (``"paper"`` on CUDA, ``"small"`` on a CPU), ``"paper"`` or
            ``"small"``; ``lrs`` / ``weight_decays`` / ``batch_sizes`` replace its axes.
        logit_scale: the fixed head scale (100).
        patience: early-stop a run after this many evaluations without improvement.
        seed: seeds the random initialisation and every configuration's batch stream.
    """
    device = get_device(device)
    ratio = _resolve_image_ratio(modality, image_ratio)
    if init not in ("text", "random"):
        raise ValueError(f"init must be 'text' or 'random', got {init!r}.")
    t = _check_text_tensor(text_features_per_template)
    num_classes, _, dim = t.shape
    txt, txt_labels = text_samples(t)
    zero_shot = class_prototypes(t)
    if image_features is None:
        image_features, image_labels = t.new_zeros(1, 0, dim), torch.zeros(0, dtype=torch.long)
    views = image_features if image_features.ndim == 3 else image_features.unsqueeze(0)
    if views.shape[-1] != dim:
        raise ValueError(
            f"image features have dimension {views.shape[-1]} but text features {dim}; "
            "encode both with the same backbone."
        )
    if val_features.ndim != 2 or val_features.shape[1] != dim:
        raise ValueError(
            f"validation features must be (N_val, {dim}), got {tuple(val_features.shape)}; "
            "use the centre-crop features of the few-shot validation split."
        )
    val_labels = _check_val(val_features, val_labels, num_classes)
    if ratio > 0 and views.shape[1] == 0:
        raise ValueError(
            "the training set has no images but image_ratio > 0; give K-shot image "
            "features, or set image_ratio=0 to train on text only."
        )
    configs, skipped = _grid_configs(
        grid, lrs, weight_decays, batch_sizes, device, views.shape[0] * views.shape[1],
        len(txt), ratio,
    )  # fmt: skip
    if init == "text":
        init_weight = zero_shot
    else:
        gen = torch.Generator().manual_seed(int(seed))
        init_weight = F.normalize(torch.randn(num_classes, dim, generator=gen), dim=-1)
    best = _train_grid(
        configs, init_weight, logit_scale, None, modality,
        views, image_labels, txt, txt_labels, val_features, val_labels,
        iters=iters, warmup=warmup, eval_every=eval_every, image_ratio=ratio, seed=seed,
        patience=patience, device=device, progress=progress,
    )  # fmt: skip
    extra = {"init": init, "iters": iters, "skipped_batch_sizes": skipped}
    return _result(best, zero_shot, modality, ratio, extra)


def sweep_templates(
    image_features: Tensor,
    image_labels: Tensor,
    text_features_per_template: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    counts: Sequence[int],
    **train_kwargs: Any,
) -> tuple[int, dict[int, CrossModalResult]]:
    """Train with the first ``m`` templates as text samples, for each ``m`` in ``counts``.

    Each ``m`` is one :func:`train_cross_modal` run (its own grid search); the choice of
    ``m`` is made on validation like every other choice here: the highest
    ``(accuracy, -loss)``, ties going to fewer templates.

    Args:
        text_features_per_template: ``(C, M, D)``; ``counts`` lie in ``[1, M]``.
        image_features, image_labels, val_features, val_labels, **train_kwargs: as for
            :func:`train_cross_modal`.

    Returns:
        ``(chosen m, {m: result})``.
    """
    t = _check_text_tensor(text_features_per_template)
    counts = sorted({int(m) for m in counts})
    if not counts or counts[0] < 1 or counts[-1] > t.shape[1]:
        raise ValueError(f"template counts must lie in [1, {t.shape[1]}], got {counts}.")
    results = {
        m: train_cross_modal(
            image_features, image_labels, t[:, :m], val_features, val_labels, **train_kwargs
        )  # fmt: skip
        for m in counts
    }
    chosen = counts[0]
    for m in counts[1:]:
        r, c = results[m], results[chosen]
        if (r.val_accuracy, -r.val_loss) > (c.val_accuracy, -c.val_loss):
            chosen = m
    return chosen, results


# --------------------------------------------------------------------------------------
# Partial fine-tuning: split the image encoder into a frozen prefix and a trainable end
# --------------------------------------------------------------------------------------


class VisualSplit(NamedTuple):
    """An image encoder cut into ``suffix(prefix(images)) == visual(images)``.

    Attributes:
        prefix: frozen, ``(B, 3, H, W)`` images -> activations entering the last block
            (ViT: ``(B, L, width)`` tokens, batch first; ModifiedResNet: ``layer4``
            output ``(B, C', h, w)``).  Runs without gradients.
        trainable: the modules fine-tuned (ViT: last residual block, ``ln_post`` and the
            projection; ModifiedResNet: ``attnpool``).
        suffix: ``nn.Module`` mapping prefix activations to ``(B, D)`` features
            (unnormalised, like ``visual(images)``); it owns ``trainable``.
    """

    prefix: Callable[[Tensor], Tensor]
    trainable: nn.ModuleList
    suffix: nn.Module


class _Projection(nn.Module):
    """Holds the ViT output projection ``(width, D)`` as a trainable module."""

    def __init__(self, proj: Tensor | None) -> None:
        super().__init__()
        self.proj = None if proj is None else nn.Parameter(proj.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x if self.proj is None else x @ self.proj


class _ViTSuffix(nn.Module):
    """Last transformer block + pooling + ``ln_post`` + projection of an open_clip ViT."""

    def __init__(self, visual: nn.Module, copy_modules: bool) -> None:
        super().__init__()
        take = copy.deepcopy if copy_modules else (lambda m: m)
        block = take(visual.transformer.resblocks[-1])
        ln_post = take(visual.ln_post)
        if copy_modules:
            projection = _Projection(visual.proj)
        else:
            projection = _SharedProjection(visual)
        self.trainable = nn.ModuleList([block, ln_post, projection])
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self.pool_type = str(getattr(visual, "pool_type", "tok"))
        self.final_ln_after_pool = bool(getattr(visual, "final_ln_after_pool", False))

    def _global_pool(self, x: Tensor) -> Tensor:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        if self.pool_type == "tok":
            return x[:, 0]
        return x

    def forward(self, tokens: Tensor) -> Tensor:
        block, ln_post, projection = self.trainable
        x = tokens if self.batch_first else tokens.transpose(0, 1)
        x = block(x)
        x = x if self.batch_first else x.transpose(0, 1)
        if self.final_ln_after_pool:
            pooled = ln_post(self._global_pool(x))
        else:
            pooled = self._global_pool(ln_post(x))
        return projection(pooled)


class _SharedProjection(nn.Module):
    """Uses (and trains) the projection parameter of the original ViT in place."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self._visual = [visual]  # a list, so the whole encoder is not registered as a child
        if visual.proj is not None:
            self.proj = visual.proj

    def forward(self, x: Tensor) -> Tensor:
        return x if self._visual[0].proj is None else x @ self._visual[0].proj


class _ResNetSuffix(nn.Module):
    """The attention pool of an open_clip ModifiedResNet."""

    def __init__(self, visual: nn.Module, copy_modules: bool) -> None:
        super().__init__()
        pool = copy.deepcopy(visual.attnpool) if copy_modules else visual.attnpool
        self.trainable = nn.ModuleList([pool])

    def forward(self, x: Tensor) -> Tensor:
        return self.trainable[0](x)


def split_visual_encoder(visual: nn.Module, copy_modules: bool = True) -> VisualSplit:
    """Cut an open_clip image encoder before its last stage, for partial fine-tuning.

    Supported: ``open_clip.transformer.VisionTransformer`` (trainable: the last residual
    block of ``visual.transformer.resblocks``, ``ln_post`` and ``proj``) and
    ``open_clip.modified_resnet.ModifiedResNet`` (trainable: ``attnpool``).  The prefix
    activations can be computed once and cached, so a training step only runs the
    suffix.  In eval mode, ``split.suffix(split.prefix(x))`` equals ``visual(x)``.

    Args:
        visual: ``model.visual`` of an open_clip CLIP model.
        copy_modules: deep-copy the trainable modules (default) so fine-tuning leaves the
            backbone untouched; ``False`` shares (and would train) the originals.

    Raises:
        NotImplementedError: any other architecture (timm towers, attentional poolers).
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        if getattr(visual, "attn_pool", None) is not None:
            raise NotImplementedError(
                "partial fine-tuning of ViTs with an attentional pooler (CoCa) is not "
                "implemented; use variant='linear'."
            )
        if not hasattr(visual, "_embeds") or len(visual.transformer.resblocks) < 1:
            raise NotImplementedError(
                "this open_clip VisionTransformer has no _embeds() (open_clip < 2.24?) or no "
                "blocks; upgrade open_clip or use variant='linear'."
            )
        suffix: nn.Module = _ViTSuffix(visual, copy_modules)
        batch_first = bool(getattr(visual.transformer, "batch_first", True))

        def prefix(images: Tensor) -> Tensor:
            with torch.no_grad():
                x = visual._embeds(images)
                x = x if batch_first else x.transpose(0, 1)
                for block in visual.transformer.resblocks[:-1]:
                    x = block(x)
                return x if batch_first else x.transpose(0, 1)

    elif isinstance(visual, ModifiedResNet):
        suffix = _ResNetSuffix(visual, copy_modules)

        def prefix(images: Tensor) -> Tensor:
            with torch.no_grad():
                x = visual.stem(images.to(visual.conv1.weight.dtype))
                return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))

    else:
        raise NotImplementedError(
            f"partial fine-tuning supports open_clip VisionTransformer and ModifiedResNet "
            f"image encoders, not {type(visual).__name__}; use variant='linear' (a linear "
            "cross-modal head on cached features works with any backbone)."
        )
    for p in suffix.parameters():
        p.requires_grad_(True)
    return VisualSplit(prefix=prefix, trainable=suffix.trainable, suffix=suffix)


def encode_split_through(
    fn: Callable[[Tensor], Tensor],
    split: Any,
    preprocess: Callable[[Any], Tensor],
    device: torch.device | str | None = None,
    batch_size: int = 128,
    flip: bool = False,
    progress: bool = False,
    out_device: torch.device | str = "cpu",
) -> Tensor:
    """Run ``fn`` (a prefix, or prefix + suffix) over every image of a ``LabeledSplit``.

    Args:
        fn: maps a ``(B, 3, H, W)`` preprocessed batch (on ``device``) to ``(B, ...)``.
        split: a :class:`fewclip_tutorial.data.base.LabeledSplit` of PIL images.
        preprocess: the backbone's eval transform.
        flip: mirror every image left-right first (the paper's second view).

    Returns:
        ``(N, ...)`` float32 outputs on ``out_device``, in split order.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    device = get_device(device)
    outs: list[Tensor] = []
    n = len(split)
    if n == 0:
        raise ValueError(f"split {getattr(split, 'name', '?')!r} is empty; nothing to encode.")
    for start in tqdm(range(0, n, batch_size), desc="encode", disable=not progress, leave=False):
        images = []
        for i in range(start, min(start + batch_size, n)):
            img = split.load_image(i)
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images.append(preprocess(img))
        batch = torch.stack(images).to(device)
        with torch.no_grad(), autocast(device):
            outs.append(fn(batch).float().to(out_device))
    return torch.cat(outs)


def train_partial_finetune(
    visual: nn.Module,
    train_images: Tensor,
    image_labels: Tensor,
    text_features_per_template: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    *,
    modality: str = "cross",
    image_ratio: float | None = None,
    iters: int = DEFAULT_ITERS,
    warmup: int = 50,
    eval_every: int = 100,
    lrs: Sequence[float] = (1e-4,),
    weight_decays: Sequence[float] = (0.0,),
    batch_sizes: Sequence[int] = (8,),
    logit_scale: float = PARTIAL_FT_LOGIT_SCALE,
    patience: int | None = None,
    seed: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    prefix_batch_size: int = 256,
    cached: bool = False,
) -> CrossModalResult:
    """Cross-modal partial fine-tuning: the last image-encoder stage + the head.

    The same trainer as the linear probe (:func:`fit_head`) with the trainable end of
    the encoder plugged in as ``suffix``.  The frozen prefix runs once over the training
    and validation images and its activations are cached; each step runs only the suffix
    on the image half of the batch (text samples go straight to the head).

    Args:
        visual: ``model.visual`` (left unchanged: the trainable end is deep-copied).
        train_images: ``(N, 3, H, W)`` or ``(V, N, 3, H, W)`` preprocessed images; with
            ``cached=True``, prefix activations ``(V, N, ...)`` instead.
        image_labels: ``(N,)``.
        text_features_per_template: ``(C, M, D)``.
        val_images: ``(N_val, 3, H, W)`` (with ``cached=True``: ``(N_val, ...)``
            activations); ``val_labels`` ``(N_val,)``.
        lrs, weight_decays, batch_sizes: the grid (default one configuration).
        logit_scale: fixed head scale (``exp(4) ≈ 54.6`` as in the paper).
        cached: the inputs are already prefix activations (``split.prefix`` of
            :func:`split_visual_encoder` on the same ``visual``).
        Others: as :func:`train_cross_modal`.

    Returns:
        :class:`CrossModalResult` whose ``suffix`` maps prefix activations to features;
        ``result.extra["prefix"]`` is the frozen prefix function.
    """
    device = get_device(device)
    ratio = _resolve_image_ratio(modality, image_ratio)
    split = split_visual_encoder(visual)
    t = _check_text_tensor(text_features_per_template)
    num_classes, _, dim = t.shape
    txt, txt_labels = text_samples(t)
    zero_shot = class_prototypes(t)

    def cache(x: Tensor) -> Tensor:
        with autocast(device):
            out = [split.prefix(c.to(device)).float() for c in x.split(prefix_batch_size)]
        return torch.cat(out) if out else x.new_zeros(0)

    if train_images.ndim == val_images.ndim:  # no view axis
        train_images = train_images.unsqueeze(0)
    if not cached and (train_images.shape[-3] != 3 or val_images.shape[-3] != 3):
        raise ValueError(
            f"expected preprocessed images (..., 3, H, W), got {tuple(train_images.shape)} "
            f"and {tuple(val_images.shape)}; pass cached=True for prefix activations."
        )
    train_cache = (
        train_images.to(device) if cached else torch.stack([cache(v) for v in train_images])
    )
    val_cache = val_images.to(device) if cached else cache(val_images)
    val_labels = _check_val(val_cache, val_labels, num_classes)
    if train_cache.shape[1] == 0 and ratio > 0:
        raise ValueError("no training images; partial fine-tuning needs K-shot images.")
    with torch.no_grad():
        out_dim = split.suffix.to(device)(val_cache[:1]).shape[-1]
    if out_dim != dim:
        raise ValueError(
            f"the image encoder outputs dimension {out_dim} but text features have "
            f"{dim}; use text features from the same CLIP model."
        )
    configs, skipped = _grid_configs(
        {}, lrs, weight_decays, batch_sizes, device,
        train_cache.shape[0] * train_cache.shape[1], len(txt), ratio,
    )  # fmt: skip
    best = _train_grid(
        configs, zero_shot, logit_scale, split.suffix, "partial",
        train_cache, image_labels, txt, txt_labels, val_cache, val_labels,
        iters=iters, warmup=warmup, eval_every=eval_every, image_ratio=ratio, seed=seed,
        patience=patience, device=device, progress=progress,
    )  # fmt: skip
    extra = {"prefix": split.prefix, "iters": iters, "skipped_batch_sizes": skipped}
    return _result(best, zero_shot, modality, ratio, extra)


# --------------------------------------------------------------------------------------
# Runner integration (``fewclip run cross-modal``) and exercises
# --------------------------------------------------------------------------------------

#: The runner's options, declared once: ``run_method``, the CLI and the docs read them.
OPTIONS: dict[str, Option] = {
    "variant": Option(
        str,
        "linear",
        "linear head, its WiSE-FT average with the zero-shot head, or partial fine-tuning",
        choices=["linear", "wise-ft", "partial"],
    ),
    "modality": Option(
        str,
        "cross",
        "'cross': image + text samples; 'image': the uni-modal probe, same head",
        choices=["cross", "image"],
    ),
    "iters": Option(int, DEFAULT_ITERS, "optimiser steps per configuration (paper: 12800)"),
    "wise_weight": Option(float, 0.5, "WiSE-FT weight of the learned head, in [0, 1]"),
    "templates": Option(int, 0, "text samples per class: the first N templates (0: all)"),
    "flip": Option(
        bool,
        None,
        "add the horizontally flipped view of each training image (default: the paper's "
        "yes, unless the dataset's classes are not mirror-invariant, as ShapeWorld's)",
    ),
    "init": Option(str, "text", "head initialisation", choices=["text", "random"]),
    "grid": Option(
        str,
        "auto",
        "hyperparameter grid: 'paper' (12 configs), 'small' (4), 'auto' (paper on CUDA)",
        choices=["auto", "paper", "small"],
    ),
}


def _train_views(ctx: Context, flip: bool, progress: bool) -> Tensor:
    """``(V, N, D)`` training features: the cached centre crop, plus its mirror image."""
    feats = ctx.features("train").features.cpu().float()
    feats = feats if feats.ndim == 3 else feats.unsqueeze(0)
    if not flip:
        return feats
    bb = ctx.backbone
    flipped = encode_split_through(
        bb.encode_images, ctx.splits.train, bb.preprocess, bb.device, flip=True, progress=progress
    )
    return torch.cat([feats, F.normalize(flipped, dim=-1).unsqueeze(0)])


def _run_partial(ctx: Context, text: Tensor, modality: str, iters: int, flip: bool,
                 progress: bool) -> tuple[CrossModalResult, dict[str, Any]]:  # fmt: skip
    """Partial fine-tuning on the episode; returns the result and ``ctx.report``."""
    device, pre = ctx.backbone.device, ctx.backbone.preprocess
    visual = ctx.backbone.model.visual
    split = split_visual_encoder(visual)

    def cache(s: Any, f: bool = False) -> Tensor:
        return encode_split_through(
            split.prefix, s, pre, device, flip=f, progress=progress, out_device=device
        )

    train_cache = torch.stack([cache(ctx.splits.train, f) for f in [False, True][: 1 + flip]])
    result = train_partial_finetune(
        visual, train_cache, torch.as_tensor(ctx.splits.train.labels), text,
        cache(ctx.splits.val), torch.as_tensor(ctx.splits.val.labels), modality=modality,
        iters=iters, seed=ctx.seed, device=device, progress=progress, cached=True,
    )  # fmt: skip
    suffix = result.suffix.eval()

    def encode(images: Tensor) -> Tensor:
        return suffix(split.prefix(images))

    named = {"val": ctx.splits.val, "test": ctx.splits.test}
    named.update({f"ood:{d}": s for d, s in ctx.splits.ood_test.items()})
    features = {
        name: FeatureSet(
            features=F.normalize(encode_split_through(encode, s, pre, device), dim=-1),
            labels=torch.as_tensor(s.labels, dtype=torch.long),
        )
        for name, s in named.items()
    }
    return result, ctx.report(result.predict, features_by_split=features)


@register_method(
    "cross-modal",
    options=OPTIONS,
    help="Cross-modal adaptation (Lin et al., CVPR 2023): class-name text embeddings as "
    "extra training samples of a linear head initialised from the zero-shot classifier.",
)
def run_cross_modal(
    ctx: Context,
    *,
    variant: str,
    modality: str,
    iters: int,
    wise_weight: float,
    templates: int,
    flip: bool | None,
    init: str,
    grid: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-modal linear probe / WiSE-FT / partial fine-tuning on one few-shot episode.

    The options and their defaults are :data:`OPTIONS` (call through ``run_method``).
    Text samples are the dataset's templates filled with each class name
    (``(C, M, D)``); image samples are the K-shot centre-crop features plus their
    flipped view (``flip=None``: unless ``dataset.info["hflip_invariant"]`` is
    ``False``, as for ShapeWorld).  Selection uses the few-shot validation split only.
    ``variant="partial"`` re-encodes the evaluation images through the fine-tuned end
    of the encoder.

    Returns:
        ``ctx.report``'s accuracies plus ``hparams``, ``best_step``,
        ``selection_val_accuracy``, ``grid``, ``variant``, ``modality``, ``templates``,
        the selected run's validation ``history`` and ``final_train_loss`` (its mean
        training loss over the last 100 steps).
    """
    if variant == "partial" and init != "text":
        raise ValueError("variant='partial' supports init='text' only.")
    if variant == "wise-ft" and not 0.0 <= wise_weight <= 1.0:
        raise ValueError(f"wise_weight must be in [0, 1], got {wise_weight}.")
    flip = bool(ctx.dataset.info.get("hflip_invariant", True)) if flip is None else flip
    all_templates = list(ctx.dataset.templates)
    if templates < 0:
        raise ValueError(
            f"templates must be >= 0 (0: all {len(all_templates)} templates), got {templates}."
        )
    used = all_templates[:templates] if templates else all_templates
    text = prompt_text_features(ctx.backbone, ctx.dataset.classnames, used).cpu()
    out: dict[str, Any] = {"variant": variant, "modality": modality, "templates": len(used),
                           "flip": flip}  # fmt: skip
    if variant == "partial":
        result, report = _run_partial(ctx, text, modality, iters, flip, progress)
    else:
        val = ctx.features("val")
        result = train_cross_modal(
            _train_views(ctx, flip, progress), torch.as_tensor(ctx.features("train").labels),
            text, val.features, val.labels, modality=modality, init=init, iters=iters,
            grid=grid, seed=ctx.seed, device=ctx.backbone.device, progress=progress,
        )  # fmt: skip
        head = result.wise_ft_head(wise_weight) if variant == "wise-ft" else result.head
        if variant == "wise-ft":
            out["wise_weight"] = wise_weight

        def predict(features: Tensor) -> Tensor:
            return head(features.to(head.weight.device)).cpu()

        report = ctx.report(predict)
    last_losses = result.history["loss"][-100:]
    return {
        **out,
        **report,
        "hparams": result.hparams,
        "best_step": result.best_step,
        "selection_val_accuracy": result.val_accuracy,
        "grid": result.grid,
        "history": {k: result.history[k] for k in ("val_step", "val_accuracy", "val_loss")},
        "final_train_loss": sum(last_losses) / max(len(last_losses), 1),
    }


def _batch_exercise_inputs(gen: torch.Generator) -> tuple[Any, ...]:
    n, c, m, d = (
        int(torch.randint(lo, hi + 1, (1,), generator=gen))
        for lo, hi in ((4, 12), (2, 5), (1, 3), (3, 8))
    )
    image_features = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    image_labels = torch.randint(c, (n,), generator=gen)
    text_features, text_labels = text_samples(torch.randn(c, m, d, generator=gen))
    half = int(torch.randint(1, min(n, c * m) + 1, (1,), generator=gen))
    image_index = next(epoch_batches(n, half, gen))
    text_index = next(epoch_batches(c * m, half, gen))
    return image_features, image_labels, text_features, text_labels, image_index, text_index


def _reference_batch(*inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exercise's answer: :func:`build_mixed_batch` as a plain tuple ``(x, y, is_text)``."""
    return tuple(build_mixed_batch(*inputs))


def _wise_exercise_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    c, d = (int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((2, 6), (3, 9)))
    weight = float(torch.rand(1, generator=gen))
    return torch.randn(c, d, generator=gen), torch.randn(c, d, generator=gen), weight


def register_exercises() -> None:
    """Register this chapter's exercises with :mod:`fewclip_tutorial.exercises`.

    * ``"cross_modal_batch"``: ``fn(image_features (N, D), image_labels (N,),
      text_features (T, D), text_labels (T,), image_index (B_img,), text_index (B_txt,))
      -> (x (B, D), y (B,), is_text (B,))``: the image rows, then the text rows
      (what :func:`build_mixed_batch` does for every training batch).
    * ``"wise_ft"``: ``fn(head_weight (C, D), zero_shot_weight (C, D), weight) -> (C, D)``.

    Called by :mod:`fewclip_tutorial.methods` on import; calling it again is harmless.
    """
    from fewclip_tutorial.exercises import register_exercise

    register_exercise(
        "cross_modal_batch",
        _reference_batch,
        _batch_exercise_inputs,
        description=(
            "Write mixed_batch(image_features, image_labels, text_features, text_labels, "
            "image_index, text_index) returning (x, y, is_text): the rows image_features["
            "image_index] followed by text_features[text_index] as float32, their int64 "
            "labels, and a bool mask that is True on the text rows."
        ),
        hint="torch.cat the two halves along dim 0, images first; labels with .long().",
    )
    register_exercise(
        "wise_ft",
        wise_ft,
        _wise_exercise_inputs,
        description=(
            "Write wise_ft(head_weight, zero_shot_weight, weight) returning the weight-space "
            "ensemble (1 - weight) * zero_shot_weight + weight * head_weight."
        ),
        hint="weight=0 must give the zero-shot head, weight=1 the learned head.",
    )
