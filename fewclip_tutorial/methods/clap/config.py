"""CLAP's options, declared once: the trainers' :class:`CLAPConfig` and the ``clap``
method's :class:`CLAPOptions` (the variant, the trainer settings, the evaluation).

The command line and :func:`~fewclip_tutorial.methods.registry.run_method` read
:class:`CLAPOptions` (:func:`~fewclip_tutorial.methods.registry.config_options`, which lists
the trainer settings in place of its ``training`` field).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fewclip_tutorial.attacks import STEP_SIZES
from fewclip_tutorial.methods.registry import option

__all__ = ["CLAPConfig", "CLAPOptions"]


@dataclass(frozen=True)
class CLAPConfig:
    """CLAP's training settings, declared once (the trainers, :class:`CLAPOptions`, the CLI).

    Defaults: the authors' small-dataset protocol (``runs/Results_CLAP_ViTB/PACS/config.yml``,
    ``main/trainer.py``): Adam at a constant 1e-4 for 8000 steps, ``tau = 0.5``, ``tau_c = 1``,
    ``lambda_c = 1``, a batch just above the number of classes.  They stopped on the training
    loss (patience 5 checks); we keep the best state on validation, step 0 (the identity) included.
    """

    steps: int = option(8000, "Adam steps (the authors' total_steps)")
    lr: float = option(1e-4, "Adam learning rate, constant")
    batch_size: int = option(
        0, "prompts (or images) per step; 0: smallest multiple of 8 above the number of classes"
    )
    tau: float = option(0.5, "InfoNCE temperature (paper: 0.5 small datasets, else 0.3)")
    tau_c: float = option(1.0, "temperature of the class-name term")
    lambda_c: float = option(1.0, "weight of the class-name term (paper: 1 or 1e-4)")
    loss_form: str = option(
        "cross_view",
        "cross_view (the paper's equation) or symmetric_simclr (the authors' code)",
        ["cross_view", "symmetric_simclr"],
    )
    hidden: int = option(256, "hidden width of the disentangle network")
    eval_every: int = option(500, "validate every this many steps")
    patience: int = option(5, "stop after this many evaluations without gain (0: never)")
    select_best: bool = option(True, "keep the best validated step (false: the last step)")


@dataclass(frozen=True)
class CLAPOptions:
    """CLAP: a residual network on CLIP features trained with augmented prompts.

    The options of the ``clap`` method (``fewclip run clap --help`` lists them).
    """

    variant: str = option(
        "clap", "clap (augmented prompts) or im-aug (augmented images)", ["clap", "im-aug"]
    )
    training: CLAPConfig = field(default_factory=CLAPConfig)
    lam: str = option("val", "inference weight: a number, or 'val' = chosen on validation")
    ign: bool = option(False, "insert Gaussian noise tokens into augmented prompts")
    attack_images: int = option(0, "test images attacked with FGSM/PGD-20/CW-20 (0: off)")
    attack_step: str = option(
        "clap", "PGD/CW step: clap (eps/10, the authors') or quarter (eps/4)", sorted(STEP_SIZES)
    )
    probe: bool = option(False, "report a few-shot linear probe on the refined image features")
