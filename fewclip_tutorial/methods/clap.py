"""CLAP: contrastive learning with augmented prompts (Cai et al., ECCV 2024).

CLAP keeps CLIP frozen and trains a small residual network on its features so that
*content* (the class) survives while *style* (colour, size, image type, art style) is
discounted.  It is trained on **text only**: a prompt ``"a [art style] [image type] of a
[object size] [object color] [class]"`` and an augmented copy (style words deleted, word
order swapped, noise tokens inserted) should map to the same point, close to the bare
class name.  At inference the same network refines image and text features.

Functional core (tensors / small dataclasses in, out):

* :class:`DisentangleNetwork` -- ``shortcut(x) + lam * W2(W1 SiLU(x) + b1)``, W2 zero-initialised.
* :class:`PromptAttributes`, :func:`clap_prompts` -- structured prompts and their product set.
* :func:`delete_size` (OSD), :func:`delete_color` (OCD), :func:`delete_image_type` (ITD),
  :func:`delete_art_style` (ASD), :func:`swap_order` (SPO), :func:`augment_prompt`.
* :func:`encode_text_with_noise` -- IGN: Gaussian noise token embeddings inside open_clip's text path.
* :func:`info_nce`, :func:`clap_loss` -- the contrastive objectives.
* :func:`refine`, :func:`refined_classifier`, :func:`select_lambda` -- inference.

Trainers, all through :func:`fewclip_tutorial.training.fit`: :func:`train_clap` (text,
the method), :func:`train_clap_image_features` / :func:`train_clap_image` (the paper's
Im.Aug baseline, augmented image views).  :func:`fit_clap` trains and selects in a runner
``Context``; :func:`run_clap_experiment` (the registered ``"clap"`` method) evaluates.

Deliberate choices (see each docstring):

* the residual branch is *pre-activation*, ``W2(W1 SiLU(x) + b1)``, as in the authors'
  ``main/networks.py`` (``ResMLP``), not ``W2(SiLU(W1 x + b1))``;
* InfoNCE defaults to the paper's cross-view form; ``form="symmetric_simclr"``
  reproduces the authors' objective (``InfoNCELoss`` of ``utils/loss.py`` for both terms);
* the inference weight ``lam`` and the training step are chosen on the few-shot
  **validation** split; the authors chose ``lam`` on the test domains
  (``search_alpha.py``) and stopped on the training loss (``main/trainer.py``).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fewclip_tutorial.data import shapeworld as sw
from fewclip_tutorial.device import autocast, float32_or_64, get_device
from fewclip_tutorial.metrics import accuracy
from fewclip_tutorial.training import FitResult, fit
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE, prompt_ensemble, prompt_text_features

# fmt: off
__all__ = [
    "AUGMENTATIONS", "CLAP_OPTIONS", "IMAUG_PROMPTS_PER_CLASS", "LAMBDA_GRID",
    "PAPER_ART_STYLES", "PAPER_COLORS", "PAPER_IMAGE_TYPES", "PAPER_SIZES",
    "ZERO_SHOT_PROMPTS", "AugmentConfig", "CLAPFit", "CLAPResult", "DisentangleNetwork",
    "PromptAttributes", "TextFeatureCache", "augment_prompt", "augment_structure", "clap_loss",
    "clap_prompts", "dataset_factors", "default_batch_size", "delete_art_style",
    "delete_color", "delete_image_type", "delete_size", "encode_text_with_noise", "fit_clap",
    "image_augmentation", "info_nce", "prompt_form_classifier", "refine", "refined_classifier",
    "register_exercises", "run_clap_experiment", "select_lambda", "swap_order", "train_clap",
    "train_clap_image", "train_clap_image_features",
]
# fmt: on

# ----------------------------------------------------------------------------- constants

#: Object colours and sizes of the paper's prompt set (ShapeWorld was built with the same lists).
PAPER_COLORS: tuple[str, ...] = tuple(sw.COLORS)
PAPER_SIZES: tuple[str, ...] = tuple(sw.SIZES)
#: Image types of the paper's prompt set.
PAPER_IMAGE_TYPES: tuple[str, ...] = (
    "painting", "sketch", "cartoon", "clipart", "photograph", "infograph", "mosaic art", "sculpture",
)  # fmt: skip
#: Art styles of the paper's prompt set (10 x 3 x 8 x 2 = 480 prompts per class).
PAPER_ART_STYLES: tuple[str, ...] = tuple(sw.ART_STYLES)

#: Inference weights ``lam`` tried on the validation split (the paper's picks, 0.056-0.208,
#: lie inside; 0 is plain CLIP, 1 is the training setting).
LAMBDA_GRID: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)

#: The paper's zero-shot prompt formats.  ``"NC"`` is the class name preceded by Gaussian
#: noise token embeddings (see :func:`encode_text_with_noise`).
ZERO_SHOT_PROMPTS: dict[str, str] = {
    "C": "{}",
    "PC": "a photo of a {}",
    "CP": "a {} in a photo",
    "NC": "{}",
}

#: Im.Aug on ShapeWorld renders one image per prompt for this many prompts per class
#: (the paper uses all 480; 64 keeps the CPU cost of encoding augmented views small).
IMAUG_PROMPTS_PER_CLASS: int = 64

NoisePosition = Literal["front", "middle", "end"]
NOISE_POSITIONS: tuple[str, ...] = ("front", "middle", "end")
LossForm = Literal["cross_view", "symmetric_simclr"]


# ----------------------------------------------------------------------------- network


class DisentangleNetwork(nn.Module):
    """CLAP's residual disentangle network (Cai et al., 2024, the network of Sec. 4).

    ``y = shortcut(x) + lam * W2(W1 SiLU(x) + b1)``

    * ``W1`` (``in_dim -> hidden``) has a bias ``b1``; ``W2`` (``hidden -> out_dim``) has
      **no bias and is zero-initialised**, so the network is the identity (or the
      shortcut) at initialisation, and exactly so for ``lam = 0``.
    * The activation is applied to the *input* (pre-activation), as in the authors'
      ``main/networks.py`` (``ResMLP.forward``: activation, linear, projection, plus ``x``);
      ``W2(SiLU(W1 x + b1))`` would be equally an identity at init.
    * When ``in_dim != out_dim`` the shortcut down/up-samples ``x`` by nearest-neighbour
      interpolation along the feature axis (``F.interpolate(mode="nearest")`` on ``(B, 1, D)``).

    Args:
        in_dim: ``D_in``, the CLIP feature dimension.
        out_dim: ``D_out`` (default ``in_dim``).
        hidden: width of the hidden layer (the paper uses 256-512 for ViT-B/16).
    """

    def __init__(self, in_dim: int, out_dim: int | None = None, hidden: int = 256) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden", hidden)):
            if int(value) < 1:
                raise ValueError(f"DisentangleNetwork: {name}={value} must be a positive integer.")
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        self.hidden = int(hidden)
        self.activation = nn.SiLU()
        self.linear = nn.Linear(self.in_dim, self.hidden, bias=True)  # W1, b1
        self.projection = nn.Linear(self.hidden, self.out_dim, bias=False)  # W2
        nn.init.zeros_(self.projection.weight)

    def shortcut(self, x: Tensor) -> Tensor:
        """``(..., D_in) -> (..., D_out)``: identity, or nearest-neighbour resampling."""
        if self.in_dim == self.out_dim:
            return x
        lead = x.shape[:-1]
        flat = x.reshape(-1, 1, self.in_dim)
        out = F.interpolate(flat, size=self.out_dim, mode="nearest")
        return out.reshape(*lead, self.out_dim)

    def residual(self, x: Tensor) -> Tensor:
        """The learned branch ``W2(W1 SiLU(x) + b1)``: ``(..., D_in) -> (..., D_out)``."""
        return self.projection(self.linear(self.activation(x)))

    def forward(self, x: Tensor, lam: float = 1.0) -> Tensor:
        """Refine features.

        Args:
            x: ``(..., D_in)`` CLIP features (image or text).
            lam: weight of the residual branch: 1 in training, chosen on validation at
                inference; ``lam = 0`` returns ``shortcut(x)`` exactly.

        Returns:
            ``(..., D_out)`` features, *not* normalised (see :func:`refine`).
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"DisentangleNetwork expects features of dimension {self.in_dim}, got shape "
                f"{tuple(x.shape)}; build the network with in_dim={x.shape[-1]}."
            )
        x = x.to(self.linear.weight.dtype)
        if lam == 0:
            return self.shortcut(x)
        return self.shortcut(x) + lam * self.residual(x)


