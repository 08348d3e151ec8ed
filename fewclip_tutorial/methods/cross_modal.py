"""Cross-modal adaptation (Lin et al., CVPR 2023, "Multimodality helps unimodality").

The idea fits in one sentence: a class name embedded by the text encoder is one more
*training sample* of that class, living in the same space as the image features.  So a
linear probe on CLIP features can be trained on images **and** text at once:

* every class's per-template text embeddings become labelled samples
  (:func:`text_samples`);
* the head is a bias-free linear layer on L2-normalised features, initialised from the
  class text prototypes, i.e. it *starts* as the zero-shot classifier
  (:class:`CrossModalHead`), with logits ``logit_scale * normalize(x) @ W.T`` and a fixed
  ``logit_scale = 100``;
* every mini-batch is half image features, half text features, under one cross-entropy
  (:func:`mixed_batches`);
* training is AdamW with linear warm-up and a cosine schedule, with the hyperparameters
  and the stopping iteration chosen on the few-shot **validation** split
  (:func:`train_cross_modal`);
* WiSE-FT averages the learned head with the zero-shot head (:func:`wise_ft`);
* partial fine-tuning also trains the last block of the image encoder; the frozen prefix
  of the encoder is run once and its output cached (:func:`split_visual_encoder`,
  :func:`train_partial_finetune`).

Setting ``image_ratio=1`` (``modality="image"``) gives the uni-modal linear probe with the
same head, the same initialisation and the same training, so the comparison is like for
like.  ``init="random"`` replaces the text initialisation by random unit rows (the paper
reports the 1-shot average dropping to 48.37 that way).

Choices made here (see the chapter):

* selection is on the few-shot validation split only, evaluated every ``eval_every``
  iterations *and* at iteration 0, so a run can fall back to its initialisation;
* ties in validation accuracy are broken by the lower validation cross-entropy, then by
  the earlier iteration / the earlier grid entry;
* ``iters`` defaults to 1000 (cheap on a CPU); the paper's 12,800 is ``iters=12800``;
* the default grid is the paper's 12 configurations on CUDA and a 4-configuration subset
  on CPU (``grid="auto"``); ``grid="paper"`` or ``grid="small"`` forces one;
* the logit scale of partial fine-tuning is ``exp(4) ≈ 54.6`` as in the paper; its
  default grid is one configuration (lr 1e-4, wd 0, batch 32) because every
  configuration trains a transformer block; pass ``lrs=...`` etc. for more;
* WiSE-FT (``variant="wise-ft"`` in the runner) averages the linear head only;
* image views are the centre crop plus its horizontal flip, as in the paper (only the
  centre crop for datasets whose classes are not mirror-invariant, such as ShapeWorld).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewclip_tutorial.device import autocast, autocast_dtype, get_device
from fewclip_tutorial.experiment import Context, Option, register_method
from fewclip_tutorial.features import FeatureSet
from fewclip_tutorial.zeroshot import prompt_ensemble, prompt_text_features

__all__ = [
    "GRIDS",
    "LOGIT_SCALE",
    "PARTIAL_FT_LOGIT_SCALE",
    "CrossModalHead",
    "CrossModalResult",
    "MixedBatch",
    "VisualSplit",
    "build_mixed_batch",
    "class_prototypes",
    "encode_split_through",
    "GridRun",
    "fit_head",
    "fit_head_grid",
    "mixed_batches",
    "register_exercises",
    "sample_mixed_indices",
    "split_visual_encoder",
    "text_samples",
    "train_cross_modal",
    "train_partial_finetune",
    "warmup_cosine",
    "wise_ft",
]

#: Fixed logit scale of the cross-modal linear head (CLIP's learned temperature, 1/0.01).
LOGIT_SCALE: float = 100.0
#: Logit scale used for partial fine-tuning in the paper: exp(4) ≈ 54.6.
PARTIAL_FT_LOGIT_SCALE: float = math.exp(4.0)

#: Hyperparameter grids.  "paper": lr {1e-3, 1e-4} x wd {0, 1e-2, 1e-4} x batch {8, 32}.
GRIDS: dict[str, dict[str, tuple[float, ...] | tuple[int, ...]]] = {
    "paper": {
        "lrs": (1e-3, 1e-4),
        "weight_decays": (0.0, 1e-2, 1e-4),
        "batch_sizes": (8, 32),
    },
    "small": {
        "lrs": (1e-3, 1e-4),
        "weight_decays": (0.0, 1e-2),
        "batch_sizes": (32,),
    },
}


# --------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------


def text_samples(text_features_per_template: Tensor) -> tuple[Tensor, Tensor]:
    """Turn per-template text embeddings into labelled training samples.

    Args:
        text_features_per_template: ``(C, M, D)``: class ``c``'s embedding under template
            ``m`` (``M`` templates per class).

    Returns:
        ``features`` of shape ``(C*M, D)``, each row L2-normalised, class-major (rows
        ``c*M .. c*M+M-1`` belong to class ``c``), and ``labels`` of shape ``(C*M,)``
        (int64, ``labels[c*M + m] = c``).
    """
    t = _check_text_tensor(text_features_per_template)
    num_classes, num_templates, dim = t.shape
    features = F.normalize(t.reshape(num_classes * num_templates, dim).float(), dim=-1)
    labels = torch.arange(num_classes, device=t.device).repeat_interleave(num_templates)
    return features, labels


def class_prototypes(text_features_per_template: Tensor) -> Tensor:
    """The zero-shot classifier: per class, the mean of its normalised template embeddings.

    Args:
        text_features_per_template: ``(C, M, D)``.

    Returns:
        ``(C, D)`` L2-normalised prototypes (CLIP's prompt ensemble).
    """
    return prompt_ensemble(_check_text_tensor(text_features_per_template).float())


class CrossModalHead(nn.Module):
    """Bias-free linear head on L2-normalised features with a fixed logit scale.

    ``logits = logit_scale * normalize(x) @ W.T`` with ``W`` of shape ``(C, D)``.  The
    weight is initialised from the class text prototypes, so before any training the
    head *is* the zero-shot classifier.  The weight rows are not re-normalised during
    training; ``logit_scale`` is a buffer, not a parameter.

    Args:
        weight: ``(C, D)`` initial weight (typically :func:`class_prototypes`).
        logit_scale: the fixed scale (100 as in the paper; ``exp(4)`` for partial FT).
    """

    def __init__(self, weight: Tensor, logit_scale: float = LOGIT_SCALE) -> None:
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
            raise ValueError(
                f"CrossModalHead needs a (C, D) weight with C, D > 0, got shape "
                f"{tuple(weight.shape)}; pass the (C, D) class prototypes."
            )
        if not math.isfinite(logit_scale) or logit_scale <= 0:
            raise ValueError(f"logit_scale must be a positive number, got {logit_scale}.")
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @classmethod
    def random(
        cls,
        num_classes: int,
        dim: int,
        generator: torch.Generator | None = None,
        logit_scale: float = LOGIT_SCALE,
    ) -> CrossModalHead:
        """A head with random unit-norm rows (the paper's random-init ablation)."""
        w = torch.randn(num_classes, dim, generator=generator)
        return cls(F.normalize(w, dim=-1), logit_scale=logit_scale)

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
        return self.logit_scale * F.normalize(x.float(), dim=-1) @ self.weight.T


class MixedBatch(NamedTuple):
    """One mini-batch: ``x`` ``(B, D)``, ``y`` ``(B,)``, ``is_text`` ``(B,)`` bool."""

    x: Tensor
    y: Tensor
    is_text: Tensor


def _check_ratio(image_ratio: float) -> float:
    if isinstance(image_ratio, bool) or not isinstance(image_ratio, (int, float)):
        raise TypeError(f"image_ratio must be a number in [0, 1], got {image_ratio!r}.")
    if not 0.0 <= float(image_ratio) <= 1.0:
        raise ValueError(
            f"image_ratio must be in [0, 1] (0: text only, 0.5: the paper's half/half, "
            f"1: images only), got {image_ratio}."
        )
    return float(image_ratio)


def _split_counts(batch_size: int, image_ratio: float) -> tuple[int, int]:
    """Number of image and text samples in a batch: ``floor(B * ratio)`` and the rest."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    _check_ratio(image_ratio)
    n_image = math.floor(batch_size * float(image_ratio) + 1e-9)
    return n_image, batch_size - n_image


def sample_mixed_indices(
    num_images: int,
    num_text: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    image_ratio: float = 0.5,
    num_views: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw one mixed batch as indices, with replacement, separately per half.

    The batch holds exactly ``n_image = floor(batch_size * image_ratio)`` image samples
    and ``batch_size - n_image`` text samples (``batch_size // 2`` each for an even
    batch at the default ratio 0.5).

    Returns:
        ``view_index`` ``(n_image,)``, ``image_index`` ``(n_image,)`` and ``text_index``
        ``(n_text,)`` (int64, CPU).
    """
    n_image, n_text = _split_counts(batch_size, image_ratio)
    if n_image > 0 and num_images == 0:
        raise ValueError(
            "the batch needs image samples but there are no training images; "
            "pass image features or set image_ratio=0 to train on text only."
        )
    if n_text > 0 and num_text == 0:
        raise ValueError(
            "the batch needs text samples but there are no text samples; "
            "pass text features or set image_ratio=1 for the image-only probe."
        )
    image_index = torch.randint(num_images or 1, (n_image,), generator=generator)
    view_index = torch.randint(max(num_views, 1), (n_image,), generator=generator)
    text_index = torch.randint(num_text or 1, (n_text,), generator=generator)
    return view_index, image_index, text_index


def mixed_batches(
    image_features: Tensor | None,
    image_labels: Tensor | None,
    text_features: Tensor,
    text_labels: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    image_ratio: float = 0.5,
    num_batches: int | None = None,
) -> Iterator[MixedBatch]:
    """Endless (or ``num_batches``-long) stream of mixed image/text mini-batches.

    Each batch is ``floor(batch_size * image_ratio)`` image samples followed by the text
    samples for the rest (half/half at the default ``image_ratio=0.5``), each half
    sampled with replacement from its own pool with ``generator``.  With ``V`` views per
    image, every image sample also draws its view uniformly.

    Args:
        image_features: ``(N, D)`` or ``(V, N, D)`` (views, e.g. centre crop + flip);
            ``None`` or empty allowed only when ``image_ratio == 0``.
        image_labels: ``(N,)`` int labels.
        text_features: ``(T, D)`` text samples (see :func:`text_samples`).
        text_labels: ``(T,)``.
        batch_size: total batch size ``B``.
        generator: a seeded ``torch.Generator`` (CPU) for reproducible batches.
        image_ratio: fraction of image samples, in ``[0, 1]``; 0 trains on text only,
            1 on images only.
        num_batches: stop after this many batches (``None``: never stop).

    Yields:
        :class:`MixedBatch` ``(x (B, D), y (B,), is_text (B,))``.
    """
    views, img_labels, text_features, text_labels = _check_training_data(
        image_features, image_labels, text_features, text_labels, image_ratio
    )
    _split_counts(batch_size, image_ratio)
    num_views, num_images = views.shape[0], views.shape[1]
    device = text_features.device if text_features.numel() else views.device
    count = 0
    while num_batches is None or count < num_batches:
        v_idx, i_idx, t_idx = sample_mixed_indices(
            num_images, len(text_labels), batch_size, generator, image_ratio, num_views
        )
        yield build_mixed_batch(
            views,
            img_labels,
            text_features,
            text_labels,
            i_idx,
            t_idx,
            v_idx,
            device=device,
        )
        count += 1


def build_mixed_batch(
    image_features: Tensor,
    image_labels: Tensor,
    text_features: Tensor,
    text_labels: Tensor,
    image_index: Tensor,
    text_index: Tensor,
    view_index: Tensor | None = None,
    device: torch.device | str | None = None,
) -> MixedBatch:
    """Gather one mixed batch: the chosen image samples first, then the chosen text samples.

    Args:
        image_features: ``(N, D)`` or ``(V, N, D)``.
        image_labels: ``(N,)``.
        text_features: ``(T, D)``; ``text_labels`` ``(T,)``.
        image_index: ``(B_img,)`` rows of the image pool; ``view_index`` ``(B_img,)`` their
            views (default: view 0).
        text_index: ``(B_txt,)`` rows of the text pool.

    Returns:
        :class:`MixedBatch` with ``x`` ``(B_img + B_txt, D)`` float32, ``y`` int64 and
        ``is_text`` (``False`` for the first ``B_img`` rows, ``True`` after).
    """
    views = _as_views(image_features)
    if view_index is None:
        view_index = torch.zeros_like(image_index)
    device = text_features.device if device is None else torch.device(device)
    src = views.device
    x_img = views[view_index.to(src), image_index.to(src)].to(device).float()
    y_img = torch.as_tensor(image_labels)[image_index.to(torch.as_tensor(image_labels).device)]
    x_txt = text_features[text_index.to(text_features.device)].to(device).float()
    y_txt = text_labels[text_index.to(text_labels.device)]
    is_text = torch.cat(
        [
            torch.zeros(len(image_index), dtype=torch.bool, device=device),
            torch.ones(len(text_index), dtype=torch.bool, device=device),
        ]
    )
    return MixedBatch(
        torch.cat([x_img, x_txt]),
        torch.cat([y_img.to(device).long(), y_txt.to(device).long()]),
        is_text,
    )


def wise_ft(head_weight: Tensor, zero_shot_weight: Tensor, weight: float) -> Tensor:
    """WiSE-FT weight-space ensemble of a learned head and the zero-shot head.

    ``W = (1 - weight) * zero_shot_weight + weight * head_weight`` (Wortsman et al.,
    used by Lin et al. with ``weight = 0.5``).  ``weight = 0`` returns the zero-shot
    classifier exactly, ``weight = 1`` the learned head exactly.

    Args:
        head_weight: ``(C, D)`` learned weight.
        zero_shot_weight: ``(C, D)`` zero-shot (text prototype) weight.
        weight: mixing coefficient in ``[0, 1]``.
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
    zs = zero_shot_weight.detach().to(head_weight.dtype)
    return (1.0 - w) * zs + w * head_weight.detach()


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to 0.

    ``step`` counts from 0 (the factor used for the first update).  During warm-up the
    factor is ``(step + 1) / warmup``; afterwards
    ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _check_text_tensor(t: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim != 3:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"text features must be a (C, M, D) tensor (classes, templates, dim), got {shape}; "
            "for one template per class use t.unsqueeze(1)."
        )
    if min(t.shape) == 0:
        raise ValueError(
            f"text features {tuple(t.shape)} are empty; give at least one class and template."
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


def _as_views(image_features: Tensor) -> Tensor:
    if image_features.ndim == 2:
        return image_features.unsqueeze(0)
    if image_features.ndim == 3:
        return image_features
    raise ValueError(
        f"image features must be (N, D) or (V, N, D), got shape {tuple(image_features.shape)}."
    )


def _check_training_data(
    image_features: Tensor | None,
    image_labels: Tensor | None,
    text_features: Tensor,
    text_labels: Tensor,
    image_ratio: float,
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate and return ``(views (V, N, D), image_labels, text_features, text_labels)``."""
    if text_features.ndim != 2:
        raise ValueError(
            f"text samples must be (T, D), got {tuple(text_features.shape)}; "
            "flatten (C, M, D) per-template features with text_samples()."
        )
    dim = text_features.shape[1]
    if image_features is None:
        image_features = text_features.new_zeros(0, dim)
        image_labels = torch.zeros(0, dtype=torch.long)
    views = _as_views(image_features)
    if views.shape[-1] != dim:
        raise ValueError(
            f"image features have dimension {views.shape[-1]} but text features {dim}; "
            "encode both with the same backbone."
        )
    if image_labels is None:
        raise ValueError("image_labels is None but image features were given; pass (N,) labels.")
    n_cls = num_classes
    if n_cls is None:
        n_cls = int(text_labels.max()) + 1 if len(text_labels) else 0
        if len(image_labels):
            n_cls = max(n_cls, int(torch.as_tensor(image_labels).max()) + 1)
    text_labels = _check_labels(text_labels, n_cls, "text")
    image_labels = _check_labels(image_labels, n_cls, "image")
    if len(text_labels) != text_features.shape[0]:
        raise ValueError(
            f"{text_features.shape[0]} text samples but {len(text_labels)} text labels; "
            "pass one label per text sample."
        )
    if len(image_labels) != views.shape[1]:
        raise ValueError(
            f"{views.shape[1]} images but {len(image_labels)} image labels; "
            "pass one label per image (views share labels)."
        )
    _check_ratio(image_ratio)
    if float(image_ratio) > 0 and views.shape[1] == 0:
        raise ValueError(
            "the training set has no images but image_ratio > 0; give K-shot image "
            "features, or set image_ratio=0 to train on text only."
        )
    if float(image_ratio) < 1 and text_features.shape[0] == 0:
        raise ValueError(
            "there are no text samples but image_ratio < 1; give per-template text "
            "features, or set image_ratio=1 (modality='image')."
        )
    return views, image_labels, text_features, text_labels


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


@dataclass
class CrossModalResult:
    """Outcome of :func:`train_cross_modal` / :func:`train_partial_finetune`.

    Attributes:
        head: the selected head, with the weights of its best validation checkpoint.
        hparams: the chosen ``{"lr", "weight_decay", "batch_size"}``.
        best_iter: the iteration of the selected checkpoint (0 = the initialisation).
        val_accuracy: validation accuracy (percent) of the selected checkpoint.
        history: the selected run's evaluations, ``[{"iter", "val_accuracy",
            "val_loss", "train_loss"}]``.
        grid: one entry per configuration tried, with its best validation accuracy.
        zero_shot_weight: ``(C, D)`` the text-prototype classifier (for WiSE-FT).
        modality: ``"cross"`` (image + text samples) or ``"image"`` (images only).
        image_ratio: the image fraction of every batch.
        suffix: for partial fine-tuning, the fine-tuned end of the image encoder
            (maps cached prefix activations to features); ``None`` for linear heads.
    """

    head: CrossModalHead
    hparams: dict[str, Any]
    best_iter: int
    val_accuracy: float
    history: list[dict[str, float]]
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
    return _check_ratio(image_ratio)


def _resolve_grid(
    grid: str,
    lrs: Sequence[float] | None,
    weight_decays: Sequence[float] | None,
    batch_sizes: Sequence[int] | None,
    device: torch.device,
) -> list[dict[str, Any]]:
    if grid == "auto":
        grid = "paper" if device.type == "cuda" else "small"
    if grid not in GRIDS:
        raise ValueError(f"grid must be 'auto', 'paper' or 'small', got {grid!r}.")
    base = GRIDS[grid]
    lrs = tuple(base["lrs"] if lrs is None else lrs)
    wds = tuple(base["weight_decays"] if weight_decays is None else weight_decays)
    bss = tuple(base["batch_sizes"] if batch_sizes is None else batch_sizes)
    if not lrs or not wds or not bss:
        raise ValueError("the hyperparameter grid is empty; give at least one lr, wd and batch.")
    for lr in lrs:
        if not lr >= 0:
            raise ValueError(f"learning rates must be >= 0, got {lr}.")
    return [
        {"lr": float(lr), "weight_decay": float(wd), "batch_size": int(bs)}
        for lr in lrs
        for wd in wds
        for bs in bss
    ]


def _evaluate(
    head: CrossModalHead,
    suffix: nn.Module | None,
    val_source: Tensor,
    val_labels: Tensor,
    device: torch.device,
    chunk: int = 1024,
) -> tuple[float, float]:
    """Validation accuracy (percent) and mean cross-entropy."""
    head.eval()
    if suffix is not None:
        suffix.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(val_labels), chunk):
            x = val_source[start : start + chunk].to(device)
            y = val_labels[start : start + chunk].to(device)
            if suffix is not None:
                with autocast(device):
                    x = suffix(x)
            logits = head(x.float())
            correct += int((logits.argmax(-1) == y).sum())
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    n = max(len(val_labels), 1)
    return 100.0 * correct / n, loss_sum / n


def _better(acc: float, loss: float, best_acc: float, best_loss: float) -> bool:
    """Higher accuracy wins; equal accuracy: lower loss wins; otherwise keep the earlier."""
    return acc > best_acc + 1e-9 or (abs(acc - best_acc) <= 1e-9 and loss < best_loss - 1e-9)


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
    iters: int = 1000,
    warmup: int = 50,
    eval_every: int = 100,
    image_ratio: float = 0.5,
    seed: int = 1,
    suffix: nn.Module | None = None,
    patience: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "cross-modal",
    select_best: bool = True,
) -> tuple[int, float, float, list[dict[str, float]]]:
    """Train one configuration in place and load its best validation checkpoint.

    The loss is one cross-entropy over each mixed batch (image + text samples).  AdamW,
    learning rate ``lr * warmup_cosine(step, warmup, iters)``.  The model is evaluated on
    the validation split at iteration 0 and every ``eval_every`` iterations (and at the
    end); the best checkpoint (accuracy, then loss) is restored into ``head`` (and
    ``suffix``).  ``patience`` stops after that many evaluations without improvement.

    Args:
        head: the head to train (modified in place).
        image_source: ``(V, N, ...)``: image features ``(V, N, D)`` for a linear head, or
            cached prefix activations when ``suffix`` is given.
        image_labels: ``(N,)``.
        text_features: ``(T, D)`` normalised text samples; ``text_labels`` ``(T,)``.
        val_source: ``(N_val, ...)`` validation features (or prefix activations).
        val_labels: ``(N_val,)``.
        suffix: trainable module mapping ``image_source`` rows to ``(B, D)`` features.
        select_best: restore the best validation checkpoint (default); ``False`` keeps
            the final weights and reports the last evaluation.

    Returns:
        ``(best_iter, best_val_accuracy, best_val_loss, history)``.
    """
    device = get_device(device)
    if iters < 0 or warmup < 0 or eval_every < 1:
        raise ValueError(
            f"need iters >= 0, warmup >= 0 and eval_every >= 1, got iters={iters}, "
            f"warmup={warmup}, eval_every={eval_every}."
        )
    _check_head_compatible(head, image_source, image_labels, text_features, text_labels, suffix)
    _check_labels(val_labels, head.num_classes, "validation")
    head.to(device)
    params = list(head.parameters())
    if suffix is not None:
        suffix.to(device)
        params += [p for p in suffix.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, iters)
    )
    use_scaler = suffix is not None and autocast_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    generator = torch.Generator().manual_seed(int(seed))
    text_features = text_features.to(device).float()
    text_labels = text_labels.to(device)
    image_labels = image_labels.to(device)
    num_views, num_images = image_source.shape[0], image_source.shape[1]

    def snapshot() -> dict[str, dict[str, Tensor]]:
        state = {"head": {k: v.detach().clone() for k, v in head.state_dict().items()}}
        if suffix is not None:
            state["suffix"] = {k: v.detach().clone() for k, v in suffix.state_dict().items()}
        return state

    acc, loss = _evaluate(head, suffix, val_source, val_labels, device)
    history = [{"iter": 0, "val_accuracy": acc, "val_loss": loss, "train_loss": float("nan")}]
    best = (0, acc, loss, snapshot())
    since_best = 0
    running, seen = 0.0, 0

    from tqdm.auto import tqdm

    bar = tqdm(range(1, iters + 1), desc=desc, disable=not progress, leave=False)
    for it in bar:
        head.train()
        if suffix is not None:
            suffix.train()
        v_idx, i_idx, t_idx = sample_mixed_indices(
            num_images, len(text_labels), batch_size, generator, image_ratio, num_views
        )
        parts, ys = [], []
        if len(i_idx):
            src_dev = image_source.device
            x_img = image_source[v_idx.to(src_dev), i_idx.to(src_dev)].to(device)
            if suffix is not None:
                with autocast(device):
                    x_img = suffix(x_img)
            parts.append(x_img.float())
            ys.append(image_labels[i_idx.to(device)])
        if len(t_idx):
            t_idx = t_idx.to(device)
            parts.append(text_features[t_idx])
            ys.append(text_labels[t_idx])
        logits = head(torch.cat(parts))
        batch_loss = F.cross_entropy(logits, torch.cat(ys))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(batch_loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        running += float(batch_loss.detach())
        seen += 1
        if it % eval_every == 0 or it == iters:
            acc, loss = _evaluate(head, suffix, val_source, val_labels, device)
            history.append(
                {
                    "iter": it,
                    "val_accuracy": acc,
                    "val_loss": loss,
                    "train_loss": running / seen,
                }
            )
            running, seen = 0.0, 0
            bar.set_postfix(val=f"{acc:.1f}")
            if _better(acc, loss, best[1], best[2]):
                best = (it, acc, loss, snapshot())
                since_best = 0
            else:
                since_best += 1
                if patience is not None and since_best >= patience:
                    break
    head.eval()
    if not select_best:
        last = history[-1]
        return int(last["iter"]), last["val_accuracy"], last["val_loss"], history
    head.load_state_dict(best[3]["head"])
    if suffix is not None:
        suffix.load_state_dict(best[3]["suffix"])
    return best[0], best[1], best[2], history


def _check_head_compatible(
    head: CrossModalHead,
    image_source: Tensor,
    image_labels: Tensor,
    text_features: Tensor,
    text_labels: Tensor,
    suffix: nn.Module | None,
) -> None:
    """Raise a clear ``ValueError`` when the data do not fit the head's (C, D)."""
    if text_features.ndim != 2 or text_features.shape[-1] != head.dim:
        raise ValueError(
            f"text samples have shape {tuple(text_features.shape)} but the head expects "
            f"(T, {head.dim}); encode text and images with the backbone the head was built for."
        )
    if suffix is None and image_source.shape[-1] != head.dim:
        raise ValueError(
            f"image features have dimension {image_source.shape[-1]} but the head expects "
            f"{head.dim}; encode images with the same backbone as the text."
        )
    if len(text_labels) and int(text_labels.max()) >= head.num_classes:
        raise ValueError(
            f"text samples cover {int(text_labels.max()) + 1} classes but the head has "
            f"{head.num_classes}; build the head from the prototypes of the same class list."
        )
    _check_labels(text_labels, head.num_classes, "text")
    _check_labels(image_labels, head.num_classes, "image")
    if image_source.shape[1] != len(image_labels):
        raise ValueError(
            f"{image_source.shape[1]} images but {len(image_labels)} image labels; "
            "pass one label per image (views share labels)."
        )


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
    iters: int = 1000,
    warmup: int = 50,
    eval_every: int = 100,
    grid: str = "auto",
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
    batch_sizes: Sequence[int] | None = None,
    logit_scale: float = LOGIT_SCALE,
    patience: int | None = None,
    seed: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CrossModalResult:
    """Cross-modal (or image-only) linear probe with a validation grid search.

    For every ``(lr, weight_decay, batch_size)`` of the grid, a head initialised from the
    text prototypes is trained on mixed batches (all configurations side by side by
    :func:`fit_head_grid`, equivalent to one :func:`fit_head` run each); the configuration
    and iteration with the best validation accuracy (ties: lower validation loss, then
    the earlier grid entry) are returned.  No test data enters this function.

    Args:
        image_features: ``(N, D)`` or ``(V, N, D)`` K-shot training features (``None``
            with ``image_ratio=0``: text only).
        image_labels: ``(N,)``.
        text_features_per_template: ``(C, M, D)`` per-class, per-template text features.
        val_features: ``(N_val, D)`` few-shot validation features; ``val_labels`` ``(N_val,)``.
        modality: ``"cross"`` (image + text samples, half/half) or ``"image"`` (images only).
        image_ratio: override the image fraction of each batch (``0``: text only).
        init: ``"text"`` (prototypes = zero-shot head) or ``"random"``.
        iters: training iterations per configuration (paper: 12,800).
        warmup: linear warm-up iterations (paper: 50).
        eval_every: validation interval (paper: 100).
        grid: ``"auto"`` (``"paper"`` on CUDA, ``"small"`` on CPU), ``"paper"`` or
            ``"small"``; ``lrs``/``weight_decays``/``batch_sizes`` override its axes.
        logit_scale: fixed head scale (100).
        patience: early-stop a run after this many evaluations without improvement.
        seed: seeds the head's random init and every configuration's batch sampler.
    """
    device = get_device(device)
    ratio = _resolve_image_ratio(modality, image_ratio)
    if init not in ("text", "random"):
        raise ValueError(f"init must be 'text' or 'random', got {init!r}.")
    t = _check_text_tensor(text_features_per_template)
    num_classes, _, dim = t.shape
    txt, txt_labels = text_samples(t)
    zero_shot = class_prototypes(t)
    views, img_labels, txt, txt_labels = _check_training_data(
        image_features, image_labels, txt, txt_labels, ratio, num_classes=num_classes
    )
    val_features, val_labels = _check_val(val_features, val_labels, dim, num_classes)
    configs = _resolve_grid(grid, lrs, weight_decays, batch_sizes, device)

    if init == "text":
        init_weight = zero_shot
    else:
        gen = torch.Generator().manual_seed(int(seed))
        init_weight = CrossModalHead.random(num_classes, dim, gen).weight.detach()
    runs = fit_head_grid(
        init_weight,
        configs,
        views,
        img_labels,
        txt,
        txt_labels,
        val_features,
        val_labels,
        iters=iters,
        warmup=warmup,
        eval_every=eval_every,
        image_ratio=ratio,
        seed=seed,
        logit_scale=logit_scale,
        patience=patience,
        device=device,
        progress=progress,
        desc=f"{modality} x{len(configs)} configs",
    )
    grid_log = [
        {**cfg, "val_accuracy": r.val_accuracy, "val_loss": r.val_loss, "best_iter": r.best_iter}
        for cfg, r in zip(configs, runs, strict=True)
    ]
    best = 0
    for i, r in enumerate(runs):
        if _better(r.val_accuracy, r.val_loss, runs[best].val_accuracy, runs[best].val_loss):
            best = i
    run = runs[best]
    return CrossModalResult(
        head=CrossModalHead(run.weight, logit_scale=logit_scale).eval(),
        hparams=dict(configs[best]),
        best_iter=run.best_iter,
        val_accuracy=run.val_accuracy,
        history=run.history,
        grid=grid_log,
        zero_shot_weight=zero_shot,
        modality=modality,
        image_ratio=ratio,
        extra={"init": init, "iters": iters},
    )


class GridRun(NamedTuple):
    """One configuration's outcome in :func:`fit_head_grid`."""

    weight: Tensor  # (C, D) best checkpoint
    best_iter: int
    val_accuracy: float
    val_loss: float
    history: list[dict[str, float]]


def fit_head_grid(
    init_weight: Tensor,
    configs: Sequence[dict[str, Any]],
    image_features: Tensor,
    image_labels: Tensor,
    text_features: Tensor,
    text_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    *,
    iters: int = 1000,
    warmup: int = 50,
    eval_every: int = 100,
    image_ratio: float = 0.5,
    seed: int = 1,
    logit_scale: float = LOGIT_SCALE,
    patience: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "cross-modal grid",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> list[GridRun]:
    """:func:`fit_head` for a whole hyperparameter grid at once (linear heads only).

    The ``G`` configurations are trained side by side as one ``(G, C, D)`` weight: each
    step gathers every configuration's own mixed batch (same sampler and seed as
    :func:`fit_head`, padded to the largest batch size), computes all ``G`` losses with
    one batched matmul, and applies AdamW (torch's update rule, written out so that each
    configuration has its own learning rate and weight decay).  The results match
    running :func:`fit_head` once per configuration, up to float rounding, at roughly
    the cost of one run.

    Args:
        init_weight: ``(C, D)`` shared initialisation (text prototypes or random rows).
        configs: ``[{"lr", "weight_decay", "batch_size"}, ...]``.
        image_features: ``(V, N, D)``; the other tensors as in :func:`fit_head`.

    Returns:
        One :class:`GridRun` per configuration, in order.
    """
    device = get_device(device)
    if iters < 0 or warmup < 0 or eval_every < 1:
        raise ValueError(
            f"need iters >= 0, warmup >= 0 and eval_every >= 1, got iters={iters}, "
            f"warmup={warmup}, eval_every={eval_every}."
        )
    if not configs:
        raise ValueError("the hyperparameter grid is empty; give at least one configuration.")
    probe = CrossModalHead(init_weight, logit_scale=logit_scale)
    views = _as_views(image_features)
    _check_head_compatible(probe, views, image_labels, text_features, text_labels, None)
    _check_labels(val_labels, probe.num_classes, "validation")
    G = len(configs)
    lr = torch.tensor([float(c["lr"]) for c in configs], device=device)
    wd = torch.tensor([float(c["weight_decay"]) for c in configs], device=device)
    sizes = [int(c["batch_size"]) for c in configs]
    for b in sizes:
        _split_counts(b, image_ratio)
    b_max = max(sizes)
    mask = torch.zeros(G, b_max, device=device)
    for g, b in enumerate(sizes):
        mask[g, :b] = 1.0
    counts = mask.sum(1)

    weight = init_weight.detach().float().to(device).expand(G, -1, -1).clone()
    weight.requires_grad_(True)
    exp_avg = torch.zeros_like(weight)
    exp_avg_sq = torch.zeros_like(weight)
    beta1, beta2 = betas
    scale = float(logit_scale)
    views = views.float()
    text_features = text_features.float()
    image_labels = torch.as_tensor(image_labels).long()
    val_x = F.normalize(val_features.to(device).float(), dim=-1)
    val_y = torch.as_tensor(val_labels).to(device).long()
    generators = [torch.Generator().manual_seed(int(seed)) for _ in configs]
    num_views, num_images = views.shape[0], views.shape[1]
    n_val = len(val_y)

    def evaluate() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits = scale * torch.einsum("nd,gcd->gnc", val_x, weight)
            acc = 100.0 * (logits.argmax(-1) == val_y).double().sum(1) / n_val
            loss = F.cross_entropy(logits.reshape(G * n_val, -1), val_y.repeat(G), reduction="none")
            return acc.cpu(), loss.reshape(G, n_val).mean(1).cpu()

    acc0, loss0 = evaluate()
    histories = [
        [{"iter": 0, "val_accuracy": float(acc0[g]), "val_loss": float(loss0[g]),
          "train_loss": float("nan")}]
        for g in range(G)
    ]  # fmt: skip
    best_iter = [0] * G
    best_acc = [float(a) for a in acc0]
    best_loss = [float(x) for x in loss0]
    best_weight = weight.detach().clone()
    since_best = [0] * G
    active = [True] * G
    running = torch.zeros(G)
    seen = 0

    from tqdm.auto import tqdm

    bar = tqdm(range(1, iters + 1), desc=desc, disable=not progress, leave=False)
    for it in bar:
        xs = torch.zeros(G, b_max, views.shape[-1])
        ys = torch.zeros(G, b_max, dtype=torch.long)
        for g in range(G):
            v_idx, i_idx, t_idx = sample_mixed_indices(
                num_images, len(text_labels), sizes[g], generators[g], image_ratio, num_views
            )
            n_img = len(i_idx)
            xs[g, :n_img] = views[v_idx, i_idx]
            ys[g, :n_img] = image_labels[i_idx]
            xs[g, n_img : sizes[g]] = text_features[t_idx]
            ys[g, n_img : sizes[g]] = text_labels[t_idx]
        xs, ys = F.normalize(xs.to(device), dim=-1), ys.to(device)
        logits = scale * torch.bmm(xs, weight.transpose(1, 2))  # (G, B, C)
        per_sample = F.cross_entropy(
            logits.reshape(G * b_max, -1), ys.reshape(-1), reduction="none"
        ).reshape(G, b_max)
        losses = (per_sample * mask).sum(1) / counts
        (grad,) = torch.autograd.grad(losses.sum(), weight)
        step_lr = (lr * warmup_cosine(it - 1, warmup, iters))[:, None, None]
        with torch.no_grad():
            # AdamW (Loshchilov & Hutter), torch.optim.AdamW's update, per-config lr and wd.
            weight.mul_(1.0 - step_lr * wd[:, None, None])
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            bias1 = 1.0 - beta1**it
            bias2 = 1.0 - beta2**it
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
            weight.sub_((step_lr / bias1) * exp_avg / denom)
        running += losses.detach().cpu()
        seen += 1
        if it % eval_every == 0 or it == iters:
            acc, loss = evaluate()
            for g in range(G):
                if not active[g]:
                    continue
                a, l_ = float(acc[g]), float(loss[g])
                histories[g].append(
                    {"iter": it, "val_accuracy": a, "val_loss": l_,
                     "train_loss": float(running[g]) / seen}
                )  # fmt: skip
                if _better(a, l_, best_acc[g], best_loss[g]):
                    best_iter[g], best_acc[g], best_loss[g] = it, a, l_
                    best_weight[g] = weight.detach()[g]
                    since_best[g] = 0
                else:
                    since_best[g] += 1
                    if patience is not None and since_best[g] >= patience:
                        active[g] = False
            running.zero_()
            seen = 0
            bar.set_postfix(val=f"{max(best_acc):.1f}")
            if not any(active):
                break
    return [
        GridRun(best_weight[g].cpu(), best_iter[g], best_acc[g], best_loss[g], histories[g])
        for g in range(G)
    ]


def _check_val(
    val_features: Tensor, val_labels: Tensor, dim: int, num_classes: int
) -> tuple[Tensor, Tensor]:
    if val_features.ndim != 2 or val_features.shape[1] != dim:
        raise ValueError(
            f"validation features must be (N_val, {dim}), got {tuple(val_features.shape)}; "
            "use the centre-crop features of the few-shot validation split."
        )
    val_labels = _check_labels(val_labels, num_classes, "validation")
    if len(val_labels) != len(val_features) or len(val_labels) == 0:
        raise ValueError(
            f"{len(val_features)} validation features and {len(val_labels)} labels; need the "
            "same non-zero number (selection needs a few-shot validation split)."
        )
    return val_features, val_labels


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
    iters: int = 1000,
    warmup: int = 50,
    eval_every: int = 100,
    lrs: Sequence[float] = (1e-4,),
    weight_decays: Sequence[float] = (0.0,),
    batch_sizes: Sequence[int] = (32,),
    logit_scale: float = PARTIAL_FT_LOGIT_SCALE,
    patience: int | None = None,
    seed: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    prefix_batch_size: int = 256,
    cached: bool = False,
) -> CrossModalResult:
    """Cross-modal partial fine-tuning: last image-encoder block + head, on mixed batches.

    The frozen prefix runs once over the training and validation images; its
    activations are cached, and each step runs only the trainable suffix on the image
    half of the batch (text samples go straight to the head).  Grid search and
    checkpoint selection are on validation, as in :func:`train_cross_modal`.

    Args:
        visual: ``model.visual`` (left unchanged: the trainable end is deep-copied).
        train_images: ``(N, 3, H, W)`` or ``(V, N, 3, H, W)`` preprocessed images; with
            ``cached=True``, prefix activations ``(V, N, ...)`` instead.
        image_labels: ``(N,)``.
        text_features_per_template: ``(C, M, D)``.
        val_images: ``(N_val, 3, H, W)`` preprocessed validation images (or, with
            ``cached=True``, their prefix activations ``(N_val, ...)``).
        val_labels: ``(N_val,)``.
        logit_scale: fixed head scale (``exp(4) ≈ 54.6`` as in the paper).
        cached: the inputs are already prefix activations (from ``split.prefix`` of
            :func:`split_visual_encoder` on the same ``visual``).

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
    image_labels = _check_labels(image_labels, num_classes, "image")
    val_labels = _check_labels(val_labels, num_classes, "validation")

    def cache(x: Tensor) -> Tensor:
        out = []
        for start in range(0, len(x), prefix_batch_size):
            with autocast(device):
                out.append(split.prefix(x[start : start + prefix_batch_size].to(device)).float())
        return torch.cat(out) if out else x.new_zeros(0)

    if train_images.ndim == val_images.ndim:  # no view axis
        train_images = train_images.unsqueeze(0)
    if cached:
        train_cache, val_cache = train_images.to(device), val_images.to(device)
    else:
        if train_images.shape[-3] != 3 or val_images.shape[-3] != 3:
            raise ValueError(
                f"expected preprocessed images (..., 3, H, W), got {tuple(train_images.shape)} "
                f"and {tuple(val_images.shape)}; pass cached=True for prefix activations."
            )
        train_cache = torch.stack([cache(v) for v in train_images])
        val_cache = cache(val_images)
    if train_cache.shape[1] != len(image_labels) or len(val_cache) != len(val_labels):
        raise ValueError(
            f"{train_cache.shape[1]} training images for {len(image_labels)} labels and "
            f"{len(val_cache)} validation images for {len(val_labels)} labels; pass one label "
            "per image."
        )
    if train_cache.shape[1] == 0 and ratio > 0:
        raise ValueError("no training images; partial fine-tuning needs K-shot images.")
    with torch.no_grad():
        probe = split.suffix.to(device)(
            train_cache[0, :1] if train_cache.shape[1] else val_cache[:1]
        )
    if probe.shape[-1] != dim:
        raise ValueError(
            f"the image encoder outputs dimension {probe.shape[-1]} but text features have "
            f"{dim}; use text features from the same CLIP model."
        )
    configs = [
        {"lr": float(lr), "weight_decay": float(wd), "batch_size": int(bs)}
        for lr in lrs
        for wd in weight_decays
        for bs in batch_sizes
    ]
    if not configs:
        raise ValueError("the hyperparameter grid is empty; give at least one lr, wd and batch.")
    best: tuple[float, float] | None = None
    chosen: CrossModalResult | None = None
    grid_log: list[dict[str, Any]] = []
    for i, cfg in enumerate(configs):
        suffix = copy.deepcopy(split.suffix)
        head = CrossModalHead(zero_shot, logit_scale=logit_scale)
        best_iter, acc, loss, history = fit_head(
            head,
            train_cache,
            image_labels,
            txt,
            txt_labels,
            val_cache,
            val_labels,
            iters=iters,
            warmup=warmup,
            eval_every=eval_every,
            image_ratio=ratio,
            seed=seed,
            suffix=suffix,
            patience=patience,
            device=device,
            progress=progress,
            desc=f"partial {i + 1}/{len(configs)}",
            **cfg,
        )
        grid_log.append({**cfg, "val_accuracy": acc, "val_loss": loss, "best_iter": best_iter})
        if best is None or _better(acc, loss, best[0], best[1]):
            best = (acc, loss)
            chosen = CrossModalResult(
                head=head,
                hparams=dict(cfg),
                best_iter=best_iter,
                val_accuracy=acc,
                history=history,
                grid=grid_log,
                zero_shot_weight=zero_shot,
                modality=modality,
                image_ratio=ratio,
                suffix=suffix,
                extra={"prefix": split.prefix, "iters": iters},
            )
    assert chosen is not None
    return chosen


# --------------------------------------------------------------------------------------
# Runner integration (``fewclip run cross-modal``) and exercises
# --------------------------------------------------------------------------------------


def _train_views(ctx: Context, flip: bool, progress: bool) -> Tensor:
    """``(V, N, D)`` training features: the cached centre crop, plus its mirror image."""
    train = ctx.features("train")
    feats = train.features if train.features.ndim == 3 else train.features.unsqueeze(0)
    feats = feats.cpu().float()
    if not flip:
        return feats
    backbone = ctx.backbone
    flipped = encode_split_through(
        backbone.encode_images,
        ctx.splits.train,
        backbone.preprocess,
        backbone.device,
        flip=True,
        progress=progress,
    )
    return torch.cat([feats, F.normalize(flipped, dim=-1).unsqueeze(0)])


@register_method(
    "cross-modal",
    options={
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
        "iters": Option(int, 1000, "training iterations per configuration (paper: 12800)"),
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
    },
    help="Cross-modal adaptation (Lin et al., CVPR 2023): class-name text embeddings as "
    "extra training samples of a linear head initialised from the zero-shot classifier.",
)
def run_cross_modal(
    ctx: Context,
    variant: str = "linear",
    modality: str = "cross",
    iters: int = 1000,
    wise_weight: float = 0.5,
    templates: int = 0,
    flip: bool | None = None,
    init: str = "text",
    grid: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Cross-modal linear probe / WiSE-FT / partial fine-tuning on one few-shot episode.

    Text samples are the dataset's templates filled with each class name (``(C, M, D)``);
    image samples are the K-shot centre-crop features plus their flipped view (``flip=None``:
    unless ``dataset.info["hflip_invariant"]`` is ``False``, as for ShapeWorld, whose
    mirrored arrows and crescents point where no image of the world does).  Selection
    (hyperparameters and iteration) uses the few-shot validation split only.
    ``variant="partial"`` re-encodes images through the fine-tuned end of the encoder,
    so its val/test/OOD features are recomputed here.

    Returns:
        ``ctx.report``'s accuracies plus ``hparams``, ``best_iter``,
        ``selection_val_accuracy``, ``grid``, ``variant``, ``modality``, ``templates``.
    """
    if variant not in ("linear", "wise-ft", "partial"):
        raise ValueError(f"variant must be 'linear', 'wise-ft' or 'partial', got {variant!r}.")
    if variant == "wise-ft" and not 0.0 <= wise_weight <= 1.0:
        raise ValueError(f"wise_weight must be in [0, 1], got {wise_weight}.")
    if flip is None:
        flip = bool(ctx.dataset.info.get("hflip_invariant", True))
    backbone = ctx.backbone
    all_templates = list(ctx.dataset.templates)
    if templates < 0:
        raise ValueError(
            f"templates must be >= 0 (0: all {len(all_templates)} templates), got {templates}."
        )
    used = all_templates[:templates] if templates else all_templates
    text = prompt_text_features(backbone, ctx.dataset.classnames, used).cpu()
    device = backbone.device
    out: dict[str, Any] = {
        "variant": variant,
        "modality": modality,
        "templates": len(used),
        "flip": flip,
    }

    if variant == "partial":
        if init != "text":
            raise ValueError("variant='partial' supports init='text' only.")
        visual = backbone.model.visual
        split = split_visual_encoder(visual)
        pre = backbone.preprocess

        def cache(s: Any, f: bool = False) -> Tensor:
            return encode_split_through(
                split.prefix, s, pre, device, flip=f, progress=progress, out_device=device
            )

        train_cache = torch.stack([cache(ctx.splits.train, f) for f in ([False, True][: 1 + flip])])
        result = train_partial_finetune(
            visual,
            train_cache,
            torch.as_tensor(ctx.splits.train.labels),
            text,
            cache(ctx.splits.val),
            torch.as_tensor(ctx.splits.val.labels),
            modality=modality,
            iters=iters,
            seed=ctx.seed,
            device=device,
            progress=progress,
            cached=True,
        )
        suffix = result.suffix
        assert suffix is not None
        suffix.eval()

        def encode(images: Tensor) -> Tensor:
            return suffix(split.prefix(images))

        named = {"val": ctx.splits.val, "test": ctx.splits.test}
        named.update({f"ood:{d}": s for d, s in ctx.splits.ood_test.items()})
        features_by_split = {
            name: FeatureSet(
                features=F.normalize(encode_split_through(encode, s, pre, device), dim=-1),
                labels=torch.as_tensor(s.labels, dtype=torch.long),
            )
            for name, s in named.items()
        }
        report = ctx.report(result.predict, features_by_split=features_by_split)
    else:
        val = ctx.features("val")
        result = train_cross_modal(
            _train_views(ctx, flip, progress),
            torch.as_tensor(ctx.features("train").labels),
            text,
            val.features,
            val.labels,
            modality=modality,
            init=init,
            iters=iters,
            grid=grid,
            seed=ctx.seed,
            device=device,
            progress=progress,
        )
        head = result.wise_ft_head(wise_weight) if variant == "wise-ft" else result.head
        if variant == "wise-ft":
            out["wise_weight"] = wise_weight

        def predict(features: Tensor) -> Tensor:
            return head(features.to(head.weight.device)).cpu()

        report = ctx.report(predict)
    out.update(report)
    out.update(
        {
            "hparams": result.hparams,
            "best_iter": result.best_iter,
            "selection_val_accuracy": result.val_accuracy,
            "grid": result.grid,
        }
    )
    return out


def _batch_exercise_inputs(gen: torch.Generator) -> tuple[Any, ...]:
    n, c, m, d = (
        int(torch.randint(lo, hi + 1, (1,), generator=gen))
        for lo, hi in ((4, 12), (2, 5), (1, 3), (3, 8))
    )
    image_features = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    image_labels = torch.randint(c, (n,), generator=gen)
    text_features, text_labels = text_samples(torch.randn(c, m, d, generator=gen))
    batch_size = 2 * int(torch.randint(1, 5, (1,), generator=gen))
    _, image_index, text_index = sample_mixed_indices(n, c * m, batch_size, gen)
    return image_features, image_labels, text_features, text_labels, image_index, text_index


def _reference_batch(
    image_features: Tensor,
    image_labels: Tensor,
    text_features: Tensor,
    text_labels: Tensor,
    image_index: Tensor,
    text_index: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gather a half-image, half-text batch: images first, then text samples.

    Returns ``x`` ``(B, D)`` float32, ``y`` ``(B,)`` int64, ``is_text`` ``(B,)`` bool.
    """
    batch = build_mixed_batch(
        image_features, image_labels, text_features, text_labels, image_index, text_index
    )
    return batch.x, batch.y, batch.is_text


def _wise_exercise_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    c, d = (int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((2, 6), (3, 9)))
    weight = float(torch.rand(1, generator=gen))
    return torch.randn(c, d, generator=gen), torch.randn(c, d, generator=gen), weight


def register_exercises() -> None:
    """Register this chapter's exercises with :mod:`fewclip_tutorial.exercises`.

    * ``"cross_modal_batch"``: ``fn(image_features (N, D), image_labels (N,),
      text_features (T, D), text_labels (T,), image_index (B/2,), text_index (B/2,)) ->
      (x (B, D), y (B,), is_text (B,))``: gather the image samples, then the text samples.
      The indices are given so the answer is deterministic (drawing them is
      :func:`sample_mixed_indices`).
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
