"""The options of ``cross-modal``, declared once, and the method's constants.

The command line, :func:`~fewclip_tutorial.methods.registry.run_method` and the runner
read :class:`CrossModalConfig` (:func:`~fewclip_tutorial.methods.registry.config_options`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fewclip_tutorial.methods.registry import option

__all__ = ["DEFAULT_ITERS", "GRIDS", "PARTIAL_FT_LOGIT_SCALE", "PARTIAL_GRIDS", "CrossModalConfig"]

#: Logit scale of partial fine-tuning in the paper: exp(4) ≈ 54.6.
PARTIAL_FT_LOGIT_SCALE: float = math.exp(4.0)
#: Optimiser steps per configuration (the paper: 12,800).
DEFAULT_ITERS: int = 1000

#: Hyperparameter grids (the authors' ``HYPER_DICT["linear"]`` is "paper").
GRIDS: dict[str, dict[str, tuple[float, ...] | tuple[int, ...]]] = {
    "paper": {"lrs": (1e-3, 1e-4), "weight_decays": (0.0, 1e-2, 1e-4), "batch_sizes": (8, 32)},
    "small": {"lrs": (1e-3, 1e-4), "weight_decays": (0.0, 1e-2), "batch_sizes": (8,)},
}

#: Grids of partial fine-tuning.  ``"paper"`` is the authors' ``HYPER_DICT["partial"]``
#: (engine/optimizer/default.py, linzhiqiu/cross_modal_adaptation, run by
#: partial_finetuning.sh): 9 configurations, each chosen on the few-shot validation split.
#: ``"single"`` is the one configuration this package ran before (lr 1e-4, ten times the
#: authors' largest; no weight decay; batch 8).
PARTIAL_GRIDS: dict[str, dict[str, tuple[float, ...] | tuple[int, ...]]] = {
    "paper": {"lrs": (1e-5, 1e-6, 1e-7), "weight_decays": (0.0, 1e-3, 1e-5), "batch_sizes": (8,)},
    "single": {"lrs": (1e-4,), "weight_decays": (0.0,), "batch_sizes": (8,)},
}


@dataclass(frozen=True)
class CrossModalConfig:
    """Cross-modal adaptation (Lin et al., CVPR 2023): class-name text embeddings as extra
    training samples of a linear head initialised from the zero-shot classifier.

    The linear head, its WiSE-FT average or partial fine-tuning, on one episode.
    """

    variant: str = option(
        "linear",
        "linear head, its WiSE-FT average with the zero-shot head, or partial fine-tuning",
        ["linear", "wise-ft", "partial"],
    )
    modality: str = option(
        "cross",
        "'cross': image + text samples; 'image': the uni-modal probe, same head",
        ["cross", "image"],
    )
    iters: int = option(DEFAULT_ITERS, "optimiser steps per configuration (paper: 12800)")
    wise_weight: float = option(0.5, "WiSE-FT weight of the learned head, in [0, 1]")
    templates: int = option(0, "text samples per class: the first N templates (0: all)")
    flip: bool | None = option(
        None,
        "add the horizontally flipped view of each training image (default: the paper's "
        "yes, unless the dataset's classes are not mirror-invariant, as ShapeWorld's)",
    )
    init: str = option("text", "head initialisation", ["text", "random"])
    grid: str = option(
        "auto",
        "hyperparameter grid of the linear head and WiSE-FT: 'paper' (12 configs), 'small' "
        "(4), 'auto' (paper on CUDA)",
        ["auto", "paper", "small"],
    )
    partial_grid: str = option(
        "paper",
        "hyperparameter grid of variant 'partial': 'paper', the authors' (lr 1e-5/1e-6/1e-7 x "
        "weight decay 0/1e-3/1e-5, batch 8: 9 configs); 'single': lr 1e-4, no weight decay, "
        "batch 8 (the package's earlier run)",
        list(PARTIAL_GRIDS),
    )
