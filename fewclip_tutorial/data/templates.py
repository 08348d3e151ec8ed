"""Prompt templates: CLIP's 80 ImageNet prompts, Tip-Adapter's 7, and per-dataset prompts.

Every template is a plain string with exactly one ``"{}"`` placeholder for the
class name, so ``template.format(classname)`` gives the prompt.

* :data:`IMAGENET_TEMPLATES` -- the 80 hand-written prompts of the CLIP paper
  (Radford et al., 2021), taken from ``open_clip.zero_shot_metadata``.
* :data:`SIMPLE_IMAGENET_TEMPLATES` / :data:`TIP_ADAPTER_TEMPLATES` -- the
  7-prompt subset used by Tip-Adapter (Zhang et al., 2022) for ImageNet.
* :data:`DATASET_TEMPLATES` -- one short, dataset-specific prompt per dataset in
  the spirit of CoOp's hand-crafted prompts (written for this package).
"""

from __future__ import annotations

from collections.abc import Sequence

from open_clip.zero_shot_metadata import (
    OPENAI_IMAGENET_TEMPLATES as _OPENAI_TEMPLATE_FNS,
)
from open_clip.zero_shot_metadata import (
    SIMPLE_IMAGENET_TEMPLATES as _SIMPLE_TEMPLATE_FNS,
)

__all__ = [
    "DATASET_TEMPLATES",
    "DEFAULT_TEMPLATES",
    "IMAGENET_TEMPLATES",
    "SIMPLE_IMAGENET_TEMPLATES",
    "TIP_ADAPTER_TEMPLATES",
    "format_prompts",
    "get_templates",
]


def _as_format_strings(template_fns: Sequence) -> list[str]:
    """Turn open_clip's ``lambda c: f"..."`` templates into ``"{}"`` format strings."""
    return [fn("{}") for fn in template_fns]


#: CLIP's 80 ImageNet prompt templates (``"a bad photo of a {}."``, ...).
IMAGENET_TEMPLATES: list[str] = _as_format_strings(_OPENAI_TEMPLATE_FNS)

#: open_clip's 7-template "simple" ImageNet subset.
SIMPLE_IMAGENET_TEMPLATES: list[str] = _as_format_strings(_SIMPLE_TEMPLATE_FNS)

#: The 7 ImageNet templates used by Tip-Adapter (a subset of the 80 CLIP templates).
TIP_ADAPTER_TEMPLATES: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

#: The plain single prompt used when a dataset has nothing better.
DEFAULT_TEMPLATES: list[str] = ["a photo of a {}."]

#: Hand-written, dataset-specific prompts (one per dataset, CoOp style).
DATASET_TEMPLATES: dict[str, list[str]] = {
    "eurosat": ["a centered satellite photo of {}."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "dtd": ["{} texture."],
    "flowers102": ["a photo of a {}, a type of flower."],
    "caltech101": ["a photo of a {}."],
    "food101": ["a photo of {}, a type of food."],
    "cifar10": ["a low resolution photo of a {}."],
    "cifar100": ["a low resolution photo of a {}."],
    "imagenet": list(TIP_ADAPTER_TEMPLATES),
}


def get_templates(dataset: str) -> list[str]:
    """The per-dataset prompt list for ``dataset`` (a copy); unknown names raise ``KeyError``."""
    try:
        return list(DATASET_TEMPLATES[dataset])
    except KeyError:
        known = ", ".join(sorted(DATASET_TEMPLATES))
        raise KeyError(
            f"No templates registered for dataset {dataset!r}; known: {known}. "
            "Pass your own list of '{}' templates instead."
        ) from None


def format_prompts(templates: Sequence[str], classname: str) -> list[str]:
    """Fill every template with ``classname``: ``T`` templates -> ``T`` prompts.

    Raises:
        ValueError: if a template does not contain exactly one ``"{}"`` placeholder.
    """
    if isinstance(templates, str):
        raise ValueError(
            "format_prompts expects a list of templates, got a single string; "
            f"wrap it in a list: [{templates!r}]."
        )
    prompts = []
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(
                f"Template {template!r} must contain exactly one '{{}}' placeholder for the "
                "class name, e.g. 'a photo of a {}.'."
            )
        prompts.append(template.replace("{}", classname))
    return prompts
