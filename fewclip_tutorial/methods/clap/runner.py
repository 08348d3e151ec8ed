"""``fewclip run clap``: CLAP (or Im.Aug) trained and selected on one few-shot episode, then
every evaluation of the chapter (refined zero-shot, the paper's prompt forms, attacks, probe)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewclip_tutorial.data import shapeworld as sw
from fewclip_tutorial.methods.clap.config import CLAPOptions
from fewclip_tutorial.methods.clap.core import (
    LAMBDA_GRID,
    ZERO_SHOT_PROMPTS,
    DisentangleNetwork,
    encode_text_raw,
    lambda_scores,
    prompt_form_classifier,
    refine,
    refined_classifier,
    select_lambda,
)
from fewclip_tutorial.methods.clap.prompts import (
    PromptAttributes,
    authors_word_lists,
    clap_prompts,
    dataset_factors,
)
from fewclip_tutorial.methods.clap.train import (
    CLAPResult,
    encode_images_raw,
    train_clap,
    train_clap_image,
)
from fewclip_tutorial.methods.registry import make_config, register_method
from fewclip_tutorial.metrics import accuracy
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE, prompt_ensemble, prompt_text_features

__all__ = ["IMAUG_PROMPTS_PER_CLASS", "CLAPFit", "run_clap", "train_clap_episode"]

#: Im.Aug on ShapeWorld renders one image per prompt for this many prompts per class
#: (the paper uses all 480; 64 keeps the CPU cost of encoding augmented views small).
IMAUG_PROMPTS_PER_CLASS: int = 64


def _render_shapeworld_prompts(
    prompts: Sequence[PromptAttributes],
    image_size: int,
    seed: int,
    classnames: Sequence[str] | None = None,
    task: str = "shapeworld",
) -> Any:
    """One rendered image per prompt of a ShapeWorld task, as a ListSplit (Im.Aug's images).

    ``classnames`` are the task's class names (default: the task's own); each prompt's
    class, colour, size, image type and art style set the rendered factors.
    """
    from PIL import Image

    from fewclip_tutorial.data.base import ListSplit

    t = sw.get_task(task)
    names = list(classnames) if classnames is not None else list(t.classnames)
    labels = [names.index(p.classname) for p in prompts]
    rng = np.random.default_rng(seed)
    n = len(prompts)
    f = sw.task_factors(t, np.asarray(labels), rng, t.train_domains)

    factor_lists = (sw.COLORS, sw.SIZES, sw.IMAGE_TYPES, sw.ART_STYLES)
    for attr, values in zip(("color", "size", "image_type", "art_style"), factor_lists):
        given = [getattr(p, attr) for p in prompts]
        current = getattr(f, attr)
        setattr(f, attr, np.asarray([values.index(v) if v else c for v, c in zip(given, current)]))
    f.radius = np.array([sw.SIZE_RADIUS[sw.SIZES[s]] for s in f.size]) * rng.uniform(0.9, 1.1, n)
    margin = f.radius * 1.05
    f.cx, f.cy = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
    images = [Image.fromarray(a) for a in sw.render(f, image_size)]
    return ListSplit(images, labels, name="clap-imaug-rendered")


class _RawImageEncoder:
    """A Backbone whose ``encode_images`` returns features before L2 normalisation.

    For :func:`~fewclip_tutorial.features.extract_features`: the identifier differs from the
    backbone's, so raw features have their own cache files.
    """

    def __init__(self, backbone: Any) -> None:
        self._backbone = backbone
        self.identifier = f"{backbone.identifier}|raw-image-features"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)

    def encode_images(self, images: Tensor, batch_size: int | None = None) -> Tensor:
        return encode_images_raw(self._backbone, images, batch_size or len(images))


def _features(ctx: Any, split: str, input_features: str) -> Any:
    """Image features of a split as the network takes them: raw (memoised) or normalised."""
    if input_features != "raw":
        return ctx.features(split)
    key = ("clap-raw-image-features", split)
    if key not in ctx._memo:
        from fewclip_tutorial.features import extract_features

        ctx._memo[key] = extract_features(
            _RawImageEncoder(ctx.backbone), ctx.split(split), cache_dir=ctx.cache_dir,
            progress=ctx.progress,
        )  # fmt: skip
    return ctx._memo[key]


def _text_features(backbone: Any, classnames: list[str], templates: list[str], raw: bool) -> Tensor:
    """``(C, M, D)`` prompt-ensemble text features, raw or L2-normalised."""
    if not raw:
        return prompt_text_features(backbone, classnames, templates)
    texts = [t.format(c) for c in classnames for t in templates]
    return encode_text_raw(backbone, texts).reshape(len(classnames), len(templates), -1)


def _parse_lam(lam: str | float) -> float | None:
    if str(lam).strip().lower() == "val":
        return None
    try:
        return float(lam)
    except ValueError as err:
        raise ValueError(
            f"lam={lam!r}: pass a number such as 0.2, or 'val' to choose it on validation."
        ) from err


@dataclass
class CLAPFit:
    """A CLAP (or Im.Aug) network trained and selected in a runner context.

    Attributes:
        result: the :class:`CLAPResult` (``network``, ``best_step``, ``history``; the
            validation history has ``"val_accuracy"``, ``"val_lam"`` and, when 1 is in the
            grid, ``"val_accuracy_at_1"``: the network as trained).
        lam: the inference weight chosen on validation; lam_val_accuracy: ``{lam: %}``.
        text_features: ``(C, M, D)`` prompt-ensemble text features of the dataset, as the
            network takes them (raw or L2-normalised, ``options.training.input_features``).
        options: the resolved options (:class:`CLAPOptions`).
    """

    result: CLAPResult
    lam: float
    lam_val_accuracy: dict[float, float]
    text_features: Tensor
    options: CLAPOptions


def _imaug_images(ctx: Any, prompts: list[PromptAttributes]) -> Any:
    """Im.Aug's images: one rendered image per prompt (a seeded subset) on ShapeWorld, else train."""
    dataset, classnames = ctx.dataset, list(ctx.dataset.classnames)
    if not str(dataset.name).startswith("shapeworld"):
        return ctx.splits.train
    pick = random.Random(ctx.seed)
    per_class = len(prompts) // len(classnames)
    keep = min(IMAUG_PROMPTS_PER_CLASS, per_class)
    subset = [
        prompts[c * per_class + i]
        for c in range(len(classnames))
        for i in sorted(pick.sample(range(per_class), keep))
    ]
    return _render_shapeworld_prompts(
        subset, ctx.backbone.image_size, ctx.seed, classnames, dataset.name
    )


