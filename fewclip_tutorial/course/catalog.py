"""The course's exercises, chapter by chapter: each refers to the method it teaches.

The checker (:mod:`fewclip_tutorial.course.exercises`) knows nothing of the chapters; this
module registers every exercise with it, and is imported with :mod:`fewclip_tutorial.course`
(so ``get_exercise`` finds them all).  The methods never import the course.

A reference defined here (a lambda, a small wrapper) names the package function it stands
for in ``forbidden``, so a submission that calls it is refused as it was when the reference
lived beside that function (:meth:`~fewclip_tutorial.course.exercises.Exercise.forbidden_functions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fewclip_tutorial.course.exercises import register_exercise
from fewclip_tutorial.methods.clap.core import info_nce
from fewclip_tutorial.methods.clap.prompts import (
    PAPER_ART_STYLES,
    PAPER_COLORS,
    PAPER_IMAGE_TYPES,
    PAPER_SIZES,
    PromptAttributes,
    delete_color,
)
from fewclip_tutorial.methods.cross_modal.core import (
    build_mixed_batch,
    epoch_batches,
    text_samples,
    wise_ft,
)
from fewclip_tutorial.methods.fd_align.core import spurious_kl, spurious_prototypes
from fewclip_tutorial.methods.tip_adapter.core import affinity, tip_logits
from fewclip_tutorial.metrics import mean_std_over_seeds, select_on_validation
from fewclip_tutorial.pretrain import caption_targets, contrastive_loss
from fewclip_tutorial.zeroshot import prompt_ensemble, zero_shot_logits

__all__ = ["register_all"]


# --------------------------------------------------------------------------- zero-shot (chapter 1)


def _sizes(gen: torch.Generator, *ranges: tuple[int, int]) -> list[int]:
    return [int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ranges]


def _prompt_ensemble_inputs(gen: torch.Generator) -> tuple[Tensor]:
    C, M, D = _sizes(gen, (2, 6), (2, 5), (3, 9))
    # Unnormalised embeddings with varied norms: forgetting to normalise shows.
    scale = torch.rand(C, M, 1, generator=gen) * 3 + 0.2
    return (torch.randn(C, M, D, generator=gen) * scale,)


def _zero_shot_logits_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    N, C, D = _sizes(gen, (1, 7), (2, 6), (3, 9))
    f = torch.nn.functional.normalize(torch.randn(N, D, generator=gen), dim=-1)
    W = torch.nn.functional.normalize(torch.randn(C, D, generator=gen), dim=-1)
    logit_scale = float(torch.empty(1).uniform_(10.0, 100.0, generator=gen))
    return f, W, logit_scale


def _register_zero_shot() -> None:
    """The zero-shot chapter's ``prompt_ensemble`` and ``zero_shot_logits``."""
    register_exercise(
        "prompt_ensemble",
        prompt_ensemble,
        _prompt_ensemble_inputs,
        description=(
            "Write prompt_ensemble(text_features) taking (C, M, D) embeddings of M prompts per "
            "class and returning the (C, D) classifier: normalise each prompt embedding, average "
            "over the M prompts, and normalise the average."
        ),
        hint="Two normalisations: one per prompt (dim=-1 of (C, M, D)), one of the mean.",
    )

    register_exercise(
        "zero_shot_logits",
        zero_shot_logits,
        _zero_shot_logits_inputs,
        description=(
            "Write zero_shot_logits(image_features, classifier, logit_scale) taking (N, D) image "
            "features and a (C, D) classifier (both L2-normalised) and returning (N, C) logits "
            "logit_scale * cosine similarity."
        ),
        hint="The classifier has one row per class: multiply by its transpose, then scale.",
        atol=1e-4,
    )


# --------------------------------------------------------------------------- Tip-Adapter (chapter 2)


def _tip_logits_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float]:
    m, c, k, d = (int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in
                  ((1, 6), (2, 5), (1, 3), (3, 8)))  # fmt: skip
    f = F.normalize(torch.randn(m, d, generator=gen), dim=-1)
    clip_weights = F.normalize(torch.randn(c, d, generator=gen), dim=-1)
    keys = F.normalize(torch.randn(c * k, d, generator=gen), dim=-1)
    keys[0] = f[0]  # one exact match: its affinity must be 1
    labels = torch.arange(c).repeat_interleave(k)[torch.randperm(c * k, generator=gen)]
    alpha, beta = (float(torch.empty(1).uniform_(0.5, hi, generator=gen)) for hi in (5.0, 8.0))
    return f, clip_weights, keys, F.one_hot(labels, c).float(), alpha, beta


