"""FD-Align's trainer: a copy of the image encoder fine-tuned with the FD-Align objective.

:func:`train_fd_align` encodes each augmented batch with the trainable and the frozen
encoder (:func:`encode_pair`) and minimises
:func:`~fewclip_tutorial.methods.fd_align.core.fd_align_loss` through the one loop,
:func:`fewclip_tutorial.training.fit`; which blocks train is
:func:`fewclip_tutorial.encoders.trainable_parameter_names`.  The authors' code is
``modules/FD_Align_SCP_CoOp.py`` in ``skingorz/FD-Align``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fewclip_tutorial.data.base import LabeledSplit
from fewclip_tutorial.device import default_num_workers, seed_everything
from fewclip_tutorial.distributed import DistInfo, dist_info, shard_batch, wrap_ddp
from fewclip_tutorial.encoders import trainable_parameter_names, with_visual
from fewclip_tutorial.features import FeatureSet, ViewDataset, crop_transform, extract_features
from fewclip_tutorial.methods.fd_align.config import FDAlignConfig
from fewclip_tutorial.methods.fd_align.core import (
    classification_logits,
    fd_align_loss,
    spurious_kl,
    trained_head,
)
from fewclip_tutorial.training import FitResult, fit
from fewclip_tutorial.zeroshot import CLIP_LOGIT_SCALE

__all__ = ["FDAlignResult", "encode_pair", "head_of", "train_fd_align", "train_transform"]


class _Trainable(nn.Module):
    """The encoder being fine-tuned.  In train mode its batch-norm layers keep their
    pretrained statistics: with a few dozen images per batch, updating them would move
    the features of every layer, frozen ones included."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def train(self, mode: bool = True) -> _Trainable:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    """Frozen and trainable encoders run the same attention kernels (the fused fast path of
    ``nn.MultiheadAttention`` without gradients differs in the last bits)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def encode_pair(trainable: nn.Module, frozen: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, 3, H, W)`` -> raw ``(B, D)`` features ``(f(x), f_0(x))``, the frozen pass under
    ``no_grad``; while the two encoders are equal the outputs are bit-identical."""
    with _mha_fastpath_disabled():
        f_ft = trainable(images)
        with torch.no_grad():
            f_fr = frozen(images)
    return f_ft, f_fr


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The authors' augmentation: a random resized crop of scale 0.08-1, no flip
    (:func:`~fewclip_tutorial.features.crop_transform`: a small translation below 96 px)."""
    from torchvision import transforms as T

    return T.Compose(
        [crop_transform(image_size, scale=(0.08, 1.0)), T.ToTensor(), T.Normalize(mean, std)]
    )


class _Labelled(Dataset):
    def __init__(self, split: LabeledSplit, transform: Callable) -> None:
        self.views = ViewDataset(split, transform, seed=None, view=0)
        self.labels = np.asarray(split.labels)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.views[i], int(self.labels[i])


class _SeededEpochs(Dataset):
    """Item ``e * N + i``: image ``i`` cropped under the seed ``(seed, e, i)`` for epoch ``e``,
    so every process of a torchrun job sees the same augmented image as one process would."""

    def __init__(self, split: LabeledSplit, transform: Callable, seed: int, epochs: int) -> None:
        self.views = ViewDataset(split, transform, seed=seed, view=0, views=epochs)
        self.labels = np.asarray(split.labels)
        self.n = len(split)

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        return self.views[item], int(self.labels[item % self.n])


class _ShardedBatches:
    """Epoch ``e``: a permutation of the ``n`` images drawn from ``(seed, e)``, cut into global
    batches of ``batch_size``; each process yields its slice of every batch
    (:func:`~fewclip_tutorial.distributed.shard_batch`), as ``DistributedSampler`` does."""

    def __init__(self, n: int, batch_size: int, seed: int, info: DistInfo) -> None:
        self.n, self.batch_size, self.seed, self.info = n, batch_size, seed, info
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen) + self.epoch * self.n
        self.epoch += 1
        for start in range(0, self.n, self.batch_size):
            yield shard_batch(order[start : start + self.batch_size], self.info).tolist()


def head_of(classifier: Tensor | nn.Module) -> Tensor | nn.Module:
    """The classifier itself, unwrapped from ``DistributedDataParallel`` when it was wrapped."""
    return getattr(classifier, "module", classifier)


