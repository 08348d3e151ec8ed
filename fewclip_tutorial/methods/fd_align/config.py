"""The options of ``fd-align``, declared once, and the presets of the chapter's settings.

The command line, :func:`~fewclip_tutorial.methods.registry.run_method`, the trainer and
the runner read :class:`FDAlignConfig` (:func:`~fewclip_tutorial.methods.registry.config_options`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fewclip_tutorial.methods.registry import option

__all__ = [
    "AUTHORS_BASE_LR",
    "AUTHORS_LR_BATCH",
    "FD_ALIGN_PRESETS",
    "FDAlignConfig",
    "authors_base_lr",
    "paper_options",
    "preset",
]


#: The authors' fine-tuning rates for ViT-B/32 before scaling, per dataset and shot count
#: (``full_lr`` of ``config/lr/lr_config.py`` in ``skingorz/FD-Align``; one number where
#: they use one rate for every shot count).  Keyed by this package's dataset names.
AUTHORS_BASE_LR: dict[str, float | dict[int, float]] = {
    "imagenet": 5e-5,
    "eurosat": {1: 2e-4, 2: 2e-4, 4: 3e-4, 8: 1e-4, 16: 9e-5},
    "dtd": {1: 2e-4, 2: 1e-4, 4: 2e-4, 8: 2e-4, 16: 2e-4},
    "caltech101": {1: 5e-6, 2: 6e-5, 4: 1e-4, 8: 5e-6, 16: 5e-4},
    "fgvc_aircraft": {1: 5e-5, 2: 5e-5, 4: 5e-5, 8: 5e-5, 16: 1e-5},
    "sun397": {1: 4e-5, 2: 8e-5, 4: 9e-5, 8: 1e-4, 16: 1e-4},
    "ucf101": {1: 1e-4, 2: 9e-5, 4: 6e-5, 8: 5e-5, 16: 6e-5},
    "flowers102": 7e-5,
    "food101": 2e-5,
    "oxford_pets": 6e-5,
    "stanford_cars": 5e-5,
}

#: The images per step the authors' rates are quoted for (their ``lr_scale`` divides by it).
AUTHORS_LR_BATCH = 256


def authors_base_lr(dataset: str | None, shots: int | None) -> float:
    """The authors' rate for ``dataset`` at ``shots`` before the batch scaling
    (:data:`AUTHORS_BASE_LR`); their ImageNet rate, 5e-5, for datasets they did not tune
    (``shapeworld``, ``cifar10``...) or when ``shots`` is not given for a per-shot dataset."""
    rate = AUTHORS_BASE_LR.get(dataset or "imagenet", AUTHORS_BASE_LR["imagenet"])
    if not isinstance(rate, dict):
        return float(rate)
    if shots is None:
        return float(AUTHORS_BASE_LR["imagenet"])  # type: ignore[arg-type]
    if int(shots) not in rate:
        raise ValueError(
            f"the authors tuned {dataset!r} at shots {sorted(rate)}, not {shots}; pass lr= "
            "explicitly (with lr_scaling='batch' it is still scaled per batch)."
        )
    return float(rate[int(shots)])


@dataclass(frozen=True)
class FDAlignConfig:
    """FD-Align (Song et al., NeurIPS 2023): fine-tune the image encoder while keeping its
    distribution over spurious (style) prototypes close to the frozen model's.

    Every option of FD-Align, declared once (the CLI and ``run_method`` read them here).

    **The objective is the authors' code by default** (``modules/FD_Align_SCP_CoOp.py``
    and ``architectures/feature_extractor/clip.py`` in ``skingorz/FD-Align``): a linear head
    initialised from the class prototypes and trained with the encoder (``head="trained"``),
    the KL as their ``nn.KLDivLoss()`` computes it, ``KL(P_frozen || P_ft)`` averaged over
    all ``B x S`` elements (``kl_direction="code"``, ``kl_reduction="elementwise-mean"``),
    CLIP's own logit scale (``logit_scale=0``) and k-means seeded with 0.  The paper's
    equations (fixed prototypes, ``KL(P_ft || P_frozen)`` per image, Eq. of ``L_spurious``)
    are :meth:`paper`; ``paper()`` with ``logit_scale=100`` and ``kmeans_seed=-1`` is
    this package's former default.

    The schedule defaults are the embedded setting (``shapeworld-tiny`` on a CPU); the
    paper's is :func:`preset` ``("colab", shots=K)``.  The embedded learning rate follows one
    rule that involves neither FD-Align's loss nor validation or test data: the largest of
    1e-3, 3e-4 and 1e-4 at which *plain fine-tuning* (``beta=0``, AdamW, 20 epochs) keeps
    its training cross-entropy below that of the unchanged encoder on the same batches in
    every epoch (the FD-Align chapter runs this check).  At 1e-3 the first epoch raises it.
    AdamW rather than the paper's SGD: its step does not depend on the gradient scale of a
    small model; the paper's SGD is the ``"colab"`` preset.
    """

    alpha: float = option(1.0, "weight of the classification loss (paper and code: 1)")
    beta: float = option(
        20.0, "weight of the spurious KL (paper and code: 20; 0 = plain fine-tuning)"
    )
    kl_direction: str = option(
        "code",
        "code: KL(P_frozen || P_ft), the authors' KLDivLoss; paper: KL(P_ft || P_frozen)",
        ["code", "paper"],
    )
    kl_reduction: str = option(
        "elementwise-mean",
        "elementwise-mean: mean over B x S terms, the authors' KLDivLoss() (= per-image KL "
        "/ S prototypes); batchmean: per-image KL averaged over the batch (paper)",
        ["elementwise-mean", "batchmean"],
    )
    head: str = option(
        "trained",
        "trained: a linear head initialised from the scaled class prototypes and trained "
        "with the encoder (authors' code); fixed: score against the class prototypes (paper)",
        ["trained", "fixed"],
    )
    logit_scale: float = option(
        0.0,
        "tau of the prototypes and of the head's initial weights: 0 = the backbone's own "
        "learned scale (the authors: CLIP's logit_scale.exp(), 100 for ViT-B/32); > 0 forces it",
    )
    spc: bool = option(True, "Spurious Prototype Correction (Isolation Forest + k-means)")
    keep: float = option(0.75, "SPC: templates kept, a fraction <= 1 or a count > 1 (paper 60/80)")
    n_clusters: int = option(20, "SPC: k-means clusters = spurious prototypes (paper: 20)")
    kmeans_seed: int = option(
        0,
        "SPC: k-means random_state (authors: 0); -1 = the episode seed.  The Isolation Forest, "
        "unseeded in the authors' code, always takes the episode seed",
    )
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
    lr: float = option(3e-4, "peak learning rate, cosine decay per step (see lr_scaling)")
    lr_scaling: str = option(
        "none",
        "none: lr as given; batch: lr x (images per step) / 256, the authors' rule for "
        "few-shot sets smaller than a batch (config/set_FT_CoOp_config.py)",
        ["none", "batch"],
    )
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
        if not self.logit_scale >= 0:
            raise ValueError(
                f"logit_scale={self.logit_scale} must be >= 0: 0 for the backbone's own scale, "
                "or the number to use (100: CLIP's)."
            )
        if isinstance(self.kmeans_seed, bool) or int(self.kmeans_seed) < -1:
            raise ValueError(
                f"kmeans_seed={self.kmeans_seed} must be an integer >= 0, or -1 for the episode "
                "seed."
            )

    def options(self) -> dict[str, Any]:
        """``{name: value}``, ready for ``run_method("fd-align", **options)``."""
        return dataclasses.asdict(self)

    def paper(self) -> FDAlignConfig:
        """This configuration with the paper's objective instead of the authors' code: the
        fixed class prototypes and ``KL(P_ft || P_frozen)`` per image, averaged over the
        batch (the paper's ``L_class`` and ``L_spurious``); the schedule is unchanged."""
        return dataclasses.replace(
            self, head="fixed", kl_direction="paper", kl_reduction="batchmean"
        )

    def resolved_logit_scale(self, backbone_scale: float) -> float:
        """``logit_scale``, or the backbone's own learned scale when it is 0."""
        return float(self.logit_scale) if self.logit_scale > 0 else float(backbone_scale)

    def resolved_lr(self, n_images: int) -> float:
        """The peak rate for ``n_images`` training images: ``lr``, times
        ``min(n_images, batch_size) / 256`` with ``lr_scaling="batch"`` (the authors'
        ``lr_scale = train_batchsize / 256``, ``train_batchsize = min(N, 256)``)."""
        if self.lr_scaling == "none":
            return float(self.lr)
        return float(self.lr) * min(int(n_images), int(self.batch_size)) / AUTHORS_LR_BATCH


#: The schedule of each chapter setting.  ``"colab"`` is the authors': the whole ViT image
#: encoder, 60 epochs, SGD with Nesterov momentum 0.9 and weight decay 5e-4, batch 256, the
#: rate scaled by the images per step over 256 (``lr_scaling="batch"``), CLIP's 80
#: templates, SPC keeping 60 of them in 20 clusters.  Its ``lr`` here is their ImageNet
#: rate; :func:`preset` puts in their rate for the setting's dataset and shot count.
FD_ALIGN_PRESETS: dict[str, FDAlignConfig] = {
    "embedded": FDAlignConfig(),
    "colab": FDAlignConfig(
        blocks=-1,
        epochs=60,
        optimizer="sgd",
        lr=5e-5,
        lr_scaling="batch",
        batch_size=256,
        templates="auto",
    ),
}


def paper_options() -> dict[str, Any]:
    """The options that turn the authors' objective into the paper's (fixed class
    prototypes, ``KL(P_ft || P_frozen)`` per image averaged over the batch): what
    :meth:`FDAlignConfig.paper` changes, as ``run_method("fd-align", ...)`` options."""
    default, paper = FDAlignConfig(), FDAlignConfig().paper()
    return {
        f.name: getattr(paper, f.name)
        for f in dataclasses.fields(FDAlignConfig)
        if getattr(paper, f.name) != getattr(default, f.name)
    }


def preset(
    setup_name: str, shots: int | None = None, dataset: str | None = None, **overrides: Any
) -> FDAlignConfig:
    """The preset of a chapter setup: ``"embedded"``, else the authors' (``"colab"``...).

    For the authors' setting ``lr`` is their base rate for the setup's dataset (or
    ``dataset``) at ``shots`` (:func:`authors_base_lr`), which the trainer scales by
    ``min(N, 256) / 256`` for ``N`` training images: at 1-shot EuroSAT (10 images)
    2e-4 x 10 / 256 = 7.8e-6, at 16 shots 9e-5 x 160 / 256 = 5.6e-5.  ``overrides`` win.
    """
    if setup_name == "embedded":
        return dataclasses.replace(FD_ALIGN_PRESETS["embedded"], **overrides)
    from fewclip_tutorial.settings import PRESETS

    name = dataset or (PRESETS[setup_name].dataset if setup_name in PRESETS else None)
    base = dataclasses.replace(FD_ALIGN_PRESETS["colab"], lr=authors_base_lr(name, shots))
    return dataclasses.replace(base, **overrides)
