"""FD-Align: feature-discrimination alignment (Song et al., NeurIPS 2023).

Fine-tuning CLIP's image encoder on a few labelled images raises accuracy on the
training distribution but can drag the features away from what the pretrained model
knew about *style*: rendering domain, colour, size, background.  FD-Align keeps that
knowledge by asking the fine-tuned encoder to place every image among a set of
**spurious prototypes** (one per prompt template, averaged over classes) the same way
the frozen pretrained encoder does.

The paper's objective, for an image ``x`` with label ``y``, a fine-tuned encoder ``f``,
the frozen pretrained encoder ``f_0`` and ``tau = 100`` (:data:`CLIP_LOGIT_SCALE`)::

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
paper's equations in three ways; each is one option away here:

* KL (``kl_direction``, ``kl_reduction``): the code computes
  ``torch.nn.KLDivLoss()(log P(x; f), P(x; f_0))``, i.e. ``KL(P(x; f_0) || P(x; f))``
  averaged over all ``B * S`` elements, which is ``1/S`` of the per-image KL.  With
  ``S = 20`` prototypes and weight 20 the per-image KL is weighted by 1, twenty times
  less than the paper's ``beta = 20`` on the per-image KL.
* Head (``head``): the code trains a linear head initialised from ``tau * t_c``; the
  paper's ``L_class`` (our default) scores against the fixed prototypes.  The authors
  also train that head alone first (linear probing); we do not.
* SPC centres: the code uses the raw k-means centres as a frozen head; we renormalise
  them, so the spurious softmax keeps CLIP's temperature.  The code's Isolation Forest
  is unseeded; ours is seeded.

Training goes through :func:`fewclip_tutorial.training.fit`: the original encoder is
evaluated at step 0 and kept unless a later epoch is strictly better on validation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fewclip_tutorial.backbones import _state_dict_digest
from fewclip_tutorial.data.base import LabeledSplit
from fewclip_tutorial.device import default_num_workers, float32_or_64, seed_everything
from fewclip_tutorial.distributed import DistInfo, dist_info, shard_batch, wrap_ddp
from fewclip_tutorial.experiment import Context, Option, register_method
from fewclip_tutorial.features import FeatureSet, _ViewDataset, crop_transform, extract_features
from fewclip_tutorial.training import FitResult, fit
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE, prompt_ensemble, prompt_text_features

__all__ = [
    "FD_ALIGN_PRESETS",
    "FDAlignConfig",
    "FDAlignLoss",
    "FDAlignResult",
    "SPCResult",
    "class_prototypes",
    "classification_logits",
    "encode_pair",
    "fd_align_loss",
    "finetune_fd_align",
    "finetuned_backbone",
    "preset",
    "register_exercises",
    "run_fd_align",
    "spurious_distribution",
    "spurious_kl",
    "spurious_prototype_correction",
    "spurious_prototypes",
    "spurious_templates",
    "train_transform",
    "trainable_parameter_names",
]

KLDirection = Literal["paper", "code"]
KLReduction = Literal["batchmean", "elementwise-mean", "none"]


# --------------------------------------------------------------------------- options


def _opt(default: Any, help: str, choices: list | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class FDAlignConfig:
    """Every option of FD-Align, declared once (the CLI and :func:`run_method` read them here).

    The defaults are the embedded setting (``shapeworld-tiny`` on a CPU); the paper's
    setting is ``FD_ALIGN_PRESETS["colab"]``.  The embedded learning rate follows one rule
    that involves neither FD-Align's loss nor validation or test data: the largest of
    1e-3, 3e-4 and 1e-4 at which *plain fine-tuning* (``beta=0``, AdamW, 20 epochs) keeps
    its training cross-entropy below that of the unchanged encoder on the same batches in
    every epoch (the FD-Align chapter runs this check).  At 1e-3 the first epoch raises it.
    AdamW rather than the paper's SGD: its step does not depend on the gradient scale of a
    small model; the paper's SGD is the ``"colab"`` preset.
    """

    alpha: float = _opt(1.0, "weight of the classification loss (paper: 1)")
    beta: float = _opt(20.0, "weight of the spurious KL (paper: 20; 0 = plain fine-tuning)")
    kl_direction: str = _opt(
        "paper", "paper: KL(P_ft || P_frozen); code: KL(P_frozen || P_ft)", ["paper", "code"]
    )
    kl_reduction: str = _opt(
        "batchmean",
        "batchmean: per-image KL (paper); elementwise-mean: / S prototypes (authors' code)",
        ["batchmean", "elementwise-mean"],
    )
    head: str = _opt(
        "fixed",
        "fixed: score against the class prototypes (paper); trained: a linear head "
        "initialised from them (authors' code)",
        ["fixed", "trained"],
    )
    spc: bool = _opt(True, "Spurious Prototype Correction (Isolation Forest + k-means)")
    keep: float = _opt(0.75, "SPC: templates kept, a fraction <= 1 or a count > 1 (paper 60/80)")
    n_clusters: int = _opt(20, "SPC: k-means clusters = spurious prototypes (paper: 20)")
    templates: str = _opt(
        "auto",
        "prototype templates: auto (ShapeWorld's style templates, else CLIP's 80), dataset, "
        "imagenet",
        ["auto", "dataset", "imagenet"],
    )
    blocks: int = _opt(
        2, "trainable part: -1 = whole image encoder (paper), 0 = output head, n = last n blocks"
    )
    epochs: int = _opt(20, "fine-tuning epochs; the best epoch (or the start) kept on validation")
    lr: float = _opt(3e-4, "peak learning rate, cosine decay per step")
    optimizer: str = _opt(
        "adamw",
        "sgd (Nesterov 0.9, as the paper) or adamw; both with weight decay",
        ["sgd", "adamw"],
    )
    weight_decay: float = _opt(5e-4, "weight decay (paper: 5e-4)")
    batch_size: int = _opt(32, "images per step (paper: 256)")
    augment: bool = _opt(True, "random resized crop (scale 0.08-1, no flip), as the authors")
    sampling: str = _opt(
        "loader",
        "loader: a shuffling DataLoader; seeded: batches and crops seeded by (seed, epoch, "
        "image), the same in 1 or N processes (used under torchrun)",
        ["loader", "seeded"],
    )
    tip_adapter: bool = _opt(False, "also run Tip-Adapter on the fine-tuned encoder")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"{f.name}={getattr(self, f.name)!r} is unknown; use one of {choices}."
                )
        if isinstance(self.epochs, bool) or int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"epochs={self.epochs} and batch_size={self.batch_size} must be >= 1.")
        if self.lr < 0 or self.alpha < 0 or self.beta < 0:
            raise ValueError(f"lr={self.lr}, alpha={self.alpha}, beta={self.beta} must be >= 0.")

    def options(self) -> dict[str, Any]:
        """``{name: value}``, ready for ``run_method("fd-align", **options)``."""
        return dataclasses.asdict(self)


#: The schedule of each chapter setting.  ``"colab"`` is the paper's: the whole ViT image
#: encoder, 60 epochs, SGD with Nesterov momentum 0.9 and weight decay 5e-4, batch 256,
#: lr 5e-5 (the authors' ImageNet rate; their EuroSAT 16-shot rate, 9e-5 scaled by
#: 160/256 images, is 5.6e-5), CLIP's 80 templates, SPC keeping 60 of them in 20 clusters.
FD_ALIGN_PRESETS: dict[str, FDAlignConfig] = {
    "embedded": FDAlignConfig(),
    "colab": FDAlignConfig(
        blocks=-1, epochs=60, optimizer="sgd", lr=5e-5, batch_size=256, templates="auto"
    ),
}


def preset(setup_name: str, **overrides: Any) -> FDAlignConfig:
    """The preset of a chapter setup: ``"embedded"``, else the paper's (``"colab"``...)."""
    base = FD_ALIGN_PRESETS["embedded" if setup_name == "embedded" else "colab"]
    return dataclasses.replace(base, **overrides)


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
    direction: KLDirection = "paper",
    reduction: KLReduction = "batchmean",
) -> FDAlignLoss:
    """``L = alpha * L_class + beta * L_spurious`` for ``(B, D)`` features and ``(B,)`` labels.

    ``classifier``: ``(C, D)`` class prototypes or a trained head (:func:`classification_logits`).
    With ``beta == 0`` the total is exactly ``alpha * L_class`` (plain fine-tuning); the
    spurious KL is still measured without gradient when the frozen features and the
    prototypes are given (NaN otherwise).
    """
    l_class = F.cross_entropy(classification_logits(finetuned_features, classifier), labels)
    if frozen_features is None or spurious_protos is None:
        if beta != 0:
            raise ValueError(
                f"beta={beta} needs frozen_features and spurious_protos; pass them, or set "
                "beta=0 for plain fine-tuning."
            )
        return FDAlignLoss(alpha * l_class, l_class, torch.full_like(l_class, float("nan")))
    kw = {"direction": direction, "reduction": reduction}
    with torch.set_grad_enabled(torch.is_grad_enabled() and beta != 0):
        l_spur = spurious_kl(finetuned_features, frozen_features, spurious_protos, **kw)
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
) -> SPCResult:
    """Spurious Prototype Correction (SPC): drop outlier templates, cluster the rest.

    1. An Isolation Forest (scikit-learn defaults, ``random_state=seed``) scores the
       ``M`` unit-normalised template features; the ``keep`` most normal stay.
    2. k-means (``n_clusters``, ``random_state=seed``, ``n_init`` restarts) clusters
       them; the renormalised centres are the new spurious prototypes.

    Both steps are unchanged by a global scale, so this equals the authors'
    ``get_ILF_kmeans_weights_classifier`` on rows scaled by 100, up to that scale.

    Args:
        template_features: ``(M, D)`` spurious prototypes before correction.
        keep: a count (paper: 60 of 80) or a fraction in ``(0, 1]`` (``0.75``).
        n_clusters: ``k`` (paper: 20); reduced to the number kept if larger.
        seed: seeds both steps.
        n_init: k-means restarts (explicit, so results do not depend on scikit-learn's default).
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
    kmeans = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(x[kept])
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


# --------------------------------------------------------------------------- encoders


def trainable_parameter_names(visual: nn.Module, blocks: int | None) -> list[str]:
    """Names of the parameters of ``visual`` that fine-tuning updates.

    ``blocks``: ``None`` or negative, the whole encoder (the paper); ``0``, the output
    head (ViT: ``ln_post``, ``proj``; ResNet: ``attnpool``); ``n > 0``, the last ``n``
    blocks (ViT transformer blocks, ResNet bottlenecks) plus that head.
    """
    names = [n for n, _ in visual.named_parameters()]
    if blocks is None or blocks < 0:
        return names
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is not None and hasattr(visual, "ln_post"):
        all_blocks = [f"transformer.resblocks.{i}." for i in range(len(resblocks))]
        head = ["ln_post.", "proj"]
    elif all(hasattr(visual, f"layer{i}") for i in range(1, 5)) and hasattr(visual, "attnpool"):
        layers = [(i, len(getattr(visual, f"layer{i}"))) for i in range(1, 5)]
        all_blocks = [f"layer{i}.{j}." for i, n in layers for j in range(n)]
        head = ["attnpool."]
    else:
        raise ValueError(
            f"blocks={blocks} needs an open_clip VisionTransformer or ModifiedResNet, got a "
            f"{type(visual).__name__}; pass blocks=-1 to fine-tune the whole encoder."
        )
    if blocks > len(all_blocks):
        raise ValueError(
            f"blocks={blocks} but the image encoder has only {len(all_blocks)} blocks; pass "
            f"0..{len(all_blocks)}, or -1 for the whole encoder."
        )
    prefixes = all_blocks[len(all_blocks) - blocks :] + head
    return [n for n in names if any(n == p or n.startswith(p) for p in prefixes)]


class _Trainable(nn.Module):
    """The encoder being fine-tuned.  In train mode its batch-norm layers keep their
    pretrained statistics: with a few dozen images per batch, updating them would move
    the features of every layer, frozen ones included."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def train(self, mode: bool = True) -> _Trainable:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Frozen and trainable encoders run the same attention kernels (the fused fast path of
    ``nn.MultiheadAttention`` without gradients differs in the last bits)."""
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
    """``(B, 3, H, W)`` -> raw ``(B, D)`` features ``(f(x), f_0(x))``, the frozen pass under
    ``no_grad``; while the two encoders are equal the outputs are bit-identical."""
    with _mha_fastpath_disabled():
        f_ft = trainable(images)
        with torch.no_grad():
            f_fr = frozen(images)
    return f_ft, f_fr


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The authors' augmentation: a random resized crop of scale 0.08-1, no flip
    (:func:`~fewclip_tutorial.features.crop_transform`: a small translation below 96 px)."""
    from torchvision import transforms as T

    return T.Compose(
        [crop_transform(image_size, scale=(0.08, 1.0)), T.ToTensor(), T.Normalize(mean, std)]
    )


