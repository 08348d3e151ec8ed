"""The options of ``fd-align``, declared once, and the presets of the chapter's settings.

The command line, :func:`~fewclip_tutorial.methods.registry.run_method`, the trainer and
the runner read :class:`FDAlignConfig` (:func:`~fewclip_tutorial.methods.registry.config_options`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fewclip_tutorial.methods.registry import option

__all__ = ["FD_ALIGN_PRESETS", "FDAlignConfig", "preset"]


@dataclass(frozen=True)
class FDAlignConfig:
    """FD-Align (Song et al., NeurIPS 2023): fine-tune the image encoder while keeping its
    distribution over spurious (style) prototypes close to the frozen model's.

    Every option of FD-Align, declared once (the CLI and ``run_method`` read them here).

    The defaults are the embedded setting (``shapeworld-tiny`` on a CPU); the paper's
    setting is ``FD_ALIGN_PRESETS["colab"]``.  The embedded learning rate follows one rule
    that involves neither FD-Align's loss nor validation or test data: the largest of
    1e-3, 3e-4 and 1e-4 at which *plain fine-tuning* (``beta=0``, AdamW, 20 epochs) keeps
    its training cross-entropy below that of the unchanged encoder on the same batches in
    every epoch (the FD-Align chapter runs this check).  At 1e-3 the first epoch raises it.
    AdamW rather than the paper's SGD: its step does not depend on the gradient scale of a
    small model; the paper's SGD is the ``"colab"`` preset.
    """

    alpha: float = option(1.0, "weight of the classification loss (paper: 1)")
    beta: float = option(20.0, "weight of the spurious KL (paper: 20; 0 = plain fine-tuning)")
    kl_direction: str = option(
        "paper", "paper: KL(P_ft || P_frozen); code: KL(P_frozen || P_ft)", ["paper", "code"]
    )
    kl_reduction: str = option(
        "batchmean",
        "batchmean: per-image KL (paper); elementwise-mean: / S prototypes (authors' code)",
        ["batchmean", "elementwise-mean"],
    )
    head: str = option(
        "fixed",
        "fixed: score against the class prototypes (paper); trained: a linear head "
        "initialised from them (authors' code)",
        ["fixed", "trained"],
    )
    spc: bool = option(True, "Spurious Prototype Correction (Isolation Forest + k-means)")
    keep: float = option(0.75, "SPC: templates kept, a fraction <= 1 or a count > 1 (paper 60/80)")
    n_clusters: int = option(20, "SPC: k-means clusters = spurious prototypes (paper: 20)")
    templates: str = option(
        "auto",
        "prototype templates: auto (ShapeWorld's style templates, else CLIP's 80), dataset, "
        "imagenet",
        ["auto", "dataset", "imagenet"],
    )
    blocks: int = option(
        2, "trainable part: -1 = whole image encoder (paper), 0 = output head, n = last n blocks"
    )
    epochs: int = option(20, "fine-tuning epochs; the best epoch (or the start) kept on validation")
    lr: float = option(3e-4, "peak learning rate, cosine decay per step")
    optimizer: str = option(
        "adamw",
        "sgd (Nesterov 0.9, as the paper) or adamw; both with weight decay",
        ["sgd", "adamw"],
    )
    weight_decay: float = option(5e-4, "weight decay (paper: 5e-4)")
    batch_size: int = option(32, "images per step (paper: 256)")
    augment: bool = option(True, "random resized crop (scale 0.08-1, no flip), as the authors")
    sampling: str = option(
        "loader",
        "loader: a shuffling DataLoader; seeded: batches and crops seeded by (seed, epoch, "
        "image), the same in 1 or N processes (used under torchrun)",
        ["loader", "seeded"],
    )
    tip_adapter: bool = option(False, "also run Tip-Adapter on the fine-tuned encoder")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"{f.name}={getattr(self, f.name)!r} is unknown; use one of {choices}."
                )
        if isinstance(self.epochs, bool) or int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"epochs={self.epochs} and batch_size={self.batch_size} must be >= 1.")
        if self.lr < 0 or self.alpha < 0 or self.beta < 0:
            raise ValueError(f"lr={self.lr}, alpha={self.alpha}, beta={self.beta} must be >= 0.")

    def options(self) -> dict[str, Any]:
        """``{name: value}``, ready for ``run_method("fd-align", **options)``."""
        return dataclasses.asdict(self)


#: The schedule of each chapter setting.  ``"colab"`` is the paper's: the whole ViT image
#: encoder, 60 epochs, SGD with Nesterov momentum 0.9 and weight decay 5e-4, batch 256,
#: lr 5e-5 (the authors' ImageNet rate; their EuroSAT 16-shot rate, 9e-5 scaled by
#: 160/256 images, is 5.6e-5), CLIP's 80 templates, SPC keeping 60 of them in 20 clusters.
FD_ALIGN_PRESETS: dict[str, FDAlignConfig] = {
    "embedded": FDAlignConfig(),
    "colab": FDAlignConfig(
        blocks=-1, epochs=60, optimizer="sgd", lr=5e-5, batch_size=256, templates="auto"
    ),
}


def preset(setup_name: str, **overrides: Any) -> FDAlignConfig:
    """The preset of a chapter setup: ``"embedded"``, else the paper's (``"colab"``...)."""
    base = FD_ALIGN_PRESETS["embedded" if setup_name == "embedded" else "colab"]
    return dataclasses.replace(base, **overrides)
