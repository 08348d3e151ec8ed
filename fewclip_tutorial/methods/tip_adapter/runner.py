"""``fewclip run tip-adapter`` and ``fewclip run tip-adapter-f`` on one few-shot episode."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fewclip_tutorial.episode import Context
from fewclip_tutorial.methods.registry import register_method
from fewclip_tutorial.methods.tip_adapter.config import TipAdapterConfig, TipAdapterFConfig
from fewclip_tutorial.methods.tip_adapter.core import (
    CLIP_LOGIT_SCALE,
    TipAdapterError,
    _clip_logits,
    build_cache_keys,
    build_cache_values,
    episode_tensors,
    percent_correct,
    tip_logits,
)
from fewclip_tutorial.methods.tip_adapter.search import default_search_grid, search_hparams
from fewclip_tutorial.methods.tip_adapter.train import train_tip_adapter_f

__all__ = ["run_tip_adapter", "run_tip_adapter_f"]


def _run(ctx: Context, o: TipAdapterConfig, progress: bool) -> dict[str, Any]:
    """Tip-Adapter, and Tip-Adapter-F when ``o`` is a :class:`TipAdapterFConfig`."""
    if o.views < 1:
        raise TipAdapterError(f"views must be >= 1, got {o.views}.")
    train, val_set = ctx.features("train", views=o.views, augment=True), ctx.features("val")
    train_views, train_labels, val_f, val_y, w = episode_tensors(
        train.features, train.labels, val_set.features, val_set.labels, ctx.text_classifier,
        ctx.device,
    )  # fmt: skip
    val = (val_f, val_y, w)
    keys, values = build_cache_keys(train_views), build_cache_values(train_labels, w.shape[0])
    grid = default_search_grid(o.beta_scale, o.alpha_scale, o.beta_steps, o.alpha_steps)
    search, extra = search_hparams(*val, keys, values, *grid), {}
    if isinstance(o, TipAdapterFConfig):
        trained = train_tip_adapter_f(
            train_views, train_labels, *val, keys, values,
            alpha=search.best_alpha, beta=search.best_beta, epochs=o.epochs, lr=o.lr,
            batch_size=o.batch_size, min_steps=o.min_steps, seed=ctx.seed,
            progress=progress, search_grid=grid,
        )  # fmt: skip
        keys = trained.cache_keys
        extra = dict(best_step=trained.best_step, steps=trained.steps, history=trained.history,
                     train_alpha=trained.train_alpha, train_beta=trained.train_beta,
                     training_free_val_accuracy=search.best_accuracy)  # fmt: skip
        search = trained.search
    alpha, beta = search.best_alpha, search.best_beta

    def predict(f: Tensor) -> Tensor:  # CPU features from ctx.report, scored on ctx.device
        with torch.no_grad():
            return tip_logits(f.to(ctx.device), w, keys, values, alpha, beta).to(f.device)

    result = ctx.report(predict)
    result.update(
        alpha=alpha,
        beta=beta,
        selection_val_accuracy=search.best_accuracy,
        zero_shot_val_accuracy=percent_correct(_clip_logits(*val[0::2], CLIP_LOGIT_SCALE), val[1]),
        cache_size=int(keys.shape[0]),
        views=int(train_views.shape[0]),
        logit_scale=CLIP_LOGIT_SCALE,
        **extra,
    )
    return result


@register_method("tip-adapter", config=TipAdapterConfig)
def run_tip_adapter(ctx: Context, config: TipAdapterConfig, progress: bool = True) -> dict:
    """Tip-Adapter ([Tip logits]) with alpha, beta searched on validation (:class:`TipAdapterConfig`)."""
    return _run(ctx, config, progress)


@register_method("tip-adapter-f", config=TipAdapterFConfig)
def run_tip_adapter_f(ctx: Context, config: TipAdapterFConfig, progress: bool = True) -> dict:
    """Tip-Adapter-F (:class:`TipAdapterFConfig`): keys trained from the searched pair.

    Training starts at the alpha/beta of the training-free search on validation (the
    authors start from fixed per-dataset values instead).
    """
    return _run(ctx, config, progress)