# ----------------------------------------------------------------------------- prompts


def _article(phrase: str) -> str:
    """``"an"`` before a vowel letter, else ``"a"``."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _clean(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"PromptAttributes.{what} must be a string or None, got {value!r}.")
    value = " ".join(value.split())
    return value or None


@dataclass(frozen=True)
class PromptAttributes:
    """A CLAP prompt kept as structure, so augmentations act on attributes, not on text.

    Rendered (:meth:`render`) as ``"a [art style] [image type] of a [size] [colour] [class]"``
    or, once swapped by SPO, ``"a [size] [colour] [class] in [art style] [image type] style"``.
    Missing attributes (``None``) are left out; articles become ``"an"`` before a vowel.
    If the image type was deleted but an art style remains, the unswapped form uses the
    neutral noun ``"image"`` (``"a realistic image of a red circle"``) to stay grammatical.

    Attributes:
        classname: the class name (never removed by any augmentation).
        size, color, image_type, art_style: style attributes, ``None`` when absent.
        swapped: ``True`` after SPO (swapping prompt order).
    """

    classname: str
    size: str | None = None
    color: str | None = None
    image_type: str | None = None
    art_style: str | None = None
    swapped: bool = False

    def __post_init__(self) -> None:
        name = _clean(self.classname, "classname")
        if not name:
            raise ValueError("PromptAttributes needs a non-empty classname; pass e.g. 'circle'.")
        object.__setattr__(self, "classname", name)
        for attr in ("size", "color", "image_type", "art_style"):
            object.__setattr__(self, attr, _clean(getattr(self, attr), attr))

    def object_phrase(self) -> str:
        """``"[size] [colour] [class]"`` without the article."""
        return " ".join(w for w in (self.size, self.color, self.classname) if w)

    def render(self) -> str:
        """The prompt as text (single spaces, never empty, always contains the class name)."""
        obj = self.object_phrase()
        obj_np = f"{_article(obj)} {obj}"
        if self.image_type is None and self.art_style is None:
            return obj_np
        if self.swapped:
            medium = " ".join(w for w in (self.art_style, self.image_type) if w)
            return f"{obj_np} in {medium} style"
        medium = " ".join(w for w in (self.art_style, self.image_type or "image") if w)
        return f"{_article(medium)} {medium} of {obj_np}"

    def __str__(self) -> str:
        return self.render()


def _factor_values(values: Sequence[str] | None) -> list[str | None]:
    """An empty or ``None`` factor list means "factor absent" (a single ``None``)."""
    if values is None or len(values) == 0:
        return [None]
    if isinstance(values, str):
        raise TypeError(f"factor lists must be sequences of strings, got the string {values!r}.")
    return list(values)


def clap_prompts(
    classname: str,
    colors: Sequence[str] | None = PAPER_COLORS,
    sizes: Sequence[str] | None = PAPER_SIZES,
    image_types: Sequence[str] | None = PAPER_IMAGE_TYPES,
    art_styles: Sequence[str] | None = PAPER_ART_STYLES,
) -> list[PromptAttributes]:
    """All prompts ``"a [art style] [image type] of a [size] [colour] [class]"`` for one class.

    The product of the factor lists, ordered art style > image type > size > colour
    (480 prompts per class with the paper's lists).  An empty list drops that factor.
    ShapeWorld passes its own lists (``shapeworld.COLORS``, ``SIZES``, ``IMAGE_TYPES``,
    ``ART_STYLES``).
    """
    out = []
    for style, itype, size, color in itertools.product(
        _factor_values(art_styles),
        _factor_values(image_types),
        _factor_values(sizes),
        _factor_values(colors),
    ):
        out.append(
            PromptAttributes(classname, size=size, color=color, image_type=itype, art_style=style)
        )
    return out


# ----------------------------------------------------------------------------- augmentations


def delete_size(p: PromptAttributes) -> PromptAttributes:
    """OSD, object size deletion: drop the ``size`` attribute."""
    return replace(p, size=None)


def delete_color(p: PromptAttributes) -> PromptAttributes:
    """OCD, object colour deletion: drop the ``color`` attribute."""
    return replace(p, color=None)


def delete_image_type(p: PromptAttributes) -> PromptAttributes:
    """ITD, image type deletion: drop the ``image_type`` attribute."""
    return replace(p, image_type=None)


def delete_art_style(p: PromptAttributes) -> PromptAttributes:
    """ASD, art style deletion: drop the ``art_style`` attribute."""
    return replace(p, art_style=None)


def swap_order(p: PromptAttributes) -> PromptAttributes:
    """SPO, swapping prompt order: ``"a X of a Y"`` -> ``"a Y in X style"``."""
    return replace(p, swapped=True)


#: The paper's prompt augmentations by abbreviation, applied in this order.
AUGMENTATIONS: dict[str, Callable[[PromptAttributes], PromptAttributes]] = {
    "osd": delete_size,
    "ocd": delete_color,
    "itd": delete_image_type,
    "asd": delete_art_style,
    "spo": swap_order,
}


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities of the prompt augmentations (paper: OSD, OCD, SPO at 0.5; ITD, ASD off)."""

    osd: float = 0.5
    ocd: float = 0.5
    itd: float = 0.0
    asd: float = 0.0
    spo: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"AugmentConfig.{f.name}={v} must be a probability in [0, 1].")


