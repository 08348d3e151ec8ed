"""Tests of fewclip_tutorial.zeroshot: prompt ensembling and zero-shot logits."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from fixtures_data import TINY_CLIP_CONFIG
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from fewclip_tutorial.backbones import Backbone, load_backbone
from fewclip_tutorial.zeroshot import (
    prompt_ensemble,
    prompt_text_features,
    text_classifier,
    zero_shot_logits,
)

TINY = "fewclip-test-tiny"
TINY_CONFIG = TINY_CLIP_CONFIG
CLASSNAMES = ["circle", "square", "triangle", "star", "heart"]
TEMPLATES = ["a photo of a {}.", "a sketch of a {}.", "a {}."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    path = tmp_path_factory.mktemp("cfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)
    return load_backbone(TINY, pretrained=None, device="cpu", seed=0)


def test_prompt_ensemble_hand_example() -> None:
    # One class, two prompts: (3, 0) and (0, 2) normalise to e1 and e2; their mean
    # (0.5, 0.5) normalises to (1, 1) / sqrt(2).
    t = torch.tensor([[[3.0, 0.0], [0.0, 2.0]]])
    expected = torch.tensor([[1.0, 1.0]]) / math.sqrt(2.0)
    torch.testing.assert_close(prompt_ensemble(t), expected)


def test_prompt_ensemble_properties() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 6, 8, generator=g)
    w = prompt_ensemble(t)
    assert w.shape == (4, 8)
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(4))
    # Rescaling any single prompt embedding by a positive number changes nothing.
    scales = torch.rand(4, 6, 1, generator=g) * 10 + 0.1
    torch.testing.assert_close(prompt_ensemble(t * scales), w)
    # With one template the ensemble is just the normalised embedding.
    torch.testing.assert_close(prompt_ensemble(t[:, :1]), F.normalize(t[:, 0], dim=-1))
    with pytest.raises(ValueError, match=r"\(C, M, D\)"):
        prompt_ensemble(t[0])


@pytest.fixture(scope="module")
def tiny64(tiny: Backbone) -> Backbone:
    """``tiny`` with its towers in float64: two encodings that differ only in batching or
    summation order agree to ~1e-15 before the package's final float32 cast, so after it
    they are equal or one float32 step apart (2^-24 for the unit vectors' entries)."""
    return dataclasses.replace(tiny, model=copy.deepcopy(tiny.model).double())


#: one float32 rounding of two float64 values ~1e-15 apart: at most one ulp of a value <= 1
ONE_F32_STEP = {"atol": 2.0**-24, "rtol": 0.0}


def test_pure_ensemble_equals_open_clip_classifier(tiny: Backbone, tiny64: Backbone) -> None:
    per_prompt = prompt_text_features(tiny, CLASSNAMES, TEMPLATES)
    assert per_prompt.shape == (5, 3, 16)
    W = text_classifier(tiny, CLASSNAMES, TEMPLATES)
    assert W.shape == (5, 16)
    torch.testing.assert_close(W.norm(dim=-1), torch.ones(5))
    # In float64 towers (the package casts outputs to float32): ours averages per-prompt
    # features that were rounded to float32 (half a step each, 2^-25), re-normalising
    # doubles that (2^-24), and the final cast adds half a step: at most 2^-23 apart
    ours64 = prompt_ensemble(prompt_text_features(tiny64, CLASSNAMES, TEMPLATES).double())
    W64 = text_classifier(tiny64, CLASSNAMES, TEMPLATES)
    torch.testing.assert_close(ours64.float(), W64, atol=2.0**-23, rtol=0.0)
    # And text_classifier is open_clip's (D, C) classifier transposed.
    raw = build_zero_shot_classifier(
        tiny.model, tiny.tokenizer, CLASSNAMES, TEMPLATES, num_classes_per_batch=None
    )
    assert raw.shape == (16, 5)
    # float32: W re-normalises raw's unit columns, (D/2 + 2) 2^-24 = 6e-7 for D = 16
    torch.testing.assert_close(W, raw.T, atol=1e-6, rtol=0)


def test_text_classifier_does_not_depend_on_batching(tiny64: Backbone) -> None:
    a = text_classifier(tiny64, CLASSNAMES, TEMPLATES, batch_size=1)
    b = text_classifier(tiny64, CLASSNAMES, TEMPLATES, batch_size=10_000)
    # float64 towers, batches of 1 against all: one final float32 rounding apart at most
    torch.testing.assert_close(a, b, **ONE_F32_STEP)


def test_text_classifier_validates_templates(tiny: Backbone) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        text_classifier(tiny, CLASSNAMES, ["a photo"])
    with pytest.raises(ValueError, match="non-empty"):
        text_classifier(tiny, [], TEMPLATES)
    with pytest.raises(ValueError, match="non-empty"):
        text_classifier(tiny, CLASSNAMES, "a {}")  # type: ignore[arg-type]


def test_zero_shot_logits_hand_example() -> None:
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    expected = 100 * torch.tensor([[1.0, 0.0, math.sqrt(0.5)], [0.6, 0.8, 1.4 * math.sqrt(0.5)]])
    torch.testing.assert_close(zero_shot_logits(f, W), expected)
    torch.testing.assert_close(zero_shot_logits(f, W, logit_scale=1.0), expected / 100)


def test_zero_shot_argmax_is_invariant_to_scale() -> None:
    g = torch.Generator().manual_seed(1)
    f = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    W = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    base = zero_shot_logits(f, W, 1.0).argmax(1)
    for scale in (0.5, 14.3, 100.0):
        assert torch.equal(zero_shot_logits(f, W, scale).argmax(1), base)
    # ... while the softmax does depend on it (sharper with a larger scale).
    p1 = zero_shot_logits(f, W, 1.0).softmax(1).max(1).values
    p100 = zero_shot_logits(f, W, 100.0).softmax(1).max(1).values
    assert bool((p100 >= p1).all())


def test_zero_shot_logits_shape_errors() -> None:
    f = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"\.T"):
        zero_shot_logits(f, torch.randn(8, 5))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        zero_shot_logits(f[0], torch.randn(5, 8))