def _affinity_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    f, _, keys, _, _, beta = _tip_logits_inputs(gen)
    return f, keys, beta


def _register_tip_adapter() -> None:
    """Register the exercises ``tip_affinity`` and ``tip_cache_logits`` (idempotent)."""

    register_exercise(
        "tip_affinity",
        affinity,
        _affinity_inputs,
        description=(
            "Write affinity(f, cache_keys, beta) taking (M, D) L2-normalised features, "
            "(N, D) L2-normalised cache keys and a float beta, and returning the (M, N) "
            "Tip-Adapter affinities exp(-beta * (1 - cosine similarity))."
        ),
        hint=(
            "Cosine similarity of unit vectors is f @ cache_keys.T; an image equal to a key "
            "must get affinity exactly 1."
        ),
    )
    register_exercise(
        "tip_cache_logits",
        tip_logits,
        _tip_logits_inputs,
        description=(
            "Write tip_logits(f, clip_weights, cache_keys, cache_values, alpha, beta) "
            "returning the (M, C) Tip-Adapter logits 100 * f @ W.T + alpha * A @ L, "
            "where A is the (M, N) affinity of the features to the (N, D) cache keys and L "
            "the (N, C) one-hot cache values."
        ),
        hint=(
            "Only the CLIP branch is multiplied by 100; the cache branch A @ L is scaled by "
            "alpha alone."
        ),
        atol=1e-4,
    )


# --------------------------------------------------------------------------- cross-modal (chapter 3)


def _batch_exercise_inputs(gen: torch.Generator) -> tuple[Any, ...]:
    n, c, m, d = (
        int(torch.randint(lo, hi + 1, (1,), generator=gen))
        for lo, hi in ((4, 12), (2, 5), (1, 3), (3, 8))
    )
    image_features = F.normalize(torch.randn(n, d, generator=gen), dim=-1)
    image_labels = torch.randint(c, (n,), generator=gen)
    text_features, text_labels = text_samples(torch.randn(c, m, d, generator=gen))
    half = int(torch.randint(1, min(n, c * m) + 1, (1,), generator=gen))
    image_index = next(epoch_batches(n, half, gen))
    text_index = next(epoch_batches(c * m, half, gen))
    return image_features, image_labels, text_features, text_labels, image_index, text_index


def _reference_batch(*inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exercise's answer: :func:`build_mixed_batch` as a plain tuple ``(x, y, is_text)``."""
    return tuple(build_mixed_batch(*inputs))


def _wise_exercise_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, float]:
    c, d = (int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((2, 6), (3, 9)))
    weight = float(torch.rand(1, generator=gen))
    return torch.randn(c, d, generator=gen), torch.randn(c, d, generator=gen), weight


def _register_cross_modal() -> None:
    """Register this chapter's exercises with :mod:`fewclip_tutorial.course.exercises`.

    * ``"cross_modal_batch"``: ``fn(image_features (N, D), image_labels (N,),
      text_features (T, D), text_labels (T,), image_index (B_img,), text_index (B_txt,))
      -> (x (B, D), y (B,), is_text (B,))``: the image rows, then the text rows
      (what :func:`build_mixed_batch` does for every training batch).
    * ``"wise_ft"``: ``fn(head_weight (C, D), zero_shot_weight (C, D), weight) -> (C, D)``.

    Called by :mod:`fewclip_tutorial.methods` on import; calling it again is harmless.
    """

    register_exercise(
        "cross_modal_batch",
        _reference_batch,
        _batch_exercise_inputs,
        description=(
            "Write mixed_batch(image_features, image_labels, text_features, text_labels, "
            "image_index, text_index) returning (x, y, is_text): the rows image_features["
            "image_index] followed by text_features[text_index] as float32, their int64 "
            "labels, and a bool mask that is True on the text rows."
        ),
        hint="torch.cat the two halves along dim 0, images first; labels with .long().",
        forbidden=(build_mixed_batch,),
    )
    register_exercise(
        "wise_ft",
        wise_ft,
        _wise_exercise_inputs,
        description=(
            "Write wise_ft(head_weight, zero_shot_weight, weight) returning the weight-space "
            "ensemble (1 - weight) * zero_shot_weight + weight * head_weight."
        ),
        hint="weight=0 must give the zero-shot head, weight=1 the learned head.",
    )


# --------------------------------------------------------------------------- FD-Align (chapter 4)


