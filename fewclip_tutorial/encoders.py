"""open_clip encoder surgery, in one place: which blocks train, how to cut an encoder.

Cross-modal partial fine-tuning and FD-Align both fine-tune the end of an open_clip image
encoder.  Both ask this module:

* :func:`encoder_blocks`: the blocks of a ViT (``transformer.resblocks``) or a ModifiedResNet
  (the bottlenecks of ``layer1`` .. ``layer4``) and its output head (ViT: ``ln_post`` and
  ``proj``; ResNet: ``attnpool``), as parameter-name prefixes;
* :func:`trainable_parameter_names`: the parameters that fine-tuning the last ``n`` blocks
  (and the head) updates (FD-Align);
* :func:`split_visual_encoder`: the encoder cut before its last stage into a frozen prefix,
  whose activations can be cached, and a trainable suffix (cross-modal partial
  fine-tuning); :func:`encode_split_through` runs a split's images through either;
* :func:`finetuned_backbone`: a backbone whose image encoder is a fine-tuned copy.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fewclip_tutorial.backbones import state_dict_digest
from fewclip_tutorial.device import autocast, get_device

__all__ = [
    "VisualSplit",
    "with_visual",
    "encode_split_through",
    "encoder_blocks",
    "finetuned_backbone",
    "split_visual_encoder",
    "trainable_parameter_names",
]


def encoder_blocks(visual: nn.Module) -> tuple[list[str], list[str]] | None:
    """``(block prefixes, head prefixes)`` of an open_clip image encoder, ``None`` if unknown.

    ViT: ``transformer.resblocks.{i}.`` and ``ln_post.``, ``proj``; ModifiedResNet:
    ``layer{i}.{j}.`` and ``attnpool.``.  Blocks are in forward order.
    """
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is not None and hasattr(visual, "ln_post"):
        return [f"transformer.resblocks.{i}." for i in range(len(resblocks))], ["ln_post.", "proj"]
    if all(hasattr(visual, f"layer{i}") for i in range(1, 5)) and hasattr(visual, "attnpool"):
        layers = [(i, len(getattr(visual, f"layer{i}"))) for i in range(1, 5)]
        return [f"layer{i}.{j}." for i, n in layers for j in range(n)], ["attnpool."]
    return None


def trainable_parameter_names(visual: nn.Module, blocks: int | None) -> list[str]:
    """Names of the parameters of ``visual`` that fine-tuning updates.

    ``blocks``: ``None`` or negative, the whole encoder (the paper); ``0``, the output
    head (ViT: ``ln_post``, ``proj``; ResNet: ``attnpool``); ``n > 0``, the last ``n``
    blocks (ViT transformer blocks, ResNet bottlenecks) plus that head.
    """
    names = [n for n, _ in visual.named_parameters()]
    if blocks is None or blocks < 0:
        return names
    structure = encoder_blocks(visual)
    if structure is None:
        raise ValueError(
            f"blocks={blocks} needs an open_clip VisionTransformer or ModifiedResNet, got a "
            f"{type(visual).__name__}; pass blocks=-1 to fine-tune the whole encoder."
        )
    all_blocks, head = structure
    if blocks > len(all_blocks):
        raise ValueError(
            f"blocks={blocks} but the image encoder has only {len(all_blocks)} blocks; pass "
            f"0..{len(all_blocks)}, or -1 for the whole encoder."
        )
    prefixes = all_blocks[len(all_blocks) - blocks :] + head
    return [n for n in names if any(n == p or n.startswith(p) for p in prefixes)]


class VisualSplit(NamedTuple):
    """An image encoder cut into ``suffix(prefix(images)) == visual(images)``.

    Attributes:
        prefix: frozen, ``(B, 3, H, W)`` images -> activations entering the last block
            (ViT: ``(B, L, width)`` tokens, batch first; ModifiedResNet: ``layer4``
            output ``(B, C', h, w)``).  Runs without gradients.
        trainable: the modules fine-tuned (ViT: last residual block, ``ln_post`` and the
            projection; ModifiedResNet: ``attnpool``).
        suffix: ``nn.Module`` mapping prefix activations to ``(B, D)`` features
            (unnormalised, like ``visual(images)``); it owns ``trainable``.
    """

    prefix: Callable[[Tensor], Tensor]
    trainable: nn.ModuleList
    suffix: nn.Module


class _Projection(nn.Module):
    """Holds the ViT output projection ``(width, D)`` as a trainable module."""

    def __init__(self, proj: Tensor | None) -> None:
        super().__init__()
        self.proj = None if proj is None else nn.Parameter(proj.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x if self.proj is None else x @ self.proj


class _ViTSuffix(nn.Module):
    """Last transformer block + pooling + ``ln_post`` + projection of an open_clip ViT."""

    def __init__(self, visual: nn.Module, copy_modules: bool) -> None:
        super().__init__()
        take = copy.deepcopy if copy_modules else (lambda m: m)
        block = take(visual.transformer.resblocks[-1])
        ln_post = take(visual.ln_post)
        if copy_modules:
            projection = _Projection(visual.proj)
        else:
            projection = _SharedProjection(visual)
        self.trainable = nn.ModuleList([block, ln_post, projection])
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self.pool_type = str(getattr(visual, "pool_type", "tok"))
        self.final_ln_after_pool = bool(getattr(visual, "final_ln_after_pool", False))

    def _global_pool(self, x: Tensor) -> Tensor:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        if self.pool_type == "tok":
            return x[:, 0]
        return x

    def forward(self, tokens: Tensor) -> Tensor:
        block, ln_post, projection = self.trainable
        x = tokens if self.batch_first else tokens.transpose(0, 1)
        x = block(x)
        x = x if self.batch_first else x.transpose(0, 1)
        if self.final_ln_after_pool:
            pooled = ln_post(self._global_pool(x))
        else:
            pooled = self._global_pool(ln_post(x))
        return projection(pooled)


class _SharedProjection(nn.Module):
    """Uses (and trains) the projection parameter of the original ViT in place."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self._visual = [visual]  # a list, so the whole encoder is not registered as a child
        if visual.proj is not None:
            self.proj = visual.proj

    def forward(self, x: Tensor) -> Tensor:
        return x if self._visual[0].proj is None else x @ self._visual[0].proj


class _ResNetSuffix(nn.Module):
    """The attention pool of an open_clip ModifiedResNet."""

    def __init__(self, visual: nn.Module, copy_modules: bool) -> None:
        super().__init__()
        pool = copy.deepcopy(visual.attnpool) if copy_modules else visual.attnpool
        self.trainable = nn.ModuleList([pool])

    def forward(self, x: Tensor) -> Tensor:
        return self.trainable[0](x)


def split_visual_encoder(visual: nn.Module, copy_modules: bool = True) -> VisualSplit:
    """Cut an open_clip image encoder before its last stage, for partial fine-tuning.

    Supported: ``open_clip.transformer.VisionTransformer`` (trainable: the last residual
    block of ``visual.transformer.resblocks``, ``ln_post`` and ``proj``, i.e. the parameters
    of ``trainable_parameter_names(visual, 1)``) and
    ``open_clip.modified_resnet.ModifiedResNet`` (trainable: ``attnpool``, the head of
    :func:`encoder_blocks`, ``trainable_parameter_names(visual, 0)``).  The prefix
    activations can be computed once and cached, so a training step only runs the
    suffix.  In eval mode, ``split.suffix(split.prefix(x))`` equals ``visual(x)``.

    Args:
        visual: ``model.visual`` of an open_clip CLIP model.
        copy_modules: deep-copy the trainable modules (default) so fine-tuning leaves the
            backbone untouched; ``False`` shares (and would train) the originals.

    Raises:
        NotImplementedError: any other architecture (timm towers, attentional poolers).
    """
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        if getattr(visual, "attn_pool", None) is not None:
            raise NotImplementedError(
                "partial fine-tuning of ViTs with an attentional pooler (CoCa) is not "
                "implemented; use variant='linear'."
            )
        if not hasattr(visual, "_embeds") or len(visual.transformer.resblocks) < 1:
            raise NotImplementedError(
                "this open_clip VisionTransformer has no _embeds() (open_clip < 2.24?) or no "
                "blocks; upgrade open_clip or use variant='linear'."
            )
        suffix: nn.Module = _ViTSuffix(visual, copy_modules)
        batch_first = bool(getattr(visual.transformer, "batch_first", True))

        def prefix(images: Tensor) -> Tensor:
            with torch.no_grad():
                x = visual._embeds(images)
                x = x if batch_first else x.transpose(0, 1)
                for block in visual.transformer.resblocks[:-1]:
                    x = block(x)
                return x if batch_first else x.transpose(0, 1)

    elif isinstance(visual, ModifiedResNet):
        suffix = _ResNetSuffix(visual, copy_modules)

        def prefix(images: Tensor) -> Tensor:
            with torch.no_grad():
                x = visual.stem(images.to(visual.conv1.weight.dtype))
                return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))

    else:
        raise NotImplementedError(
            f"partial fine-tuning supports open_clip VisionTransformer and ModifiedResNet "
            f"image encoders, not {type(visual).__name__}; use variant='linear' (a linear "
            "cross-modal head on cached features works with any backbone)."
        )
    for p in suffix.parameters():
        p.requires_grad_(True)
    return VisualSplit(prefix=prefix, trainable=suffix.trainable, suffix=suffix)