class _Labelled(Dataset):
    def __init__(self, split: LabeledSplit, transform: Callable) -> None:
        self.views = _ViewDataset(split, transform, seed=None, view=0)
        self.labels = np.asarray(split.labels)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.views[i], int(self.labels[i])


class _SeededEpochs(Dataset):
    """Item ``e * N + i``: image ``i`` cropped under the seed ``(seed, e, i)`` for epoch ``e``,
    so every process of a torchrun job sees the same augmented image as one process would."""

    def __init__(self, split: LabeledSplit, transform: Callable, seed: int, epochs: int) -> None:
        self.views = _ViewDataset(split, transform, seed=seed, view=0, views=epochs)
        self.labels = np.asarray(split.labels)
        self.n = len(split)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        return self.views[item], int(self.labels[item % self.n])


class _ShardedBatches:
    """Epoch ``e``: a permutation of the ``n`` images drawn from ``(seed, e)``, cut into global
    batches of ``batch_size``; each process yields its slice of every batch
    (:func:`~fewclip_tutorial.distributed.shard_batch`), as ``DistributedSampler`` does."""

    def __init__(self, n: int, batch_size: int, seed: int, info: DistInfo) -> None:
        self.n, self.batch_size, self.seed, self.info = n, batch_size, seed, info
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen) + self.epoch * self.n
        self.epoch += 1
        for start in range(0, self.n, self.batch_size):
            yield shard_batch(order[start : start + self.batch_size], self.info).tolist()


