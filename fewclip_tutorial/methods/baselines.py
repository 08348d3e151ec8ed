"""The two baselines every few-shot paper compares against.

* ``zero-shot``: CLIP with the dataset's prompt-ensemble classifier ``W``
  (Radford et al., 2021); no training image is used, the scores are
  ``100 * f @ W.T``.
* ``linear-probe``: logistic regression on the frozen image features of the K
  shots, ``C`` chosen on the few-shot validation split
  (:mod:`fewclip_tutorial.linear_probe`).  By default CoOp's ``lpclip`` protocol
  (``lpclip/linear_probe.py``, KaiyangZhou/CoOp: raw image-tower features, its C grid
  and bisection), the "Linear probe CLIP" of the CoOp, Tip-Adapter and cross-modal
  tables; ``protocol="normalized"`` is the package's earlier probe (L2-normalised
  features, a 13-value grid, ties to the smaller C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from fewclip_tutorial.episode import Context
from fewclip_tutorial.features import FeatureSet
from fewclip_tutorial.linear_probe import (
    DEFAULT_CS,
    LPCLIP_STEPS,
    PROTOCOLS,
    fit_linear_probe,
    fit_linear_probe_lpclip,
)
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
    """Logistic regression on frozen image features; C chosen on the few-shot val split.

    The default is CoOp's ``lpclip`` protocol (``lpclip/linear_probe.py``,
    KaiyangZhou/CoOp): raw image-tower features, ``C`` first over 1e6 ... 1e-6 (the first
    best), then 8 bisection steps in log10 C.  ``protocol="normalized"``: L2-normalised
    features, ``C`` over ``logspace(-3, 3, 13)``, ties to the smaller ``C``.
    """

    protocol: str = option(
        "lpclip",
        "'lpclip': CoOp's probe (raw features, its C grid and bisection); 'normalized': "
        "L2-normalised features, a 13-value C grid, ties to the smaller C",
        list(PROTOCOLS),
    )
    max_iter: int = option(1000, "L-BFGS iterations of the logistic regression")
    steps: int = option(LPCLIP_STEPS, "bisection steps in log10 C of protocol 'lpclip'")


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
    """Linear probe (CLIP Sec. 3.2): sklearn logistic regression, ``C`` searched on val.

    ``protocol="lpclip"`` fits and evaluates on the raw features of every split
    (``ctx.features(split, raw=True)``); ``"normalized"`` on the cached normalised ones.
    """
    if config.steps < 0:
        raise ValueError(f"steps must be >= 0 (CoOp: {LPCLIP_STEPS}), got {config.steps}.")
    raw = config.protocol == "lpclip"
    train = ctx.features("train", raw=raw)
    val = ctx.features("val", raw=raw)
    common = {"max_iter": config.max_iter, "seed": ctx.seed, "num_classes": ctx.num_classes}
    args = (_flat(train.features), train.labels, _flat(val.features), val.labels)
    if raw:
        probe = fit_linear_probe_lpclip(*args, steps=config.steps, **common)
        names = ["val", "test"] + [f"ood:{d}" for d in ctx.ood_domains]
        by_split: dict[str, FeatureSet] = {n: ctx.features(n, raw=True) for n in names}
        result = ctx.report(probe.logits, features_by_split=by_split)
    else:
        probe = fit_linear_probe(*args, Cs=DEFAULT_CS, **common)
        result = ctx.report(probe.logits)
    result["protocol"] = config.protocol
    result["C"] = probe.C
    result["C_search"] = [[c, acc] for c, acc in probe.search]
    return result
