"""CLAP: contrastive learning with augmented prompts (Cai et al., ECCV 2024).

CLAP keeps CLIP frozen and trains a small residual network on top of its
features so that *content* (the class) survives while *style* (colour, size,
image type, art style) is discounted.  It is trained on **text only**: a prompt
``"a [art style] [image type] of a [object size] [object color] [class]"`` and an
augmented copy of it (style words deleted, word order swapped, noise tokens
inserted) should map to the same point, and close to the bare class name.  At
inference the same network refines both the image and the text features.

Functional core (tensors / small dataclasses in, out):

* :class:`DisentangleNetwork` -- ``shortcut(x) + lam * W2(W1 SiLU(x) + b1)``, W2 zero-initialised.
* :class:`PromptAttributes`, :func:`clap_prompts` -- structured prompts and their product set.
* :func:`delete_size` (OSD), :func:`delete_color` (OCD), :func:`delete_image_type` (ITD),
  :func:`delete_art_style` (ASD), :func:`swap_order` (SPO), :func:`augment_prompt`.
* :func:`encode_text_with_noise` -- IGN: Gaussian noise token embeddings inside open_clip's text path.
* :func:`info_nce`, :func:`clap_loss` -- the contrastive objectives.
* :func:`refine`, :func:`refined_classifier`, :func:`select_lambda` -- inference.

Thin trainers: :func:`train_clap` (text, the method) and :func:`train_clap_image`
(the paper's Im.Aug baseline: the same network trained on augmented image views).

Deliberate choices (see each docstring):

* the residual branch is *pre-activation*, ``W2(W1 SiLU(x) + b1)``, as in REFERENCE.md
  and the authors' network code, not ``W2(SiLU(W1 x + b1))``;
* InfoNCE defaults to the paper's cross-view form; the code's symmetric SimCLR form
  (intra-view negatives) is ``form="symmetric_simclr"``;
* the inference weight ``lam`` is chosen on the few-shot **validation** split; the
  reference chose it on the test domains.
"""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "AUGMENTATIONS",
    "IMAUG_PROMPTS_PER_CLASS",
    "LAMBDA_GRID",
    "PAPER_ART_STYLES",
    "PAPER_COLORS",
    "PAPER_IMAGE_TYPES",
    "PAPER_SIZES",
    "ZERO_SHOT_PROMPTS",
    "AugmentConfig",
    "CLAPResult",
    "DisentangleNetwork",
    "PromptAttributes",
    "TextFeatureCache",
    "augment_prompt",
    "augment_structure",
    "clap_loss",
    "clap_prompts",
    "delete_art_style",
    "delete_color",
    "delete_image_type",
    "delete_size",
    "encode_text_with_noise",
    "image_augmentation",
    "info_nce",
    "prompt_form_classifier",
    "refine",
    "refined_classifier",
    "register_exercises",
    "run_clap_experiment",
    "select_lambda",
    "swap_order",
    "train_clap",
    "train_clap_image",
    "train_clap_image_features",
    "zero_shot_accuracy",
]

# ----------------------------------------------------------------------------- constants