def encode_split_through(
    fn: Callable[[Tensor], Tensor],
    split: Any,
    preprocess: Callable[[Any], Tensor],
    device: torch.device | str | None = None,
    batch_size: int = 128,
    flip: bool = False,
    progress: bool = False,
    out_device: torch.device | str = "cpu",
) -> Tensor:
    """Run ``fn`` (a prefix, or prefix + suffix) over every image of a ``LabeledSplit``.

    Args:
        fn: maps a ``(B, 3, H, W)`` preprocessed batch (on ``device``) to ``(B, ...)``.
        split: a :class:`fewclip_tutorial.data.base.LabeledSplit` of PIL images.
        preprocess: the backbone's eval transform.
        flip: mirror every image left-right first (the paper's second view).

    Returns:
        ``(N, ...)`` float32 outputs on ``out_device``, in split order.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    device = get_device(device)
    outs: list[Tensor] = []
    n = len(split)
    if n == 0:
        raise ValueError(f"split {getattr(split, 'name', '?')!r} is empty; nothing to encode.")
    for start in tqdm(range(0, n, batch_size), desc="encode", disable=not progress, leave=False):
        images = []
        for i in range(start, min(start + batch_size, n)):
            img = split.load_image(i)
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images.append(preprocess(img))
        batch = torch.stack(images).to(device)
        with torch.no_grad(), autocast(device):
            outs.append(fn(batch).float().to(out_device))
    return torch.cat(outs)


def with_visual(backbone: Any, visual: nn.Module, identifier: str) -> Any:
    """A shallow copy of ``backbone`` whose CLIP model has ``visual`` as image encoder."""
    model = copy.copy(backbone.model)
    model._modules = dict(backbone.model._modules)  # swapping `visual` leaves the original alone
    model.visual = visual
    return dataclasses.replace(backbone, model=model, identifier=identifier)


def finetuned_backbone(backbone: Any, visual: nn.Module, tag: str = "fd-align") -> Any:
    """A copy of ``backbone`` whose image encoder is ``visual`` (e.g. ``FDAlignResult.visual``).

    The text tower is shared; ``identifier`` gets ``+{tag}-{digest of the weights}``, so
    the feature cache keeps the fine-tuned encoder's features apart from the original's.
    """
    if not dataclasses.is_dataclass(backbone):
        raise TypeError(
            f"finetuned_backbone expects a Backbone, got {type(backbone).__name__}; load one "
            "with fewclip_tutorial.backbones.load_backbone()."
        )
    visual = visual.to(backbone.device).eval().requires_grad_(False)
    return with_visual(backbone, visual, f"{backbone.identifier}+{tag}-{state_dict_digest(visual)}")
