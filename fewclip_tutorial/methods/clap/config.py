"""CLAP's options, declared once: the trainers' :class:`CLAPConfig` and the ``clap``
method's :class:`CLAPOptions` (the variant, the trainer settings, the evaluation).

The command line and :func:`~fewclip_tutorial.methods.registry.run_method` read
:class:`CLAPOptions` (:func:`~fewclip_tutorial.methods.registry.config_options`, which lists
the trainer settings in place of its ``training`` field).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from fewclip_tutorial.attacks import STEP_SIZES
from fewclip_tutorial.methods.registry import option

__all__ = ["CLAPConfig", "CLAPOptions"]


def _check_choices(config: object) -> None:
    """A clear error for a string option outside its choices (``fewclip run`` checks too)."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and isinstance(value, str) and value not in choices:
            raise ValueError(
                f"{type(config).__name__}.{f.name}={value!r}: choose one of {list(choices)}."
            )


@dataclass(frozen=True)
class CLAPConfig:
    """CLAP's training settings, declared once (the trainers, :class:`CLAPOptions`, the CLI).

    Defaults: the authors' small-dataset protocol (``runs/Results_CLAP_ViTB/PACS/config.yml``,
    ``configs/train_CLAP_VLCS_ViTB.yaml``, ``main/trainer.py``): Adam at a constant 1e-4 for
    8000 steps, ``tau = 0.5``, ``tau_c = 1``, ``lambda_c = 1``, the SimCLR loss of
    ``utils/loss.py`` for both terms, raw CLIP features into the network, the authors' prompt
    strings, hidden width 256, a batch just above the number of classes.  They stopped on the
    training loss (patience 5 checks); we keep the best state on validation, step 0 (the
    identity) included.
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
        "symmetric_simclr",
        "symmetric_simclr (the authors' utils/loss.py) or cross_view (the paper's equation)",
        ["symmetric_simclr", "cross_view"],
    )
    input_features: str = option(
        "raw",
        "network input: raw CLIP features (the authors' code) or L2-normalized ones",
        ["raw", "normalized"],
    )
    prompt_form: str = option(
        "authors",
        "prompt strings and augmentations: authors (gen_prompts.py, utils/data_utils.py) "
        "or grammatical (structured)",
        ["authors", "grammatical"],
    )
    hidden: int = option(256, "hidden width of the disentangle network")
    eval_every: int = option(500, "validate every this many steps")
    patience: int = option(5, "stop after this many evaluations without gain (0: never)")
    select_best: bool = option(True, "keep the best validated step (false: the last step)")

    def __post_init__(self) -> None:
        _check_choices(self)


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
    ign: bool = option(
        True, "insert Gaussian noise tokens into every augmented prompt (the authors' PACS/VLCS)"
    )
    noise_tokens: int = option(4, "IGN: noise tokens per augmented prompt (the authors' noise_len)")
    noise_std: float = option(0.02, "IGN: standard deviation of the noise embeddings")
    attack_images: int = option(0, "test images attacked with FGSM/PGD-20/CW-20 (0: off)")
    attack_convention: str = option(
        "authors",
        "authors: CE on raw cosines, eps and the [0,1] clamp on CLIP-normalized images "
        "(main/evaluate.py); pixel: [0,1] pixel space, logits x100",
        ["authors", "pixel"],
    )
    attack_step: str = option(
        "clap", "PGD/CW step: clap (eps/10, the authors') or quarter (eps/4)", sorted(STEP_SIZES)
    )
    probe: bool = option(False, "report a few-shot linear probe on the refined image features")

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.noise_tokens < 0:
            raise ValueError(f"CLAPOptions.noise_tokens={self.noise_tokens} must be >= 0.")