def augment_structure(
    p: PromptAttributes, probs: AugmentConfig, rng: random.Random | np.random.Generator
) -> PromptAttributes:
    """Apply each augmentation of :data:`AUGMENTATIONS` independently with its probability.

    Exactly one uniform number is drawn per augmentation (five per call), so the
    random stream does not depend on which augmentations fired.
    """
    for name, fn in AUGMENTATIONS.items():
        if float(rng.random()) < getattr(probs, name):
            p = fn(p)
    return p


def augment_prompt(
    p: PromptAttributes,
    probs: AugmentConfig | None = None,
    rng: random.Random | np.random.Generator | None = None,
) -> str:
    """An augmented prompt as text: :func:`augment_structure` then :meth:`PromptAttributes.render`."""
    probs = AugmentConfig() if probs is None else probs
    rng = random.Random(0) if rng is None else rng
    return augment_structure(p, probs, rng).render()


# ----------------------------------------------------------------------------- IGN


def _text_tower(model: nn.Module) -> None:
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"encode_text_with_noise needs an open_clip CLIP model with a built-in text tower "
            f"(missing {missing}); CustomTextCLIP/CoCa models are not supported, use a "
            "standard open_clip CLIP (e.g. ViT-B-32-quickgelu or shapeworld-tiny)."
        )


def _eot_positions(model: nn.Module, tokens: Tensor) -> Tensor:
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        eos = getattr(model, "text_eos_id", None)
        if eos is None:
            raise ValueError("text_pool_type='eos' but the model has no text_eos_id.")
        return (tokens == eos).int().argmax(dim=-1)
    raise ValueError(
        f"encode_text_with_noise supports text_pool_type 'argmax' or 'eos', not {pool!r}; "
        "use a CLIP-style text tower that pools at the end-of-text token."
    )


def encode_text_with_noise(
    model: nn.Module,
    tokens: Tensor,
    n_noise: int = 4,
    std: float = 0.02,
    position: NoisePosition = "front",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """IGN: encode text with ``n_noise`` Gaussian token embeddings inserted (Cai et al., 2024).

    Reimplements open_clip's ``CLIP.encode_text`` step by step:
    ``token_embedding`` -> insert ``N(0, std^2)`` embeddings -> keep ``L`` positions ->
    ``+ positional_embedding`` -> ``transformer(x, attn_mask=model.attn_mask)`` ->
    ``ln_final`` -> the end-of-text (EOT) position, shifted by the insertion -> ``@ text_projection``.

    Insertion points (``e`` = EOT index of a row, real tokens at ``1 .. e-1``):
    ``"front"`` right after the start token (index 1), ``"middle"`` at ``1 + (e - 1) // 2``,
    ``"end"`` right before EOT (index ``e``).  The sequence grows to ``L + n_noise`` and is
    truncated back to the context length ``L``; when the shifted EOT would fall outside,
    the last kept positions before it are dropped and EOT is put at ``L - 1``.

    Args:
        model: an open_clip ``CLIP`` (frozen; gradients flow only if the caller allows).
        tokens: ``(B, L)`` token ids from the model's tokenizer.
        n_noise: number of noise tokens (0: exactly ``model.encode_text(tokens)``).
        std: standard deviation of the noise embeddings.
        position: ``"front"``, ``"middle"`` or ``"end"``.
        generator: CPU ``torch.Generator`` for the noise (the noise is drawn on the CPU
            and moved, so a seed gives the same noise on every device).
        noise: optional explicit ``(B, n_noise, W)`` embeddings to insert instead of
            sampling (``std`` and ``generator`` are then unused).  Inserting the token
            embedding of a word reproduces ``encode_text`` of the text with that word added.

    Returns:
        ``(B, D)`` text features, not normalised (like ``encode_text(normalize=False)``).
    """
    _text_tower(model)
    if position not in NOISE_POSITIONS:
        raise ValueError(f"position={position!r}; choose one of {NOISE_POSITIONS}.")
    if n_noise < 0:
        raise ValueError(f"n_noise={n_noise} must be >= 0.")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, L) token ids, got shape {tuple(tokens.shape)}.")
    cast_dtype = model.transformer.get_cast_dtype()
    batch, length = tokens.shape
    x = model.token_embedding(tokens).to(cast_dtype)  # (B, L, W)
    eot = _eot_positions(model, tokens)  # (B,)
    if n_noise > 0:
        width = x.shape[-1]
        if noise is None:
            noise = torch.randn(batch, n_noise, width, generator=generator) * std
        elif tuple(noise.shape) != (batch, n_noise, width):
            raise ValueError(
                f"noise must have shape (B, n_noise, W) = {(batch, n_noise, width)}, "
                f"got {tuple(noise.shape)}."
            )
        ext = torch.cat([x, noise.to(device=x.device, dtype=x.dtype)], dim=1)  # (B, L+n, W)
        if position == "front":
            ins = torch.ones_like(eot)
        elif position == "end":
            ins = eot.clone()
        else:
            ins = 1 + (eot - 1).clamp(min=0) // 2
        ins = ins.clamp(min=1)
        j = torch.arange(length + n_noise, device=tokens.device).unsqueeze(0)  # (1, L+n)
        ins_ = ins.unsqueeze(1)
        index = torch.where(
            j < ins_, j, torch.where(j < ins_ + n_noise, length + j - ins_, j - n_noise)
        )
        new_eot = eot + n_noise
        overflow = new_eot > length - 1
        index = index[:, :length].clone()
        index[overflow, length - 1] = eot[overflow]
        x = torch.gather(ext, 1, index.unsqueeze(-1).expand(-1, -1, ext.shape[-1]))
        eot = torch.where(overflow, torch.full_like(new_eot, length - 1), new_eot)
    x = x + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(batch, device=x.device), eot]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


# ----------------------------------------------------------------------------- losses


