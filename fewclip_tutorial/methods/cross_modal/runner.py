"""``fewclip run cross-modal``: the linear head, WiSE-FT or partial fine-tuning on one episode."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewclip_tutorial.encoders import encode_split_through, split_visual_encoder
from fewclip_tutorial.episode import Context
from fewclip_tutorial.features import FeatureSet
from fewclip_tutorial.methods.cross_modal.config import CrossModalConfig
from fewclip_tutorial.methods.cross_modal.train import (
    CrossModalResult,
    train_cross_modal,
    train_partial_finetune,
)
from fewclip_tutorial.methods.registry import register_method
from fewclip_tutorial.zeroshot import prompt_text_features

__all__ = ["run_cross_modal"]


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
                 progress: bool, grid: str = "paper",
                 ) -> tuple[CrossModalResult, dict[str, Any]]:  # fmt: skip
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
        iters=iters, seed=ctx.seed, device=device, progress=progress, cached=True, grid=grid,
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


@register_method("cross-modal", config=CrossModalConfig)
def run_cross_modal(ctx: Context, config: CrossModalConfig, progress: bool = True) -> dict:
    """Cross-modal linear probe / WiSE-FT / partial fine-tuning on one few-shot episode.

    The options and their defaults are :class:`CrossModalConfig`.
    Text samples are the dataset's templates filled with each class name
    (``(C, M, D)``); image samples are the K-shot centre-crop features plus their
    flipped view (``flip=None``: unless ``dataset.info["hflip_invariant"]`` is
    ``False``, as for ShapeWorld).  Selection uses the few-shot validation split only.
    ``variant="partial"`` re-encodes the evaluation images through the fine-tuned end
    of the encoder; it searches ``partial_grid`` (default the authors' 9 configurations,
    ``HYPER_DICT["partial"]`` of linzhiqiu/cross_modal_adaptation).

    Returns:
        ``ctx.report``'s accuracies plus ``hparams``, ``best_step``,
        ``selection_val_accuracy``, ``grid``, ``variant``, ``modality``, ``templates``,
        the selected run's validation ``history`` and ``final_train_loss`` (its mean
        training loss over the last 100 steps).
    """
    variant, modality, iters, init = config.variant, config.modality, config.iters, config.init
    templates, flip, grid = config.templates, config.flip, config.grid
    wise_weight = config.wise_weight
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
        result, report = _run_partial(
            ctx, text, modality, iters, flip, progress, grid=config.partial_grid
        )
        out["partial_grid"] = config.partial_grid
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