#: Object colours of the paper's prompt set.
PAPER_COLORS: tuple[str, ...] = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "brown",
    "multicolored",
)
#: Object sizes of the paper's prompt set.
PAPER_SIZES: tuple[str, ...] = ("large", "normal sized", "small")
#: Image types of the paper's prompt set.
PAPER_IMAGE_TYPES: tuple[str, ...] = (
    "painting",
    "sketch",
    "cartoon",
    "clipart",
    "photograph",
    "infograph",
    "mosaic art",
    "sculpture",
)
#: Art styles of the paper's prompt set (10 x 3 x 8 x 2 = 480 prompts per class).
PAPER_ART_STYLES: tuple[str, ...] = ("realistic", "impressionistic")

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
    * The activation is applied to the *input* (pre-activation).  REFERENCE.md writes the
      network this way and the authors' network code does the same; the alternative
      ``W2(SiLU(W1 x + b1))`` (a standard MLP) is equally an identity at init.  We follow
      the reference so that ``hidden`` and ``lam`` mean what they mean in the paper.
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
    * ``form="symmetric_simclr"`` (the reference code, SimCLR's NT-Xent): ``2B`` rows; row
      ``a_i`` scores ``[a_i . b_j, a_i . a_k (k != i)]``, row ``b_i`` scores
      ``[b_i . a_j, b_i . b_k (k != i)]``, the positive is the cross-view pair.

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
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
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
    """CLAP's objective: ``InfoNCE(prompt, augmented; tau) + lambda_c InfoNCE(augmented, class; tau_c)``.

    All inputs are *refined* features (after the network), ``(B, D)``, row-aligned:
    row ``i`` of ``class_name_features`` is the class-name prompt of prompt ``i``.
    ``form`` applies to the first term; the class-name term is always cross-view
    (intra-view negatives among repeated class names would be meaningless).
    Paper settings: ``tau`` 0.5 (small datasets) or 0.3, ``tau_c = 1``, ``lambda_c`` 1 or 1e-4.
    """
    loss = info_nce(anchor, augmented, tau, form)
    if lambda_c:
        loss = loss + lambda_c * info_nce(augmented, class_name_features, tau_c, "cross_view")
    return loss


# ----------------------------------------------------------------------------- inference


def refine(features: Tensor, network: DisentangleNetwork, lam: float = 1.0) -> Tensor:
    """``normalize(network(features, lam))``: ``(..., D_in) -> (..., D_out)``, applied to both modalities."""
    return F.normalize(network(features, lam=lam).float(), dim=-1)


def refined_classifier(text_features: Tensor, network: DisentangleNetwork, lam: float) -> Tensor:
    """Zero-shot classifier from refined text features.

    Args:
        text_features: ``(C, D)`` (one prompt per class) or ``(T, C, D)`` (``T`` templates).

    Returns:
        ``(C, D_out)``: each prompt refined and normalised, averaged over templates, renormalised.
    """
    if text_features.dim() == 2:
        text_features = text_features.unsqueeze(0)
    if text_features.dim() != 3:
        raise ValueError(
            f"text_features must be (C, D) or (T, C, D), got shape {tuple(text_features.shape)}."
        )
    return F.normalize(refine(text_features, network, lam).mean(0), dim=-1)


def zero_shot_accuracy(image_features: Tensor, labels: Tensor, classifier: Tensor) -> float:
    """Top-1 accuracy in percent of ``argmax(image_features @ classifier.T)``: ``(N, D), (N,), (C, D)``."""
    if image_features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_features.shape[0]} features but {labels.shape[0]} labels; pass one label per row."
        )
    if image_features.shape[0] == 0:
        raise ValueError("zero_shot_accuracy got no samples.")
    pred = (image_features.float() @ classifier.float().to(image_features.device).T).argmax(-1)
    return float((pred.cpu() == labels.cpu()).float().mean() * 100.0)


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
    with _autocast(dev):
        w = encode_text_with_noise(backbone.model, tokens, 4, 0.02, "front", gen)
    return F.normalize(w.float(), dim=-1)


@torch.no_grad()
def select_lambda(
    val_features: Tensor,
    val_labels: Tensor,
    text_features: Tensor,
    network: DisentangleNetwork,
    grid: Sequence[float] = LAMBDA_GRID,
) -> tuple[float, dict[float, float]]:
    """Choose the inference weight ``lam`` on the **validation** split.

    The reference picked ``lam`` on the test domains; here only validation features
    enter.  Ties go to the first (smallest, i.e. closest to CLIP) value of ``grid``.

    Args:
        val_features: ``(N, D)`` validation image features.
        val_labels: ``(N,)``.
        text_features: ``(C, D)`` or ``(T, C, D)`` raw text features.
        grid: candidate values.

    Returns:
        ``(best_lam, {lam: val accuracy in percent})``.
    """
    grid = list(grid)
    if not grid:
        raise ValueError("select_lambda got an empty grid; pass e.g. LAMBDA_GRID.")
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    f = val_features.to(device)
    t = text_features.to(device)
    scores = {
        float(lam): zero_shot_accuracy(
            refine(f, network, lam), val_labels, refined_classifier(t, network, lam)
        )
        for lam in grid
    }
    network.train(was_training)
    best = max(scores, key=lambda k: (scores[k], -grid.index(k)))
    return best, scores


# ----------------------------------------------------------------------------- training


@dataclass
class CLAPResult:
    """A trained network and its training record.

    Attributes:
        network: the selected :class:`DisentangleNetwork` (eval mode).
        history: ``"loss"`` per step; ``"val_step"`` / ``"val_score"`` at each evaluation.
        best_step: the step whose weights were kept (0 = the identity network).
        best_val: its validation score (``None`` without ``val_fn``).
    """

    network: DisentangleNetwork
    history: dict[str, list] = field(default_factory=dict)
    best_step: int = 0
    best_val: float | None = None


