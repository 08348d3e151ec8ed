"""FD-Align: feature-discrimination alignment (Song et al., NeurIPS 2023).

Fine-tuning CLIP's image encoder on a few labelled images raises accuracy on the
training distribution but drags the features away from what the pretrained model
knew about *style*: rendering domain, colour, size, background.  FD-Align keeps
that knowledge by asking the fine-tuned encoder to place every image among a set
of **spurious prototypes** (one per prompt template, averaged over classes) the
same way the frozen pretrained encoder does.

The paper's objective, for an image ``x`` with label ``y``, a fine-tuned encoder
``f`` and the frozen pretrained encoder ``f_0``::

    class prototype     t_c  = norm( 1/M sum_m norm(g(P_m(c))) )           (C, D)
    spurious prototype  mu_m = norm( 1/C sum_c norm(g(P_m(c))) )           (M, D)
    L_class    = CE( tau * cos(f(x), t_.), y )
    P(x; f)    = softmax_m( tau * cos(f(x), mu_m) )                         (M,)
    L_spurious = KL( P(x; f) || P(x; f_0) )
    L          = alpha * L_class + beta * L_spurious        (alpha = 1, beta = 20)

where ``g`` is the text encoder, ``P_m(c)`` is template ``m`` filled with class
name ``c`` and ``tau = 100`` is CLIP's logit scale.  **Spurious Prototype
Correction** (SPC) first drops outlier templates with an Isolation Forest and
then clusters the rest with k-means; the cluster centres replace the raw
spurious prototypes.

Where the paper and the public reference code disagree (see
``/work/shared/REFERENCE.md``), this module follows the paper by default and
makes the code's choice selectable:

* KL direction: paper ``KL(P_finetuned || P_frozen)`` (``direction="paper"``);
  code ``KL(P_frozen || P_finetuned)`` (``direction="code"``).
* KL reduction: the paper's per-sample KL averaged over the batch
  (``"batchmean"``); the code's ``reduction='mean'`` averages over all ``B * S``
  elements (``"elementwise-mean"``), i.e. it is ``1/S`` times the batch mean, so
  with ``S = 20`` prototypes and ``beta = 20`` the code weights the KL by about 1.
* Head: the code trains a linear head initialised from the class prototypes; we
  keep the class prototypes fixed (the paper's ``L_class``).
* SPC centres: the code uses the raw k-means centres as a frozen linear head; we
  renormalise them and scale by ``tau`` so the spurious softmax keeps the same
  temperature as before correction.
* Isolation Forest: unseeded in the code; seeded here (``random_state=seed``).

Functional core: :func:`class_prototypes`, :func:`spurious_prototypes`,
:func:`classification_loss`, :func:`spurious_distribution`, :func:`spurious_kl`,
:func:`fd_align_loss`, :func:`spurious_prototype_correction`.  Thin trainer:
:func:`finetune_fd_align`, and :func:`finetuned_backbone` to plug the result
into any feature-based method (e.g. Tip-Adapter on FD-Align features).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fewclip_tutorial.data.base import LabeledSplit
from fewclip_tutorial.device import autocast, seed_everything
from fewclip_tutorial.experiment import (
    CLIP_LOGIT_SCALE,
    Context,
    Option,
    register_method,
)

__all__ = [
    "FDAlignLoss",
    "FDAlignResult",
    "SPCResult",
    "class_prototypes",
    "classification_logits",
    "classification_loss",
    "encode_pair",
    "encode_split",
    "fd_align_loss",
    "finetune_fd_align",
    "finetuned_backbone",
    "register_exercises",
    "run_fd_align",
    "spurious_distribution",
    "spurious_kl",
    "spurious_prototype_correction",
    "spurious_prototypes",
    "spurious_templates",
    "template_text_features",
    "train_transform",
    "trainable_parameter_names",
]

KLDirection = Literal["paper", "code"]
KLReduction = Literal["batchmean", "elementwise-mean", "none"]

DEFAULT_LOGIT_SCALE: float = 100.0


# --------------------------------------------------------------------------- prototypes


def _check_text_features(text_features: Tensor) -> None:
    if not isinstance(text_features, Tensor) or text_features.ndim != 3:
        shape = tuple(text_features.shape) if isinstance(text_features, Tensor) else None
        raise ValueError(
            f"text_features must be a (C, M, D) tensor (classes x templates x dim), got shape "
            f"{shape}; encode every template for every class and reshape to (C, M, D), "
            "e.g. with template_text_features()."
        )
    if 0 in text_features.shape:
        raise ValueError(
            f"text_features has an empty dimension (shape {tuple(text_features.shape)}); "
            "pass at least one class, one template and one feature dimension."
        )


def class_prototypes(text_features: Tensor, logit_scale: float = DEFAULT_LOGIT_SCALE) -> Tensor:
    """Class prototypes ``t_c`` of FD-Align (the paper's class-prototype equation).

    Per class, the mean over the ``M`` templates of the L2-normalised text features,
    renormalised and multiplied by ``logit_scale``::

        t_c = logit_scale * norm( 1/M sum_m norm(text_features[c, m]) )

    Args:
        text_features: ``(C, M, D)`` text features (normalised or not).
        logit_scale: CLIP's temperature ``tau`` (100).

    Returns:
        ``(C, D)`` fp32 prototypes of norm ``logit_scale``.
    """
    _check_text_features(text_features)
    t = F.normalize(text_features.float(), dim=-1)
    return logit_scale * F.normalize(t.mean(dim=1), dim=-1)


def spurious_prototypes(text_features: Tensor, logit_scale: float = DEFAULT_LOGIT_SCALE) -> Tensor:
    """Spurious prototypes ``mu_m`` of FD-Align (the paper's spurious-prototype equation).

    Per template, the mean over the ``C`` classes of the L2-normalised text features,
    renormalised and multiplied by ``logit_scale``.  Averaging out the class leaves
    what the template says about style ("a sketch of a ...", "a red ...")::

        mu_m = logit_scale * norm( 1/C sum_c norm(text_features[c, m]) )

    Args:
        text_features: ``(C, M, D)`` text features.
        logit_scale: CLIP's temperature ``tau`` (100).

    Returns:
        ``(M, D)`` fp32 prototypes of norm ``logit_scale``.
    """
    _check_text_features(text_features)
    t = F.normalize(text_features.float(), dim=-1)
    return logit_scale * F.normalize(t.mean(dim=0), dim=-1)


def template_text_features(
    encode_text: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """Encode every ``template.format(classname)`` and return ``(C, M, D)`` text features.

    Args:
        encode_text: e.g. ``backbone.encode_text``: ``list[str] -> (T, D)``.
        classnames: ``C`` class names.
        templates: ``M`` templates, each with one ``"{}"``.
        batch_size: prompts per call to ``encode_text``.
    """
    if len(classnames) == 0 or len(templates) == 0:
        raise ValueError(
            f"got {len(classnames)} class names and {len(templates)} templates; "
            "pass at least one of each."
        )
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(
            f"templates must contain exactly one '{{}}' placeholder; these do not: {bad[:3]}. "
            "Write them like 'a photo of a {}.'"
        )
    prompts = [t.format(c) for c in classnames for t in templates]
    chunks = [
        encode_text(prompts[i : i + batch_size]).float().cpu()
        for i in range(0, len(prompts), batch_size)
    ]
    feats = torch.cat(chunks)
    return feats.reshape(len(classnames), len(templates), -1)


# --------------------------------------------------------------------------- losses


def classification_logits(image_features: Tensor, class_protos: Tensor) -> Tensor:
    """``(B, D)`` image features, ``(C, D)`` scaled prototypes -> ``(B, C)`` logits.

    ``logits = norm(image_features) @ class_protos.T``; the prototypes already carry
    the logit scale, so these are ``tau * cos(f(x), t_c)``.
    """
    if image_features.ndim != 2 or class_protos.ndim != 2:
        raise ValueError(
            f"expected image_features (B, D) and class_protos (C, D), got "
            f"{tuple(image_features.shape)} and {tuple(class_protos.shape)}."
        )
    if image_features.shape[1] != class_protos.shape[1]:
        raise ValueError(
            f"feature dimension mismatch: images have D={image_features.shape[1]}, prototypes "
            f"D={class_protos.shape[1]}; build the prototypes with the same backbone."
        )
    return F.normalize(image_features.float(), dim=-1) @ class_protos.float().T


def classification_loss(image_features: Tensor, class_protos: Tensor, labels: Tensor) -> Tensor:
    """FD-Align's ``L_class``: cross-entropy of prototype logits (mean over the batch).

    Args:
        image_features: ``(B, D)`` image features (any norm; they are normalised here).
        class_protos: ``(C, D)`` prototypes from :func:`class_prototypes` (scaled).
        labels: ``(B,)`` int64 class indices.
    """
    return F.cross_entropy(classification_logits(image_features, class_protos), labels)


def _spurious_log_distribution(image_features: Tensor, spurious_protos: Tensor) -> Tensor:
    if image_features.ndim != 2 or spurious_protos.ndim != 2:
        raise ValueError(
            f"expected image features (B, D) and spurious_protos (S, D), got "
            f"{tuple(image_features.shape)} and {tuple(spurious_protos.shape)}."
        )
    if image_features.shape[1] != spurious_protos.shape[1]:
        raise ValueError(
            f"feature dimension mismatch: images have D={image_features.shape[1]}, spurious "
            f"prototypes D={spurious_protos.shape[1]}; build them with the same backbone."
        )
    logits = F.normalize(image_features.float(), dim=-1) @ spurious_protos.float().T
    return F.log_softmax(logits, dim=-1)


def spurious_distribution(image_features: Tensor, spurious_protos: Tensor) -> Tensor:
    """``P(x; f)``: softmax over the spurious prototypes.

    ``P = softmax(norm(image_features) @ spurious_protos.T)``, prototypes scaled by tau.

    Args:
        image_features: ``(B, D)``.
        spurious_protos: ``(S, D)`` from :func:`spurious_prototypes` or SPC.

    Returns:
        ``(B, S)``, rows sum to 1.
    """
    return _spurious_log_distribution(image_features, spurious_protos).exp()


def spurious_kl(
    finetuned_features: Tensor,
    frozen_features: Tensor,
    spurious_protos: Tensor,
    direction: KLDirection = "paper",
    reduction: KLReduction = "batchmean",
) -> Tensor:
    """FD-Align's ``L_spurious``: KL divergence between spurious distributions.

    With ``P = spurious_distribution(finetuned_features)`` and
    ``Q = spurious_distribution(frozen_features)``:

    * ``direction="paper"``: ``KL(P || Q) = sum_s P_s (log P_s - log Q_s)``, the
      paper's formula (fine-tuned distribution first).
    * ``direction="code"``: ``KL(Q || P)``, what the reference code computes with
      ``F.kl_div(log P, Q)``.  The two differ unless ``P == Q``.

    Reductions:

    * ``"batchmean"``: per-sample KL (sum over the ``S`` prototypes), mean over the
      batch.  This is a proper KL divergence and what the paper writes.
    * ``"elementwise-mean"``: mean over all ``B * S`` elements, as the reference
      code's ``reduction='mean'``; it equals ``batchmean / S``.
    * ``"none"``: the ``(B,)`` per-sample KL.

    ``frozen_features`` is the reference and is detached.  The value is exactly zero
    when both feature tensors are equal (the encoder has not moved).

    Args:
        finetuned_features: ``(B, D)`` features from the encoder being trained.
        frozen_features: ``(B, D)`` features of the same images from the frozen
            pretrained encoder.
        spurious_protos: ``(S, D)`` scaled spurious prototypes.
        direction: ``"paper"`` or ``"code"``.
        reduction: ``"batchmean"``, ``"elementwise-mean"`` or ``"none"``.

    Returns:
        A scalar, or ``(B,)`` for ``reduction="none"``.
    """
    if finetuned_features.shape != frozen_features.shape:
        raise ValueError(
            f"finetuned_features {tuple(finetuned_features.shape)} and frozen_features "
            f"{tuple(frozen_features.shape)} must have the same shape: encode the same images "
            "with both encoders."
        )
    log_p_ft = _spurious_log_distribution(finetuned_features, spurious_protos)
    log_p_fr = _spurious_log_distribution(frozen_features.detach(), spurious_protos)
    if direction == "paper":
        log_p, log_q = log_p_ft, log_p_fr
    elif direction == "code":
        log_p, log_q = log_p_fr, log_p_ft
    else:
        raise ValueError(f"direction={direction!r} is unknown; use 'paper' or 'code'.")
    elementwise = log_p.exp() * (log_p - log_q)  # (B, S)
    if reduction == "batchmean":
        return elementwise.sum(dim=1).mean()
    if reduction == "elementwise-mean":
        return elementwise.mean()
    if reduction == "none":
        return elementwise.sum(dim=1)
    raise ValueError(
        f"reduction={reduction!r} is unknown; use 'batchmean', 'elementwise-mean' or 'none'."
    )


class FDAlignLoss(NamedTuple):
    """The FD-Align objective and its two parts (scalars)."""

    total: Tensor
    classification: Tensor
    spurious: Tensor


def fd_align_loss(
    finetuned_features: Tensor,
    frozen_features: Tensor | None,
    labels: Tensor,
    class_protos: Tensor,
    spurious_protos: Tensor | None,
    alpha: float = 1.0,
    beta: float = 20.0,
    direction: KLDirection = "paper",
    reduction: KLReduction = "batchmean",
) -> FDAlignLoss:
    """The FD-Align objective ``L = alpha * L_class + beta * L_spurious``.

    With ``beta == 0`` the total is exactly ``alpha * L_class`` (plain fine-tuning;
    the spurious term is still reported, without gradient, when
    ``frozen_features`` and ``spurious_protos`` are given, otherwise it is NaN).

    Args:
        finetuned_features: ``(B, D)`` features of the trained encoder.
        frozen_features: ``(B, D)`` features of the same images, frozen encoder
            (may be ``None`` only when ``beta == 0``).
        labels: ``(B,)`` int64.
        class_protos: ``(C, D)`` scaled class prototypes.
        spurious_protos: ``(S, D)`` scaled spurious prototypes (``None`` only if ``beta == 0``).
        alpha, beta: loss weights (paper: 1 and 20).
        direction, reduction: see :func:`spurious_kl`.
    """
    l_class = classification_loss(finetuned_features, class_protos, labels)
    have_ref = frozen_features is not None and spurious_protos is not None
    if beta == 0:
        if have_ref:
            with torch.no_grad():
                l_spur = spurious_kl(
                    finetuned_features.detach(),
                    frozen_features,
                    spurious_protos,
                    direction,
                    reduction,
                )
        else:
            l_spur = torch.full((), float("nan"), device=l_class.device)
        return FDAlignLoss(alpha * l_class, l_class, l_spur)
    if not have_ref:
        raise ValueError(
            f"beta={beta} needs frozen_features and spurious_protos; pass them, or set beta=0 "
            "for plain fine-tuning."
        )
    l_spur = spurious_kl(finetuned_features, frozen_features, spurious_protos, direction, reduction)
    return FDAlignLoss(alpha * l_class + beta * l_spur, l_class, l_spur)


# --------------------------------------------------------------------------- SPC


@dataclass
class SPCResult:
    """Output of :func:`spurious_prototype_correction`.

    Attributes:
        prototypes: ``(k, D)`` corrected spurious prototypes, normalised and scaled
            by ``logit_scale`` (ready for :func:`spurious_kl`).
        centres: ``(k, D)`` the raw k-means centres (of the unit-normalised template
            features); the reference code used these, unnormalised, as a frozen head.
        kept_indices: ``(n_keep,)`` template indices kept (the most normal), ascending.
        removed_indices: ``(M - n_keep,)`` template indices dropped as outliers, ascending.
        labels: ``(n_keep,)`` cluster of each kept template (aligned with ``kept_indices``).
        scores: ``(M,)`` Isolation Forest ``score_samples``: higher = more normal.
        n_clusters: the number of clusters actually used (after clipping).
    """

    prototypes: Tensor
    centres: Tensor
    kept_indices: np.ndarray
    removed_indices: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    n_clusters: int


def _resolve_keep(keep: float, m: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"keep={keep!r} must be a number: a fraction in (0, 1] or a count of templates."
        )
    if not keep > 0:
        raise ValueError(
            f"keep={keep} must be positive: a fraction in (0, 1] (e.g. 0.75) or a count >= 1."
        )
    if isinstance(keep, (float, np.floating)) and keep <= 1.0:
        n = max(1, round(float(keep) * m))
    else:
        n = round(float(keep))
    return min(n, m)


def spurious_prototype_correction(
    template_features: Tensor,
    keep: float = 60,
    n_clusters: int = 20,
    seed: int = 0,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    n_init: int = 10,
) -> SPCResult:
    """Spurious Prototype Correction (SPC): drop outlier templates, cluster the rest.

    1. Isolation Forest (scikit-learn defaults, ``random_state=seed``) scores the
       ``M`` templates; the ``keep`` most normal ones stay.
    2. k-means (``n_clusters``, ``random_state=seed``, ``n_init`` restarts) clusters
       the kept templates; the centres become the spurious prototypes.

    The input rows are L2-normalised first (both steps are unchanged by a global
    scale, so passing the scaled prototypes gives the same result).  The returned
    ``prototypes`` are the centres renormalised and scaled by ``logit_scale``; the
    reference code instead used the raw centres as a frozen linear head.

    Clipping: a ``keep`` count larger than ``M`` keeps all templates; ``n_clusters``
    larger than the number kept is reduced to it (see ``SPCResult.n_clusters``).

    Args:
        template_features: ``(M, D)`` per-template features, i.e. the spurious
            prototypes before correction (:func:`spurious_prototypes`).
        keep: an ``int`` count (paper: 60 of 80), or a ``float`` fraction in
            ``(0, 1]`` (``0.75`` = 60 of 80).  Floats above 1 are counts.
        n_clusters: ``k`` (paper: 20).
        seed: seeds both the Isolation Forest and k-means.
        logit_scale: scale of the returned prototypes.
        n_init: k-means restarts (set explicitly so results do not depend on the
            scikit-learn version's default).
    """
    from sklearn.cluster import KMeans
    from sklearn.ensemble import IsolationForest

    if not isinstance(template_features, Tensor) or template_features.ndim != 2:
        raise ValueError(
            "template_features must be an (M, D) tensor of per-template features "
            "(e.g. spurious_prototypes(text_features)); got "
            f"{getattr(template_features, 'shape', type(template_features))}."
        )
    m = int(template_features.shape[0])
    if m < 2:
        raise ValueError(
            f"SPC needs at least 2 templates to find outliers, got {m}; use more prompt "
            "templates or skip SPC (spc=False)."
        )
    if isinstance(n_clusters, bool) or int(n_clusters) < 1:
        raise ValueError(f"n_clusters={n_clusters} must be an integer >= 1.")
    n_keep = _resolve_keep(keep, m)
    k = min(int(n_clusters), n_keep)

    x = F.normalize(template_features.detach().float().cpu(), dim=-1).double().numpy()
    forest = IsolationForest(random_state=seed).fit(x)
    scores = forest.score_samples(x)
    order = np.argsort(-scores, kind="stable")
    kept = np.sort(order[:n_keep])
    removed = np.sort(order[n_keep:])

    kmeans = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(x[kept])
    centres = torch.from_numpy(kmeans.cluster_centers_).float()
    prototypes = logit_scale * F.normalize(centres, dim=-1)
    return SPCResult(
        prototypes=prototypes.to(template_features.device),
        centres=centres.to(template_features.device),
        kept_indices=kept.astype(np.int64),
        removed_indices=removed.astype(np.int64),
        labels=kmeans.labels_.astype(np.int64),
        scores=scores,
        n_clusters=k,
    )


# --------------------------------------------------------------------------- trainer


def _resnet_blocks(visual: nn.Module) -> list[str] | None:
    """Prefixes of the residual blocks of an open_clip ``ModifiedResNet``, in order."""
    if not all(hasattr(visual, f"layer{i}") for i in range(1, 5)) or not hasattr(
        visual, "attnpool"
    ):
        return None
    return [f"layer{i}.{j}." for i in range(1, 5) for j in range(len(getattr(visual, f"layer{i}")))]


def trainable_parameter_names(visual: nn.Module, blocks: int | None) -> list[str]:
    """Names of the parameters of ``visual`` that fine-tuning updates.

    Convention for ``blocks``:

    * ``None`` or negative: the whole image encoder (the paper's setting).
    * ``0``: only the output head of the encoder (ViT: ``ln_post`` and ``proj``;
      ResNet: the attention pool ``attnpool``).
    * ``n > 0``: the last ``n`` blocks (ViT: transformer blocks; ResNet: bottleneck
      blocks of ``layer1..layer4``) plus that output head.

    Partial fine-tuning needs an open_clip ``VisionTransformer`` or ``ModifiedResNet``.
    """
    names = [n for n, _ in visual.named_parameters()]
    if blocks is None or blocks < 0:
        return names
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is not None and hasattr(visual, "ln_post"):
        all_blocks = [f"transformer.resblocks.{i}." for i in range(len(resblocks))]
        head = ["ln_post.", "proj"]
    elif (rn := _resnet_blocks(visual)) is not None:
        all_blocks, head = rn, ["attnpool."]
    else:
        raise ValueError(
            f"blocks={blocks} needs an open_clip VisionTransformer or ModifiedResNet, but the "
            f"image encoder is a {type(visual).__name__}; pass blocks=None to fine-tune the "
            "whole encoder."
        )
    n_blocks = len(all_blocks)
    if blocks > n_blocks:
        raise ValueError(
            f"blocks={blocks} but the image encoder has only {n_blocks} blocks; "
            f"pass 0..{n_blocks}, or blocks=None for the whole encoder."
        )
    prefixes = all_blocks[n_blocks - blocks :] + head
    return [n for n in names if any(n == p or n.startswith(p) for p in prefixes)]


def _train_mode(module: nn.Module) -> None:
    """``module.train()``, but batch-norm layers keep their pretrained statistics (eval).

    With a few dozen images per batch, updating BN running statistics would move the
    features of every layer, frozen ones included.
    """
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _TransformedSplit(Dataset):
    """``(PIL, label)`` split -> ``(tensor, label)`` with a transform."""

    def __init__(self, split: LabeledSplit, transform: Callable[[Any], Tensor]) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.split[index]
        if hasattr(image, "convert"):
            image = image.convert("RGB")
        return self.transform(image), int(label)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """FD-Align's augmentation: a random crop, no flip, CLIP normalisation.

    :func:`~fewclip_tutorial.features.crop_transform` with the authors' scale 0.08-1: their
    ``RandomResizedCrop`` at CLIP's resolutions, a small translation below
    :data:`~fewclip_tutorial.features.SMALL_IMAGE_SIZE` px, since an 8%-area crop of a 32 px
    image (9 px wide) holds a fragment of the object at best.
    """
    from torchvision import transforms as T

    from fewclip_tutorial.features import crop_transform

    crop = crop_transform(image_size, scale=(0.08, 1.0))
    return T.Compose([crop, T.ToTensor(), T.Normalize(mean, std)])


def _encode(visual: nn.Module, images: Tensor) -> Tensor:
    return F.normalize(visual(images).float(), dim=-1)


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Make frozen and trainable encoders run the same attention kernels.

    ``nn.MultiheadAttention`` takes a fused "fast path" when it runs without
    gradients in eval mode; its numbers differ from the regular path in the last
    bits, which would make the KL of an unchanged encoder ~1e-8 instead of 0.
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def encode_pair(trainable: nn.Module, frozen: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Encode the same ``(B, 3, H, W)`` batch with the trained and the frozen encoder.

    Returns raw ``(B, D)`` features ``(f(x), f_0(x))``; the frozen pass runs under
    ``no_grad``.  Both passes use the same kernels, so while the trainable copy still
    equals the frozen one the two outputs are bit-identical and the spurious KL is
    exactly zero.
    """
    with _mha_fastpath_disabled():
        f_ft = trainable(images)
        with torch.no_grad():
            f_fr = frozen(images)
    return f_ft, f_fr


@torch.no_grad()
def encode_split(
    visual: nn.Module,
    split: LabeledSplit,
    preprocess: Callable[[Any], Tensor],
    device: torch.device | str,
    batch_size: int = 128,
    progress: bool = False,
    num_workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """Encode a split with an image encoder (no disk cache): ``((N, D) fp32 normalised, (N,))``.

    ``visual`` is put in eval mode for the pass and restored afterwards.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    loader = DataLoader(
        _TransformedSplit(split, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    was_training = visual.training
    visual.eval()
    feats, labels = [], []
    try:
        for images, y in tqdm(loader, desc=f"encode {split.name}", disable=not progress):
            with autocast(device):
                feats.append(_encode(visual, images.to(device)).cpu())
            labels.append(y)
    finally:
        visual.train(was_training)
    if not feats:
        raise ValueError(f"split {split.name!r} is empty; nothing to encode.")
    return torch.cat(feats), torch.cat(labels).long()


@dataclass
class FDAlignResult:
    """Output of :func:`finetune_fd_align`.

    Attributes:
        visual: the fine-tuned image encoder at ``best_epoch`` (eval mode, frozen).
        reference_visual: the frozen copy of the original encoder used for ``P(x; f_0)``.
        best_epoch: 1-based epoch with the highest validation accuracy (earliest on ties).
        best_val_accuracy: its validation accuracy (percent).
        initial_val_accuracy: validation accuracy before fine-tuning (percent).
        history: per epoch (lists of length ``epochs``): ``"loss"``,
            ``"classification_loss"``, ``"spurious_loss"`` (batch means),
            ``"val_accuracy"`` (percent), ``"lr"`` (at the end of the epoch).
        trainable_parameters: names of the parameters that were updated.
        config: the hyperparameters used.
    """

    visual: nn.Module
    reference_visual: nn.Module
    best_epoch: int
    best_val_accuracy: float
    initial_val_accuracy: float
    history: dict[str, list[float]]
    trainable_parameters: list[str]
    config: dict[str, Any] = field(default_factory=dict)


ValidationFn = Callable[[nn.Module], float]


def finetune_fd_align(
    backbone: Any,
    train_split: LabeledSplit,
    val: LabeledSplit | ValidationFn,
    class_protos: Tensor,
    spurious_protos: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 20.0,
    epochs: int = 5,
    lr: float = 1e-4,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    blocks: int | None = None,
    batch_size: int = 32,
    kl_direction: KLDirection = "paper",
    kl_reduction: KLReduction = "batchmean",
    augment: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> FDAlignResult:
    """Fine-tune the image encoder with the FD-Align objective.

    A trainable copy and a frozen copy (``requires_grad=False``, eval mode, run under
    ``no_grad``) of ``backbone.model.visual`` start equal; ``backbone`` itself is not
    modified.  Each step encodes the same augmented batch with both, and minimises
    ``alpha * L_class + beta * L_spurious`` (:func:`fd_align_loss`).  ``beta=0`` is
    plain fine-tuning with identical settings.  After every epoch the trainable copy
    is scored on the validation split; the best epoch's weights are returned.  The
    trainer never sees test data.

    Optimiser: SGD with Nesterov momentum 0.9 and weight decay 5e-4 (paper), or
    AdamW; cosine learning-rate decay per step to 0; mixed precision on CUDA.

    Args:
        backbone: a :class:`fewclip_tutorial.backbones.Backbone` (uses ``model.visual``,
            ``preprocess``, ``image_size``, ``mean``, ``std``, ``device``).
        train_split: the ``K``-shot training images (PIL) and labels.
        val: the few-shot validation split, or a function ``visual -> accuracy``.
        class_protos: ``(C, D)`` scaled class prototypes (:func:`class_prototypes`).
        spurious_protos: ``(S, D)`` scaled spurious prototypes (raw or SPC-corrected).
        alpha, beta: loss weights (paper: 1, 20).
        epochs: training epochs (paper: 60).
        lr: peak learning rate (paper: 5e-5 on ImageNet, batch 256).
        optimizer: ``"sgd"`` (paper) or ``"adamw"``.
        momentum, weight_decay: SGD momentum (Nesterov) and weight decay (both optimisers).
        blocks: which part of the encoder trains; see :func:`trainable_parameter_names`
            (``None``: all of it, as in the paper).
        batch_size: images per step (paper: 256).
        kl_direction, kl_reduction: see :func:`spurious_kl`.
        augment: random resized crop (scale 0.08-1, no flip); ``False`` uses
            ``backbone.preprocess``.
        seed: seeds shuffling, augmentation and initialisation-free randomness.
        num_workers: DataLoader workers.
        progress: show tqdm progress bars.
    """
    from tqdm.auto import tqdm

    if isinstance(epochs, bool) or int(epochs) < 1:
        raise ValueError(f"epochs={epochs} must be an integer >= 1.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if not lr > 0:
        raise ValueError(f"lr={lr} must be positive.")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer={optimizer!r} is unknown; use 'sgd' or 'adamw'.")
    if beta < 0 or alpha < 0:
        raise ValueError(f"alpha={alpha} and beta={beta} must be >= 0.")
    if len(train_split) == 0:
        raise ValueError("train_split is empty; pass the K-shot training images.")
    n_classes = int(class_protos.shape[0])
    max_label = int(np.max(train_split.labels))
    if max_label >= n_classes:
        raise ValueError(
            f"train_split has label {max_label} but class_protos has only {n_classes} rows; "
            "build the prototypes for every class of the dataset."
        )

    device = torch.device(backbone.device)
    seed_everything(seed)
    class_protos = class_protos.detach().float().to(device)
    spurious_protos = spurious_protos.detach().float().to(device)

    original = backbone.model.visual
    frozen = copy.deepcopy(original).float().to(device).eval()
    frozen.requires_grad_(False)
    trainable = copy.deepcopy(original).float().to(device)
    trainable.requires_grad_(False)
    names = trainable_parameter_names(trainable, blocks)
    named = dict(trainable.named_parameters())
    params = [named[n] for n in names]
    for p in params:
        p.requires_grad_(True)
    _train_mode(trainable)

    transform = (
        train_transform(backbone.image_size, backbone.mean, backbone.std)
        if augment
        else backbone.preprocess
    )
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        _TransformedSplit(train_split, transform),
        batch_size=int(batch_size),
        shuffle=True,
        generator=gen,
        num_workers=num_workers,
    )

    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps = int(epochs) * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)),
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")

    def validate() -> float:
        if callable(val) and not isinstance(val, LabeledSplit):
            return float(val(trainable))
        feats, labels = encode_split(
            trainable,
            val,
            backbone.preprocess,
            device,
            batch_size=max(int(batch_size), 64),
        )
        pred = classification_logits(feats.to(device), class_protos).argmax(dim=1).cpu()
        return 100.0 * int((pred == labels).sum()) / len(labels)

    initial = validate()
    history: dict[str, list[float]] = {
        k: [] for k in ("loss", "classification_loss", "spurious_loss", "val_accuracy", "lr")
    }
    best_epoch, best_acc, best_state = 0, -math.inf, None
    bar = tqdm(range(1, int(epochs) + 1), desc=f"FD-Align (beta={beta})", disable=not progress)
    for epoch in bar:
        _train_mode(trainable)
        sums = torch.zeros(3, dtype=torch.float64)
        n_seen = 0
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device):
                f_ft, f_fr = encode_pair(trainable, frozen, images)
            loss = fd_align_loss(
                f_ft.float(),
                f_fr.float(),
                labels,
                class_protos,
                spurious_protos,
                alpha=alpha,
                beta=beta,
                direction=kl_direction,
                reduction=kl_reduction,
            )
            if not torch.isfinite(loss.total):
                raise FloatingPointError(
                    f"FD-Align loss became {loss.total.item()} at epoch {epoch}; lower lr "
                    f"(now {lr}) or beta (now {beta})."
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss.total).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            b = images.shape[0]
            sums += b * torch.tensor(
                [loss.total.item(), loss.classification.item(), loss.spurious.item()],
                dtype=torch.float64,
            )
            n_seen += b
        acc = validate()
        means = (sums / max(n_seen, 1)).tolist()
        history["loss"].append(means[0])
        history["classification_loss"].append(means[1])
        history["spurious_loss"].append(means[2])
        history["val_accuracy"].append(acc)
        history["lr"].append(float(opt.param_groups[0]["lr"]))
        bar.set_postfix(loss=f"{means[0]:.3f}", kl=f"{means[2]:.4f}", val=f"{acc:.1f}")
        if acc > best_acc:
            best_epoch, best_acc = epoch, acc
            best_state = {k: v.detach().clone() for k, v in trainable.state_dict().items()}

    assert best_state is not None
    trainable.load_state_dict(best_state)
    trainable.eval()
    trainable.requires_grad_(False)
    config = {
        "alpha": alpha,
        "beta": beta,
        "epochs": int(epochs),
        "lr": lr,
        "optimizer": optimizer,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "blocks": blocks,
        "batch_size": int(batch_size),
        "kl_direction": kl_direction,
        "kl_reduction": kl_reduction,
        "augment": augment,
        "seed": seed,
    }
    return FDAlignResult(
        visual=trainable,
        reference_visual=frozen,
        best_epoch=best_epoch,
        best_val_accuracy=best_acc,
        initial_val_accuracy=initial,
        history=history,
        trainable_parameters=names,
        config=config,
    )


def _weights_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def finetuned_backbone(backbone: Any, visual: nn.Module, tag: str = "fd-align") -> Any:
    """A copy of ``backbone`` whose image encoder is ``visual`` (e.g. ``FDAlignResult.visual``).

    The ``Backbone`` dataclass is copied with :func:`dataclasses.replace`; its CLIP
    model is copied shallowly (text tower and logit scale shared) with ``visual``
    swapped in, so ``encode_images`` of the new backbone uses the fine-tuned encoder
    while the original backbone is left untouched.  ``identifier`` gets
    ``+{tag}-{hash of the visual weights}`` so feature caches never mix the two.
    """
    if not dataclasses.is_dataclass(backbone):
        raise TypeError(
            f"finetuned_backbone expects a Backbone dataclass, got {type(backbone).__name__}; "
            "load one with fewclip_tutorial.backbones.load_backbone()."
        )
    model = copy.copy(backbone.model)
    # nn.Module keeps submodules in a dict; copy it so swapping `visual` does not touch
    # the original model.
    model._modules = dict(backbone.model._modules)
    visual = visual.to(backbone.device).eval()
    visual.requires_grad_(False)
    model.visual = visual
    identifier = f"{backbone.identifier}+{tag}-{_weights_digest(visual)}"
    return dataclasses.replace(backbone, model=model, identifier=identifier)


# --------------------------------------------------------------------------- runner


def spurious_templates(
    dataset_name: str, dataset_templates: Sequence[str], which: str
) -> list[str]:
    """The templates FD-Align builds its prototypes from.

    ``which="auto"``: ShapeWorld's style-bearing :data:`~fewclip_tutorial.data.shapeworld.TEMPLATES`
    (rendering domain, colour, size, art style, background) for ``shapeworld``, CLIP's
    80 ImageNet templates (the paper's choice) for any other dataset.
    ``"dataset"``: the dataset's own zero-shot templates.  ``"imagenet"``: the 80.
    """
    from fewclip_tutorial.data.templates import IMAGENET_TEMPLATES

    if which == "dataset":
        return list(dataset_templates)
    if which == "imagenet":
        return list(IMAGENET_TEMPLATES)
    if which == "auto":
        if dataset_name.startswith("shapeworld"):
            from fewclip_tutorial.data.shapeworld import TEMPLATES

            return list(TEMPLATES)
        return list(IMAGENET_TEMPLATES)
    raise ValueError(f"templates={which!r} is unknown; use 'auto', 'dataset' or 'imagenet'.")


@register_method(
    "fd-align",
    options={
        "alpha": Option(float, 1.0, "weight of the classification loss (paper: 1)"),
        "beta": Option(float, 20.0, "weight of the spurious KL (paper: 20; 0 = plain fine-tuning)"),
        "spc": Option(bool, True, "Spurious Prototype Correction (Isolation Forest + k-means)"),
        "keep": Option(
            float,
            0.75,
            "SPC: templates kept, a fraction <= 1 or a count > 1 (paper: 60 of 80)",
        ),
        "n_clusters": Option(int, 20, "SPC: k-means clusters = spurious prototypes (paper: 20)"),
        "blocks": Option(
            int,
            2,
            "trainable part: -1 = whole image encoder (paper), 0 = ln_post + proj, "
            "n = last n transformer blocks + ln_post + proj",
        ),
        "epochs": Option(int, 5, "fine-tuning epochs; best one chosen on validation (paper: 60)"),
        "lr": Option(float, 1e-3, "peak learning rate, cosine decay per step"),
        "optimizer": Option(str, "sgd", "SGD (Nesterov 0.9, wd 5e-4) or AdamW", ["sgd", "adamw"]),
        "kl_direction": Option(
            str,
            "paper",
            "paper: KL(P_ft || P_frozen); code: KL(P_frozen || P_ft)",
            ["paper", "code"],
        ),
        "kl_reduction": Option(
            str,
            "batchmean",
            "batchmean (paper) or elementwise-mean (reference code, = batchmean / S)",
            ["batchmean", "elementwise-mean"],
        ),
        "batch_size": Option(int, 32, "images per step (paper: 256)"),
        "templates": Option(
            str,
            "auto",
            "prompt templates of the prototypes: auto (ShapeWorld style templates, else "
            "CLIP's 80), dataset, imagenet",
            ["auto", "dataset", "imagenet"],
        ),
        "augment": Option(bool, True, "random resized crop (scale 0.08-1, no flip)"),
        "tip_adapter": Option(
            bool, False, "also run Tip-Adapter on the fine-tuned encoder (result key 'tip_adapter')"
        ),
    },
    help="FD-Align (Song et al., NeurIPS 2023): fine-tune the image encoder while keeping its "
    "distribution over spurious (style) prototypes close to the frozen model's.",
)
def run_fd_align(
    ctx: Context,
    *,
    alpha: float = 1.0,
    beta: float = 20.0,
    spc: bool = True,
    keep: float = 0.75,
    n_clusters: int = 20,
    blocks: int = 2,
    epochs: int = 5,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    kl_direction: str = "paper",
    kl_reduction: str = "batchmean",
    batch_size: int = 32,
    templates: str = "auto",
    augment: bool = True,
    tip_adapter: bool = False,
) -> dict:
    """FD-Align on one few-shot episode; ``beta=0`` is plain fine-tuning, like for like.

    Prototypes come from every (class, template) prompt; the epoch is chosen on the
    few-shot validation split; the fine-tuned encoder's val/test/OOD features are
    computed afresh (no disk cache) and scored with the class prototypes.
    """
    backbone = ctx.backbone
    names = spurious_templates(ctx.dataset.name, ctx.dataset.templates, templates)
    text = template_text_features(backbone.encode_text, ctx.classnames, names)
    cls = class_prototypes(text, CLIP_LOGIT_SCALE)
    spur = spurious_prototypes(text, CLIP_LOGIT_SCALE)
    removed: list[str] = []
    n_spurious = int(spur.shape[0])
    if spc:
        corrected = spurious_prototype_correction(
            spur,
            keep=keep,
            n_clusters=n_clusters,
            seed=ctx.seed,
            logit_scale=CLIP_LOGIT_SCALE,
        )
        spur = corrected.prototypes
        removed = [names[i] for i in corrected.removed_indices]
        n_spurious = corrected.n_clusters
    result = finetune_fd_align(
        backbone,
        ctx.splits.train,
        ctx.splits.val,
        cls,
        spur,
        alpha=alpha,
        beta=beta,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,  # type: ignore[arg-type]
        blocks=None if blocks < 0 else blocks,
        batch_size=batch_size,
        kl_direction=kl_direction,  # type: ignore[arg-type]
        kl_reduction=kl_reduction,  # type: ignore[arg-type]
        augment=augment,
        seed=ctx.seed,
        progress=ctx.progress,
    )
    features_by_split = {
        name: encode_split(
            result.visual,
            ctx.split(name),
            backbone.preprocess,
            backbone.device,
            batch_size=max(batch_size, 128),
            progress=ctx.progress,
        )
        for name in ["val", "test"] + [f"ood:{d}" for d in ctx.ood_domains]
    }
    head = F.normalize(cls, dim=-1).cpu()

    def predict(features: Tensor) -> Tensor:
        return CLIP_LOGIT_SCALE * features.float() @ head.to(features.device).T

    out = ctx.report(predict, features_by_split=features_by_split)
    out.update(
        alpha=alpha,
        beta=beta,
        spc=spc,
        removed_templates=removed,
        n_templates=len(names),
        n_spurious_prototypes=n_spurious,
        best_epoch=result.best_epoch,
        prototype_zero_shot_val_accuracy=result.initial_val_accuracy,
        history=result.history,
        blocks=blocks,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        kl_direction=kl_direction,
        kl_reduction=kl_reduction,
        batch_size=batch_size,
        logit_scale=CLIP_LOGIT_SCALE,
    )
    if tip_adapter:
        # The fine-tuned encoder as a drop-in image encoder: Tip-Adapter on its features,
        # with the same episode (same shots, same validation split, same text classifier).
        from fewclip_tutorial.experiment import run_method

        tuned = finetuned_backbone(backbone, result.visual)
        tuned_ctx = dataclasses.replace(ctx, backbone=tuned, cache_dir=None, _memo={})
        tip = run_method("tip-adapter", context=tuned_ctx, progress=False)
        out["tip_adapter"] = {
            k: tip[k]
            for k in ("val_accuracy", "test_accuracy", "ood_accuracy", "alpha", "beta")
            if k in tip
        }
    return out


# --------------------------------------------------------------------------- exercises


def _exercise_spurious_prototypes_inputs(gen: torch.Generator) -> tuple[Tensor, float]:
    c, m, d = (
        int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((2, 6), (2, 7), (3, 9))
    )
    # varied norms per prompt, so a missing normalisation shows
    scale = torch.rand(c, m, 1, generator=gen) * 3 + 0.2
    logit_scale = float(torch.empty(1).uniform_(10.0, 100.0, generator=gen))
    return torch.randn(c, m, d, generator=gen) * scale, logit_scale


def _exercise_spurious_kl_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    b, s, d = (
        int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((2, 6), (2, 6), (3, 9))
    )
    frozen = torch.randn(b, d, generator=gen)
    finetuned = frozen + 0.5 * torch.randn(b, d, generator=gen)
    protos = 10.0 * F.normalize(torch.randn(s, d, generator=gen), dim=-1)
    return finetuned, frozen, protos


def register_exercises() -> None:
    """Register the FD-Align exercises with :mod:`fewclip_tutorial.exercises`.

    * ``"spurious_prototypes"``: ``fn(text_features (C, M, D), logit_scale) -> (M, D)``.
    * ``"spurious_kl"``: ``fn(finetuned (B, D), frozen (B, D), spurious_protos (S, D))
      -> scalar``, the paper's ``KL(P_finetuned || P_frozen)`` averaged over the batch.

    Called by :mod:`fewclip_tutorial.methods` after importing this module; in a
    notebook: ``get_exercise("spurious_kl").check(my_fn)``.
    """
    from fewclip_tutorial.exercises import register_exercise

    register_exercise(
        "spurious_prototypes",
        spurious_prototypes,
        _exercise_spurious_prototypes_inputs,
        description=(
            "Write spurious_prototypes(text_features, logit_scale) taking (C, M, D) embeddings "
            "of M templates for each of C classes and returning (M, D) prototypes: normalise "
            "each embedding, average over the classes, normalise again, multiply by logit_scale."
        ),
        hint="It is the class prototype with the roles swapped: average over dim=0, not dim=1.",
        atol=1e-4,
    )
    register_exercise(
        "spurious_kl",
        spurious_kl,
        _exercise_spurious_kl_inputs,
        description=(
            "Write spurious_kl(finetuned, frozen, spurious_protos) for (B, D) features of the "
            "same images from the fine-tuned and the frozen encoder and (S, D) scaled prototypes: "
            "P = softmax(normalize(finetuned) @ protos.T), Q = the same for frozen; return "
            "KL(P || Q) = sum_s P (log P - log Q), averaged over the B images."
        ),
        hint=(
            "Use log_softmax for both log P and log Q; sum over the prototypes (dim=1), then "
            "mean over the batch. F.kl_div(input, target) computes KL(target || exp(input))."
        ),
        atol=1e-5,
    )