def head_of(classifier: Tensor | nn.Module) -> Tensor | nn.Module:
    """The classifier itself, unwrapped from ``DistributedDataParallel`` when it was wrapped."""
    return getattr(classifier, "module", classifier)


def _with_visual(backbone: Any, visual: nn.Module, identifier: str) -> Any:
    """A shallow copy of ``backbone`` whose CLIP model has ``visual`` as image encoder."""
    model = copy.copy(backbone.model)
    model._modules = dict(backbone.model._modules)  # swapping `visual` leaves the original alone
    model.visual = visual
    return dataclasses.replace(backbone, model=model, identifier=identifier)


def finetuned_backbone(backbone: Any, visual: nn.Module, tag: str = "fd-align") -> Any:
    """A copy of ``backbone`` whose image encoder is ``visual`` (e.g. ``FDAlignResult.visual``).

    The text tower is shared; ``identifier`` gets ``+{tag}-{digest of the weights}``, so
    the feature cache keeps the fine-tuned encoder's features apart from the original's.
    """
    if not dataclasses.is_dataclass(backbone):
        raise TypeError(
            f"finetuned_backbone expects a Backbone, got {type(backbone).__name__}; load one "
            "with fewclip_tutorial.backbones.load_backbone()."
        )
    visual = visual.to(backbone.device).eval().requires_grad_(False)
    return _with_visual(
        backbone, visual, f"{backbone.identifier}+{tag}-{_state_dict_digest(visual)}"
    )


