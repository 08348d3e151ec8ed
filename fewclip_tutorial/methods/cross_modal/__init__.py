"""Cross-modal adaptation (Lin et al., CVPR 2023, "Multimodality helps unimodality").

* :mod:`.core`: text samples, the cross-modal head, mixed batches, WiSE-FT;
* :mod:`.train`: one trainer for the linear probe and partial fine-tuning, and the
  searches on the validation split;
* :mod:`.config`, :mod:`.runner`: the options and the registered ``cross-modal`` method.

Splitting the image encoder for partial fine-tuning is :mod:`fewclip_tutorial.encoders`.
The public names are re-exported here.
"""

from fewclip_tutorial.encoders import VisualSplit, encode_split_through, split_visual_encoder
from fewclip_tutorial.methods.cross_modal.config import (
    DEFAULT_ITERS,
    GRIDS,
    PARTIAL_FT_LOGIT_SCALE,
    PARTIAL_GRIDS,
    CrossModalConfig,
)
from fewclip_tutorial.methods.cross_modal.core import (
    CrossModalHead,
    MixedBatch,
    build_mixed_batch,
    class_prototypes,
    epoch_batches,
    mixed_batches,
    text_samples,
    wise_ft,
)
from fewclip_tutorial.methods.cross_modal.runner import run_cross_modal
from fewclip_tutorial.methods.cross_modal.train import (
    CrossModalResult,
    sweep_templates,
    train_cross_modal,
    train_head,
    train_partial_finetune,
)

__all__ = [
    "DEFAULT_ITERS",
    "GRIDS",
    "PARTIAL_FT_LOGIT_SCALE",
    "PARTIAL_GRIDS",
    "CrossModalConfig",
    "CrossModalHead",
    "CrossModalResult",
    "MixedBatch",
    "VisualSplit",
    "build_mixed_batch",
    "class_prototypes",
    "encode_split_through",
    "epoch_batches",
    "mixed_batches",
    "run_cross_modal",
    "split_visual_encoder",
    "sweep_templates",
    "text_samples",
    "train_cross_modal",
    "train_head",
    "train_partial_finetune",
    "wise_ft",
]
