"""open_clip encoder surgery (fewclip_tutorial.encoders): the two ways the methods fine-tune
the end of an image encoder agree on which parameters that end is."""

from __future__ import annotations

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from fewclip_tutorial.encoders import (
    encoder_blocks,
    split_visual_encoder,
    trainable_parameter_names,
)


def _sizes(params) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in params)


def test_split_trains_what_the_last_block_and_head_are() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2, output_dim=16
    ).eval()
    blocks, head = encoder_blocks(vit)
    assert blocks == ["transformer.resblocks.0.", "transformer.resblocks.1."]
    assert head == ["ln_post.", "proj"]
    named = dict(vit.named_parameters())
    last = [named[n] for n in trainable_parameter_names(vit, 1)]  # FD-Align's blocks=1
    split = split_visual_encoder(vit)  # cross-modal partial fine-tuning
    assert _sizes(split.trainable.parameters()) == _sizes(last)

    resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=32, width=8)
    blocks, head = encoder_blocks(resnet)
    assert blocks == ["layer1.0.", "layer2.0.", "layer3.0.", "layer4.0."]
    assert head == ["attnpool."]
    named = dict(resnet.named_parameters())
    pool = [named[n] for n in trainable_parameter_names(resnet, 0)]  # the head alone
    assert _sizes(split_visual_encoder(resnet).trainable.parameters()) == _sizes(pool)
    assert encoder_blocks(torch.nn.Linear(3, 3)) is None
