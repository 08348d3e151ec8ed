"""Tip-Adapter-F (Zhang et al., ECCV 2022, Sec. 3.2): the cache keys fine-tuned.

The keys become a trainable linear layer initialised from the cache and only they are
fine-tuned (authors' ``run_tip_adapter_F`` in ``main.py``); values and text classifier stay
frozen.  Training goes through the book's one loop, :func:`fewclip_tutorial.training.fit`;
alpha and beta are then re-searched on validation
(:func:`~fewclip_tutorial.methods.tip_adapter.search.search_hparams`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewclip_tutorial.methods.tip_adapter.core import (
    CLIP_LOGIT_SCALE,
    TipAdapterError,
    _check_beta,
    _check_cache,
    _check_labels,
    _check_logit_inputs,
    _require_tensor,
    _tip,
    percent_correct,
)
from fewclip_tutorial.methods.tip_adapter.search import (
    SearchResult,
    default_search_grid,
    search_hparams,
)
from fewclip_tutorial.training import fit

__all__ = ["TipAdapterF", "TipAdapterFResult", "tip_f_steps", "train_tip_adapter_f"]


class TipAdapterF(nn.Module):
    """Tip-Adapter-F: the ``(N, D)`` cache keys become a trainable linear layer.

    ``self.cache_keys`` is ``nn.Linear(D, N, bias=False)`` whose weight starts as the keys
    (the authors' ``adapter``), so the untrained forward equals :func:`tip_logits`.  The
    ``(N, C)`` values are a frozen buffer; trained keys are not renormalised (as the authors).
    """

    def __init__(self, cache_keys: Tensor, cache_values: Tensor) -> None:
        super().__init__()
        _check_cache(cache_keys, cache_values, None)
        num_entries, dim = cache_keys.shape
        self.cache_keys = nn.Linear(dim, num_entries, bias=False, device="meta")
        self.cache_keys.weight = nn.Parameter(cache_keys.detach().clone())
        self.register_buffer("cache_values", cache_values.detach().clone())

    @property
    def keys(self) -> Tensor:
        """``(N, D)`` current (trained) keys, detached."""
        return self.cache_keys.weight.detach()

    def forward(
        self,
        f: Tensor,
        clip_weights: Tensor,
        alpha: float,
        beta: float,
        logit_scale: float = CLIP_LOGIT_SCALE,
    ) -> Tensor:
        """[Tip logits] with trainable keys: ``(M, D) -> (M, C)`` logits."""
        _check_logit_inputs(f, clip_weights, self.cache_keys.weight, self.cache_values)
        similarity = self.cache_keys(f)  # (M, N) = f @ keys.T, the authors' adapter(f)
        return _tip(similarity, f, clip_weights, self.cache_values, alpha, beta, logit_scale)


@dataclass
class TipAdapterFResult:
    """Outcome of :func:`train_tip_adapter_f`.

    Attributes:
        model, cache_keys: the adapter holding the kept ``(N, D)`` keys, and those keys.
        alpha, beta: re-searched on validation with the kept keys (``search``).
        train_alpha, train_beta: the pair used during training.
        best_step: the optimiser step whose keys were kept (0: the starting keys, that is
            training-free Tip-Adapter; a later step is kept only if strictly better).
        steps: optimiser steps taken; best_val_accuracy: the kept keys' validation
            accuracy (%) at the training pair.
        history: :class:`~fewclip_tutorial.training.FitResult` history (``step``, ``loss``,
            ``lr`` per step; ``val_step``, ``val_score`` = validation accuracy per epoch).
    """

    model: TipAdapterF
    cache_keys: Tensor
    alpha: float
    beta: float
    train_alpha: float
    train_beta: float
    best_step: int
    steps: int
    best_val_accuracy: float
    search: SearchResult
    history: dict[str, list] = field(default_factory=dict)


def tip_f_steps(num_train: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """Tip-Adapter-F's training length: ``max(epochs * ceil(N / batch_size), min_steps)``.

    The authors train ``epochs`` passes (20; 100 for EuroSAT) in batches of 256.  On a set
    smaller than a batch that is one optimiser step per epoch, and the authors' own
    schedule for their one-batch dataset (EuroSAT, 16 shots x 10 classes = 160 images) is
    100 epochs, i.e. 100 steps.  So the length is the authors' schedule, but never fewer
    than ``min_steps`` (100) steps; where the authors' schedule already has 100 steps (20
    epochs of 5 or more batches, e.g. 63 for 16-shot ImageNet) it is unchanged.
    """
    if min(num_train, batch_size, epochs) < 1 or min_steps < 0:
        raise TipAdapterError(f"need N, batch_size, epochs >= 1, min_steps >= 0; got "
                              f"{num_train}, {batch_size}, {epochs}, {min_steps}.")  # fmt: skip
    return max(epochs * math.ceil(num_train / batch_size), min_steps)


def train_tip_adapter_f(
    train_view_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    clip_weights: Tensor,
    cache_keys: Tensor,
    cache_values: Tensor,
    alpha: float,
    beta: float,
    epochs: int = 20,
    lr: float = 1e-3,
    eps: float = 1e-4,
    batch_size: int = 256,
    seed: int = 1,
    progress: bool = True,
    search_grid: tuple[Tensor, Tensor] | None = None,
    weight_decay: float = 0.01,
    min_steps: int = 100,
) -> TipAdapterFResult:
    """Fine-tune the cache keys (Tip-Adapter-F) on cached augmented features.

    Runs :func:`fewclip_tutorial.training.fit` for :func:`tip_f_steps` optimiser steps:
    each epoch visits every training image once in random order (batches of
    ``min(batch_size, N)``), each time through one randomly chosen augmented view of its
    cached features, so no image is re-encoded.  Loss: cross-entropy of [Tip logits] at
    the training ``alpha``, ``beta``.  AdamW (``lr``, ``eps``, ``weight_decay``) with a
    cosine schedule stepped per iteration, as in the authors' ``run_tip_adapter_F``.
    Validation accuracy is measured at step 0 and after every epoch; the starting keys
    (training-free Tip-Adapter) are kept unless a later epoch is strictly better.  Alpha
    and beta are then re-searched on validation with the kept keys.  There is
    deliberately no test argument.

    Args:
        train_view_features: ``(V, N, D)`` cached views (``(N, D)``: ``V = 1``);
            train_labels: ``(N,)``; val_features: ``(M, D)``; val_labels: ``(M,)``.
        clip_weights: ``(C, D)`` frozen; cache_keys: ``(N, D)`` initial; cache_values: ``(N, C)``.
        alpha, beta: the pair used while training.
        epochs, lr, eps, batch_size, weight_decay: the authors' settings (20, 1e-3, 1e-4,
            256; AdamW's default weight decay 0.01); min_steps: see :func:`tip_f_steps`.
        seed: seeds the shuffling and the views (deterministic on CPU); progress: a bar.
        search_grid: ``(betas, alphas)`` of the final search (default grid if None).
    """
    views = _require_tensor("train_view_features", train_view_features)
    views = views.unsqueeze(0) if views.dim() == 2 else views
    if views.dim() != 3:
        raise TipAdapterError(f"train_view_features must be (V, N, D), got {tuple(views.shape)}.")
    _check_logit_inputs(val_features, clip_weights, cache_keys, cache_values)
    if views.shape[1:] != cache_keys.shape:
        raise TipAdapterError(
            f"train_view_features has (N, D) = {tuple(views.shape[1:])} but cache_keys is "
            f"{tuple(cache_keys.shape)}; the cache must be built from these training features."
        )
    num_classes, device = clip_weights.shape[0], cache_keys.device
    train_y = _check_labels("train_labels", train_labels, views.shape[1], num_classes).to(device)
    val_y = _check_labels("val_labels", val_labels, val_features.shape[0], num_classes).to(device)
    alpha, beta = float(alpha), float(beta)
    _check_beta(beta)
    num_views, num_train = views.shape[0], views.shape[1]
    steps = tip_f_steps(num_train, batch_size, epochs, min_steps)
    batch = min(batch_size, num_train)
    per_epoch = math.ceil(num_train / batch)
    views, val_f, w = views.to(device), val_features.to(device), clip_weights.to(device)

    generator = torch.Generator().manual_seed(int(seed))
    model = TipAdapterF(cache_keys, cache_values).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, weight_decay=weight_decay)
    epoch: dict[str, Tensor] = {}

    def step_loss(step: int) -> Tensor:
        b = (step - 1) % per_epoch
        if b == 0:  # a new epoch: new order, one random view per image
            epoch["order"] = torch.randperm(num_train, generator=generator).to(device)
            epoch["view"] = torch.randint(num_views, (num_train,), generator=generator).to(device)
        idx = epoch["order"][b * batch : (b + 1) * batch]
        logits = model(views[epoch["view"][idx], idx], w, alpha, beta)  # (B, C)
        return F.cross_entropy(logits, train_y[idx])

    fitted = fit(model, step_loss, steps=steps, optimizer=optimizer, schedule="cosine",
                 evaluate=lambda: percent_correct(model(val_f, w, alpha, beta), val_y),
                 eval_every=per_epoch, device=device, progress=progress, desc="Tip-Adapter-F")  # fmt: skip
    betas, alphas = search_grid if search_grid is not None else default_search_grid()
    search = search_hparams(val_f, val_y, w, model.keys, model.cache_values, betas, alphas)
    return TipAdapterFResult(
        model, model.keys.clone(), search.best_alpha, search.best_beta, alpha, beta,
        fitted.best_step, fitted.steps_run, float(fitted.best_score), search, fitted.history,
    )  # fmt: skip
