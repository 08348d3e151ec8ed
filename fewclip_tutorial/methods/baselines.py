"""The two baselines every few-shot paper compares against.

* ``zero-shot``: CLIP with the dataset's prompt-ensemble classifier ``W``
  (Radford et al., 2021); no training image is used, the scores are
  ``100 * f @ W.T``.
* ``linear-probe``: logistic regression on the frozen image features of the K
  shots, ``C`` chosen on the few-shot validation split
  (:mod:`fewclip_tutorial.linear_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from fewclip_tutorial.episode import Context
from fewclip_tutorial.linear_probe import DEFAULT_CS, fit_linear_probe
from fewclip_tutorial.methods.registry import option, register_method
from fewclip_tutorial.metrics import accuracy, per_class_accuracy
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE, prompt_text_features, zero_shot_logits

__all__ = ["LinearProbeConfig", "ZeroShotConfig", "run_linear_probe", "run_zero_shot"]


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot CLIP with the dataset's prompt ensemble (no training images)."""

    by_prompt: bool = option(
        False, "also report the test accuracy of each single template (analysis only)"
    )


@dataclass(frozen=True)
class LinearProbeConfig:
    """Logistic regression on frozen image features; C chosen on the few-shot val split."""

    max_iter: int = option(1000, "L-BFGS iterations of the logistic regression")


def _flat(features: Tensor) -> Tensor:
    """``(V, N, D)`` views -> their mean ``(N, D)``; ``(N, D)`` unchanged."""
    return features.mean(0) if features.ndim == 3 else features


@register_method("zero-shot", config=ZeroShotConfig)
def run_zero_shot(ctx: Context, config: ZeroShotConfig) -> dict[str, Any]:
    """Zero-shot CLIP: ``100 * f @ W.T`` with the prompt-ensemble classifier ``W`` (C, D)."""
    W = ctx.text_classifier

    def predict(f: Tensor) -> Tensor:
        return zero_shot_logits(f, W.to(f.device), CLIP_LOGIT_SCALE)

    result = ctx.report(predict)
    test = ctx.features("test")
    test_f = _flat(test.features)
    per_class = per_class_accuracy(predict(test_f), test.labels, num_classes=ctx.num_classes)
    result["per_class_accuracy"] = {
        name: (None if np.isnan(acc) else float(acc))
        for name, acc in zip(ctx.classnames, per_class, strict=True)
    }
    result["templates"] = len(ctx.dataset.templates)
    if config.by_prompt:
        # (C, M, D): one classifier per template; reported for analysis, nothing is chosen.
        per_prompt = prompt_text_features(ctx.backbone, ctx.classnames, ctx.dataset.templates)
        result["zero_shot_by_prompt"] = {
            template: accuracy(
                zero_shot_logits(test_f, per_prompt[:, m].to(test_f.device)), test.labels
            )
            for m, template in enumerate(ctx.dataset.templates)
        }
    return result


@register_method("linear-probe", config=LinearProbeConfig)
def run_linear_probe(ctx: Context, config: LinearProbeConfig) -> dict[str, Any]:
    """Linear probe (CLIP Sec. 3.2): sklearn logistic regression, ``C`` searched on val."""
    train = ctx.features("train")
    val = ctx.features("val")
    probe = fit_linear_probe(
        _flat(train.features),
        train.labels,
        _flat(val.features),
        val.labels,
        Cs=DEFAULT_CS,
        max_iter=config.max_iter,
        seed=ctx.seed,
        num_classes=ctx.num_classes,
    )
    result = ctx.report(probe.logits)
    result["C"] = probe.C
    result["C_search"] = [[c, acc] for c, acc in probe.search]
    return result