def _device(device: torch.device | str | None) -> torch.device:
    from fewclip_tutorial.device import get_device

    return get_device(device)


def _autocast(device: torch.device):
    from fewclip_tutorial.device import autocast

    return autocast(device)


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


#: Text-feature caches shared by every training run of the same frozen backbone (keyed by
#: its identifier and the device): the text encoder never changes, so a string's feature
#: is the same in every run, and sweeps over shots and seeds encode each string once.
_TEXT_CACHES: dict[tuple[str, str], TextFeatureCache] = {}


def _text_cache_for(text_encoder: Any, device: torch.device) -> TextFeatureCache:
    ident = getattr(text_encoder, "identifier", None)
    if not isinstance(ident, str):
        return TextFeatureCache(_text_encode_fn(text_encoder), device)
    key = (ident, str(device))
    if key not in _TEXT_CACHES:
        _TEXT_CACHES[key] = TextFeatureCache(_text_encode_fn(text_encoder), device)
    return _TEXT_CACHES[key]


def _text_encode_fn(text_encoder: Any) -> Callable[[list[str]], Tensor]:
    if hasattr(text_encoder, "encode_text") and hasattr(text_encoder, "tokenizer"):
        return lambda texts: text_encoder.encode_text(texts)
    if callable(text_encoder):
        return lambda texts: F.normalize(text_encoder(texts).float(), dim=-1)
    raise TypeError(
        "text_encoder must be a Backbone (with .encode_text and .tokenizer) or a function "
        "list[str] -> (T, D) features."
    )


def _fit(
    network: DisentangleNetwork,
    batch_loss: Callable[[int], Tensor],
    *,
    steps: int,
    lr: float,
    val_fn: Callable[[DisentangleNetwork], float] | None,
    eval_every: int,
    patience: int | None,
    progress: bool,
    desc: str,
) -> CLAPResult:
    """Adam on ``batch_loss(step)``; keeps the weights with the best ``val_fn`` score."""
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0.")
    if eval_every < 1:
        raise ValueError(f"eval_every={eval_every} must be >= 1.")
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    history: dict[str, list] = {"loss": [], "val_step": [], "val_score": []}
    best_state = copy.deepcopy(network.state_dict())
    best_step, best_val, bad_evals = 0, None, 0

    def evaluate(step: int) -> bool:
        nonlocal best_state, best_step, best_val, bad_evals
        network.eval()
        with torch.no_grad():
            score = float(val_fn(network))
        network.train()
        history["val_step"].append(step)
        history["val_score"].append(score)
        if best_val is None or score > best_val:
            best_state, best_step, best_val, bad_evals = (
                copy.deepcopy(network.state_dict()),
                step,
                score,
                0,
            )
        else:
            bad_evals += 1
        return patience is not None and bad_evals >= patience

    if val_fn is not None:
        evaluate(0)
    network.train()
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False)
    for step in bar:
        loss = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["loss"].append(float(loss.detach()))
        if progress:
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
        if val_fn is not None and (step % eval_every == 0 or step == steps):
            if evaluate(step):
                break
    if val_fn is None:
        best_step = len(history["loss"])
    else:
        network.load_state_dict(best_state)
    network.eval()
    return CLAPResult(network=network, history=history, best_step=best_step, best_val=best_val)


def _make_network(
    in_dim: int, out_dim: int | None, hidden: int, seed: int, device: torch.device
) -> DisentangleNetwork:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DisentangleNetwork(in_dim, out_dim, hidden)
    return net.to(device)


class _EpochSampler:
    """Mini-batches of indices, a fresh permutation every pass over the data."""

    def __init__(self, n: int, batch_size: int, rng: random.Random) -> None:
        self.n, self.batch_size, self.rng = n, min(batch_size, n), rng
        self.order: list[int] = []

    def next(self) -> list[int]:
        if len(self.order) < self.batch_size:
            perm = list(range(self.n))
            self.rng.shuffle(perm)
            self.order = self.order + perm
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        if len(set(batch)) < len(batch):  # a wrap-around repeated an index: draw fresh
            batch = self.rng.sample(range(self.n), self.batch_size)
        return batch


