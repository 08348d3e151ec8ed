"""CLAP: contrastive learning with augmented prompts (Cai et al., ECCV 2024).

CLAP keeps CLIP frozen and trains a small residual network on its features so that
*content* (the class) survives while *style* (colour, size, image type, art style) is
discounted.  It is trained on **text only**: a prompt ``"a [art style] [image type] of a
[object size] [object color] [class]"`` and an augmented copy (style words deleted, word
order swapped, noise tokens inserted) should map to the same point, close to the bare
class name.  At inference the same network refines image and text features.

Functional core (tensors / small dataclasses in, out; :mod:`.core`, the prompts in :mod:`.prompts`):

* :class:`DisentangleNetwork` -- ``shortcut(x) + lam * W2(W1 SiLU(x) + b1)``, W2 zero-initialised.
* :class:`PromptAttributes`, :func:`clap_prompts` -- structured prompts and their product set.
* :func:`delete_size` (OSD), :func:`delete_color` (OCD), :func:`delete_image_type` (ITD),
  :func:`delete_art_style` (ASD), :func:`swap_order` (SPO), :func:`augment_prompt`.
* :func:`encode_text_with_noise` -- IGN: Gaussian noise token embeddings inside open_clip's text path.
* :func:`info_nce`, :func:`clap_loss` -- the contrastive objectives.
* :func:`refine`, :func:`refined_classifier`, :func:`select_lambda` -- inference.

Trainers (:mod:`.train`), all through :func:`fewclip_tutorial.training.fit`: :func:`train_clap` (text,
the method), :func:`train_clap_image_features` / :func:`train_clap_image` (the paper's
Im.Aug baseline, augmented image views).  :func:`train_clap_episode` trains and selects in a
runner ``Context``; :func:`run_clap` (the registered ``"clap"`` method) evaluates.

Deliberate choices (see each docstring):

* the residual branch is *pre-activation*, ``W2(W1 SiLU(x) + b1)``, as in the authors'
  ``main/networks.py`` (``ResMLP``), not ``W2(SiLU(W1 x + b1))``;
* InfoNCE defaults to the authors' objective (``form="symmetric_simclr"``, ``InfoNCELoss`` of
  ``utils/loss.py`` for both terms); ``form="cross_view"`` is the paper's equation;
* the network sees raw (un-normalised) CLIP features by default, as in the authors'
  ``main/trainer.py`` and ``main/evaluate.py``; features are normalised after it
  (:func:`refine`); ``CLAPConfig.input_features="normalized"`` feeds L2-normalised ones;
* the inference weight ``lam`` and the training step are chosen on the few-shot
  **validation** split; the authors chose ``lam`` on the test domains
  (``search_alpha.py``) and stopped on the training loss (``main/trainer.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewclip_tutorial.device import autocast, float32_or_64
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE, prompt_ensemble

__all__ = [
    "LAMBDA_GRID",
    "NOISE_POSITIONS",
    "ZERO_SHOT_PROMPTS",
    "DisentangleNetwork",
    "clap_loss",
    "encode_text_raw",
    "encode_text_with_noise",
    "info_nce",
    "lambda_scores",
    "prompt_form_classifier",
    "refine",
    "refined_classifier",
    "select_lambda",
]

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

NoisePosition = Literal["front", "middle", "end", "inside"]
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
    shared: bool = True,
) -> Tensor:
    """IGN: encode text with ``n_noise`` Gaussian token embeddings inserted (Cai et al., 2024).

    Reimplements open_clip's ``CLIP.encode_text`` step by step:
    ``token_embedding`` -> insert ``N(0, std^2)`` embeddings -> keep ``L`` positions ->
    ``+ positional_embedding`` -> ``transformer(x, attn_mask=model.attn_mask)`` ->
    ``ln_final`` -> the end-of-text (EOT) position, shifted by the insertion -> ``@ text_projection``.

    Insertion points (``e`` = EOT index of a row, real tokens at ``1 .. e-1``), as the
    authors' ``clip_encode_noised_text`` (``utils/misc.py``) places them:
    ``"front"`` right after the start token (index 1), ``"end"`` right before EOT (index
    ``e``), ``"middle"`` the first ``n_noise // 2`` after the start token and the others
    before EOT (the authors' "middle" surrounds the text).  ``"inside"`` (not the authors')
    puts all of them inside the text, at ``1 + (e - 1) // 2``.  The sequence grows to
    ``L + n_noise`` and is truncated back to the context length ``L``; when the shifted EOT
    would fall outside, the last kept positions before it are dropped and EOT is put at ``L - 1``.

    Args:
        model: an open_clip ``CLIP`` (frozen; gradients flow only if the caller allows).
        tokens: ``(B, L)`` token ids from the model's tokenizer.
        n_noise: number of noise tokens (0: exactly ``model.encode_text(tokens)``).
        std: standard deviation of the noise embeddings.
        position: ``"front"``, ``"middle"``, ``"end"`` or ``"inside"``.
        generator: CPU ``torch.Generator`` for the noise (the noise is drawn on the CPU
            and moved, so a seed gives the same noise on every device).
        noise: optional explicit ``(B, n_noise, W)`` or ``(1, n_noise, W)`` embeddings to
            insert instead of sampling (``std`` and ``generator`` are then unused).  Inserting
            the token embedding of a word reproduces ``encode_text`` of the text with that word.
        shared: draw one ``(n_noise, W)`` set of noise embeddings for the whole batch, as the
            authors do (``ctx_vectors`` expanded over the prompts); ``False``: one per row.

    Returns:
        ``(B, D)`` text features, not normalised (like ``encode_text(normalize=False)``).
    """
    _text_tower(model)
    if position not in NOISE_POSITIONS + ("inside",):
        raise ValueError(f"position={position!r}; choose one of {NOISE_POSITIONS + ('inside',)}.")
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
            noise = torch.randn(1 if shared else batch, n_noise, width, generator=generator) * std
        elif tuple(noise.shape) not in ((batch, n_noise, width), (1, n_noise, width)):
            raise ValueError(
                f"noise must have shape (B, n_noise, W) = {(batch, n_noise, width)} or "
                f"(1, n_noise, W), got {tuple(noise.shape)}."
            )
        noise = noise.expand(batch, n_noise, width)
        ext = torch.cat([x, noise.to(device=x.device, dtype=x.dtype)], dim=1)  # (B, L+n, W)
        # the first k1 noise tokens go before position ins1, the others before ins2 >= ins1
        if position == "front":
            ins1, ins2, k1 = torch.ones_like(eot), torch.ones_like(eot), n_noise
        elif position == "end":
            ins1, ins2, k1 = eot.clone(), eot.clone(), n_noise
        elif position == "middle":
            ins1, ins2, k1 = torch.ones_like(eot), eot.clone(), n_noise // 2
        else:
            ins1 = 1 + (eot - 1).clamp(min=0) // 2
            ins2, k1 = ins1, n_noise
        ins1, ins2 = ins1.clamp(min=1).unsqueeze(1), ins2.clamp(min=1).unsqueeze(1)
        j = torch.arange(length + n_noise, device=tokens.device).unsqueeze(0)  # (1, L+n)
        index = torch.where(
            j < ins1,
            j,
            torch.where(
                j < ins1 + k1,
                length + j - ins1,
                torch.where(
                    j < ins2 + k1,
                    j - k1,
                    torch.where(j < ins2 + n_noise, length + j - ins2, j - n_noise),
                ),
            ),
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


def info_nce(a: Tensor, b: Tensor, tau: float = 0.5, form: LossForm = "symmetric_simclr") -> Tensor:
    """InfoNCE between two views, row ``i`` of ``a`` paired with row ``i`` of ``b``.

    Features are L2-normalised first; ``s = a @ b.T / tau``.

    * ``form="symmetric_simclr"`` (the default: the authors' ``InfoNCELoss`` in
      ``utils/loss.py``, SimCLR's NT-Xent): ``2B`` rows; row ``a_i`` scores
      ``[a_i . b_j, a_i . a_k (k != i)]``, row ``b_i`` scores ``[b_i . a_j, b_i . b_k (k != i)]``,
      the positive is the cross-view pair.
    * ``form="cross_view"`` (the paper's training-loss equation, Sec. 4):
      ``mean_i -log softmax_j(s_ij)[i]``, the negatives of ``a_i`` are the other rows of ``b`` only.

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
    form: LossForm = "symmetric_simclr",
) -> Tensor:
    """CLAP's objective ``InfoNCE(prompt, augmented; tau) + lambda_c InfoNCE(augmented, class; tau_c)``.

    All inputs are *refined* features (after the network), ``(B, D)``, row-aligned:
    row ``i`` of ``class_name_features`` is the class-name prompt of prompt ``i``.
    ``form`` applies to **both** terms:

    * ``"symmetric_simclr"`` (the default): the authors' code, ``main/trainer.py`` computing
      ``loss_text_modal(z_t, z_t_) + scale_coef * loss_align_content(z_t_, z_c)`` with both
      losses ``InfoNCELoss`` of ``utils/loss.py``.  Its class term has intra-view negatives
      among the class-name features, including repeats of the same class in a batch;
    * ``"cross_view"``: the paper's training loss (Sec. 4), negatives from the other view only.

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
    backbone: Any, classnames: Sequence[str], form: str, seed: int = 1, normalize: bool = True
) -> Tensor:
    """CLIP's ``(C, D)`` zero-shot classifier for one of the paper's prompt forms.

    ``form`` is a key of :data:`ZERO_SHOT_PROMPTS`: ``"C"`` (the bare class name), ``"PC"``
    (``"a photo of a [class]"``), ``"CP"`` (``"a [class] in a photo"``) or ``"NC"`` (the class
    name after 4 Gaussian noise token embeddings, std 0.02, drawn with ``seed``; the
    paper's noisy-context probe).  Rows are L2-normalised, or raw text features with
    ``normalize=False`` (the network's input when ``input_features="raw"``).
    """
    if form not in ZERO_SHOT_PROMPTS:
        raise ValueError(f"Unknown prompt form {form!r}; use one of {list(ZERO_SHOT_PROMPTS)}.")
    texts = [ZERO_SHOT_PROMPTS[form].format(c) for c in classnames]
    if form != "NC":
        if normalize:
            return backbone.encode_text(texts).float()
        return encode_text_raw(backbone, texts)
    dev = torch.device(backbone.device)
    tokens = backbone.tokenizer(texts).to(dev)
    gen = torch.Generator().manual_seed(seed)
    with autocast(dev):
        w = encode_text_with_noise(backbone.model, tokens, 4, 0.02, "front", gen)
    return F.normalize(w.float(), dim=-1) if normalize else w.float()


@torch.no_grad()
def encode_text_raw(backbone: Any, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """``(T, D)`` text features *before* L2 normalisation (``model.encode_text``), fp32.

    The authors' trainer and evaluation feed these to the network (``main/trainer.py``,
    ``__encode_txt``; ``main/evaluate.py``, ``eval_zero_shot``).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("encode_text_raw got no texts; pass at least one prompt.")
    dev = torch.device(backbone.device)
    full = backbone.dtype == torch.float32
    outs = []
    for start in range(0, len(texts), batch_size):
        tokens = backbone.tokenizer(texts[start : start + batch_size]).to(dev)
        with torch.inference_mode(), autocast(dev, enabled=full):
            outs.append(backbone.model.encode_text(tokens))
    return torch.cat(outs).float().clone()


@torch.no_grad()
def lambda_scores(
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
    scores = lambda_scores(val_features, val_labels, text_features, network, grid)
    network.train(was_training)
    best = max(scores, key=lambda k: (*scores[k], -grid.index(k)))
    return best, {k: v[0] for k, v in scores.items()}