def train_clap_episode(
    ctx: Any, config: CLAPOptions | None = None, progress: bool = True, **options: Any
) -> CLAPFit:
    """Train CLAP (or Im.Aug) on a few-shot episode and choose ``lam`` on its validation split.

    The training step and ``lam`` are both chosen on validation: each evaluation scores the
    network by its best (accuracy, -cross-entropy) over the ``lam`` grid, so a trained
    state is kept only when, at some ``lam``, it beats the identity network of step 0.

    Args:
        ctx: a :class:`~fewclip_tutorial.episode.Context`.
        config: the options (:class:`CLAPOptions`); ``options``, any of its option names
            (defaults from there), override it.
    """
    opts = make_config(CLAPOptions, config, options, "clap")
    fixed_lam = _parse_lam(opts.lam)
    backbone, classnames = ctx.backbone, list(ctx.dataset.classnames)
    dev = backbone.device
    inputs = opts.training.input_features
    text = _text_features(backbone, classnames, list(ctx.dataset.templates), inputs == "raw")
    val = _features(ctx, "val", inputs)
    val_f, val_y = val.features.to(dev), torch.as_tensor(val.labels)
    grid = LAMBDA_GRID if fixed_lam is None else (fixed_lam,)

    def val_fn(net: DisentangleNetwork) -> dict[str, Any]:
        scores = lambda_scores(val_f, val_y, text, net, grid)
        best = max(scores, key=lambda k: (*scores[k], -grid.index(k)))
        extra = {"accuracy_at_1": scores[1.0][0]} if 1.0 in scores else {}
        return {"score": scores[best], "accuracy": scores[best][0], "lam": best, **extra}

    config = opts.training
    common = dict(seed=ctx.seed, val_fn=val_fn, device=dev, progress=progress)
    factors = dataset_factors(ctx.dataset)
    order = config.prompt_form
    prompts = [p for c in classnames for p in clap_prompts(c, **factors, order=order)]
    if opts.variant == "clap":
        result = train_clap(
            backbone, prompts, config, ign=opts.ign, n_noise=opts.noise_tokens,
            noise_std=opts.noise_std, words=authors_word_lists(**factors), **common,
        )  # fmt: skip
    else:
        result = train_clap_image(backbone, _imaug_images(ctx, prompts), config, **common)
    lam, lam_scores = select_lambda(val_f, val_y, text, result.network, grid)
    return CLAPFit(result, lam, lam_scores, text, opts)


