"""CLAP: contrastive learning with augmented prompts (Cai et al., ECCV 2024).

* :mod:`.core`: the disentangle network, IGN noise tokens, InfoNCE and CLAP's loss,
  inference (refined features and classifier, the choice of ``lam``);
* :mod:`.prompts`: structured prompts and the paper's prompt augmentations;
* :mod:`.train`: the network trained on prompts (:func:`train_clap`) or on augmented
  image views (Im.Aug), through the one loop;
* :mod:`.config`, :mod:`.runner`: the options and the registered ``clap`` method.

The public names are re-exported here.
"""

from fewclip_tutorial.methods.clap.config import CLAPConfig, CLAPOptions
from fewclip_tutorial.methods.clap.core import (
    LAMBDA_GRID,
    NOISE_POSITIONS,
    ZERO_SHOT_PROMPTS,
    DisentangleNetwork,
    clap_loss,
    encode_text_raw,
    encode_text_with_noise,
    info_nce,
    lambda_scores,
    prompt_form_classifier,
    refine,
    refined_classifier,
    select_lambda,
)
from fewclip_tutorial.methods.clap.prompts import (
    AUGMENTATIONS,
    AUTHORS_AUGMENTATION_ORDER,
    PAPER_ART_STYLES,
    PAPER_COLORS,
    PAPER_IMAGE_TYPES,
    PAPER_SIZES,
    PROMPT_FORMS,
    AugmentConfig,
    PromptAttributes,
    augment_prompt,
    augment_structure,
    authors_augment,
    authors_word_lists,
    clap_prompts,
    dataset_factors,
    delete_art_style,
    delete_color,
    delete_image_type,
    delete_size,
    swap_order,
)
from fewclip_tutorial.methods.clap.runner import (
    IMAUG_PROMPTS_PER_CLASS,
    CLAPFit,
    run_clap,
    train_clap_episode,
)
from fewclip_tutorial.methods.clap.train import (
    CLAPResult,
    TextFeatureCache,
    default_batch_size,
    encode_images_raw,
    image_augmentation,
    train_clap,
    train_clap_image,
    train_clap_image_features,
)

# fmt: off
__all__ = [
    "AUGMENTATIONS", "AUTHORS_AUGMENTATION_ORDER", "AugmentConfig", "CLAPConfig", "CLAPFit",
    "CLAPOptions", "CLAPResult", "DisentangleNetwork", "IMAUG_PROMPTS_PER_CLASS", "LAMBDA_GRID",
    "NOISE_POSITIONS", "PAPER_ART_STYLES", "PAPER_COLORS", "PAPER_IMAGE_TYPES", "PAPER_SIZES",
    "PROMPT_FORMS", "PromptAttributes", "TextFeatureCache", "ZERO_SHOT_PROMPTS",
    "augment_prompt", "augment_structure", "authors_augment", "authors_word_lists", "clap_loss",
    "clap_prompts", "dataset_factors", "default_batch_size", "delete_art_style", "delete_color",
    "delete_image_type", "delete_size", "encode_images_raw", "encode_text_raw",
    "encode_text_with_noise", "image_augmentation", "info_nce", "lambda_scores",
    "prompt_form_classifier", "refine", "refined_classifier", "run_clap", "select_lambda",
    "swap_order", "train_clap", "train_clap_episode", "train_clap_image",
    "train_clap_image_features",
]
# fmt: on