def train_clap(
    text_encoder: Any,
    prompts: Sequence[PromptAttributes],
    *,
    steps: int = 500,
    lr: float = 1e-4,
    batch_size: int = 128,
    tau: float = 0.5,
    tau_c: float = 1.0,
    lambda_c: float = 1.0,
    loss_form: LossForm = "cross_view",
    aug: AugmentConfig | None = None,
    ign: bool = False,
    n_noise: int = 4,
    noise_std: float = 0.02,
    class_prompt: str = "{}",
    hidden: int = 256,
    out_dim: int | None = None,
    seed: int = 1,
    val_fn: Callable[[DisentangleNetwork], float] | None = None,
    eval_every: int = 50,
    patience: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CLAPResult:
    """Train CLAP's network on text only (Cai et al., 2024).

    Each step draws ``B`` prompts, augments each (:func:`augment_prompt`), encodes the
    original, the augmented and the class-name prompt with the frozen text encoder,
    refines all three with the network (``lam = 1``) and minimises :func:`clap_loss`.
    Without IGN every string is encoded once (:class:`TextFeatureCache`); with IGN the
    augmented prompts go through :func:`encode_text_with_noise` every step, with the
    insertion position drawn per batch.

    Selection: with ``val_fn`` (e.g. validation zero-shot accuracy of the refined
    features) the best-scoring weights over evaluations every ``eval_every`` steps are
    kept, step 0 (the identity) included; ``patience`` evaluations without improvement
    stop early.  Never pass a test-set score here.  Without ``val_fn`` the last weights
    are returned (the paper stopped on the training loss).

    Args:
        text_encoder: a :class:`~fewclip_tutorial.backbones.Backbone` (needed for IGN), or a
            function ``list[str] -> (T, D)`` features.
        prompts: the structured training prompts (e.g. :func:`clap_prompts` for every class).
        steps, lr, batch_size: Adam steps, learning rate (paper 1e-4), prompts per batch.
        tau, tau_c, lambda_c, loss_form: see :func:`clap_loss`.
        aug: augmentation probabilities (default :class:`AugmentConfig`).
        ign, n_noise, noise_std: Gaussian noise tokens on the augmented view.
        class_prompt: format of the class-name prompt (``"{}"``: the bare class name).
        hidden, out_dim: network size.
        seed: seeds network init, batch order, augmentations and noise.

    Returns:
        :class:`CLAPResult`.
    """
    prompts = list(prompts)
    if len(prompts) < 2:
        raise ValueError(
            f"train_clap needs at least 2 prompts (got {len(prompts)}); see clap_prompts()."
        )
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size} must be >= 2: InfoNCE needs negatives.")
    aug = AugmentConfig() if aug is None else aug
    dev = _device(device if device is not None else getattr(text_encoder, "device", None))
    cache = _text_cache_for(text_encoder, dev)
    if ign and not (hasattr(text_encoder, "model") and hasattr(text_encoder, "tokenizer")):
        raise ValueError(
            "ign=True needs the open_clip model: pass the Backbone (with .model and "
            ".tokenizer) as text_encoder, or set ign=False."
        )
    rng = random.Random(seed)
    noise_gen = torch.Generator().manual_seed(seed)
    sampler = _EpochSampler(len(prompts), batch_size, rng)
    anchor_texts = [p.render() for p in prompts]
    class_texts = [class_prompt.format(p.classname) for p in prompts]
    dim = int(cache(anchor_texts[:1]).shape[-1])
    network = _make_network(dim, out_dim, hidden, seed, dev)

    def noisy(texts: list[str]) -> Tensor:
        tokens = text_encoder.tokenizer(texts).to(text_encoder.device)
        position = rng.choice(NOISE_POSITIONS)
        with torch.no_grad(), _autocast(dev):
            f = encode_text_with_noise(
                text_encoder.model, tokens, n_noise, noise_std, position, noise_gen
            )
        return F.normalize(f.float(), dim=-1).to(dev)

    def batch_loss(step: int) -> Tensor:
        idx = sampler.next()
        augmented = [augment_prompt(prompts[i], aug, rng) for i in idx]
        f_anchor = cache([anchor_texts[i] for i in idx])
        f_aug = noisy(augmented) if ign else cache(augmented)
        f_cls = cache([class_texts[i] for i in idx])
        return clap_loss(
            network(f_anchor), network(f_aug), network(f_cls), tau, tau_c, lambda_c, loss_form
        )

    result = _fit(
        network,
        batch_loss,
        steps=steps,
        lr=lr,
        val_fn=val_fn,
        eval_every=eval_every,
        patience=patience,
        progress=progress,
        desc="CLAP",
    )
    result.history["cached_strings"] = [len(cache)]
    return result