def _exercise_spurious_prototypes_inputs(gen: torch.Generator) -> Tensor:
    c, m, d = (
        int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((2, 6), (2, 7), (3, 9))
    )
    scale = (
        torch.rand(c, m, 1, generator=gen) * 3 + 0.2
    )  # varied norms: a missing normalisation shows
    return torch.randn(c, m, d, generator=gen) * scale


def _exercise_spurious_kl_inputs(gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, float]:
    b, s, d = (
        int(torch.randint(lo, hi + 1, (1,), generator=gen)) for lo, hi in ((2, 6), (2, 6), (3, 9))
    )
    frozen = torch.randn(b, d, generator=gen)
    protos = F.normalize(torch.randn(s, d, generator=gen), dim=-1)
    return frozen + 0.5 * torch.randn(b, d, generator=gen), frozen, protos, 10.0


def _register_fd_align() -> None:
    """Register ``"spurious_prototypes"`` (``fn(text (C, M, D)) -> (M, D)``) and
    ``"spurious_kl"`` (``fn(finetuned (B, D), frozen (B, D), protos (S, D), logit_scale)``,
    the paper's per-image ``KL(P_f || P_f0)`` averaged over the batch)."""

    register_exercise(
        "spurious_prototypes",
        spurious_prototypes,
        _exercise_spurious_prototypes_inputs,
        description=(
            "Write spurious_prototypes(text_features) taking (C, M, D) embeddings of M templates "
            "for each of C classes and returning (M, D) unit prototypes: normalise each "
            "embedding, average over the classes, normalise again."
        ),
        hint="It is the class prototype with the roles swapped: average over dim=0, not dim=1.",
        atol=1e-4,
    )
    register_exercise(
        "spurious_kl",
        spurious_kl,
        _exercise_spurious_kl_inputs,
        description=(
            "Write spurious_kl(finetuned, frozen, spurious_protos, logit_scale) for (B, D) "
            "features of the same images from the fine-tuned and the frozen encoder and (S, D) "
            "unit prototypes: P = softmax(logit_scale * normalize(finetuned) @ protos.T), Q the "
            "same for frozen; return KL(P || Q) = sum_s P (log P - log Q), averaged over the B images."
        ),
        hint=(
            "Use log_softmax for both log P and log Q; sum over the prototypes (dim=1), then "
            "mean over the batch. F.kl_div(input, target) computes KL(target || exp(input))."
        ),
        atol=1e-5,
    )


# --------------------------------------------------------------------------- CLAP (chapter 5)


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


def _register_clap() -> None:
    """Register the CLAP exercises with :mod:`fewclip_tutorial.course.exercises`.

    * ``"prompt_augmentation"``: ``fn(prompt: PromptAttributes) -> str``, object colour
      deletion (OCD) rendered as text (``delete_color(prompt).render()``);
    * ``"info_nce"``: ``fn(a (B, D), b (B, D), tau) -> scalar``, cross-view InfoNCE.

    Called by :mod:`fewclip_tutorial.methods` after importing this module.
    """

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
        forbidden=(delete_color,),
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
        forbidden=(info_nce,),
    )


# --------------------------------------------------------------------------- comparison (chapter 6)


def _results_table_inputs(gen: torch.Generator) -> tuple[Tensor]:
    seeds = int(torch.randint(2, 6, (1,), generator=gen))
    methods = int(torch.randint(2, 7, (1,), generator=gen))
    return (torch.rand(seeds, methods, generator=gen, dtype=torch.float64) * 60 + 40,)


def _validation_table_inputs(gen: torch.Generator) -> tuple[Tensor]:
    """Validation accuracies on 40 images (multiples of 2.5 points) with a planted tie: a
    later column holds the best column's values in another seed order (the same mean)."""
    seeds = int(torch.randint(1, 5, (1,), generator=gen))
    methods = int(torch.randint(3, 7, (1,), generator=gen))
    val = torch.randint(16, 41, (seeds, methods), generator=gen).double() * 2.5
    best = int(val.mean(0).argmax())
    other = int(torch.randint(0, methods - 1, (1,), generator=gen))
    other += other >= best  # any column but the best
    val[:, other] = val[torch.randperm(seeds, generator=gen), best]
    return (val,)