def info_nce(a: Tensor, b: Tensor, tau: float = 0.5, form: LossForm = "cross_view") -> Tensor:
    """InfoNCE between two views, row ``i`` of ``a`` paired with row ``i`` of ``b``.

    Features are L2-normalised first; ``s = a @ b.T / tau``.

    * ``form="cross_view"`` (the paper's equation): ``mean_i -log softmax_j(s_ij)[i]``, the
      negatives of ``a_i`` are the other rows of ``b`` only.
    * ``form="symmetric_simclr"`` (the authors' ``InfoNCELoss`` in ``utils/loss.py``,
      SimCLR's NT-Xent): ``2B`` rows; row ``a_i`` scores ``[a_i . b_j, a_i . a_k (k != i)]``,
      row ``b_i`` scores ``[b_i . a_j, b_i . b_k (k != i)]``, the positive is the cross-view pair.

    Args:
        a, b: ``(B, D)`` features.
        tau: temperature.

    Returns:
        scalar loss (mean over rows).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"info_nce needs two (B, D) tensors of the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}; pair row i of a with row i of b."
        )
    if tau <= 0:
        raise ValueError(f"tau={tau} must be > 0 (typical: 0.3-1.0).")
    a = F.normalize(float32_or_64(a), dim=-1)
    b = F.normalize(float32_or_64(b), dim=-1)
    n = a.shape[0]
    targets = torch.arange(n, device=a.device)
    s_ab = a @ b.T / tau
    if form == "cross_view":
        return F.cross_entropy(s_ab, targets)
    if form == "symmetric_simclr":
        eye = torch.eye(n, dtype=torch.bool, device=a.device)
        s_aa = (a @ a.T / tau).masked_fill(eye, float("-inf"))
        s_bb = (b @ b.T / tau).masked_fill(eye, float("-inf"))
        logits = torch.cat([torch.cat([s_ab, s_aa], 1), torch.cat([s_ab.T, s_bb], 1)], 0)
        return F.cross_entropy(logits, torch.cat([targets, targets]))
    raise ValueError(f"form={form!r}; choose 'cross_view' (paper) or 'symmetric_simclr' (code).")


def clap_loss(
    anchor: Tensor,
    augmented: Tensor,
    class_name_features: Tensor,
    tau: float = 0.5,
    tau_c: float = 1.0,
    lambda_c: float = 1.0,
    form: LossForm = "cross_view",
) -> Tensor:
    """CLAP's objective ``InfoNCE(prompt, augmented; tau) + lambda_c InfoNCE(augmented, class; tau_c)``.

    All inputs are *refined* features (after the network), ``(B, D)``, row-aligned:
    row ``i`` of ``class_name_features`` is the class-name prompt of prompt ``i``.
    ``form`` applies to **both** terms:

    * ``"cross_view"``: the paper's training loss (Sec. 4), negatives from the other view only;
    * ``"symmetric_simclr"``: the authors' code, ``main/trainer.py`` computing
      ``loss_text_modal(z_t, z_t_) + scale_coef * loss_align_content(z_t_, z_c)`` with both
      losses ``InfoNCELoss`` of ``utils/loss.py``.  Its class term has intra-view negatives
      among the class-name features, including repeats of the same class in a batch.

    Paper settings: ``tau`` 0.5 (small datasets) or 0.3, ``tau_c = 1``, ``lambda_c`` 1 or 1e-4.
    """
    loss = info_nce(anchor, augmented, tau, form)
    if lambda_c:
        loss = loss + lambda_c * info_nce(augmented, class_name_features, tau_c, form)
    return loss


# ----------------------------------------------------------------------------- inference


def refine(features: Tensor, network: DisentangleNetwork, lam: float = 1.0) -> Tensor:
    """``normalize(network(features, lam))``: ``(..., D_in) -> (..., D_out)``, applied to both modalities."""
    return F.normalize(float32_or_64(network(features, lam=lam)), dim=-1)


def refined_classifier(text_features: Tensor, network: DisentangleNetwork, lam: float) -> Tensor:
    """Zero-shot classifier from refined text features.

    Args:
        text_features: ``(C, D)`` (one prompt per class) or ``(C, M, D)`` (``M`` templates,
            the layout of :func:`fewclip_tutorial.zeroshot.prompt_text_features`).

    Returns:
        ``(C, D_out)``: each prompt refined, then CLIP's prompt ensemble (mean over ``M``,
        renormalised; :func:`fewclip_tutorial.zeroshot.prompt_ensemble`).
    """
    if text_features.dim() == 2:
        text_features = text_features.unsqueeze(1)
    if text_features.dim() != 3:
        raise ValueError(
            f"text_features must be (C, D) or (C, M, D), got shape {tuple(text_features.shape)}."
        )
    return prompt_ensemble(refine(text_features, network, lam))


@torch.no_grad()
def prompt_form_classifier(
    backbone: Any, classnames: Sequence[str], form: str, seed: int = 1
) -> Tensor:
    """CLIP's ``(C, D)`` zero-shot classifier for one of the paper's prompt forms.

    ``form`` is a key of :data:`ZERO_SHOT_PROMPTS`: ``"C"`` (the bare class name), ``"PC"``
    (``"a photo of a [class]"``), ``"CP"`` (``"a [class] in a photo"``) or ``"NC"`` (the class
    name after 4 Gaussian noise token embeddings, std 0.02, drawn with ``seed``; the
    paper's noisy-context probe).  Rows are L2-normalised.
    """
    if form not in ZERO_SHOT_PROMPTS:
        raise ValueError(f"Unknown prompt form {form!r}; use one of {list(ZERO_SHOT_PROMPTS)}.")
    texts = [ZERO_SHOT_PROMPTS[form].format(c) for c in classnames]
    if form != "NC":
        return backbone.encode_text(texts).float()
    dev = torch.device(backbone.device)
    tokens = backbone.tokenizer(texts).to(dev)
    gen = torch.Generator().manual_seed(seed)
    with autocast(dev):
        w = encode_text_with_noise(backbone.model, tokens, 4, 0.02, "front", gen)
    return F.normalize(w.float(), dim=-1)


@torch.no_grad()
def _lambda_scores(
    features: Tensor,
    labels: Tensor,
    text_features: Tensor,
    network: DisentangleNetwork,
    grid: Sequence[float],
) -> dict[float, tuple[float, float]]:
    """``{lam: (accuracy %, -cross-entropy)}`` of the refined zero-shot classifier."""
    device = next(network.parameters()).device
    f, t, y = features.to(device), text_features.to(device), labels.to(device)
    out = {}
    for lam in grid:
        logits = CLIP_LOGIT_SCALE * refine(f, network, lam) @ refined_classifier(t, network, lam).T
        acc = float((logits.argmax(-1) == y).float().mean() * 100.0)
        out[float(lam)] = (acc, -float(F.cross_entropy(logits, y)))
    return out


def select_lambda(
    val_features: Tensor,
    val_labels: Tensor,
    text_features: Tensor,
    network: DisentangleNetwork,
    grid: Sequence[float] = LAMBDA_GRID,
) -> tuple[float, dict[float, float]]:
    """Choose the inference weight ``lam`` on the **validation** split (the authors used test).

    A ``lam`` scores its zero-shot accuracy; equal accuracies (a 40-image split moves in
    steps of 2.5 points) are ordered by the cross-entropy at CLIP's logit scale, and exact
    ties go to the first (smallest, closest to CLIP) value of ``grid``.

    Args:
        val_features: ``(N, D)`` validation image features; val_labels: ``(N,)``.
        text_features: ``(C, D)`` or ``(C, M, D)`` raw text features.
        grid: candidate values.

    Returns:
        ``(best_lam, {lam: val accuracy in percent})``.
    """
    grid = list(grid)
    if not grid:
        raise ValueError("select_lambda got an empty grid; pass e.g. LAMBDA_GRID.")
    was_training = network.training
    network.eval()
    scores = _lambda_scores(val_features, val_labels, text_features, network, grid)
    network.train(was_training)
    best = max(scores, key=lambda k: (*scores[k], -grid.index(k)))
    return best, {k: v[0] for k, v in scores.items()}


# ----------------------------------------------------------------------------- training


def _setting(default: Any, help: str, choices: list | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class CLAPConfig:
    """CLAP's training settings, declared once (the trainers, :data:`CLAP_OPTIONS`, the CLI).

    Defaults: the authors' small-dataset protocol (``runs/Results_CLAP_ViTB/PACS/config.yml``,
    ``main/trainer.py``): Adam at a constant 1e-4 for 8000 steps, ``tau = 0.5``, ``tau_c = 1``,
    ``lambda_c = 1``, a batch just above the number of classes.  They stopped on the training
    loss (patience 5 checks); we keep the best state on validation, step 0 (the identity) included.
    """

    steps: int = _setting(8000, "Adam steps (the authors' total_steps)")
    lr: float = _setting(1e-4, "Adam learning rate, constant")
    batch_size: int = _setting(
        0, "prompts (or images) per step; 0: smallest multiple of 8 above the number of classes"
    )
    tau: float = _setting(0.5, "InfoNCE temperature (paper: 0.5 small datasets, else 0.3)")
    tau_c: float = _setting(1.0, "temperature of the class-name term")
    lambda_c: float = _setting(1.0, "weight of the class-name term (paper: 1 or 1e-4)")
    loss_form: str = _setting(
        "cross_view",
        "cross_view (the paper's equation) or symmetric_simclr (the authors' code)",
        ["cross_view", "symmetric_simclr"],
    )
    hidden: int = _setting(256, "hidden width of the disentangle network")
    eval_every: int = _setting(500, "validate every this many steps")
    patience: int = _setting(5, "stop after this many evaluations without gain (0: never)")
    select_best: bool = _setting(True, "keep the best validated step (false: the last step)")


def default_batch_size(num_classes: int) -> int:
    """The smallest multiple of 8 above ``num_classes``: the authors' batch rule.

    Their configs use a batch "larger than the number of class names": 8 for PACS (7
    classes) and VLCS (5), 96 for OfficeHome (65), 384 for DomainNet (345).  The rule
    gives 8, 8, 72 and 352 for those, and 16 for ShapeWorld's 10 classes.
    """
    return 8 * (max(int(num_classes), 1) // 8 + 1)


@dataclass
class CLAPResult(FitResult):
    """:class:`~fewclip_tutorial.training.FitResult` of a CLAP network, plus the network.

    Attributes:
        network: the kept :class:`DisentangleNetwork` (eval); the identity if ``best_step == 0``.
        cached_strings: distinct strings encoded by text training (``None`` for images).
    """

    network: DisentangleNetwork | None = None
    cached_strings: int | None = None


class TextFeatureCache:
    """Text features by string: each distinct string is encoded once.

    Prompt augmentations produce a finite set of strings, so training with IGN off
    never encodes a string twice.

    Args:
        encode_fn: ``list[str] -> (T, D)`` features (normalised by the caller's encoder).
        device: where the returned features live.
    """

    def __init__(self, encode_fn: Callable[[list[str]], Tensor], device: torch.device) -> None:
        self.encode_fn = encode_fn
        self.device = device
        self._store: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def __call__(self, texts: Sequence[str]) -> Tensor:
        """``T`` strings -> ``(T, D)`` features."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._store))
        if missing:
            with torch.no_grad():
                feats = self.encode_fn(missing).detach().float().to(self.device)
            for t, f in zip(missing, feats, strict=True):
                self._store[t] = f
        return torch.stack([self._store[t] for t in texts])


#: Text-feature caches by (backbone identifier, device): the text encoder is frozen, so
#: sweeps over shots and seeds encode each string once.
_TEXT_CACHES: dict[tuple[str, str], TextFeatureCache] = {}


def _text_cache_for(text_encoder: Any, device: torch.device) -> TextFeatureCache:
    if hasattr(text_encoder, "encode_text") and hasattr(text_encoder, "tokenizer"):
        encode = text_encoder.encode_text
    elif callable(text_encoder):
        encode = lambda texts: F.normalize(text_encoder(texts).float(), dim=-1)  # noqa: E731
    else:
        raise TypeError(
            "text_encoder must be a Backbone (with .encode_text and .tokenizer) or a function "
            "list[str] -> (T, D) features."
        )
    ident = getattr(text_encoder, "identifier", None)
    if not isinstance(ident, str):
        return TextFeatureCache(encode, device)
    return _TEXT_CACHES.setdefault((ident, str(device)), TextFeatureCache(encode, device))


def _batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Index batches without replacement, a fresh permutation every pass (a short tail is dropped)."""
    batch_size = min(batch_size, n)
    while True:
        perm = rng.sample(range(n), n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def _train_network(
    dim: int,
    batch_loss: Callable[[DisentangleNetwork, list[int]], Tensor],
    n: int,
    num_classes: int,
    config: CLAPConfig,
    *,
    seed: int,
    val_fn: Callable[[DisentangleNetwork], Any] | None,
    device: torch.device,
    progress: bool,
    desc: str,
) -> CLAPResult:
    """A seeded identity network trained by Adam on ``batch_loss(network, indices)`` through ``fit``."""
    if n < 2:
        raise ValueError(f"{desc} needs at least 2 training samples, got {n}.")
    batch_size = config.batch_size or default_batch_size(num_classes)
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size} must be >= 2: InfoNCE needs negatives.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = DisentangleNetwork(dim, hidden=config.hidden).to(device)
    batches = _batches(n, batch_size, random.Random(seed))
    result = fit(
        network,
        lambda step: batch_loss(network, next(batches)),
        steps=config.steps,
        optimizer=torch.optim.Adam(network.parameters(), lr=config.lr),
        evaluate=None if val_fn is None else (lambda: val_fn(network)),
        eval_every=config.eval_every,
        patience=config.patience or None,
        select_best=config.select_best,
        device=device,
        progress=progress,
        desc=desc,
    )
    return CLAPResult(**vars(result), network=network)


def train_clap(
    text_encoder: Any,
    prompts: Sequence[PromptAttributes],
    config: CLAPConfig | None = None,
    *,
    aug: AugmentConfig | None = None,
    ign: bool = False,
    n_noise: int = 4,
    noise_std: float = 0.02,
    class_prompt: str = "{}",
    seed: int = 1,
    val_fn: Callable[[DisentangleNetwork], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> CLAPResult:
    """Train CLAP's network on text only (Cai et al., 2024; the authors' ``main/trainer.py``).

    Each step draws ``B`` prompts (a fresh permutation per pass), augments each
    (:func:`augment_prompt`), encodes the original, the augmented and the class-name prompt
    with the frozen text encoder, refines all three with the network (``lam = 1``) and
    minimises :func:`clap_loss`.  Without IGN every string is encoded once
    (:class:`TextFeatureCache`); with IGN the augmented prompts go through
    :func:`encode_text_with_noise` every step, the insertion position drawn per batch.

    Selection: with ``val_fn(network) -> score`` (higher is better; a float, a tuple or a
    mapping with ``"score"``, see :func:`fewclip_tutorial.training.fit`) the state with the
    best score over evaluations every ``config.eval_every`` steps is kept, step 0 (the
    identity) included.  Never pass a test-set score.  Without ``val_fn`` the last state is kept.

    Args:
        text_encoder: a :class:`~fewclip_tutorial.backbones.Backbone` (needed for IGN), or a
            function ``list[str] -> (T, D)`` features.
        prompts: the structured training prompts (e.g. :func:`clap_prompts` for every class).
        config: :class:`CLAPConfig`; ``overrides`` replace single fields (``steps=80``).
        aug: augmentation probabilities (default :class:`AugmentConfig`).
        ign, n_noise, noise_std: Gaussian noise tokens on the augmented view.
        class_prompt: format of the class-name prompt (``"{}"``: the bare class name).
        seed: seeds network init, batch order, augmentations and noise.

    Returns:
        :class:`CLAPResult`.
    """
    config = replace(config or CLAPConfig(), **overrides)
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError(
            f"train_clap needs at least 2 prompts (got {len(prompts)}); see clap_prompts()."
        )
    aug = AugmentConfig() if aug is None else aug
    dev = get_device(device if device is not None else getattr(text_encoder, "device", None))
    cache = _text_cache_for(text_encoder, dev)
    if ign and not (hasattr(text_encoder, "model") and hasattr(text_encoder, "tokenizer")):
        raise ValueError(
            "ign=True needs the open_clip model: pass the Backbone (with .model and "
            ".tokenizer) as text_encoder, or set ign=False."
        )
    rng = random.Random(seed + 1)  # augmentations and noise positions (batches use seed)
    noise_gen = torch.Generator().manual_seed(seed)
    anchor_texts = [p.render() for p in prompts]
    class_texts = [class_prompt.format(p.classname) for p in prompts]

    def noisy(texts: list[str]) -> Tensor:
        tokens = text_encoder.tokenizer(texts).to(text_encoder.device)
        position = rng.choice(NOISE_POSITIONS)
        with torch.no_grad(), autocast(dev):
            f = encode_text_with_noise(
                text_encoder.model, tokens, n_noise, noise_std, position, noise_gen
            )
        return F.normalize(f.float(), dim=-1).to(dev)

    def batch_loss(network: DisentangleNetwork, idx: list[int]) -> Tensor:
        augmented = [augment_prompt(prompts[i], aug, rng) for i in idx]
        f_anchor = cache([anchor_texts[i] for i in idx])
        f_aug = noisy(augmented) if ign else cache(augmented)
        f_cls = cache([class_texts[i] for i in idx])
        z_anchor, z_aug, z_cls = network(torch.cat([f_anchor, f_aug, f_cls])).chunk(3)
        terms = (config.tau, config.tau_c, config.lambda_c, config.loss_form)
        return clap_loss(z_anchor, z_aug, z_cls, *terms)

    dim = int(cache(anchor_texts[:1]).shape[-1])
    num_classes = len({p.classname for p in prompts})
    result = _train_network(
        dim, batch_loss, len(prompts), num_classes, config, seed=seed, val_fn=val_fn,
        device=dev, progress=progress, desc="CLAP",
    )  # fmt: skip
    result.cached_strings = len(cache)
    return result


def image_augmentation(
    crop_scale: tuple[float, float] = (0.64, 1.0), brightness: float = 0.5, hue: float = 0.3
) -> Callable:
    """Im.Aug's view transform on PIL images: random resized crop + ColorJitter.

    The paper says each with p = 0.5; the authors' code applies both always, and so do we.
    The crop keeps the input size.
    """
    from torchvision import transforms as T

    def apply(img: Any) -> Any:
        size = img.size[::-1]
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=crop_scale, antialias=True),
                T.ColorJitter(brightness=brightness, hue=hue),
            ]
        )(img)

    return apply


def train_clap_image_features(
    view_features: Tensor,
    config: CLAPConfig | None = None,
    *,
    num_classes: int = 1,
    seed: int = 1,
    val_fn: Callable[[DisentangleNetwork], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> CLAPResult:
    """Im.Aug core: train the network on pairs of augmented views of the same image.

    Each step draws ``B`` images and two different views of each and minimises
    ``InfoNCE(view1, view2; tau)`` in ``config.loss_form``: the authors' Im.Aug loss
    (``main/trainer.py``, ``loss_image_modal``), with no class-name term.

    Args:
        view_features: ``(V, N, D)`` features of ``V >= 2`` augmented views of ``N`` images.
        num_classes: sets the default batch size (:func:`default_batch_size`).
        config, overrides, seed, val_fn: as in :func:`train_clap`.
    """
    config = replace(config or CLAPConfig(), **overrides)
    if view_features.dim() != 3 or view_features.shape[0] < 2:
        raise ValueError(
            f"view_features must be (V, N, D) with V >= 2 views, got {tuple(view_features.shape)}; "
            "encode at least two augmented views per image."
        )
    n_views, n, dim = view_features.shape
    dev = get_device(device)
    feats = view_features.to(dev).float()
    rng = random.Random(seed + 1)

    def batch_loss(network: DisentangleNetwork, idx: list[int]) -> Tensor:
        pairs = [rng.sample(range(n_views), 2) for _ in idx]
        i = torch.as_tensor(idx, device=dev)
        v1 = torch.as_tensor([p[0] for p in pairs], device=dev)
        v2 = torch.as_tensor([p[1] for p in pairs], device=dev)
        return info_nce(network(feats[v1, i]), network(feats[v2, i]), config.tau, config.loss_form)

    return _train_network(
        dim, batch_loss, n, num_classes, config, seed=seed, val_fn=val_fn, device=dev,
        progress=progress, desc="Im.Aug",
    )  # fmt: skip


def train_clap_image(
    backbone: Any,
    images: Any,
    config: CLAPConfig | None = None,
    *,
    n_views: int = 4,
    seed: int = 1,
    progress: bool = True,
    **kwargs: Any,
) -> CLAPResult:
    """Im.Aug: the same network trained on augmented views of images instead of prompts.

    ``n_views`` views of every image (:func:`image_augmentation`) are encoded once; training
    samples view pairs (:func:`train_clap_image_features`).  The paper's images are one
    synthetic image per prompt; for ShapeWorld the runner renders them from the prompt factors.

    Args:
        backbone: a Backbone (``preprocess``, ``encode_images``).
        images: a :class:`~fewclip_tutorial.data.base.LabeledSplit` (PIL images + labels).
        kwargs: forwarded to :func:`train_clap_image_features` (``val_fn``, ``device``, overrides).
    """
    if n_views < 2:
        raise ValueError(f"n_views={n_views} must be >= 2 (pairs of views).")
    transform = image_augmentation()
    views = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pil = [images.load_image(i) for i in range(len(images))]
        for _ in tqdm(range(n_views), desc="Im.Aug views", disable=not progress, leave=False):
            batch = torch.stack([backbone.preprocess(transform(img)) for img in pil])
            views.append(backbone.encode_images(batch, batch_size=256).float())
    kwargs.setdefault("device", backbone.device)
    kwargs.setdefault("num_classes", len(set(np.asarray(images.labels).tolist())))
    return train_clap_image_features(
        torch.stack(views), config, seed=seed, progress=progress, **kwargs
    )


# ----------------------------------------------------------------------------- exercises


def _exercise_ocd_inputs(gen: torch.Generator) -> tuple[PromptAttributes]:
    def pick(options: Sequence[Any]) -> Any:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    p = PromptAttributes(
        pick(["dog", "elephant", "circle", "apple"]),
        size=pick([None, *PAPER_SIZES]),
        color=pick(PAPER_COLORS),
        image_type=pick([None, *PAPER_IMAGE_TYPES]),
        art_style=pick([None, *PAPER_ART_STYLES]),
        swapped=bool(torch.rand(1, generator=gen) < 0.5),
    )
    return (p,)


def _exercise_info_nce_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    n = int(torch.randint(2, 9, (1,), generator=gen))
    d = int(torch.randint(3, 17, (1,), generator=gen))
    # unnormalised features with varied norms: forgetting to normalise shows
    a = torch.randn(n, d, generator=gen) * (torch.rand(n, 1, generator=gen) * 3 + 0.2)
    b = a + 0.5 * torch.randn(n, d, generator=gen)
    tau = float(torch.empty(1).uniform_(0.1, 1.0, generator=gen))
    return a, b, tau


def register_exercises() -> None:
    """Register the CLAP exercises with :mod:`fewclip_tutorial.exercises`.

    * ``"prompt_augmentation"``: ``fn(prompt: PromptAttributes) -> str``, object colour
      deletion (OCD) rendered as text (``delete_color(prompt).render()``);
    * ``"info_nce"``: ``fn(a (B, D), b (B, D), tau) -> scalar``, cross-view InfoNCE.

    Called by :mod:`fewclip_tutorial.methods` after importing this module.
    """
    from fewclip_tutorial.exercises import register_exercise

    register_exercise(
        "prompt_augmentation",
        lambda prompt: delete_color(prompt).render(),
        _exercise_ocd_inputs,
        description=(
            "Write ocd(prompt) taking a PromptAttributes and returning the prompt text with the "
            "object colour deleted (OCD), e.g. 'a realistic photo of a large red dog' -> "
            "'a realistic photo of a large dog'. Keep everything else, including the class."
        ),
        hint="PromptAttributes is a frozen dataclass: dataclasses.replace(p, color=None).render().",
    )
    register_exercise(
        "info_nce",
        lambda a, b, tau: info_nce(a, b, tau, "cross_view"),
        _exercise_info_nce_inputs,
        description=(
            "Write info_nce(a, b, tau) for (B, D) views a and b: L2-normalise both, compute "
            "logits a @ b.T / tau, and return the cross-entropy with the positives on the "
            "diagonal (row i of a matches row i of b), averaged over rows."
        ),
        hint="torch.nn.functional.cross_entropy(logits, torch.arange(B)) does the softmax + mean.",
        atol=1e-5,
    )


# ----------------------------------------------------------------------------- runner


def dataset_factors(dataset: Any) -> dict[str, Sequence[str]]:
    """Prompt factor lists CLAP uses for a dataset: ShapeWorld's own, else the paper's."""
    if str(getattr(dataset, "name", "")).startswith("shapeworld"):
        lists = (sw.COLORS, sw.SIZES, sw.IMAGE_TYPES, sw.ART_STYLES)
    else:
        lists = (PAPER_COLORS, PAPER_SIZES, PAPER_IMAGE_TYPES, PAPER_ART_STYLES)
    return dict(zip(("colors", "sizes", "image_types", "art_styles"), lists, strict=True))


def _render_shapeworld_prompts(
    prompts: Sequence[PromptAttributes],
    image_size: int,
    seed: int,
    classnames: Sequence[str] | None = None,
    task: str = "shapeworld",
) -> Any:
    """One rendered image per prompt of a ShapeWorld task, as a ListSplit (Im.Aug's images).

    ``classnames`` are the task's class names (default: the task's own); each prompt's
    class, colour, size, image type and art style set the rendered factors.
    """
    from PIL import Image

    from fewclip_tutorial.data.base import ListSplit

    t = sw.get_task(task)
    names = list(classnames) if classnames is not None else list(t.classnames)
    labels = [names.index(p.classname) for p in prompts]
    rng = np.random.default_rng(seed)
    n = len(prompts)
    f = sw.task_factors(t, np.asarray(labels), rng, t.train_domains)

    factor_lists = (sw.COLORS, sw.SIZES, sw.IMAGE_TYPES, sw.ART_STYLES)
    for attr, values in zip(("color", "size", "image_type", "art_style"), factor_lists):
        given = [getattr(p, attr) for p in prompts]
        current = getattr(f, attr)
        setattr(f, attr, np.asarray([values.index(v) if v else c for v, c in zip(given, current)]))
    f.radius = np.array([sw.SIZE_RADIUS[sw.SIZES[s]] for s in f.size]) * rng.uniform(0.9, 1.1, n)
    margin = f.radius * 1.05
    f.cx, f.cy = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
    images = [Image.fromarray(a) for a in sw.render(f, image_size)]
    return ListSplit(images, labels, name="clap-imaug-rendered")


def _build_options() -> dict[str, Any]:
    from fewclip_tutorial.attacks import STEP_SIZES
    from fewclip_tutorial.experiment import Option

    return {
        "variant": Option(
            str, "clap", "clap (augmented prompts) or im-aug (augmented images)", ["clap", "im-aug"]
        ),
        **{
            f.name: Option(type(f.default), f.default, f.metadata["help"], f.metadata["choices"])
            for f in fields(CLAPConfig)
        },
        "lam": Option(str, "val", "inference weight: a number, or 'val' = chosen on validation"),
        "ign": Option(bool, False, "insert Gaussian noise tokens into augmented prompts"),
        "attack_images": Option(int, 0, "test images attacked with FGSM/PGD-20/CW-20 (0: off)"),
        "attack_step": Option(
            str,
            "clap",
            "PGD/CW step: clap (eps/10, the authors') or quarter (eps/4)",
            sorted(STEP_SIZES),
        ),  # fmt: skip
        "probe": Option(
            bool, False, "report a few-shot linear probe on the refined image features"
        ),
    }


#: The ``"clap"`` method's options, declared once (``fewclip run clap --help`` lists them).
CLAP_OPTIONS: dict[str, Any] = _build_options()


def _parse_lam(lam: str | float) -> float | None:
    if str(lam).strip().lower() == "val":
        return None
    try:
        return float(lam)
    except ValueError as err:
        raise ValueError(
            f"lam={lam!r}: pass a number such as 0.2, or 'val' to choose it on validation."
        ) from err


@dataclass
class CLAPFit:
    """A CLAP (or Im.Aug) network trained and selected in a runner context.

    Attributes:
        result: the :class:`CLAPResult` (``network``, ``best_step``, ``history``; the
            validation history has ``"val_accuracy"``, ``"val_lam"`` and, when 1 is in the
            grid, ``"val_accuracy_at_1"``: the network as trained).
        lam: the inference weight chosen on validation; lam_val_accuracy: ``{lam: %}``.
        text_features: ``(C, M, D)`` raw prompt-ensemble text features of the dataset.
        options: the resolved options (:data:`CLAP_OPTIONS`).
    """

    result: CLAPResult
    lam: float
    lam_val_accuracy: dict[float, float]
    text_features: Tensor
    options: dict[str, Any]


def _imaug_images(ctx: Any, prompts: list[PromptAttributes]) -> Any:
    """Im.Aug's images: one rendered image per prompt (a seeded subset) on ShapeWorld, else train."""
    dataset, classnames = ctx.dataset, list(ctx.dataset.classnames)
    if not str(dataset.name).startswith("shapeworld"):
        return ctx.splits.train
    pick = random.Random(ctx.seed)
    per_class = len(prompts) // len(classnames)
    keep = min(IMAUG_PROMPTS_PER_CLASS, per_class)
    subset = [
        prompts[c * per_class + i]
        for c in range(len(classnames))
        for i in sorted(pick.sample(range(per_class), keep))
    ]
    return _render_shapeworld_prompts(
        subset, ctx.backbone.image_size, ctx.seed, classnames, dataset.name
    )