def image_augmentation(
    crop_scale: tuple[float, float] = (0.64, 1.0), brightness: float = 0.5, hue: float = 0.3
) -> Callable:
    """Im.Aug's view transform on PIL images: random resized crop + ColorJitter.

    The paper says each with p = 0.5; the reference code applies both always, and so do we.
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
    labels: Tensor | None = None,
    class_name_features: Tensor | None = None,
    *,
    steps: int = 500,
    lr: float = 1e-4,
    batch_size: int = 128,
    tau: float = 0.5,
    tau_c: float = 1.0,
    lambda_c: float = 0.0,
    loss_form: LossForm = "cross_view",
    hidden: int = 256,
    out_dim: int | None = None,
    seed: int = 1,
    val_fn: Callable[[DisentangleNetwork], float] | None = None,
    eval_every: int = 50,
    patience: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CLAPResult:
    """Im.Aug core: train the network on pairs of augmented views of the same image.

    Each step draws ``B`` images and two different views of each and minimises
    ``InfoNCE(view1, view2; tau)`` (the reference Im.Aug loss), plus, if ``lambda_c > 0``,
    ``lambda_c InfoNCE(view2, class name; tau_c)`` as in :func:`clap_loss`.

    Args:
        view_features: ``(V, N, D)`` features of ``V >= 2`` augmented views of ``N`` images.
        labels: ``(N,)`` class indices (needed when ``lambda_c > 0``).
        class_name_features: ``(C, D)`` class-name text features (needed when ``lambda_c > 0``).
    """
    if view_features.dim() != 3 or view_features.shape[0] < 2:
        raise ValueError(
            f"view_features must be (V, N, D) with V >= 2 views, got {tuple(view_features.shape)}; "
            "encode at least two augmented views per image."
        )
    n_views, n, dim = view_features.shape
    if n < 2:
        raise ValueError("train_clap_image needs at least 2 images.")
    if lambda_c and (labels is None or class_name_features is None):
        raise ValueError("lambda_c > 0 needs labels and class_name_features; or set lambda_c=0.")
    dev = _device(device)
    feats = view_features.to(dev).float()
    cls = None if class_name_features is None else class_name_features.to(dev).float()
    y = None if labels is None else torch.as_tensor(labels, device=dev).long()
    rng = random.Random(seed)
    sampler = _EpochSampler(n, batch_size, rng)
    network = _make_network(dim, out_dim, hidden, seed, dev)

    def batch_loss(step: int) -> Tensor:
        idx = sampler.next()
        pairs = [rng.sample(range(n_views), 2) for _ in idx]
        i = torch.as_tensor(idx, device=dev)
        v1 = torch.as_tensor([p[0] for p in pairs], device=dev)
        v2 = torch.as_tensor([p[1] for p in pairs], device=dev)
        z1, z2 = network(feats[v1, i]), network(feats[v2, i])
        loss = info_nce(z1, z2, tau, loss_form)
        if lambda_c:
            loss = loss + lambda_c * info_nce(z2, network(cls[y[i]]), tau_c, "cross_view")
        return loss

    return _fit(
        network,
        batch_loss,
        steps=steps,
        lr=lr,
        val_fn=val_fn,
        eval_every=eval_every,
        patience=patience,
        progress=progress,
        desc="Im.Aug",
    )


def train_clap_image(
    backbone: Any,
    images: Any,
    *,
    n_views: int = 4,
    classnames: Sequence[str] | None = None,
    lambda_c: float = 0.0,
    seed: int = 1,
    progress: bool = True,
    **kwargs: Any,
) -> CLAPResult:
    """Im.Aug: the same network trained on augmented views of images instead of prompts.

    ``n_views`` views of every image are drawn once with :func:`image_augmentation`,
    encoded by the frozen image encoder and cached; training then samples view pairs
    (:func:`train_clap_image_features`).  In the paper the images are one synthetic
    image per prompt; for ShapeWorld the runner renders them from the prompt factors.

    Args:
        backbone: a Backbone (``preprocess``, ``encode_images``, ``encode_text``).
        images: a :class:`~fewclip_tutorial.data.base.LabeledSplit` (PIL images + labels).
        classnames: needed when ``lambda_c > 0`` (class-name text term).
        kwargs: forwarded to :func:`train_clap_image_features`.
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
    cls = None
    if lambda_c:
        if classnames is None:
            raise ValueError("lambda_c > 0 needs classnames for the class-name prompts.")
        cls = backbone.encode_text(list(classnames))
    return train_clap_image_features(
        torch.stack(views),
        torch.as_tensor(np.asarray(images.labels)),
        cls,
        lambda_c=lambda_c,
        seed=seed,
        progress=progress,
        device=kwargs.pop("device", backbone.device),
        **kwargs,
    )


