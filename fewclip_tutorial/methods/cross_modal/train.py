"""Cross-modal adaptation's trainers (Lin et al., CVPR 2023): one loop for the linear
probe and partial fine-tuning, and the searches on the validation split.

:func:`train_head` trains one configuration through :func:`fewclip_tutorial.training.fit`
(the authors' ``train()``); :func:`train_cross_modal` searches the grid of learning rates,
weight decays and batch sizes (``main()``'s sweep and ``get_valid_batch_sizes``);
:func:`sweep_templates` the number of templates; :func:`train_partial_finetune` trains the
last stage of the image encoder (:func:`fewclip_tutorial.encoders.split_visual_encoder`)
with the head.  The choices are listed in :mod:`.core`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewclip_tutorial.device import autocast, get_device
from fewclip_tutorial.encoders import split_visual_encoder
from fewclip_tutorial.methods.cross_modal.config import (
    DEFAULT_ITERS,
    GRIDS,
    PARTIAL_FT_LOGIT_SCALE,
    PARTIAL_GRIDS,
)
from fewclip_tutorial.methods.cross_modal.core import (
    CrossModalHead,
    _check_labels,
    _check_text_tensor,
    _image_pool,
    _split_counts,
    class_prototypes,
    mixed_batches,
    text_samples,
    wise_ft,
)
from fewclip_tutorial.training import FitResult, fit
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE

__all__ = [
    "CrossModalResult",
    "sweep_templates",
    "train_cross_modal",
    "train_head",
    "train_partial_finetune",
]


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


def train_head(
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
    """:func:`train_head` once per configuration; keep the best by validation.

    Each configuration trains a fresh head (and a fresh copy of ``suffix``) from
    ``init_weight``.  The kept configuration has the highest ``(accuracy, -loss)``;
    ties go to the earlier one.
    """
    best: tuple | None = None
    log = []
    for i, cfg in enumerate(configs):
        head = CrossModalHead(init_weight, logit_scale=logit_scale)
        trained = copy.deepcopy(suffix) if suffix is not None else None
        res = train_head(head, *data, suffix=trained, desc=f"{desc} {i + 1}/{len(configs)}",
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
    initialisation with :func:`train_head`; the configuration and step with the best
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
        iters, warmup, eval_every: see :func:`train_head` (the paper: 12,800, 50, 100).
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
    grid: str = "paper",
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
    batch_sizes: Sequence[int] | None = None,
    logit_scale: float = PARTIAL_FT_LOGIT_SCALE,
    patience: int | None = None,
    seed: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    prefix_batch_size: int = 256,
    cached: bool = False,
) -> CrossModalResult:
    """Cross-modal partial fine-tuning: the last image-encoder stage + the head.

    The same trainer as the linear probe (:func:`train_head`) with the trainable end of
    the encoder plugged in as ``suffix``.  The frozen prefix runs once over the training
    and validation images and its activations are cached; each step runs only the suffix
    on the image half of the batch (text samples go straight to the head).

    Every configuration of the grid starts from the same state (the zero-shot head and
    the pretrained suffix) and keeps its best validated step; the configuration with the
    best validation ``(accuracy, -loss)`` wins, ties to the earlier one.  The starting
    state stays a candidate: it is kept unless some step strictly beats it.  The default
    grid is the authors' (``HYPER_DICT["partial"]`` in engine/optimizer/default.py of
    linzhiqiu/cross_modal_adaptation, :data:`PARTIAL_GRIDS`).

    Args:
        visual: ``model.visual`` (left unchanged: the trainable end is deep-copied).
        train_images: ``(N, 3, H, W)`` or ``(V, N, 3, H, W)`` preprocessed images; with
            ``cached=True``, prefix activations ``(V, N, ...)`` instead.
        image_labels: ``(N,)``.
        text_features_per_template: ``(C, M, D)``.
        val_images: ``(N_val, 3, H, W)`` (with ``cached=True``: ``(N_val, ...)``
            activations); ``val_labels`` ``(N_val,)``.
        grid: ``"paper"`` (the authors' 3 x 3 x 1) or ``"single"`` (lr 1e-4, weight decay
            0, batch 8), see :data:`PARTIAL_GRIDS`; ``lrs`` / ``weight_decays`` /
            ``batch_sizes`` replace its axes.
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
    if grid not in PARTIAL_GRIDS:
        raise ValueError(
            f"grid must be one of {sorted(PARTIAL_GRIDS)} for partial fine-tuning, got {grid!r}; "
            "or give lrs, weight_decays and batch_sizes."
        )
    configs, skipped = _grid_configs(
        PARTIAL_GRIDS[grid], lrs, weight_decays, batch_sizes, device,
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