def fit_clap(ctx: Any, progress: bool = True, **options: Any) -> CLAPFit:
    """Train CLAP (or Im.Aug) on a few-shot episode and choose ``lam`` on its validation split.

    The training step and ``lam`` are both chosen on validation: each evaluation scores the
    network by its best (accuracy, -cross-entropy) over the ``lam`` grid, so a trained
    state is kept only when, at some ``lam``, it beats the identity network of step 0.

    Args:
        ctx: a :class:`~fewclip_tutorial.experiment.Context`.
        options: any of :data:`CLAP_OPTIONS` (defaults from there).
    """
    from fewclip_tutorial.experiment import MethodSpec, resolve_options

    opts = resolve_options(MethodSpec("clap", run_clap_experiment, CLAP_OPTIONS), options)
    fixed_lam = _parse_lam(opts["lam"])
    backbone, classnames = ctx.backbone, list(ctx.dataset.classnames)
    dev = backbone.device
    text = prompt_text_features(backbone, classnames, list(ctx.dataset.templates))
    val = ctx.features("val")
    val_f, val_y = val.features.to(dev), torch.as_tensor(val.labels)
    grid = LAMBDA_GRID if fixed_lam is None else (fixed_lam,)

    def val_fn(net: DisentangleNetwork) -> dict[str, Any]:
        scores = _lambda_scores(val_f, val_y, text, net, grid)
        best = max(scores, key=lambda k: (*scores[k], -grid.index(k)))
        extra = {"accuracy_at_1": scores[1.0][0]} if 1.0 in scores else {}
        return {"score": scores[best], "accuracy": scores[best][0], "lam": best, **extra}

    config = CLAPConfig(**{f.name: opts[f.name] for f in fields(CLAPConfig)})
    common = dict(seed=ctx.seed, val_fn=val_fn, device=dev, progress=progress)
    prompts = [p for c in classnames for p in clap_prompts(c, **dataset_factors(ctx.dataset))]
    if opts["variant"] == "clap":
        result = train_clap(backbone, prompts, config, ign=opts["ign"], **common)
    else:
        result = train_clap_image(backbone, _imaug_images(ctx, prompts), config, **common)
    lam, lam_scores = select_lambda(val_f, val_y, text, result.network, grid)
    return CLAPFit(result, lam, lam_scores, text, opts)


