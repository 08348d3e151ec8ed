"""White-box adversarial attacks in [0, 1] pixel space: FGSM, PGD-20 and CW-20.

CLAP (Cai et al., ECCV 2024) reports robustness of zero-shot and one-shot CLIP
classifiers under FGSM, PGD-20 and CW-20 at ``eps = 0.031`` (L_inf).  The
reference code clamps images that are *already normalised* by CLIP's mean/std,
so its ``eps`` and its ``[0, 1]`` box are not in pixel units.  Here every attack
works on raw pixels in ``[0, 1]``: the classifier wrapper
:class:`NormalizedClassifier` normalises inside its forward pass, so ``eps = 0.031``
means 8/255 of the pixel range, as usual in the robustness literature.

* :func:`fgsm` -- one signed-gradient step of size ``eps`` (Goodfellow et al., 2015).
* :func:`pgd` -- ``steps`` signed-gradient steps of size ``alpha`` from a random start in
  the ``eps`` ball, projected back after each step (Madry et al., 2018).
* :func:`cw` -- PGD on the Carlini-Wagner margin loss (L_inf "CW-k" as in TRADES-style
  evaluations): ``max_{j != y} z_j - z_y``, capped at ``kappa``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "EPS",
    "NormalizedClassifier",
    "attack",
    "cw",
    "cw_margin_loss",
    "fgsm",
    "pgd",
    "robust_accuracy",
]

#: The paper's L_inf budget (8/255 of the pixel range).
EPS: float = 0.031

LogitsFn = Callable[[Tensor], Tensor]


class NormalizedClassifier(nn.Module):
    """A cosine classifier on a visual encoder that takes raw pixels in ``[0, 1]``.

    ``logits = logit_scale * normalize(refine_fn(normalize(visual((x - mean) / std)))) @ W.T``

    Args:
        visual: image encoder ``(B, 3, H, W) -> (B, D)`` (e.g. ``backbone.model.visual``).
        mean, std: per-channel normalisation (e.g. ``backbone.mean``, ``backbone.std``).
        head_weights: ``(C, D')`` class weights (rows L2-normalised by the caller).
        refine_fn: optional feature map applied after the encoder (e.g. CLAP's refinement,
            ``lambda f: clap.refine(f, network, lam)``); its output is renormalised.
        logit_scale: multiplies the cosine similarities (100 for CLIP-style heads).
    """

    def __init__(
        self,
        visual: Callable[[Tensor], Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        head_weights: Tensor,
        refine_fn: Callable[[Tensor], Tensor] | None = None,
        logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
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
        """``(B, 3, H, W)`` pixels in ``[0, 1]`` -> ``(B, C)`` logits."""
        x = (pixels.float() - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        params = list(self.visual.parameters()) if isinstance(self.visual, nn.Module) else []
        if params:
            x = x.to(params[0].dtype)
        f = F.normalize(self.visual(x).float(), dim=-1)
        if self.refine_fn is not None:
            f = F.normalize(self.refine_fn(f).float(), dim=-1)
        return self.logit_scale * f @ self.head_weights.to(f.device).T


def _check(images: Tensor, labels: Tensor, eps: float) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}.")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got shape {tuple(labels.shape)}.")
    if not eps > 0:
        raise ValueError(f"eps={eps} must be > 0 (the paper uses 0.031).")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"images span [{lo:.3f}, {hi:.3f}]: attacks work in [0, 1] pixel space; pass "
            "un-normalised images (a transform without Normalize) and let NormalizedClassifier "
            "normalise inside the forward pass."
        )


def cw_margin_loss(logits: Tensor, labels: Tensor, kappa: float = 50.0) -> Tensor:
    """Per-sample CW margin ``min(max_{j != y} z_j - z_y, kappa)``: ``(B, C), (B,) -> (B,)``.

    Maximising it pushes the best wrong class above the true one.
    """
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return (others.max(1).values - true).clamp(max=kappa)


def _loss(logits: Tensor, labels: Tensor, kind: str, kappa: float) -> Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, labels, reduction="sum")
    if kind == "cw":
        return cw_margin_loss(logits, labels, kappa).sum()
    raise ValueError(f"loss={kind!r}; choose 'ce' or 'cw'.")


def _input_grad(logits_fn: LogitsFn, x: Tensor, labels: Tensor, kind: str, kappa: float) -> Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = _loss(logits_fn(x), labels, kind, kappa)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(logits_fn: LogitsFn, images: Tensor, labels: Tensor, eps: float = EPS) -> Tensor:
    """FGSM: ``clip(x + eps * sign(grad_x CE), 0, 1)``.

    Args:
        logits_fn: pixels in ``[0, 1]`` ``(B, 3, H, W)`` -> logits ``(B, C)``.
        images: ``(B, 3, H, W)`` clean images in ``[0, 1]``.
        labels: ``(B,)`` true labels.

    Returns:
        ``(B, 3, H, W)`` adversarial images, ``|x_adv - x|_inf <= eps``, inside ``[0, 1]``.
    """
    _check(images, labels, eps)
    grad = _input_grad(logits_fn, images, labels, "ce", 0.0)
    return (images + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(
    logits_fn: LogitsFn,
    images: Tensor,
    labels: Tensor,
    eps: float = EPS,
    alpha: float | None = None,
    steps: int = 20,
    random_start: bool = True,
    loss: str = "ce",
    kappa: float = 50.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD (L_inf): ``x <- Proj_{B(x0, eps) & [0,1]}(x + alpha * sign(grad_x loss))``, ``steps`` times.

    Args:
        alpha: step size (default ``eps / 4``).
        random_start: start from a uniform point in the ``eps`` ball.
        loss: ``"ce"`` (PGD) or ``"cw"`` (the CW margin, see :func:`cw_margin_loss`).
        generator: CPU generator for the random start (deterministic across devices).

    Returns:
        ``(B, 3, H, W)`` adversarial images.
    """
    _check(images, labels, eps)
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1.")
    alpha = eps / 4 if alpha is None else alpha
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


def cw(
    logits_fn: LogitsFn,
    images: Tensor,
    labels: Tensor,
    eps: float = EPS,
    alpha: float | None = None,
    steps: int = 20,
    kappa: float = 50.0,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CW-``steps`` (L_inf): :func:`pgd` with the Carlini-Wagner margin loss."""
    return pgd(logits_fn, images, labels, eps, alpha, steps, random_start, "cw", kappa, generator)


def attack(
    name: str,
    logits_fn: LogitsFn,
    images: Tensor,
    labels: Tensor,
    eps: float = EPS,
    seed: int = 0,
    steps: int = 20,
) -> Tensor:
    """Dispatch by name: ``"clean"``, ``"fgsm"``, ``"pgd"`` or ``"cw"`` (seeded random start)."""
    gen = torch.Generator().manual_seed(seed)
    if name == "clean":
        return images
    if name == "fgsm":
        return fgsm(logits_fn, images, labels, eps)
    if name == "pgd":
        return pgd(logits_fn, images, labels, eps, steps=steps, generator=gen)
    if name == "cw":
        return cw(logits_fn, images, labels, eps, steps=steps, generator=gen)
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
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy in percent on clean and attacked images: ``{attack name: accuracy}``.

    Args:
        logits_fn: pixels in ``[0, 1]`` -> logits (e.g. a :class:`NormalizedClassifier`).
        images: ``(N, 3, H, W)`` in ``[0, 1]``; labels ``(N,)``.
        batch_size: images attacked at once (batch ``b`` uses seed ``seed + b``).
    """
    _check(images, labels, eps)
    correct = {a: 0 for a in attacks}
    starts = range(0, images.shape[0], batch_size)
    for b, start in enumerate(tqdm(starts, desc="attacks", disable=not progress, leave=False)):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        for a in attacks:
            adv = attack(a, logits_fn, x, y, eps, seed + b, steps)
            with torch.no_grad():
                correct[a] += int((logits_fn(adv).argmax(-1) == y).sum())
    n = images.shape[0]
    return {a: 100.0 * c / n for a, c in correct.items()}