def _register_comparison() -> None:
    """The comparison chapter's ``seed_mean_std`` and ``select_on_validation``."""

    register_exercise(
        "seed_mean_std",
        mean_std_over_seeds,
        _results_table_inputs,
        description=(
            "Write mean_std_over_seeds(acc) taking an (S, M) table of accuracies (one row per "
            "seed, one column per method) and returning a tuple (mean, std) of (M,) tensors: "
            "the mean over the seeds and the population standard deviation (divide by S), "
            "as the book's 'mean ± std' tables print them."
        ),
        hint=(
            "Reduce over dim=0 (the seeds). torch.std divides by S - 1 unless you pass "
            "correction=0; the book's tables divide by S."
        ),
    )
    register_exercise(
        "select_on_validation",
        select_on_validation,
        _validation_table_inputs,
        description=(
            "Write select_on_validation(val_acc) taking an (S, M) table of validation "
            "accuracies (seeds x methods, methods listed from the simplest) and returning the "
            "int index of the method with the highest mean over the seeds; methods whose means "
            "are equal (within 1e-6 points) tie, and a tie goes to the method listed first."
        ),
        hint=(
            "Average over dim=0 first, then take the first index that reaches the maximum: "
            "every input has a planted tie between two methods."
        ),
    )


# --------------------------------------------------------------------------- pretraining (appendix)


def _exercise_tokens(gen: torch.Generator, batch: int) -> torch.Tensor:
    """``(B, L)`` token ids shaped like open_clip's (start token, words, end token, padding),
    drawn from fewer distinct captions than ``B``, so at least one caption repeats."""
    n_words = int(torch.randint(1, 4, (1,), generator=gen))
    n_unique = int(torch.randint(1, batch, (1,), generator=gen))
    words = torch.randint(100, 120, (n_unique, n_words), generator=gen)
    sot = torch.full((n_unique, 1), 49406)
    eot = torch.full((n_unique, 1), 49407)
    pad = torch.zeros(n_unique, 2, dtype=torch.long)
    captions = torch.cat([sot, words, eot, pad], dim=1)
    return captions[torch.randint(0, n_unique, (batch,), generator=gen)]


def _caption_targets_inputs(gen: torch.Generator) -> tuple[torch.Tensor]:
    batch = int(torch.randint(3, 9, (1,), generator=gen))
    return (_exercise_tokens(gen, batch),)


def _contrastive_loss_inputs(
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = int(torch.randint(3, 9, (1,), generator=gen))
    dim = int(torch.randint(4, 11, (1,), generator=gen))
    image_features = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    text_features = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
    logit_scale = torch.empty(()).uniform_(1.0, 100.0, generator=gen)
    return image_features, text_features, _exercise_tokens(gen, batch), logit_scale


def _register_pretraining() -> None:
    """Register the appendix's exercises ``pretrain_caption_targets`` and
    ``pretrain_contrastive_loss`` (calling it again is harmless)."""

    register_exercise(
        "pretrain_caption_targets",
        caption_targets,
        _caption_targets_inputs,
        description=(
            "Write caption_targets(tokens) taking (B, L) caption token ids and returning the "
            "(B, B) float targets P[i, j] = 1[c_i == c_j] / #{k : c_k == c_i}: caption i's "
            "probability mass spread evenly over every caption of the batch equal to it."
        ),
        hint=(
            "Two captions are equal when all L of their tokens are: compare (B, 1, L) with "
            "(1, B, L) and reduce over the last dimension; then divide each row by its sum."
        ),
    )
    register_exercise(
        "pretrain_contrastive_loss",
        contrastive_loss,
        _contrastive_loss_inputs,
        description=(
            "Write contrastive_loss(image_features, text_features, tokens, logit_scale) taking "
            "(B, D) L2-normalised image and text features, (B, L) caption tokens and a scalar "
            "tensor logit_scale, and returning the scalar loss 0.5 * (CE(P, softmax of the rows "
            "of s F T^T) + CE(P, softmax of the rows of s T F^T)), each cross-entropy averaged "
            "over the B rows, with the soft targets P of pretrain_caption_targets."
        ),
        hint=(
            "The text-to-image direction uses the transposed logits; with soft targets the "
            "cross-entropy of a row is -sum_j P[i, j] * log_softmax(logits)[i, j]. Repeated "
            "captions are positives: F.cross_entropy with arange(B) labels ignores them."
        ),
    )


def register_all() -> None:
    """Register every chapter's exercises (calling it again is harmless)."""
    for register in (
        _register_zero_shot,
        _register_tip_adapter,
        _register_cross_modal,
        _register_fd_align,
        _register_clap,
        _register_comparison,
        _register_pretraining,
    ):
        register()


register_all()
