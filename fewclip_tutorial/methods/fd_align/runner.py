"""``fewclip run fd-align``: FD-Align on one few-shot episode, and the prototypes' templates.

With ``tip_adapter``, training-free Tip-Adapter also runs on the fine-tuned encoder, built
from the Tip-Adapter core and search (no method calls another through the registry).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from fewclip_tutorial.device import seed_everything
from fewclip_tutorial.encoders import finetuned_backbone
from fewclip_tutorial.episode import Context
from fewclip_tutorial.methods.fd_align.config import FDAlignConfig
from fewclip_tutorial.methods.fd_align.core import (
    class_prototypes,
    classification_logits,
    spurious_prototype_correction,
    spurious_prototypes,
)
from fewclip_tutorial.methods.fd_align.train import train_fd_align
from fewclip_tutorial.methods.registry import register_method
from fewclip_tutorial.methods.tip_adapter.config import TipAdapterConfig
from fewclip_tutorial.methods.tip_adapter.core import (
    build_cache_keys,
    build_cache_values,
    episode_tensors,
    tip_logits,
)
from fewclip_tutorial.methods.tip_adapter.search import default_search_grid, search_hparams
from fewclip_tutorial.zeroshot import prompt_text_features

__all__ = ["run_fd_align", "spurious_templates"]


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


@register_method("fd-align", config=FDAlignConfig)
def run_fd_align(
    ctx: Context, config: FDAlignConfig, *, progress: bool = True, return_result: bool = False
) -> dict:
    """FD-Align on one few-shot episode (options: :class:`FDAlignConfig`; ``beta=0`` is
    plain fine-tuning, like for like: with the trained head, the authors' ``modules/FT_CoOp.py``).

    The original encoder's validation and test features come from the feature cache;
    a fine-tuned encoder is cached under its own weights digest.  The result holds every
    option that ran (defaults included) and ``"resolved"``: the logit scale, learning rate
    and SPC seeds those options came to on this backbone and episode; also
    ``"start"``: the original encoder scored with FD-Align's class prototypes (the
    like-for-like zero-shot), ``"best_epoch"`` (0: the original was kept) and
    ``"history"``: :meth:`FDAlignResult.epochs`; with ``return_result`` (a direct call,
    not an option) also ``"result"``: the :class:`FDAlignResult` with the encoders.
    """
    cfg = config
    backbone = ctx.backbone
    names = spurious_templates(ctx.dataset.name, ctx.dataset.templates, cfg.templates)
    text = prompt_text_features(backbone, ctx.classnames, names)
    cls, spur = class_prototypes(text), spurious_prototypes(text)
    removed: list[str] = []
    if cfg.spc:
        corrected = spurious_prototype_correction(
            spur,
            cfg.keep,
            cfg.n_clusters,
            seed=ctx.seed,
            kmeans_seed=None if cfg.kmeans_seed < 0 else cfg.kmeans_seed,
        )
        spur, removed = corrected.prototypes, [names[i] for i in corrected.removed_indices]
    result = train_fd_align(
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
    tau = result.logit_scale
    start = ctx.report(lambda f: classification_logits(f, cls.to(f.device), tau))
    kept_start = result.fit.best_step == 0 and cfg.head == "fixed"
    tuned_ctx = ctx
    if not kept_start:
        tuned = finetuned_backbone(backbone, result.visual)
        tuned_ctx = dataclasses.replace(ctx, backbone=tuned, _memo={})
    head = result.classifier.cpu()
    out = tuned_ctx.report(lambda f: classification_logits(f, head, tau))
    out.update(
        result.config.options(),
        start=start,
        best_epoch=result.best_epoch,
        kept_original=result.fit.best_step == 0,
        history=result.epochs(),
        removed_templates=removed,
        n_templates=len(names),
        n_spurious_prototypes=int(spur.shape[0]),
        # what the options above resolved to on this backbone and episode
        resolved={
            "logit_scale": tau,
            "lr": result.lr,
            "kmeans_random_state": (ctx.seed if cfg.kmeans_seed < 0 else cfg.kmeans_seed)
            if cfg.spc
            else None,
            "isolation_forest_random_state": ctx.seed if cfg.spc else None,
            "n_train_images": len(ctx.splits.train),
        },
    )
    if return_result:
        out["result"] = result
    if cfg.tip_adapter:  # the fine-tuned encoder as a drop-in image encoder, same episode
        out["tip_adapter"] = _tip_adapter_step(tuned_ctx)
    return out


def _tip_adapter_step(ctx: Context) -> dict[str, Any]:
    """Training-free Tip-Adapter at its default options on ``ctx``'s (fine-tuned) encoder:
    its accuracies and the chosen ``alpha``, ``beta``, from the Tip-Adapter core and search."""
    seed_everything(ctx.seed)  # as run_method does before a method
    tip = TipAdapterConfig()
    train, val = ctx.features("train", views=tip.views, augment=True), ctx.features("val")
    views, labels, val_f, val_y, w = episode_tensors(
        train.features, train.labels, val.features, val.labels, ctx.text_classifier, ctx.device
    )
    keys, values = build_cache_keys(views), build_cache_values(labels, w.shape[0])
    grid = default_search_grid(tip.beta_scale, tip.alpha_scale, tip.beta_steps, tip.alpha_steps)
    search = search_hparams(val_f, val_y, w, keys, values, *grid)
    alpha, beta = search.best_alpha, search.best_beta

    def predict(f: Tensor) -> Tensor:
        return tip_logits(f.to(ctx.device), w, keys, values, alpha, beta).to(f.device)

    return {**ctx.report(predict), "alpha": alpha, "beta": beta}