@register_method("clap", config=CLAPOptions)
def run_clap(ctx: Any, config: CLAPOptions, progress: bool = True) -> dict:
    """The registered ``"clap"`` method: :func:`train_clap_episode`, then every evaluation.

    The standard keys (``val_accuracy``, ``test_accuracy``, ``ood_accuracy``) use refined
    image features against the refined prompt-ensemble classifier (or, with ``probe``, a
    few-shot linear probe on refined features; the zero-shot numbers then move to
    ``zero_shot_refined``, and to the scalars ``zero_shot_val_accuracy``,
    ``zero_shot_test_accuracy`` and ``zero_shot_ood_mean`` that a sweep's rows keep); ``zero_shot_by_prompt`` compares raw CLIP and refined features
    for the paper's ZS(C/PC/CP/NC) prompts on test; ``attack_images > 0`` adds
    ``adversarial`` (clean / FGSM / PGD-20 / CW-20 accuracy of CLIP and of the refined classifier).
    """
    fitted = train_clap_episode(ctx, config, progress=progress)
    result, lam, opts = fitted.result, fitted.lam, fitted.options
    net = result.network
    dev = ctx.backbone.device
    inputs = opts.training.input_features
    raw = inputs == "raw"
    classifier = refined_classifier(fitted.text_features, net, lam)

    def refined(f: Tensor) -> Tensor:
        with torch.no_grad():
            return refine(f.to(dev), net, lam)

    def report_of(predict: Any) -> dict:
        if not raw:
            return ctx.report(predict)
        names = ["val", "test"] + [f"ood:{d}" for d in ctx.splits.ood_test]
        return ctx.report(predict, {n: _features(ctx, n, inputs) for n in names})

    report = report_of(lambda f: (CLIP_LOGIT_SCALE * refined(f) @ classifier.T).cpu())
    test = _features(ctx, "test", inputs)
    by_prompt: dict[str, dict[str, float]] = {}
    for key in ZERO_SHOT_PROMPTS:
        w = prompt_form_classifier(
            ctx.backbone, ctx.dataset.classnames, key, seed=ctx.seed, normalize=not raw
        )
        with torch.no_grad():
            f_test, w = test.features.to(dev), w.to(dev)
            by_prompt[key] = {
                "clip": accuracy(
                    torch.nn.functional.normalize(f_test, dim=-1)
                    @ torch.nn.functional.normalize(w, dim=-1).T,
                    test.labels,
                ),
                "refined": accuracy(refined(f_test) @ refined(w).T, test.labels),
            }
    report.update(
        variant=opts.variant,
        lam=lam,
        lam_val_accuracy={f"{k:g}": v for k, v in fitted.lam_val_accuracy.items()},
        best_step=result.best_step,
        steps_run=result.steps_run,
        final_train_loss=result.history["loss"][-1] if result.history["loss"] else None,
        residual_norm=float(net.projection.weight.detach().norm()),
        history=result.history,
        zero_shot_by_prompt=by_prompt,
    )
    if opts.attack_images > 0:
        from fewclip_tutorial.attacks import zero_shot_robustness

        heads = {
            "clip": (prompt_ensemble(fitted.text_features), None),
            "refined": (classifier, lambda f: refine(f, net, lam)),
        }
        report["adversarial"] = zero_shot_robustness(
            ctx.backbone, ctx.splits.test, heads, opts.attack_images, ctx.seed,
            opts.attack_step, opts.attack_convention, inputs,
        )  # fmt: skip
    if opts.probe:
        from fewclip_tutorial.linear_probe import fit_linear_probe

        train, val = _features(ctx, "train", inputs), _features(ctx, "val", inputs)
        probe = fit_linear_probe(
            refined(train.features).cpu(), train.labels, refined(val.features).cpu(), val.labels,
            seed=ctx.seed, num_classes=ctx.num_classes,
        )  # fmt: skip
        report["zero_shot_refined"] = {
            k: report[k] for k in ("val_accuracy", "test_accuracy", "ood_accuracy") if k in report
        }
        # the same numbers as scalars, so a sweep's table rows keep them too
        ood = report.get("ood_accuracy") or {}
        report["zero_shot_val_accuracy"] = report["val_accuracy"]
        report["zero_shot_test_accuracy"] = report["test_accuracy"]
        if ood:
            report["zero_shot_ood_mean"] = sum(ood.values()) / len(ood)
        report.update(report_of(lambda f: probe.logits(refined(f).cpu())), probe_C=probe.C)
    return report
