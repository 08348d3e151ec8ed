"""FD-Align: feature-discrimination alignment (Song et al., NeurIPS 2023).

* :mod:`.core`: class and spurious prototypes, the spurious KL, the objective and SPC;
* :mod:`.train`: the encoder fine-tuned through the one loop (:func:`train_fd_align`);
* :mod:`.config`, :mod:`.runner`: the options (and the chapter presets) and the registered
  ``fd-align`` method.

Which blocks of the image encoder train, and the fine-tuned backbone, are
:mod:`fewclip_tutorial.encoders`.  The public names are re-exported here.
"""

from fewclip_tutorial.encoders import finetuned_backbone, trainable_parameter_names
from fewclip_tutorial.methods.fd_align.config import (
    AUTHORS_BASE_LR,
    FD_ALIGN_PRESETS,
    FDAlignConfig,
    authors_base_lr,
    paper_options,
    preset,
)
from fewclip_tutorial.methods.fd_align.core import (
    FDAlignLoss,
    SPCResult,
    class_prototypes,
    classification_logits,
    fd_align_loss,
    spurious_distribution,
    spurious_kl,
    spurious_prototype_correction,
    spurious_prototypes,
    trained_head,
)
from fewclip_tutorial.methods.fd_align.runner import run_fd_align, spurious_templates
from fewclip_tutorial.methods.fd_align.train import (
    FDAlignResult,
    encode_pair,
    head_of,
    train_fd_align,
    train_transform,
)

__all__ = [
    "AUTHORS_BASE_LR",
    "FD_ALIGN_PRESETS",
    "FDAlignConfig",
    "FDAlignLoss",
    "FDAlignResult",
    "SPCResult",
    "authors_base_lr",
    "class_prototypes",
    "classification_logits",
    "encode_pair",
    "fd_align_loss",
    "finetuned_backbone",
    "head_of",
    "paper_options",
    "preset",
    "run_fd_align",
    "spurious_distribution",
    "spurious_kl",
    "spurious_prototype_correction",
    "spurious_prototypes",
    "spurious_templates",
    "train_fd_align",
    "train_transform",
    "trained_head",
    "trainable_parameter_names",
]