def run_clap_experiment(ctx: Any, progress: bool = True, **options: Any) -> dict:
    """The registered ``"clap"`` method: :func:`fit_clap`, then every evaluation.

    The standard keys (``val_accuracy``, ``test_accuracy``, ``ood_accuracy``) use refined
    image features against the refined prompt-ensemble classifier (or, with ``probe``, a
    few-shot linear probe on refined features; the zero-shot numbers then move to
    ``zero_shot_refined``); ``zero_shot_by_prompt`` compares raw CLIP and refined features
    for the paper's ZS(C/PC/CP/NC) prompts on test; ``attack_images > 0`` adds
    ``adversarial`` (clean / FGSM / PGD-20 / CW-20 accuracy of CLIP and of the refined classifier).
    """
    fitted = fit_clap(ctx, progress=progress, **options)
    result, lam, opts = fitted.result, fitted.lam, fitted.options
    net = result.network
    dev = ctx.backbone.device
    classifier = refined_classifier(fitted.text_features, net, lam)

    def refined(f: Tensor) -> Tensor:
        with torch.no_grad():
            return refine(f.to(dev), net, lam)

    report = ctx.report(lambda f: (CLIP_LOGIT_SCALE * refined(f) @ classifier.T).cpu())
    test = ctx.features("test")
    by_prompt: dict[str, dict[str, float]] = {}
    for key in ZERO_SHOT_PROMPTS:
        w = prompt_form_classifier(ctx.backbone, ctx.dataset.classnames, key, seed=ctx.seed)
        with torch.no_grad():
            by_prompt[key] = {
                "clip": accuracy(test.features.to(dev) @ w.to(dev).T, test.labels),
                "refined": accuracy(refined(test.features) @ refined(w).T, test.labels),
            }
    report.update(
        variant=opts["variant"],
        lam=lam,
        lam_val_accuracy={f"{k:g}": v for k, v in fitted.lam_val_accuracy.items()},
        best_step=result.best_step,
        steps_run=result.steps_run,
        final_train_loss=result.history["loss"][-1] if result.history["loss"] else None,
        residual_norm=float(net.projection.weight.detach().norm()),
        history=result.history,
        zero_shot_by_prompt=by_prompt,
    )
    if opts["attack_images"] > 0:
        from fewclip_tutorial.attacks import zero_shot_robustness

        heads = {
            "clip": (prompt_ensemble(fitted.text_features), None),
            "refined": (classifier, lambda f: refine(f, net, lam)),
        }
        report["adversarial"] = zero_shot_robustness(
            ctx.backbone, ctx.splits.test, heads, opts["attack_images"], ctx.seed,
            opts["attack_step"],
        )  # fmt: skip
    if opts["probe"]:
        from fewclip_tutorial.linear_probe import fit_linear_probe

        train, val = ctx.features("train"), ctx.features("val")
        probe = fit_linear_probe(
            refined(train.features).cpu(), train.labels, refined(val.features).cpu(), val.labels,
            seed=ctx.seed, num_classes=ctx.num_classes,
        )  # fmt: skip
        report["zero_shot_refined"] = {
            k: report[k] for k in ("val_accuracy", "test_accuracy", "ood_accuracy") if k in report
        }
        report.update(ctx.report(lambda f: probe.logits(refined(f).cpu())), probe_C=probe.C)
    return report


def _register_runner() -> None:
    from fewclip_tutorial.experiment import register_method

    register_method(
        "clap",
        options=CLAP_OPTIONS,
        help="CLAP: a residual network on CLIP features trained with augmented prompts.",
    )(run_clap_experiment)


_register_runner()
