"""Zero-shot CLIP: a classifier built from text alone.

CLIP (Radford et al., 2021, Sec. 3.1.4 "Prompt engineering and ensembling") classifies
an image by comparing its embedding with the embeddings of one prompt per class,
``"a photo of a {class}."``.  With ``M`` templates per class, the *prompt
ensemble* averages the ``M`` normalised text embeddings of a class and
normalises the mean again:

.. math::

    w_c = \\frac{\\bar t_c}{\\lVert \\bar t_c \\rVert}, \\qquad
    \\bar t_c = \\frac{1}{M} \\sum_{m=1}^{M} \\frac{t_{c,m}}{\\lVert t_{c,m} \\rVert}

and the logits are ``logit_scale * f @ W.T`` with ``logit_scale = 100`` (CLIP's
learned temperature, clipped at 100).

:func:`text_classifier` does this with the backbone's text encoder (through
open_clip's ``build_zero_shot_classifier``); :func:`prompt_ensemble` is the
same arithmetic on a ready ``(C, M, D)`` tensor, for teaching and testing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import Tensor

from fewclip_tutorial.device import autocast

if TYPE_CHECKING:
    from fewclip_tutorial.backbones import Backbone

#: The logit scale of every CLIP-style score in the package: CLIP's learned temperature
#: exp(logit_scale), clipped at 100 during its training, and the value the four papers use.
CLIP_LOGIT_SCALE: float = 100.0

__all__ = [
    "CLIP_LOGIT_SCALE",
    "prompt_ensemble",
    "prompt_text_features",
    "text_classifier",
    "zero_shot_logits",
]


def _check_prompts(classnames: Sequence[str], templates: Sequence[str]) -> None:
    if isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError("classnames must be a non-empty list of class names.")
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError(
            "templates must be a non-empty list of strings with one '{}' placeholder, "
            "e.g. ['a photo of a {}.']."
        )
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(
            f"Every template needs a '{{}}' placeholder for the class name; these do not: {bad[:3]}"
        )


def text_classifier(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 512,
    progress: bool = False,
) -> Tensor:
    """The zero-shot prompt-ensemble classifier ``W``.

    Args:
        backbone: the frozen backbone whose text encoder embeds the prompts.
        classnames: ``C`` class names.
        templates: ``M`` templates with one ``"{}"`` placeholder.
        batch_size: approximate number of prompts per text-encoder forward pass.
        progress: show a tqdm progress bar.

    Returns:
        ``(C, D)`` fp32 tensor on ``backbone.device``; row ``c`` is the L2-normalised
        mean of the ``M`` normalised prompt embeddings of class ``c`` (CLIP's prompt
        ensembling; see :func:`prompt_ensemble`).
    """
    _check_prompts(classnames, templates)
    classes_per_batch = max(1, batch_size // len(templates))
    with autocast(backbone.device):
        weights = build_zero_shot_classifier(
            backbone.model,
            backbone.tokenizer,
            classnames=list(classnames),
            templates=list(templates),
            num_classes_per_batch=classes_per_batch,
            device=backbone.device,
            use_tqdm=progress,
        )
    # open_clip returns (D, C); we keep one row per class.
    return F.normalize(weights.T.float(), dim=-1).contiguous()


def prompt_text_features(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """Normalised text embeddings of every (class, template) prompt.

    Returns:
        ``(C, M, D)`` tensor ``t[c, m] = E_txt(templates[m].format(classnames[c]))``,
        each row L2-normalised.  ``prompt_ensemble`` of it equals :func:`text_classifier`.
    """
    _check_prompts(classnames, templates)
    prompts = [t.format(c) for c in classnames for t in templates]
    feats = backbone.encode_text(prompts, batch_size=batch_size)
    return feats.reshape(len(classnames), len(templates), -1)


def prompt_ensemble(text_features: Tensor) -> Tensor:
    """Average ``M`` prompt embeddings per class (CLIP's prompt ensembling).

    Args:
        text_features: ``(C, M, D)`` text embeddings (normalised or not).

    Returns:
        ``(C, D)``: per class, normalise each of the ``M`` embeddings, take their
        mean, and normalise the mean again.
    """
    if text_features.ndim != 3:
        raise ValueError(
            "prompt_ensemble expects (C, M, D) text features (classes, templates, dim), got "
            f"shape {tuple(text_features.shape)}; for one template use t.unsqueeze(1)."
        )
    per_prompt = F.normalize(text_features, dim=-1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def zero_shot_logits(
    image_features: Tensor, classifier: Tensor, logit_scale: float = CLIP_LOGIT_SCALE
) -> Tensor:
    """CLIP's zero-shot logits ``logit_scale * f @ W.T``.

    Args:
        image_features: ``(N, D)`` L2-normalised image features ``f``.
        classifier: ``(C, D)`` L2-normalised class embeddings ``W``.
        logit_scale: temperature (100 in CLIP and in every paper of this book).

    Returns:
        ``(N, C)`` logits (cosine similarities times ``logit_scale``).
    """
    if image_features.ndim != 2 or classifier.ndim != 2:
        raise ValueError(
            f"zero_shot_logits expects (N, D) image features and a (C, D) classifier, got "
            f"{tuple(image_features.shape)} and {tuple(classifier.shape)}."
        )
    if image_features.shape[1] != classifier.shape[1]:
        raise ValueError(
            f"Feature dimensions differ: image features have D={image_features.shape[1]}, "
            f"the classifier has D={classifier.shape[1]}; were they made by the same backbone? "
            "(A (D, C) classifier needs a .T.)"
        )
    classifier = classifier.to(device=image_features.device, dtype=image_features.dtype)
    return logit_scale * image_features @ classifier.T