# --------------------------------------------------------------------------- trainer


@dataclass
class FDAlignResult:
    """Output of :func:`finetune_fd_align`.

    Attributes:
        visual: the kept image encoder (eval mode, frozen): the original's copy when
            selection kept the start.
        reference_visual: the frozen copy of the original encoder, for ``P(x; f_0)``.
        classifier: ``(C, D)`` class prototypes, or the trained head (``head="trained"``).
        fit: the loop's :class:`~fewclip_tutorial.training.FitResult` (per-step history,
            ``"train_class"``, ``"train_spurious_kl"``; per evaluation ``"val_accuracy"``,
            ``"val_spurious_kl"``, the per-image paper-direction KL to the original).
        steps_per_epoch: optimiser steps per epoch (evaluations happen every epoch).
        trainable_parameters: names of the updated parameters of ``visual``.
        config: the :class:`FDAlignConfig` used.
    """

    visual: nn.Module
    reference_visual: nn.Module
    classifier: Tensor | nn.Module
    fit: FitResult
    steps_per_epoch: int
    trainable_parameters: list[str]
    config: FDAlignConfig

    @property
    def best_epoch(self) -> int:
        """The kept epoch; 0 when selection kept the original encoder."""
        return self.fit.best_step // self.steps_per_epoch

    @property
    def best_val_accuracy(self) -> float:
        return float(self.fit.best_score)

    @property
    def initial_val_accuracy(self) -> float:
        return float(self.fit.history["val_accuracy"][0])

    def epochs(self) -> dict[str, list[float]]:
        """Per epoch (0 = the original encoder): mean training loss terms (NaN at 0) and the
        validation accuracy and spurious KL."""
        h, n = self.fit.history, self.steps_per_epoch
        out: dict[str, list[float]] = {"epoch": [s // n for s in h["val_step"]]}
        for key in ("loss", "train_class", "train_spurious_kl"):
            values = np.asarray(h[key], dtype=float)
            out[key] = [float("nan")] + [
                float(values[e * n - n : e * n].mean()) for e in out["epoch"][1:]
            ]
        out["val_accuracy"] = list(h["val_accuracy"])
        out["val_spurious_kl"] = list(h["val_spurious_kl"])
        return out


ValidationFn = Callable[[nn.Module], float]


def finetune_fd_align(
    backbone: Any,
    train_split: LabeledSplit,
    val: LabeledSplit | ValidationFn,
    class_protos: Tensor,
    spurious_protos: Tensor,
    config: FDAlignConfig | None = None,
    *,
    seed: int = 0,
    val_reference: FeatureSet | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> FDAlignResult:
    """Fine-tune a copy of ``backbone.model.visual`` with the FD-Align objective.

    A trainable and a frozen copy start equal; ``backbone`` is not modified.  Each step
    encodes one augmented batch with both and minimises :func:`fd_align_loss`.  The
    trainable copy (and the head, if trained) is scored on the validation split at the
    start and after every epoch; :func:`~fewclip_tutorial.training.fit` keeps the start
    unless an epoch is strictly better.  The trainer never sees test data.

    Args:
        backbone: a :class:`~fewclip_tutorial.backbones.Backbone`.
        train_split: the ``K``-shot training images and labels.
        val: the validation split (accuracy with ``classifier``, and the spurious KL to
            the original), or ``visual -> score`` (no KL then).
        class_protos: ``(C, D)`` class prototypes; spurious_protos: ``(S, D)``.
        config: the options (default :class:`FDAlignConfig`), with ``overrides`` applied.
        seed: seeds shuffling, augmentation and the trained head.
        val_reference: the original encoder's validation features (from the feature
            cache), so they are not encoded again.
        num_workers: image-decoding workers (default: ``device.default_num_workers``).
        progress: a progress bar.
        dtype: the precision of the trained encoder, the frozen copy, the prototypes and the
            head (``torch.float64`` lets tests compare two runs that differ only in summation
            order, e.g. torchrun against one process, up to rounding).
    """
    cfg = dataclasses.replace(config or FDAlignConfig(), **overrides)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} is not supported; use torch.float32 or torch.float64.")
    if len(train_split) == 0:
        raise ValueError("train_split is empty; pass the K-shot training images.")
    if int(np.max(train_split.labels)) >= class_protos.shape[0]:
        raise ValueError(
            f"train_split has label {int(np.max(train_split.labels))} but class_protos has only "
            f"{class_protos.shape[0]} rows; build the prototypes for every class."
        )
    device = torch.device(backbone.device)
    workers = default_num_workers(device) if num_workers is None else int(num_workers)
    seed_everything(seed)
    spurious_protos = spurious_protos.detach().to(device, dtype)
    frozen = copy.deepcopy(backbone.model.visual).to(device, dtype).eval().requires_grad_(False)
    encoder = _Trainable(copy.deepcopy(backbone.model.visual).to(device, dtype)).requires_grad_(
        False
    )
    names = trainable_parameter_names(encoder.visual, None if cfg.blocks < 0 else cfg.blocks)
    named = dict(encoder.visual.named_parameters())
    params = [named[n].requires_grad_(True) for n in names]
    modules: list[nn.Module] = [encoder]
    classifier: Tensor | nn.Module = class_protos.detach().to(device, dtype)
    if cfg.head == "trained":  # the authors' CoOp_head: weights tau * t_c, bias 0, trained
        head = nn.Linear(classifier.shape[1], classifier.shape[0]).to(device, dtype)
        with torch.no_grad():
            head.weight.copy_(CLIP_LOGIT_SCALE * F.normalize(classifier, dim=-1))
            head.bias.zero_()
        classifier = head
        modules.append(head)
        params += list(head.parameters())
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    transform = (
        train_transform(backbone.image_size, backbone.mean, backbone.std)
        if cfg.augment
        else backbone.preprocess
    )
    info = dist_info()
    if info.enabled:  # N processes match one only with seeded sampling; report what ran
        cfg = dataclasses.replace(cfg, sampling="seeded")
    if cfg.sampling == "seeded":
        loader: Any = DataLoader(
            _SeededEpochs(train_split, transform, seed, int(cfg.epochs)),
            batch_sampler=_ShardedBatches(len(train_split), int(cfg.batch_size), seed, info),
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        steps_per_epoch = -(-len(train_split) // int(cfg.batch_size))
        encoder_step: nn.Module = wrap_ddp(encoder, device)
        if isinstance(classifier, nn.Module):
            classifier = wrap_ddp(classifier, device)
    else:
        loader = DataLoader(
            _Labelled(train_split, transform),
            batch_size=int(cfg.batch_size),
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )
        steps_per_epoch = len(loader)
        encoder_step = encoder

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield from loader

    stream = batches()
    trained = [False]

    def step_loss(step: int) -> dict[str, Tensor]:
        images, labels = next(stream)
        trained[0] = True
        f_ft, f_fr = encode_pair(encoder_step, frozen, images.to(device, dtype, non_blocking=True))
        loss = fd_align_loss(
            f_ft,
            f_fr,
            labels.to(device),
            classifier,
            spurious_protos,
            cfg.alpha,
            cfg.beta,
            cfg.kl_direction,
            cfg.kl_reduction,  # type: ignore[arg-type]
        )
        if not torch.isfinite(loss.total):
            raise FloatingPointError(
                f"FD-Align loss became {loss.total.item()} at step {step}; lower lr "
                f"(now {cfg.lr}) or beta (now {cfg.beta})."
            )
        return {
            "loss": loss.total,
            "class": loss.classification.detach(),
            "spurious_kl": loss.spurious.detach(),
        }

    if isinstance(val, LabeledSplit):
        if val_reference is None:
            val_reference = extract_features(
                backbone, val, cache_dir=None, progress=False, num_workers=workers
            )
        ref = val_reference.features.to(device)
        labels = torch.as_tensor(val_reference.labels).to(device)
        probe = _with_visual(backbone, encoder.visual, "fd-align-in-training")

    def evaluate() -> dict[str, float] | float:
        if not isinstance(val, LabeledSplit):
            return float(val(encoder.visual))
        feats = ref
        if trained[0]:
            feats = extract_features(
                probe, val, cache_dir=None, progress=False, num_workers=workers
            ).features
            feats = feats.to(device)
        accuracy = (
            100.0
            * (classification_logits(feats, head_of(classifier)).argmax(1) == labels).float().mean()
        )
        kl = spurious_kl(feats, ref, spurious_protos)
        return {"score": float(accuracy), "accuracy": float(accuracy), "spurious_kl": float(kl)}

    result = fit(
        modules,
        step_loss,
        steps=int(cfg.epochs) * steps_per_epoch,
        optimizer=opt,
        schedule="cosine",
        evaluate=evaluate,
        eval_every=steps_per_epoch,
        device=device,
        progress=progress,
        desc=f"FD-Align (beta={cfg.beta})",
    )
    if "val_accuracy" not in result.history:  # a validation function: its score is the accuracy
        result.history["val_accuracy"] = list(result.history["val_score"])
        result.history["val_spurious_kl"] = [float("nan")] * len(result.history["val_score"])
    for m in modules:
        m.requires_grad_(False)
    return FDAlignResult(
        visual=encoder.visual,
        reference_visual=frozen,
        classifier=head_of(classifier),
        fit=result,
        steps_per_epoch=steps_per_epoch,
        trainable_parameters=names,
        config=cfg,
    )


# --------------------------------------------------------------------------- runner


def spurious_templates(
    dataset_name: str, dataset_templates: Sequence[str], which: str
) -> list[str]:
    """The templates of FD-Align's prototypes.

    ``"auto"``: ShapeWorld's style-bearing templates (rendering domain, colour, size, art
    style, background) for ``shapeworld*``, CLIP's 80 ImageNet templates (the paper's)
    otherwise; ``"dataset"``: the dataset's zero-shot templates; ``"imagenet"``: the 80.
    """
    from fewclip_tutorial.data.templates import IMAGENET_TEMPLATES

    if which == "dataset":
        return list(dataset_templates)
    if which == "imagenet" or (which == "auto" and not dataset_name.startswith("shapeworld")):
        return list(IMAGENET_TEMPLATES)
    if which == "auto":
        from fewclip_tutorial.data.shapeworld import TEMPLATES

        return list(TEMPLATES)
    raise ValueError(f"templates={which!r} is unknown; use 'auto', 'dataset' or 'imagenet'.")


@register_method(
    "fd-align",
    options={
        f.name: Option(type(f.default), f.default, f.metadata["help"], f.metadata["choices"])
        for f in dataclasses.fields(FDAlignConfig)
    },
    help="FD-Align (Song et al., NeurIPS 2023): fine-tune the image encoder while keeping its "
    "distribution over spurious (style) prototypes close to the frozen model's.",
)
def run_fd_align(
    ctx: Context, *, progress: bool = True, return_result: bool = False, **options: Any
) -> dict:
    """FD-Align on one few-shot episode (options: :class:`FDAlignConfig`; ``beta=0`` is
    plain fine-tuning, like for like).

    The original encoder's validation and test features come from the feature cache;
    a fine-tuned encoder is cached under its own weights digest.  The result holds
    ``"start"``: the original encoder scored with FD-Align's class prototypes (the
    like-for-like zero-shot), ``"best_epoch"`` (0: the original was kept) and
    ``"history"``: :meth:`FDAlignResult.epochs`; with ``return_result`` (a direct call,
    not an option) also ``"result"``: the :class:`FDAlignResult` with the encoders.
    """
    cfg = FDAlignConfig(**options)
    backbone = ctx.backbone
    names = spurious_templates(ctx.dataset.name, ctx.dataset.templates, cfg.templates)
    text = prompt_text_features(backbone, ctx.classnames, names)
    cls, spur = class_prototypes(text), spurious_prototypes(text)
    removed: list[str] = []
    if cfg.spc:
        corrected = spurious_prototype_correction(spur, cfg.keep, cfg.n_clusters, seed=ctx.seed)
        spur, removed = corrected.prototypes, [names[i] for i in corrected.removed_indices]
    result = finetune_fd_align(
        backbone,
        ctx.splits.train,
        ctx.splits.val,
        cls,
        spur,
        cfg,
        seed=ctx.seed,
        val_reference=ctx.features("val"),
        progress=progress,
    )
    start = ctx.report(lambda f: classification_logits(f, cls.to(f.device)))
    kept_start = result.fit.best_step == 0 and cfg.head == "fixed"
    tuned_ctx = ctx
    if not kept_start:
        tuned = finetuned_backbone(backbone, result.visual)
        tuned_ctx = dataclasses.replace(ctx, backbone=tuned, _memo={})
    head = result.classifier.cpu()
    out = tuned_ctx.report(lambda f: classification_logits(f, head))
    out.update(
        result.config.options(),
        start=start,
        best_epoch=result.best_epoch,
        kept_original=result.fit.best_step == 0,
        history=result.epochs(),
        removed_templates=removed,
        n_templates=len(names),
        n_spurious_prototypes=int(spur.shape[0]),
        logit_scale=CLIP_LOGIT_SCALE,
    )
    if return_result:
        out["result"] = result
    if cfg.tip_adapter:  # the fine-tuned encoder as a drop-in image encoder, same episode
        from fewclip_tutorial.experiment import run_method

        tip = run_method("tip-adapter", context=tuned_ctx, progress=False)
        keys = ("val_accuracy", "test_accuracy", "ood_accuracy", "alpha", "beta")
        out["tip_adapter"] = {k: tip[k] for k in keys if k in tip}
    return out


# --------------------------------------------------------------------------- exercises


def _exercise_spurious_prototypes_inputs(gen: torch.Generator) -> Tensor:
    c, m, d = (
        int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((2, 6), (2, 7), (3, 9))
    )
    scale = (
        torch.rand(c, m, 1, generator=gen) * 3 + 0.2
    )  # varied norms: a missing normalisation shows
    return torch.randn(c, m, d, generator=gen) * scale


def _exercise_spurious_kl_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, float]:
    b, s, d = (
        int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((2, 6), (2, 6), (3, 9))
    )
    frozen = torch.randn(b, d, generator=gen)
    protos = F.normalize(torch.randn(s, d, generator=gen), dim=-1)
    return frozen + 0.5 * torch.randn(b, d, generator=gen), frozen, protos, 10.0


def register_exercises() -> None:
    """Register ``"spurious_prototypes"`` (``fn(text (C, M, D)) -> (M, D)``) and
    ``"spurious_kl"`` (``fn(finetuned (B, D), frozen (B, D), protos (S, D), logit_scale)``,
    the paper's per-image ``KL(P_f || P_f0)`` averaged over the batch)."""
    from fewclip_tutorial.exercises import register_exercise

    register_exercise(
        "spurious_prototypes",
        spurious_prototypes,
        _exercise_spurious_prototypes_inputs,
        description=(
            "Write spurious_prototypes(text_features) taking (C, M, D) embeddings of M templates "
            "for each of C classes and returning (M, D) unit prototypes: normalise each "
            "embedding, average over the classes, normalise again."
        ),
        hint="It is the class prototype with the roles swapped: average over dim=0, not dim=1.",
        atol=1e-4,
    )
    register_exercise(
        "spurious_kl",
        spurious_kl,
        _exercise_spurious_kl_inputs,
        description=(
            "Write spurious_kl(finetuned, frozen, spurious_protos, logit_scale) for (B, D) "
            "features of the same images from the fine-tuned and the frozen encoder and (S, D) "
            "unit prototypes: P = softmax(logit_scale * normalize(finetuned) @ protos.T), Q the "
            "same for frozen; return KL(P || Q) = sum_s P (log P - log Q), averaged over the B images."
        ),
        hint=(
            "Use log_softmax for both log P and log Q; sum over the prototypes (dim=1), then "
            "mean over the batch. F.kl_div(input, target) computes KL(target || exp(input))."
        ),
        atol=1e-5,
    )
