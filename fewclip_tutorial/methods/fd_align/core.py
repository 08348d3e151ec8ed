"""FD-Align: feature-discrimination alignment (Song et al., NeurIPS 2023).

Fine-tuning CLIP's image encoder on a few labelled images raises accuracy on the
training distribution but can drag the features away from what the pretrained model
knew about *style*: rendering domain, colour, size, background.  FD-Align keeps that
knowledge by asking the fine-tuned encoder to place every image among a set of
**spurious prototypes** (one per prompt template, averaged over classes) the same way
the frozen pretrained encoder does.

The paper's objective, for an image ``x`` with label ``y``, a fine-tuned encoder ``f``,
the frozen pretrained encoder ``f_0`` and CLIP's logit scale ``tau`` (100 for CLIP,
:data:`CLIP_LOGIT_SCALE`; the authors read ``logit_scale.exp()`` from the model)::

    class prototype     t_c  = norm( 1/M sum_m norm(g(P_m(c))) )         (C, D) unit rows
    spurious prototype  mu_m = norm( 1/C sum_c norm(g(P_m(c))) )         (M, D) unit rows
    L_class    = CE( tau * cos(f(x), t_.), y )
    P(x; f)    = softmax_m( tau * cos(f(x), mu_m) )                       (M,)
    L_spurious = KL( P(x; f) || P(x; f_0) )
    L          = alpha * L_class + beta * L_spurious      (alpha = 1, beta = 20)

where ``g`` is the text encoder and ``P_m(c)`` is template ``m`` filled with class
``c``.  **Spurious Prototype Correction** (SPC) drops outlier templates with an
Isolation Forest and clusters the rest with k-means; the centres replace the raw
spurious prototypes.

The authors' code (``modules/FD_Align_SCP_CoOp.py`` and
``architectures/feature_extractor/clip.py`` in ``skingorz/FD-Align``) differs from the
paper's equations in three ways.  :class:`~.config.FDAlignConfig` follows the code by
default and reaches the paper with :meth:`~.config.FDAlignConfig.paper`:

* KL (``kl_direction``, ``kl_reduction``): the code computes
  ``torch.nn.KLDivLoss()(log P(x; f), P(x; f_0))``, i.e. ``KL(P(x; f_0) || P(x; f))``
  averaged over all ``B * S`` elements, which is ``1/S`` of the per-image KL.  With
  ``S = 20`` prototypes and weight 20 the per-image KL is weighted by 1, twenty times
  less than the paper's ``beta = 20`` on the per-image KL.
* Head (``head``): the code trains a linear head initialised from ``tau * t_c`` (their
  ``CoOp_head``); the paper's ``L_class`` scores against the fixed prototypes.  The
  authors' scripts also train that head alone first (linear probing); we do not.
* SPC centres: the code uses the raw k-means centres as a frozen head; we renormalise
  them, so the spurious softmax keeps CLIP's temperature.  The code's k-means has
  ``random_state=0`` (ours by default, ``kmeans_seed``); its Isolation Forest is
  unseeded, ours takes the episode seed.

The functions below default to the paper's equations (``spurious_kl``) where they are
one equation; :func:`fd_align_loss` defaults to the authors' KL form.

This module is the functional core (prototypes, losses, SPC); the trainer is :mod:`.train`
(:func:`~.train.train_fd_align`), the runner :mod:`.runner`, the options :mod:`.config`.
Training goes through :func:`fewclip_tutorial.training.fit`: the original encoder is
evaluated at step 0 and kept unless a later epoch is strictly better on validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewclip_tutorial.device import float32_or_64
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE, prompt_ensemble

__all__ = [
    "FDAlignLoss",
    "SPCResult",
    "class_prototypes",
    "classification_logits",
    "fd_align_loss",
    "spurious_distribution",
    "spurious_kl",
    "spurious_prototype_correction",
    "spurious_prototypes",
    "trained_head",
]

KLDirection = Literal["paper", "code"]
KLReduction = Literal["batchmean", "elementwise-mean", "none"]

# --------------------------------------------------------------------------- prototypes


def _check_text_features(text_features: Tensor) -> None:
    if not isinstance(text_features, Tensor) or text_features.ndim != 3 or 0 in text_features.shape:
        shape = tuple(text_features.shape) if isinstance(text_features, Tensor) else None
        raise ValueError(
            f"text_features must be a non-empty (C, M, D) tensor (classes x templates x dim), "
            f"got shape {shape}; encode every template for every class with "
            "zeroshot.prompt_text_features()."
        )


def class_prototypes(text_features: Tensor) -> Tensor:
    """Class prototypes ``t_c``: ``(C, M, D)`` text features -> ``(C, D)`` unit rows.

    Per class, the mean of the ``M`` normalised template features, normalised again
    (CLIP's prompt ensemble, :func:`~fewclip_tutorial.zeroshot.prompt_ensemble`).
    """
    _check_text_features(text_features)
    return prompt_ensemble(float32_or_64(text_features))


def spurious_prototypes(text_features: Tensor) -> Tensor:
    """Spurious prototypes ``mu_m``: ``(C, M, D)`` text features -> ``(M, D)`` unit rows.

    The class prototype with the roles swapped: per template, the mean over the ``C``
    classes of the normalised features, normalised again.  Averaging out the class leaves
    what the template says about style ("a sketch of a ...", "a red ...").
    """
    _check_text_features(text_features)
    return prompt_ensemble(float32_or_64(text_features).transpose(0, 1))


# --------------------------------------------------------------------------- losses


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64 (equivalence tests), else float32 (fp16/bf16 are
    upcast, as ``.float()`` does): float32 results are the same as with ``.float()``."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _cosine_logits(features: Tensor, prototypes: Tensor, logit_scale: float, what: str) -> Tensor:
    if features.ndim != 2 or prototypes.ndim != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"expected (B, D) image features and (K, D) {what} of the same D, got "
            f"{tuple(features.shape)} and {tuple(prototypes.shape)}; build both with one backbone."
        )
    dtype = _compute_dtype(features, prototypes)
    f = F.normalize(features.to(dtype), dim=-1)
    return logit_scale * f @ F.normalize(prototypes.to(dtype), dim=-1).T


def classification_logits(
    image_features: Tensor, classifier: Tensor | nn.Module, logit_scale: float = CLIP_LOGIT_SCALE
) -> Tensor:
    """``(B, D)`` image features -> ``(B, C)`` logits.

    ``classifier`` is either ``(C, D)`` class prototypes (logits ``tau * cos(f, t_c)``,
    the paper), or a trained head ``nn.Linear(D, C)`` applied to the normalised features
    (the authors' code; its weights carry the scale).
    """
    if isinstance(classifier, nn.Module):
        dtype = next(classifier.parameters()).dtype  # float32, or float64 in equivalence tests
        return classifier(F.normalize(image_features.to(dtype), dim=-1))
    return _cosine_logits(image_features, classifier, logit_scale, "class prototypes")


def trained_head(class_protos: Tensor, logit_scale: float = CLIP_LOGIT_SCALE) -> nn.Linear:
    """The authors' trainable head at its start: ``nn.Linear(D, C)`` with weights
    ``logit_scale * t_c`` (unit rows) and bias 0, in the prototypes' dtype and device.

    Their ``CoOp_head`` (``architectures/classifier/CoOp_head.py``) initialised by
    ``get_zeroshot_weight`` (``architectures/feature_extractor/clip.py``), trained with the
    encoder; :func:`classification_logits` feeds it the normalised image features, so at the
    start its logits are the paper's ``tau * cos(f(x), t_c)``.
    """
    if class_protos.ndim != 2 or 0 in class_protos.shape:
        raise ValueError(
            f"class_protos must be a non-empty (C, D) tensor, got {tuple(class_protos.shape)}; "
            "build it with class_prototypes()."
        )
    if not logit_scale > 0:
        raise ValueError(f"logit_scale={logit_scale} must be positive (CLIP's: 100).")
    c, d = class_protos.shape
    head = nn.Linear(d, c).to(class_protos.device, class_protos.dtype)
    with torch.no_grad():
        head.weight.copy_(logit_scale * F.normalize(class_protos.detach(), dim=-1))
        head.bias.zero_()
    return head


def spurious_distribution(
    image_features: Tensor, spurious_protos: Tensor, logit_scale: float = CLIP_LOGIT_SCALE
) -> Tensor:
    """``P(x; f) = softmax(tau * cos(f(x), mu))``: ``(B, D), (S, D) -> (B, S)``, rows sum to 1."""
    return _cosine_logits(
        image_features, spurious_protos, logit_scale, "spurious prototypes"
    ).softmax(-1)


def spurious_kl(
    finetuned_features: Tensor,
    frozen_features: Tensor,
    spurious_protos: Tensor,
    logit_scale: float = CLIP_LOGIT_SCALE,
    *,
    direction: KLDirection = "paper",
    reduction: KLReduction = "batchmean",
) -> Tensor:
    """FD-Align's ``L_spurious`` between ``P = P(x; f)`` and ``Q = P(x; f_0)``.

    * ``direction="paper"``: ``KL(P || Q) = sum_s P_s (log P_s - log Q_s)``;
      ``"code"``: ``KL(Q || P)``, what the authors' ``KLDivLoss()(log P, Q)`` computes.
    * ``reduction="batchmean"``: the per-image KL averaged over the batch (the paper);
      ``"elementwise-mean"``: the mean over all ``B * S`` terms, ``batchmean / S`` (the
      authors' ``KLDivLoss()`` default); ``"none"``: the ``(B,)`` per-image KL.

    Args:
        finetuned_features: ``(B, D)`` features of the encoder being trained.
        frozen_features: ``(B, D)`` features of the same images, frozen encoder (detached).
        spurious_protos: ``(S, D)`` spurious prototypes (any norm).

    Returns:
        A scalar, or ``(B,)``; exactly 0 when both feature tensors are equal.
    """
    if finetuned_features.shape != frozen_features.shape:
        raise ValueError(
            f"finetuned_features {tuple(finetuned_features.shape)} and frozen_features "
            f"{tuple(frozen_features.shape)} differ: encode the same images with both encoders."
        )
    if direction not in ("paper", "code"):
        raise ValueError(f"direction={direction!r} is unknown; use 'paper' or 'code'.")
    if reduction not in ("batchmean", "elementwise-mean", "none"):
        raise ValueError(
            f"reduction={reduction!r} is unknown; use 'batchmean', 'elementwise-mean' or 'none'."
        )
    what = "spurious prototypes"
    log_ft = _cosine_logits(finetuned_features, spurious_protos, logit_scale, what).log_softmax(-1)
    log_fr = _cosine_logits(frozen_features.detach(), spurious_protos, logit_scale, what)
    log_p, log_q = log_ft, log_fr.log_softmax(-1)
    if direction == "code":
        log_p, log_q = log_q, log_p
    terms = log_p.exp() * (log_p - log_q)  # (B, S)
    if reduction == "elementwise-mean":
        return terms.mean()
    per_image = terms.sum(dim=1)
    return per_image.mean() if reduction == "batchmean" else per_image


class FDAlignLoss(NamedTuple):
    """The FD-Align objective and its two parts (scalars)."""

    total: Tensor
    classification: Tensor
    spurious: Tensor


def fd_align_loss(
    finetuned_features: Tensor,
    frozen_features: Tensor | None,
    labels: Tensor,
    classifier: Tensor | nn.Module,
    spurious_protos: Tensor | None,
    alpha: float = 1.0,
    beta: float = 20.0,
    direction: KLDirection = "code",
    reduction: KLReduction = "elementwise-mean",
    logit_scale: float = CLIP_LOGIT_SCALE,
) -> FDAlignLoss:
    """``L = alpha * L_class + beta * L_spurious`` for ``(B, D)`` features and ``(B,)`` labels.

    By default the authors' ``CE + 20 * KLDivLoss()(log P(x; f), P(x; f_0))``
    (``modules/FD_Align_SCP_CoOp.py``: ``shared_step`` and ``train_forward``); the paper's
    Eq. ``alpha * L_class + beta * KL(P_ft || P_frozen)`` is ``direction="paper",
    reduction="batchmean"`` with ``(C, D)`` prototypes as ``classifier``.

    ``classifier``: ``(C, D)`` class prototypes or a trained head (:func:`classification_logits`).
    ``logit_scale`` scales the cosines to the prototypes (a trained head carries its own).
    With ``beta == 0`` the total is exactly ``alpha * L_class`` (plain fine-tuning); the
    spurious KL is still measured without gradient when the frozen features and the
    prototypes are given (NaN otherwise).
    """
    logits = classification_logits(finetuned_features, classifier, logit_scale)
    l_class = F.cross_entropy(logits, labels)
    if frozen_features is None or spurious_protos is None:
        if beta != 0:
            raise ValueError(
                f"beta={beta} needs frozen_features and spurious_protos; pass them, or set "
                "beta=0 for plain fine-tuning."
            )
        return FDAlignLoss(alpha * l_class, l_class, torch.full_like(l_class, float("nan")))
    kw = {"direction": direction, "reduction": reduction}
    with torch.set_grad_enabled(torch.is_grad_enabled() and beta != 0):
        l_spur = spurious_kl(
            finetuned_features, frozen_features, spurious_protos, logit_scale, **kw
        )
    if beta == 0:  # exactly alpha * L_class, and no graph through the KL
        return FDAlignLoss(alpha * l_class, l_class, l_spur)
    return FDAlignLoss(alpha * l_class + beta * l_spur, l_class, l_spur)


# --------------------------------------------------------------------------- SPC


@dataclass
class SPCResult:
    """Output of :func:`spurious_prototype_correction`.

    Attributes:
        prototypes: ``(k, D)`` corrected spurious prototypes, unit rows.
        centres: ``(k, D)`` the raw k-means centres of the unit template features.
        kept_indices: templates kept (the most normal), ascending.
        removed_indices: templates dropped as outliers, ascending.
        labels: cluster of each kept template (aligned with ``kept_indices``).
        scores: ``(M,)`` Isolation Forest ``score_samples``: higher = more normal.
        n_clusters: the number of clusters used (at most the number kept).
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
        raise TypeError(f"keep={keep!r} must be a fraction in (0, 1] or a count of templates.")
    if not keep > 0:
        raise ValueError(f"keep={keep} must be positive: a fraction in (0, 1] or a count >= 1.")
    if isinstance(keep, (float, np.floating)) and keep <= 1.0:
        return max(1, round(float(keep) * m))
    return min(round(float(keep)), m)


def spurious_prototype_correction(
    template_features: Tensor,
    keep: float = 60,
    n_clusters: int = 20,
    seed: int = 0,
    n_init: int = 10,
    kmeans_seed: int | None = 0,
) -> SPCResult:
    """Spurious Prototype Correction (SPC): drop outlier templates, cluster the rest.

    1. An Isolation Forest (scikit-learn defaults, ``random_state=seed``) scores the
       ``M`` unit-normalised template features; the ``keep`` most normal stay.  The
       authors' forest is unseeded, so which templates they drop varies from run to run.
    2. k-means (``n_clusters``, ``random_state=kmeans_seed``: 0 as the authors, ``None``
       for ``seed``; ``n_init`` restarts) clusters them; the renormalised centres are the
       new spurious prototypes.

    Both steps are unchanged by a global scale, so this equals the authors'
    ``get_ILF_kmeans_weights_classifier`` on rows scaled by 100, up to that scale.

    Args:
        template_features: ``(M, D)`` spurious prototypes before correction.
        keep: a count (paper: 60 of 80) or a fraction in ``(0, 1]`` (``0.75``).
        n_clusters: ``k`` (paper: 20); reduced to the number kept if larger.
        seed: seeds the Isolation Forest (and k-means when ``kmeans_seed`` is ``None``).
        n_init: k-means restarts (explicit, so results do not depend on scikit-learn's
            default; 10 was the default of the authors' scikit-learn 1.0.1).
        kmeans_seed: k-means ``random_state`` (the authors': 0).
    """
    from sklearn.cluster import KMeans
    from sklearn.ensemble import IsolationForest

    if not isinstance(template_features, Tensor) or template_features.ndim != 2:
        raise ValueError(
            "template_features must be an (M, D) tensor, e.g. spurious_prototypes(text); got "
            f"{getattr(template_features, 'shape', type(template_features))}."
        )
    m = int(template_features.shape[0])
    if m < 2:
        raise ValueError(
            f"SPC needs at least 2 templates, got {m}; add templates or set spc=False."
        )
    if isinstance(n_clusters, bool) or int(n_clusters) < 1:
        raise ValueError(f"n_clusters={n_clusters} must be an integer >= 1.")
    n_keep = _resolve_keep(keep, m)
    k = min(int(n_clusters), n_keep)
    x = F.normalize(template_features.detach().float().cpu(), dim=-1).double().numpy()
    scores = IsolationForest(random_state=seed).fit(x).score_samples(x)
    order = np.argsort(-scores, kind="stable")
    kept, removed = np.sort(order[:n_keep]), np.sort(order[n_keep:])
    km_state = seed if kmeans_seed is None else int(kmeans_seed)
    kmeans = KMeans(n_clusters=k, random_state=km_state, n_init=n_init).fit(x[kept])
    centres = torch.from_numpy(kmeans.cluster_centers_).float()
    device = template_features.device
    return SPCResult(
        prototypes=F.normalize(centres, dim=-1).to(device),
        centres=centres.to(device),
        kept_indices=kept.astype(np.int64),
        removed_indices=removed.astype(np.int64),
        labels=kmeans.labels_.astype(np.int64),
        scores=scores,
        n_clusters=k,
    )