# ----------------------------------------------------------------------------- exercises


def _exercise_ocd_reference(prompt: PromptAttributes) -> str:
    """Reference for the "prompt_augmentation" exercise: OCD, rendered as text."""
    return delete_color(prompt).render()


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


def _exercise_info_nce_reference(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """Reference for the "info_nce" exercise: the paper's cross-view InfoNCE."""
    return info_nce(a, b, tau, "cross_view")


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
        _exercise_ocd_reference,
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
        _exercise_info_nce_reference,
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


def _dataset_factors(dataset: Any) -> dict[str, Sequence[str]]:
    """Prompt factor lists: ShapeWorld's own for the embedded world, else the paper's."""
    if str(getattr(dataset, "name", "")).startswith("shapeworld"):
        from fewclip_tutorial.data import shapeworld as sw

        return {
            "colors": sw.COLORS,
            "sizes": sw.SIZES,
            "image_types": sw.IMAGE_TYPES,
            "art_styles": sw.ART_STYLES,
        }
    return {
        "colors": PAPER_COLORS,
        "sizes": PAPER_SIZES,
        "image_types": PAPER_IMAGE_TYPES,
        "art_styles": PAPER_ART_STYLES,
    }


#: Public name: the prompt factor lists CLAP uses for a dataset.
dataset_factors = _dataset_factors


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

    from fewclip_tutorial.data import shapeworld as sw
    from fewclip_tutorial.data.base import ListSplit

    t = sw.get_task(task)
    names = list(classnames) if classnames is not None else list(t.classnames)
    labels = [names.index(p.classname) for p in prompts]
    rng = np.random.default_rng(seed)
    n = len(prompts)
    f = sw.task_factors(t, np.asarray(labels), rng, t.train_domains)

    def idx(names: Sequence[str], values: Iterable[str | None], current: np.ndarray) -> np.ndarray:
        return np.asarray(
            [names.index(v) if v else c for v, c in zip(values, current, strict=True)]
        )

    f.color = idx(sw.COLORS, (p.color for p in prompts), f.color)
    f.size = idx(sw.SIZES, (p.size for p in prompts), f.size)
    f.image_type = idx(sw.IMAGE_TYPES, (p.image_type for p in prompts), f.image_type)
    f.art_style = idx(sw.ART_STYLES, (p.art_style for p in prompts), f.art_style)
    f.radius = np.array([sw.SIZE_RADIUS[sw.SIZES[s]] for s in f.size]) * rng.uniform(0.9, 1.1, n)
    margin = f.radius * 1.05
    f.cx, f.cy = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
    images = [Image.fromarray(a) for a in sw.render(f, image_size)]
    return ListSplit(images, labels, name="clap-imaug-rendered")


def _pixel_transform(preprocess: Any) -> Any:
    """``backbone.preprocess`` without its Normalize step: PIL -> ``(3, H, W)`` in [0, 1]."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        raise ValueError("attacks need a torchvision Compose preprocess to strip Normalize from.")
    return T.Compose([t for t in steps if not isinstance(t, T.Normalize)])


def _register_runner() -> None:
    try:
        from fewclip_tutorial.experiment import Context, Option, register_method
    except ModuleNotFoundError as err:  # the functional core works without the runner
        if err.name != "fewclip_tutorial.experiment":
            raise
        return

    @register_method(
        "clap",
        options={
            "variant": Option(
                str,
                "clap",
                "clap (augmented prompts) or im-aug (augmented images)",
                ["clap", "im-aug"],
            ),
            "steps": Option(int, 500, "training steps (paper: at most 8000)"),
            "batch_size": Option(int, 128, "prompts (or images) per step"),
            "lr": Option(float, 1e-4, "Adam learning rate"),
            "tau": Option(float, 0.5, "InfoNCE temperature (paper: 0.5 small datasets, else 0.3)"),
            "lambda_c": Option(float, 1.0, "weight of the class-name term (paper: 1 or 1e-4)"),
            "lam": Option(
                str, "val", "inference weight: a number, or 'val' = chosen on validation"
            ),
            "ign": Option(bool, False, "insert Gaussian noise tokens into augmented prompts"),
            "hidden": Option(int, 256, "hidden width of the disentangle network"),
            "attack_images": Option(int, 0, "test images attacked with FGSM/PGD-20/CW-20 (0: off)"),
            "probe": Option(
                bool, False, "report a few-shot linear probe on the refined image features"
            ),
        },
        help="CLAP: a residual network on CLIP features trained with augmented prompts.",
    )
    def run_clap(
        ctx: Context,
        variant: str = "clap",
        steps: int = 500,
        batch_size: int = 128,
        lr: float = 1e-4,
        tau: float = 0.5,
        lambda_c: float = 1.0,
        lam: str = "val",
        ign: bool = False,
        hidden: int = 256,
        attack_images: int = 0,
        probe: bool = False,
        progress: bool = True,
    ) -> dict:
        return run_clap_experiment(
            ctx,
            variant=variant,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            tau=tau,
            lambda_c=lambda_c,
            lam=lam,
            ign=ign,
            hidden=hidden,
            attack_images=attack_images,
            probe=probe,
            progress=progress,
        )


def _parse_lam(lam: str | float) -> float | None:
    if isinstance(lam, (int, float)):
        return float(lam)
    if str(lam).strip().lower() == "val":
        return None
    try:
        return float(lam)
    except ValueError as err:
        raise ValueError(
            f"lam={lam!r}: pass a number such as 0.2, or 'val' to choose it on validation."
        ) from err


def run_clap_experiment(
    ctx: Any,
    *,
    variant: str = "clap",
    steps: int = 500,
    batch_size: int = 128,
    lr: float = 1e-4,
    tau: float = 0.5,
    lambda_c: float = 1.0,
    lam: str | float = "val",
    ign: bool = False,
    hidden: int = 256,
    attack_images: int = 0,
    probe: bool = False,
    progress: bool = True,
) -> dict:
    """Train CLAP (or Im.Aug) in a :class:`~fewclip_tutorial.experiment.Context` and evaluate.

    ``lam`` and the training step are both chosen on the validation split.  The
    standard keys (``val_accuracy``, ``test_accuracy``, ``ood_accuracy``) use refined
    image features against the refined prompt-ensemble classifier; ``zero_shot_by_prompt``
    compares raw CLIP and refined features for the paper's ZS(C/PC/CP/NC) prompts on test.
    """
    if variant not in ("clap", "im-aug"):
        raise ValueError(f"variant={variant!r}; choose 'clap' or 'im-aug'.")
    fixed_lam = _parse_lam(lam)
    backbone, dataset = ctx.backbone, ctx.dataset
    dev = backbone.device
    classnames = list(dataset.classnames)
    factors = _dataset_factors(dataset)
    prompts = [p for c in classnames for p in clap_prompts(c, **factors)]

    templates = list(dataset.templates)
    text_feats = backbone.encode_text([t.format(c) for t in templates for c in classnames]).reshape(
        len(templates), len(classnames), -1
    )
    val = ctx.features("val")
    val_f, val_y = val.features.to(dev), val.labels
    grid = LAMBDA_GRID if fixed_lam is None else (fixed_lam,)

    def val_fn(net: DisentangleNetwork) -> float:
        return max(select_lambda(val_f, val_y, text_feats, net, grid)[1].values())

    common = dict(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        tau=tau,
        lambda_c=lambda_c,
        hidden=hidden,
        seed=ctx.seed,
        val_fn=val_fn,
        device=dev,
        progress=progress,
    )
    if variant == "clap":
        result = train_clap(backbone, prompts, ign=ign, **common)
    else:
        if str(dataset.name).startswith("shapeworld"):
            # one rendered image per prompt, for a seeded subset of the prompts of each class
            pick = random.Random(ctx.seed)
            per_class = len(prompts) // len(classnames)
            subset = [
                prompts[c * per_class + i]
                for c in range(len(classnames))
                for i in sorted(
                    pick.sample(range(per_class), min(IMAUG_PROMPTS_PER_CLASS, per_class))
                )
            ]
            images = _render_shapeworld_prompts(
                subset, backbone.image_size, ctx.seed, classnames, dataset.name
            )
        else:
            images = ctx.splits.train
        result = train_clap_image(backbone, images, classnames=classnames, **common)
    net = result.network
    best_lam, lam_scores = select_lambda(val_f, val_y, text_feats, net, grid)
    classifier = refined_classifier(text_feats, net, best_lam)
    scale = float(getattr(backbone, "logit_scale", 100.0))

    def predict(f: Tensor) -> Tensor:
        with torch.no_grad():
            return (scale * refine(f.to(dev), net, best_lam) @ classifier.T).to(f.device)

    report = ctx.report(predict)

    test = ctx.features("test")
    test_f, test_y = test.features.to(dev), test.labels
    by_prompt: dict[str, dict[str, float]] = {}
    for key in ZERO_SHOT_PROMPTS:
        w = prompt_form_classifier(backbone, classnames, key, seed=ctx.seed).to(dev)
        with torch.no_grad():
            by_prompt[key] = {
                "clip": zero_shot_accuracy(test_f, test_y, w),
                "refined": zero_shot_accuracy(
                    refine(test_f, net, best_lam), test_y, refine(w, net, best_lam)
                ),
            }

    report.update(
        variant=variant,
        lam=best_lam,
        lam_val_accuracy={f"{k:g}": v for k, v in lam_scores.items()},
        best_step=result.best_step,
        steps_run=len(result.history["loss"]),
        final_train_loss=result.history["loss"][-1] if result.history["loss"] else None,
        zero_shot_by_prompt=by_prompt,
        num_prompts=len(prompts) if variant == "clap" else None,
    )
    if attack_images > 0:
        report["adversarial"] = _attack_report(ctx, net, best_lam, text_feats, attack_images, scale)
    if probe:
        # few-shot linear probe on the refined image features (C chosen on validation);
        # the standard keys then report the probe, the zero-shot numbers move to a sub-dict
        from fewclip_tutorial.linear_probe import fit_linear_probe

        train = ctx.features("train")
        with torch.no_grad():
            train_r = refine(train.features.to(dev), net, best_lam).cpu()
            val_r = refine(val_f, net, best_lam).cpu()
        lp = fit_linear_probe(
            train_r, train.labels, val_r, val_y, seed=ctx.seed, num_classes=len(classnames)
        )

        def predict_probe(f: Tensor) -> Tensor:
            with torch.no_grad():
                return lp.logits(refine(f.to(dev), net, best_lam).cpu())

        report["zero_shot_refined"] = {
            k: report[k] for k in ("val_accuracy", "test_accuracy", "ood_accuracy") if k in report
        }
        report.update(ctx.report(predict_probe), probe_C=lp.C)
    return report


def _attack_report(
    ctx: Any, net: DisentangleNetwork, lam: float, text_feats: Tensor, n_images: int, scale: float
) -> dict[str, dict[str, float]]:
    """Clean / FGSM / PGD-20 / CW-20 accuracy (eps 0.031, [0, 1] pixels) on test images."""
    from fewclip_tutorial.attacks import NormalizedClassifier, robust_accuracy

    backbone = ctx.backbone
    split = ctx.splits.test
    rng = np.random.default_rng(ctx.seed)
    idx = rng.choice(len(split), size=min(n_images, len(split)), replace=False)
    to_pixels = _pixel_transform(backbone.preprocess)
    pixels = torch.stack([to_pixels(split.load_image(int(i))) for i in idx]).to(backbone.device)
    labels = torch.as_tensor(np.asarray(split.labels)[idx]).to(backbone.device)
    clip_head = F.normalize(text_feats.mean(0), dim=-1)
    out = {}
    for name, head, refine_fn in (
        ("clip", clip_head, None),
        ("refined", refined_classifier(text_feats, net, lam), lambda f: refine(f, net, lam)),
    ):
        clf = NormalizedClassifier(
            backbone.model.visual, backbone.mean, backbone.std, head.detach(), refine_fn, scale
        )
        out[name] = robust_accuracy(clf, pixels, labels, seed=ctx.seed)
    return out


_register_runner()