@dataclass
class FDAlignResult:
    """Output of :func:`train_fd_align`.

    Attributes:
        visual: the kept image encoder (eval mode, frozen): the original's copy when
            selection kept the start.
        reference_visual: the frozen copy of the original encoder, for ``P(x; f_0)``.
        classifier: ``(C, D)`` class prototypes, or the trained head (``head="trained"``).
        fit: the loop's :class:`~fewclip_tutorial.training.FitResult` (per-step history,
            ``"train_class"``, ``"train_spurious_kl"``; per evaluation ``"val_accuracy"``,
            ``"val_spurious_kl"``, the per-image paper-direction KL to the original).
        steps_per_epoch: optimiser steps per epoch (evaluations happen every epoch).
        trainable_parameters: names of the updated parameters of ``visual``.
        config: the :class:`FDAlignConfig` used.
        logit_scale: the ``tau`` that ran (``config.logit_scale``, or the backbone's own).
        lr: the peak learning rate that ran (``config.lr``, scaled by ``lr_scaling``).
    """

    visual: nn.Module
    reference_visual: nn.Module
    classifier: Tensor | nn.Module
    fit: FitResult
    steps_per_epoch: int
    trainable_parameters: list[str]
    config: FDAlignConfig
    logit_scale: float = CLIP_LOGIT_SCALE
    lr: float = float("nan")

    @property
    def best_epoch(self) -> int:
        """The kept epoch; 0 when selection kept the original encoder."""
        return self.fit.best_step // self.steps_per_epoch

    @property
    def best_val_accuracy(self) -> float:
        return float(self.fit.best_score)

    @property
    def initial_val_accuracy(self) -> float:
        return float(self.fit.history["val_accuracy"][0])

    def epochs(self) -> dict[str, list[float]]:
        """Per epoch (0 = the original encoder): mean training loss terms (NaN at 0) and the
        validation accuracy and spurious KL."""
        h, n = self.fit.history, self.steps_per_epoch
        out: dict[str, list[float]] = {"epoch": [s // n for s in h["val_step"]]}
        for key in ("loss", "train_class", "train_spurious_kl"):
            values = np.asarray(h[key], dtype=float)
            out[key] = [float("nan")] + [
                float(values[e * n - n : e * n].mean()) for e in out["epoch"][1:]
            ]
        out["val_accuracy"] = list(h["val_accuracy"])
        out["val_spurious_kl"] = list(h["val_spurious_kl"])
        return out


ValidationFn = Callable[[nn.Module], float]


def train_fd_align(
    backbone: Any,
    train_split: LabeledSplit,
    val: LabeledSplit | ValidationFn,
    class_protos: Tensor,
    spurious_protos: Tensor,
    config: FDAlignConfig | None = None,
    *,
    seed: int = 0,
    val_reference: FeatureSet | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> FDAlignResult:
    """Fine-tune a copy of ``backbone.model.visual`` with the FD-Align objective.

    A trainable and a frozen copy start equal; ``backbone`` is not modified.  Each step
    encodes one augmented batch with both and minimises :func:`fd_align_loss`.  The
    trainable copy (and the head, if trained) is scored on the validation split at the
    start and after every epoch; :func:`~fewclip_tutorial.training.fit` keeps the start
    unless an epoch is strictly better.  The trainer never sees test data.

    Args:
        backbone: a :class:`~fewclip_tutorial.backbones.Backbone`.
        train_split: the ``K``-shot training images and labels.
        val: the validation split (accuracy with ``classifier``, and the spurious KL to
            the original), or ``visual -> score`` (no KL then).
        class_protos: ``(C, D)`` class prototypes; spurious_protos: ``(S, D)``.
        config: the options (default :class:`FDAlignConfig`), with ``overrides`` applied.
        seed: seeds shuffling, augmentation and the trained head.
        val_reference: the original encoder's validation features (from the feature
            cache), so they are not encoded again.
        num_workers: image-decoding workers (default: ``device.default_num_workers``).
        progress: a progress bar.
        dtype: the precision of the trained encoder, the frozen copy, the prototypes and the
            head (``torch.float64`` lets tests compare two runs that differ only in summation
            order, e.g. torchrun against one process, up to rounding).
    """
    cfg = dataclasses.replace(config or FDAlignConfig(), **overrides)
    tau = cfg.resolved_logit_scale(backbone.logit_scale)
    lr = cfg.resolved_lr(len(train_split))
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} is not supported; use torch.float32 or torch.float64.")
    if len(train_split) == 0:
        raise ValueError("train_split is empty; pass the K-shot training images.")
    if int(np.max(train_split.labels)) >= class_protos.shape[0]:
        raise ValueError(
            f"train_split has label {int(np.max(train_split.labels))} but class_protos has only "
            f"{class_protos.shape[0]} rows; build the prototypes for every class."
        )
    device = torch.device(backbone.device)
    workers = default_num_workers(device) if num_workers is None else int(num_workers)
    seed_everything(seed)
    spurious_protos = spurious_protos.detach().to(device, dtype)
    frozen = copy.deepcopy(backbone.model.visual).to(device, dtype).eval().requires_grad_(False)
    encoder = _Trainable(copy.deepcopy(backbone.model.visual).to(device, dtype)).requires_grad_(
        False
    )
    names = trainable_parameter_names(encoder.visual, None if cfg.blocks < 0 else cfg.blocks)
    named = dict(encoder.visual.named_parameters())
    params = [named[n].requires_grad_(True) for n in names]
    modules: list[nn.Module] = [encoder]
    classifier: Tensor | nn.Module = class_protos.detach().to(device, dtype)
    if cfg.head == "trained":  # the authors' CoOp_head: weights tau * t_c, bias 0, trained
        head = trained_head(classifier, tau)
        classifier = head
        modules.append(head)
        params += list(head.parameters())
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)

    transform = (
        train_transform(backbone.image_size, backbone.mean, backbone.std)
        if cfg.augment
        else backbone.preprocess
    )
    info = dist_info()
    if info.enabled:  # N processes match one only with seeded sampling; report what ran
        cfg = dataclasses.replace(cfg, sampling="seeded")
    if cfg.sampling == "seeded":
        loader: Any = DataLoader(
            _SeededEpochs(train_split, transform, seed, int(cfg.epochs)),
            batch_sampler=_ShardedBatches(len(train_split), int(cfg.batch_size), seed, info),
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        steps_per_epoch = -(-len(train_split) // int(cfg.batch_size))
        encoder_step: nn.Module = wrap_ddp(encoder, device)
        if isinstance(classifier, nn.Module):
            classifier = wrap_ddp(classifier, device)
    else:
        loader = DataLoader(
            _Labelled(train_split, transform),
            batch_size=int(cfg.batch_size),
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )
        steps_per_epoch = len(loader)
        encoder_step = encoder

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield from loader

    stream = batches()
    trained = [False]

    def step_loss(step: int) -> dict[str, Tensor]:
        images, labels = next(stream)
        trained[0] = True
        f_ft, f_fr = encode_pair(encoder_step, frozen, images.to(device, dtype, non_blocking=True))
        loss = fd_align_loss(
            f_ft,
            f_fr,
            labels.to(device),
            classifier,
            spurious_protos,
            cfg.alpha,
            cfg.beta,
            cfg.kl_direction,  # type: ignore[arg-type]
            cfg.kl_reduction,  # type: ignore[arg-type]
            tau,
        )
        if not torch.isfinite(loss.total):
            raise FloatingPointError(
                f"FD-Align loss became {loss.total.item()} at step {step}; lower lr "
                f"(now {lr}) or beta (now {cfg.beta})."
            )
        return {
            "loss": loss.total,
            "class": loss.classification.detach(),
            "spurious_kl": loss.spurious.detach(),
        }

    if isinstance(val, LabeledSplit):
        if val_reference is None:
            val_reference = extract_features(
                backbone, val, cache_dir=None, progress=False, num_workers=workers
            )
        ref = val_reference.features.to(device)
        labels = torch.as_tensor(val_reference.labels).to(device)
        probe = with_visual(backbone, encoder.visual, "fd-align-in-training")

    def evaluate() -> dict[str, float] | float:
        if not isinstance(val, LabeledSplit):
            return float(val(encoder.visual))
        feats = ref
        if trained[0]:
            feats = extract_features(
                probe, val, cache_dir=None, progress=False, num_workers=workers
            ).features
            feats = feats.to(device)
        accuracy = (
            100.0
            * (classification_logits(feats, head_of(classifier), tau).argmax(1) == labels)
            .float()
            .mean()
        )
        kl = spurious_kl(feats, ref, spurious_protos, tau)
        return {"score": float(accuracy), "accuracy": float(accuracy), "spurious_kl": float(kl)}

    result = fit(
        modules,
        step_loss,
        steps=int(cfg.epochs) * steps_per_epoch,
        optimizer=opt,
        schedule="cosine",
        evaluate=evaluate,
        eval_every=steps_per_epoch,
        device=device,
        progress=progress,
        desc=f"FD-Align (beta={cfg.beta})",
    )
    if "val_accuracy" not in result.history:  # a validation function: its score is the accuracy
        result.history["val_accuracy"] = list(result.history["val_score"])
        result.history["val_spurious_kl"] = [float("nan")] * len(result.history["val_score"])
    for m in modules:
        m.requires_grad_(False)
    return FDAlignResult(
        visual=encoder.visual,
        reference_visual=frozen,
        classifier=head_of(classifier),
        fit=result,
        steps_per_epoch=steps_per_epoch,
        trainable_parameters=names,
        config=cfg,
        logit_scale=tau,
        lr=lr,
    )
