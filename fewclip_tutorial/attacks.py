"""White-box adversarial attacks in [0, 1] pixel space: FGSM, PGD-20 and CW-20.

CLAP (Cai et al., ECCV 2024) reports robustness of zero-shot and one-shot CLIP
classifiers under FGSM, PGD-20 and CW-20 at ``eps = 0.031`` (L_inf).  The protocol
follows the authors' ``main/evaluate.py`` (``adversarial_attack`` and ``pgd_attack``):

* FGSM is one signed-gradient step of size ``eps`` from the clean image
  (Goodfellow et al., 2015);
* PGD-20 takes 20 signed-gradient steps of size ``alpha = eps / 10`` from a uniform
  random start in the ``eps`` ball, projecting back after each step (Madry et al., 2018);
* CW-20 is the same loop on the Carlini-Wagner margin ``max_{j != y} z_j - z_y``,
  capped at ``kappa = 50`` (the "CW-k" L_inf attack of TRADES-style evaluations).

The step size is the one choice that differs between evaluations in the literature:
:data:`STEP_SIZES` names the authors' ``eps / 10`` (``"clap"``, the default) and the
``eps / 4`` we used before (``"quarter"``, close to TRADES' 0.007 at ``eps = 0.031``).

Two conventions (:data:`CONVENTIONS`, the ``convention`` of :func:`zero_shot_robustness`):

* ``"authors"`` (the default of CLAP's zero-shot path): as the authors' ``main/evaluate.py``
  (``eval_zero_shot`` -> ``adversarial_attack`` -> ``pgd_attack``): the attacked images are
  the loader's CLIP-*normalised* tensors, ``eps`` and the clamp to ``[0, 1]`` act on those
  normalised values (the clamp cuts every negative normalised value to 0, so even a step of
  size 0 changes the image: a bug-like choice we reproduce, not endorse), and the loss is the
  cross-entropy of the raw cosine similarities (no x100 logit scale);
* ``"pixel"``: raw pixels in ``[0, 1]``: :class:`NormalizedClassifier` normalises inside its
  forward pass, so ``eps = 0.031`` means 8/255 of the pixel range, and the logits are
  scaled by CLIP's 100.  This is the stated budget of the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE

__all__ = [
    "CONVENTIONS",
    "EPS",
    "STEP_SIZES",
    "NormalizedClassifier",
    "attack",
    "cw",
    "cw_margin_loss",
    "fgsm",
    "pgd",
    "pixel_transform",
    "robust_accuracy",
    "step_size",
    "zero_shot_robustness",
]

#: The paper's L_inf budget (8/255 of the pixel range).
EPS: float = 0.031

#: PGD/CW step size as a fraction of ``eps``: ``"clap"`` is the authors' ``eps / 10``
#: (``main/evaluate.py``), ``"quarter"`` is ``eps / 4``.
STEP_SIZES: dict[str, float] = {"clap": 0.1, "quarter": 0.25}

#: Attack conventions of :func:`zero_shot_robustness` (see the module docstring).
CONVENTIONS: tuple[str, ...] = ("authors", "pixel")

LogitsFn = Callable[[Tensor], Tensor]


def step_size(alpha: float | str, eps: float) -> float:
    """The PGD step: a number is used as is, a name of :data:`STEP_SIZES` is a fraction of ``eps``."""
    if isinstance(alpha, str):
        if alpha not in STEP_SIZES:
            raise ValueError(f"alpha={alpha!r}: pass a number or one of {sorted(STEP_SIZES)}.")
        return STEP_SIZES[alpha] * eps
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0.")
    return float(alpha)


class NormalizedClassifier(nn.Module):
    """A cosine classifier on a visual encoder that takes raw pixels in ``[0, 1]``.

    ``logits = logit_scale * normalize(refine_fn(normalize(visual((x - mean) / std)))) @ W.T``

    Args:
        visual: image encoder ``(B, 3, H, W) -> (B, D)`` (e.g. ``backbone.model.visual``).
        mean, std: per-channel normalisation (e.g. ``backbone.mean``, ``backbone.std``).
        head_weights: ``(C, D')`` class weights (rows L2-normalised by the caller).
        refine_fn: optional feature map applied after the encoder (e.g. CLAP's refinement,
            ``lambda f: clap.refine(f, network, lam)``); its output is renormalised.
        logit_scale: multiplies the cosine similarities (CLIP's 100 by default; the authors'
            attack uses the raw cosines, 1).
        refine_input: ``"normalized"``: ``refine_fn`` sees L2-normalised encoder features;
            ``"raw"``: the encoder's output as is (the authors' network input).
        input_space: ``"pixel"``: inputs are pixels in ``[0, 1]``, normalised here;
            ``"normalized"``: inputs are already CLIP-normalised (the authors' attack).
    """

    def __init__(
        self,
        visual: Callable[[Tensor], Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        head_weights: Tensor,
        refine_fn: Callable[[Tensor], Tensor] | None = None,
        logit_scale: float = CLIP_LOGIT_SCALE,
        refine_input: str = "normalized",
        input_space: str = "pixel",
    ) -> None:
        super().__init__()
        if refine_input not in ("normalized", "raw"):
            raise ValueError(f"refine_input={refine_input!r}: choose 'normalized' or 'raw'.")
        if input_space not in ("pixel", "normalized"):
            raise ValueError(f"input_space={input_space!r}: choose 'pixel' or 'normalized'.")
        self.refine_input = refine_input
        self.input_space = input_space
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need 3 values, one per RGB channel.")
        if any(s <= 0 for s in std):
            raise ValueError(f"std={tuple(std)} must be positive.")
        self.visual = visual
        self.refine_fn = refine_fn
        self.logit_scale = float(logit_scale)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("head_weights", head_weights.detach().float().clone())

    def forward(self, pixels: Tensor) -> Tensor:
        """``(B, 3, H, W)`` pixels in ``[0, 1]`` (or normalised images) -> ``(B, C)`` logits."""
        x = pixels.float()
        if self.input_space == "pixel":
            x = (x - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        params = list(self.visual.parameters()) if isinstance(self.visual, nn.Module) else []
        if params:
            x = x.to(params[0].dtype)
        raw = self.visual(x).float()
        f = F.normalize(raw, dim=-1)
        if self.refine_fn is not None:
            f = F.normalize(
                self.refine_fn(raw if self.refine_input == "raw" else f).float(), dim=-1
            )
        return self.logit_scale * f @ self.head_weights.to(f.device).T


def pixel_transform(preprocess: Any) -> Any:
    """``preprocess`` without its ``Normalize`` step: PIL -> ``(3, H, W)`` pixels in ``[0, 1]``."""
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        raise ValueError(
            "pixel_transform needs a torchvision Compose preprocess (e.g. backbone.preprocess) "
            "to strip Normalize from."
        )
    return T.Compose([t for t in steps if not isinstance(t, T.Normalize)])


def _check(images: Tensor, labels: Tensor, eps: float, pixels: bool = True) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}.")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got shape {tuple(labels.shape)}.")
    if not eps > 0:
        raise ValueError(f"eps={eps} must be > 0 (the paper uses 0.031).")
    lo, hi = float(images.min()), float(images.max())
    if pixels and (lo < 0.0 or hi > 1.0):
        raise ValueError(
            f"images span [{lo:.3f}, {hi:.3f}]: attacks work in [0, 1] pixel space; pass "
            "un-normalised images (a transform without Normalize) and let NormalizedClassifier "
            "normalise inside the forward pass, or pass pixels=False for the authors' "
            "convention (normalised images, clamped to [0, 1] all the same)."
        )


def cw_margin_loss(logits: Tensor, labels: Tensor, kappa: float = 50.0) -> Tensor:
    """Per-sample CW margin ``min(max_{j != y} z_j - z_y, kappa)``: ``(B, C), (B,) -> (B,)``.

    Maximising it pushes the best wrong class above the true one.
    """
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return (others.max(1).values - true).clamp(max=kappa)


def _input_grad(logits_fn: LogitsFn, x: Tensor, labels: Tensor, kind: str, kappa: float) -> Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = logits_fn(x)
        if kind == "ce":
            loss = F.cross_entropy(logits, labels, reduction="sum")
        elif kind == "cw":
            loss = cw_margin_loss(logits, labels, kappa).sum()
        else:
            raise ValueError(f"loss={kind!r}; choose 'ce' or 'cw'.")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def pgd(
    logits_fn: LogitsFn,
    images: Tensor,
    labels: Tensor,
    eps: float = EPS,
    alpha: float | str = "clap",
    steps: int = 20,
    random_start: bool = True,
    loss: str = "ce",
    kappa: float = 50.0,
    generator: torch.Generator | None = None,
    pixels: bool = True,
) -> Tensor:
    """PGD (L_inf): ``x <- Proj_{B(x0, eps) & [0,1]}(x + alpha * sign(grad_x loss))``, ``steps`` times.

    Args:
        logits_fn: pixels in ``[0, 1]`` ``(B, 3, H, W)`` -> logits ``(B, C)``.
        images: ``(B, 3, H, W)`` clean images in ``[0, 1]``; labels: ``(B,)``.
        alpha: step size, a number or a name of :data:`STEP_SIZES` (default ``"clap"``:
            ``eps / 10``, the authors' step).
        random_start: start from a uniform point in the ``eps`` ball.
        loss: ``"ce"`` (PGD) or ``"cw"`` (the CW margin, see :func:`cw_margin_loss`).
        generator: CPU generator for the random start (deterministic across devices).
        pixels: ``True``: ``images`` must lie in ``[0, 1]``; ``False``: any range (the
            authors' convention: CLIP-normalised images, still clamped to ``[0, 1]``).

    Returns:
        ``(B, 3, H, W)`` adversarial images, ``|x_adv - x|_inf <= eps``, inside ``[0, 1]``.
    """
    _check(images, labels, eps, pixels)
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1.")
    alpha = step_size(alpha, eps)
    x0 = images.detach()
    x = x0.clone()
    if random_start:
        noise = torch.rand(x0.shape, generator=generator) * 2 - 1
        x = (x0 + eps * noise.to(device=x0.device, dtype=x0.dtype)).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = _input_grad(logits_fn, x, labels, loss, kappa)
        x = x + alpha * grad.sign()
        x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0.0, 1.0).detach()
    return x


def fgsm(
    logits_fn: LogitsFn, images: Tensor, labels: Tensor, eps: float = EPS, pixels: bool = True
) -> Tensor:
    """FGSM: ``clip(x + eps * sign(grad_x CE), 0, 1)``, one :func:`pgd` step of size ``eps``."""
    return pgd(
        logits_fn, images, labels, eps, alpha=eps, steps=1, random_start=False, pixels=pixels
    )


def cw(logits_fn: LogitsFn, images: Tensor, labels: Tensor, eps: float = EPS, **kwargs) -> Tensor:
    """CW-``steps`` (L_inf): :func:`pgd` with the Carlini-Wagner margin loss (same keywords)."""
    return pgd(logits_fn, images, labels, eps, loss="cw", **kwargs)


def attack(
    name: str, logits_fn: LogitsFn, images: Tensor, labels: Tensor, eps: float = EPS, seed: int = 0,
    **pgd_kwargs: Any,
) -> Tensor:  # fmt: skip
    """Dispatch by name: ``"clean"``, ``"fgsm"``, ``"pgd"`` or ``"cw"`` (seeded random start).

    ``pgd_kwargs`` (``steps``, ``alpha``) go to :func:`pgd` for ``"pgd"`` and ``"cw"``.
    """
    if name == "clean":
        return images
    if name == "fgsm":
        return fgsm(logits_fn, images, labels, eps, pgd_kwargs.get("pixels", True))
    if name in ("pgd", "cw"):
        gen = torch.Generator().manual_seed(seed)
        loss = "ce" if name == "pgd" else "cw"
        return pgd(logits_fn, images, labels, eps, loss=loss, generator=gen, **pgd_kwargs)
    raise ValueError(f"unknown attack {name!r}; choose 'clean', 'fgsm', 'pgd' or 'cw'.")


def robust_accuracy(
    logits_fn: LogitsFn,
    images: Tensor,
    labels: Tensor,
    attacks: Sequence[str] = ("clean", "fgsm", "pgd", "cw"),
    eps: float = EPS,
    batch_size: int = 64,
    seed: int = 0,
    steps: int = 20,
    alpha: float | str = "clap",
    progress: bool = False,
    pixels: bool = True,
) -> dict[str, float]:
    """Accuracy in percent on clean and attacked images: ``{attack name: accuracy}``.

    Args:
        logits_fn: pixels in ``[0, 1]`` -> logits (e.g. a :class:`NormalizedClassifier`).
        images: ``(N, 3, H, W)`` in ``[0, 1]``; labels ``(N,)``.
        batch_size: images attacked at once (batch ``b`` uses seed ``seed + b``).
        steps, alpha: PGD/CW iterations and step (see :func:`pgd`).
        pixels: see :func:`pgd` (``False``: the authors' normalised-image convention).
    """
    _check(images, labels, eps, pixels)
    correct = {a: 0 for a in attacks}
    starts = range(0, images.shape[0], batch_size)
    for b, start in enumerate(tqdm(starts, desc="attacks", disable=not progress, leave=False)):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        for a in attacks:
            adv = attack(a, logits_fn, x, y, eps, seed + b, steps=steps, alpha=alpha, pixels=pixels)
            with torch.no_grad():
                correct[a] += int((logits_fn(adv).argmax(-1) == y).sum())
    n = images.shape[0]
    return {a: 100.0 * c / n for a, c in correct.items()}


def zero_shot_robustness(
    backbone: Any,
    split: Any,
    heads: dict[str, tuple[Tensor, Callable[[Tensor], Tensor] | None]],
    n_images: int,
    seed: int = 0,
    alpha: float | str = "clap",
    convention: str = "authors",
    refine_input: str = "normalized",
) -> dict[str, dict[str, float]]:
    """Clean / FGSM / PGD-20 / CW-20 accuracy of zero-shot heads on ``n_images`` test images.

    Args:
        backbone: a Backbone (``model.visual``, ``preprocess``, ``mean``, ``std``, ``device``).
        split: a :class:`~fewclip_tutorial.data.base.LabeledSplit`; ``n_images`` of it are
            drawn with ``seed`` (without replacement).
        heads: ``name -> (head_weights (C, D'), refine_fn or None)``, see
            :class:`NormalizedClassifier`.
        alpha: PGD/CW step (see :func:`pgd`).
        convention: ``"authors"`` (default, the authors' ``main/evaluate.py``): attack the
            CLIP-normalised images (``backbone.preprocess``), clamp them to ``[0, 1]`` (a
            bug-like choice: it cuts negative normalised values), cross-entropy on the raw
            cosines; ``"pixel"``: attack pixels in ``[0, 1]`` with logits scaled by 100.
        refine_input: what the heads' ``refine_fn`` receives, ``"normalized"`` or ``"raw"``
            encoder features (see :class:`NormalizedClassifier`).

    Returns:
        ``{head name: {attack: accuracy %}}``; every head sees the same images.
    """
    import numpy as np

    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: choose one of {list(CONVENTIONS)}.")
    authors = convention == "authors"
    idx = np.random.default_rng(seed).choice(len(split), min(n_images, len(split)), replace=False)
    to_input = backbone.preprocess if authors else pixel_transform(backbone.preprocess)
    images = torch.stack([to_input(split.load_image(int(i))) for i in idx]).to(backbone.device)
    labels = torch.as_tensor(np.asarray(split.labels)[idx]).to(backbone.device)
    out = {}
    for name, (head, refine_fn) in heads.items():
        clf = NormalizedClassifier(
            backbone.model.visual, backbone.mean, backbone.std, head.detach(), refine_fn,
            logit_scale=1.0 if authors else CLIP_LOGIT_SCALE, refine_input=refine_input,
            input_space="normalized" if authors else "pixel",
        )  # fmt: skip
        out[name] = robust_accuracy(clf, images, labels, seed=seed, alpha=alpha, pixels=not authors)
    return out
