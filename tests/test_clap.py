"""Tests of CLAP: network, structured prompts, augmentations, IGN, InfoNCE, training, lambda."""

from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewclip_tutorial.methods import clap
from fewclip_tutorial.methods.clap import (
    AUGMENTATIONS,
    AugmentConfig,
    DisentangleNetwork,
    PromptAttributes,
    augment_prompt,
    augment_structure,
    clap_loss,
    clap_prompts,
    delete_art_style,
    delete_color,
    delete_image_type,
    delete_size,
    encode_text_with_noise,
    info_nce,
    refine,
    refined_classifier,
    select_lambda,
    swap_order,
    train_clap,
    train_clap_image_features,
)
from fewclip_tutorial.sweep import flatten_result
from fewclip_tutorial.zeroshot import prompt_ensemble

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def backbone():
    """The untrained shapeworld-tiny open_clip CLIP (context length 24, D = 128) on CPU."""
    from fewclip_tutorial.backbones import load_backbone

    torch.manual_seed(0)
    bb = load_backbone("shapeworld-tiny", pretrained=None, device="cpu")
    # An untrained tower gives near-identical features for every text; spread the
    # token embeddings so text differences are visible.
    with torch.no_grad():
        bb.model.token_embedding.weight.normal_(0, 0.5)
    return bb


def _word_encoder(dim: int = 16, seed: int = 0):
    """A frozen toy text encoder: sum of fixed random word vectors, normalised."""
    gen = torch.Generator().manual_seed(seed)
    table: dict[str, torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            vec = torch.zeros(dim)
            for w in t.split():
                if w not in table:
                    table[w] = torch.randn(dim, generator=gen)
                vec = vec + table[w]
            rows.append(vec)
        return F.normalize(torch.stack(rows), dim=-1)

    return encode


# ----------------------------------------------------------------------------- network


def test_network_is_identity_at_init_and_at_lam_zero() -> None:
    torch.manual_seed(0)
    net = DisentangleNetwork(8, hidden=5).double()  # float64: orders of summation agree to 1e-15
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(net(x), x)  # W2 is zero: exactly the identity
    assert net.projection.bias is None and net.linear.bias is not None
    with torch.no_grad():
        net.projection.weight.normal_()
    assert not torch.allclose(net(x), x)
    assert torch.equal(net(x, lam=0.0), x)
    # lam scales the residual branch linearly; float64, |x| ~ 3: a few roundings of 1.1e-16 * 3
    torch.testing.assert_close(net(x, lam=0.5) - x, 0.5 * (net(x, lam=1.0) - x), atol=1e-12, rtol=0)


def test_network_residual_is_pre_activation() -> None:
    torch.manual_seed(1)
    net = DisentangleNetwork(6, hidden=3).double()  # float64: the formula differs by rounding only
    with torch.no_grad():
        net.projection.weight.normal_()
    x = torch.randn(2, 6, dtype=torch.float64)
    w1, b1, w2 = net.linear.weight, net.linear.bias, net.projection.weight
    expected = x + 0.3 * ((F.silu(x) @ w1.T + b1) @ w2.T)
    # float64, sums of <= 6 terms of size ~10: <= 6 * 1.1e-16 * 10 per sum, < 1e-12
    torch.testing.assert_close(net(x, lam=0.3), expected, atol=1e-12, rtol=0)


def test_network_shortcut_resamples_when_dims_differ() -> None:
    x = torch.arange(16, dtype=torch.float32).view(2, 8)
    down = DisentangleNetwork(8, 4, hidden=3)
    assert torch.equal(down(x), x[:, [0, 2, 4, 6]])  # nearest neighbour, identity branch zero
    up = DisentangleNetwork(4, 8, hidden=3)
    y = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(up(y), torch.tensor([[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]]))
    with torch.no_grad():
        down.projection.weight.fill_(1.0)
    assert down(x).shape == (2, 4) and not torch.equal(down(x), x[:, [0, 2, 4, 6]])
    # works on extra leading dims (T, C, D)
    assert down(x.view(1, 2, 8)).shape == (1, 2, 4)
    with pytest.raises(ValueError, match="in_dim=5"):
        down(torch.zeros(2, 5))


# ----------------------------------------------------------------------------- prompts


def test_render_and_each_augmentation_on_a_worked_example() -> None:
    p = PromptAttributes(
        "dog", size="large", color="red", image_type="photo", art_style="realistic"
    )
    assert p.render() == "a realistic photo of a large red dog"
    assert delete_size(p).render() == "a realistic photo of a red dog"
    assert delete_color(p).render() == "a realistic photo of a large dog"
    assert delete_image_type(p).render() == "a realistic image of a large red dog"
    assert delete_art_style(p).render() == "a photo of a large red dog"
    assert swap_order(p).render() == "a large red dog in realistic photo style"
    assert swap_order(delete_art_style(p)).render() == "a large red dog in photo style"
    everything = p
    for fn in AUGMENTATIONS.values():
        everything = fn(everything)
    assert everything.render() == "a dog"
    q = PromptAttributes(
        "apple", color="orange", image_type="painting", art_style="impressionistic"
    )
    assert q.render() == "an impressionistic painting of an orange apple"
    assert delete_color(q).render() == "an impressionistic painting of an apple"
    assert PromptAttributes("  ice   cream ").render() == "an ice cream"
    with pytest.raises(ValueError, match="classname"):
        PromptAttributes("  ")


def test_clap_prompts_is_the_full_product() -> None:
    prompts = clap_prompts("dog")
    assert len(prompts) == 480  # 10 colours x 3 sizes x 8 image types x 2 art styles
    assert len({p.render() for p in prompts}) == 480
    small = clap_prompts("cat", colors=["red"], sizes=[], image_types=["sketch"], art_styles=None)
    assert [p.render() for p in small] == ["a sketch of a red cat"]


def _content_words(text: str) -> list[str]:
    return [w for w in text.split() if w not in ("a", "an")]


@pytest.mark.parametrize(
    ("name", "attr"),
    [("osd", "size"), ("ocd", "color"), ("itd", "image_type"), ("asd", "art_style")],
)
def test_deletions_remove_exactly_their_attribute(name: str, attr: str) -> None:
    fn = AUGMENTATIONS[name]
    prompts = [
        PromptAttributes(c, size=s, color=col, image_type=t, art_style=a, swapped=sw)
        for c, s, col, t, a, sw in itertools.product(
            ["dog", "ice cream", "apple"],
            [None, "large", "normal sized"],
            [None, "red", "orange"],
            [None, "photo", "mosaic art"],
            [None, "realistic", "impressionistic"],
            [False, True],
        )
    ]
    for p in prompts:
        q = fn(p)
        assert getattr(q, attr) is None
        for other in ("classname", "size", "color", "image_type", "art_style", "swapped"):
            if other != attr:
                assert getattr(q, other) == getattr(p, other)
        text, before = q.render(), p.render()
        assert p.classname in text and "  " not in text and text == text.strip()
        removed = getattr(p, attr)
        if removed is None:
            assert text == before
            continue
        # the rendered text loses exactly the attribute's words (and may swap a/an);
        # deleting the image type leaves the neutral noun "image" when a style remains
        expected = _content_words(before)
        start = next(
            i
            for i in range(len(expected))
            if expected[i : i + len(removed.split())] == removed.split()
        )
        del expected[start : start + len(removed.split())]
        if attr == "image_type" and p.art_style is not None and not p.swapped:
            expected.insert(start, "image")
        if q.image_type is None and q.art_style is None:  # no medium left: "a [object]"
            expected = (
                p.object_phrase().split() if attr in ("image_type", "art_style") else expected
            )
        assert _content_words(text) == expected, (before, text)


def test_no_combination_of_augmentations_drops_the_class() -> None:
    base = clap_prompts(
        "hot dog", colors=["red", None], sizes=["small", None], image_types=["sculpture", None],
        art_styles=["impressionistic", None],
    )  # fmt: skip
    fns = list(AUGMENTATIONS.values())
    for p in base:
        for mask in itertools.product([False, True], repeat=len(fns)):
            q = p
            for use, fn in zip(mask, fns, strict=True):
                q = fn(q) if use else q
            text = q.render()
            assert "hot dog" in text and "  " not in text and text == text.strip()
            assert text.split()[0] in ("a", "an")


def test_spo_swaps_order() -> None:
    p = PromptAttributes(
        "car", size="small", color="blue", image_type="sketch", art_style="realistic"
    )
    before, after = p.render(), swap_order(p).render()
    assert before.index("sketch") < before.index("car")
    assert after == "a small blue car in realistic sketch style"
    assert after.index("car") < after.index("sketch")
    assert swap_order(PromptAttributes("car", color="blue")).render() == "a blue car"


def test_augment_prompt_probabilities_and_determinism() -> None:
    p = PromptAttributes(
        "dog", size="large", color="red", image_type="photo", art_style="realistic"
    )
    none = AugmentConfig(osd=0, ocd=0, itd=0, asd=0, spo=0)
    every = AugmentConfig(osd=1, ocd=1, itd=1, asd=1, spo=1)
    assert augment_prompt(p, none, random.Random(0)) == p.render()
    assert augment_prompt(p, every, random.Random(0)) == "a dog"
    only_ocd = AugmentConfig(osd=0, ocd=1, itd=0, asd=0, spo=0)
    assert augment_prompt(p, only_ocd, random.Random(3)) == "a realistic photo of a large dog"
    draws = [augment_prompt(p, AugmentConfig(), random.Random(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = random.Random(0)
    outs = [augment_structure(p, AugmentConfig(), rng) for _ in range(2000)]
    for attr, prob in (("size", 0.5), ("color", 0.5), ("image_type", 0.0), ("art_style", 0.0)):
        frac = np.mean([getattr(q, attr) is None for q in outs])
        assert abs(frac - prob) < 0.05
    assert abs(np.mean([q.swapped for q in outs]) - 0.5) < 0.05
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(osd=1.5)


# ----------------------------------------------------------------------------- IGN


def test_ign_without_noise_equals_encode_text(backbone) -> None:
    model = backbone.model
    tokens = backbone.tokenizer(["a red circle", "a large blue star on the grass", "x"])
    with torch.no_grad():
        ref = model.encode_text(tokens)
        got = encode_text_with_noise(model, tokens, n_noise=0)
    assert torch.equal(got, ref)  # the same operations on the same shapes: bit-exact


@pytest.mark.parametrize("position", ["front", "middle", "end"])
def test_ign_noise_changes_features_and_keeps_shapes(backbone, position: str) -> None:
    model = backbone.model
    tokens = backbone.tokenizer(["a red circle", "a large blue star"])
    with torch.no_grad():
        ref = model.encode_text(tokens)
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        a = encode_text_with_noise(model, tokens, 4, 0.5, position, g1)
        b = encode_text_with_noise(model, tokens, 4, 0.5, position, g2)
        c = encode_text_with_noise(model, tokens, 4, 0.5, position, g1)  # g1 advanced
    assert a.shape == ref.shape == (2, backbone.embed_dim)
    assert torch.equal(a, b)  # seeded
    assert not torch.allclose(a, c)
    assert (a - ref).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("position", "text"),
    [
        ("front", "big a red circle"),
        ("middle", "a red circle big"),  # n // 2 = 0 before the text, 1 after it
        ("end", "a red circle big"),
        ("inside", "a big red circle"),
    ],
)
def test_ign_inserts_at_the_right_position(backbone, position: str, text: str) -> None:
    """Inserting the embedding of a real word must equal encoding the text with that word."""
    model, tok = backbone.model, backbone.tokenizer
    word = tok(["big"])[0, 1:2]  # the single BPE token of "big"
    assert tok(["big"])[0, 2] == tok(["big"]).max()  # one token, then EOT
    tokens = tok(["a red circle"])
    with torch.no_grad():
        noise = model.token_embedding(word).view(1, 1, -1)
        got = encode_text_with_noise(model, tokens, 1, position=position, noise=noise)
        ref = model.encode_text(tok([text]))
    assert torch.equal(got, ref)  # the same operations on the same shapes: bit-exact


@pytest.mark.parametrize(
    ("position", "text"),
    [
        ("front", "big small a red circle"),
        # the authors' "middle" (utils/misc.py, clip_encode_noised_text): prefix, the first
        # n_ctx // 2 noise tokens, the text's tokens, the other half, then EOT
        ("middle", "big a red circle small"),
        ("end", "a red circle big small"),
    ],
)
def test_ign_two_tokens_follow_the_authors_positions(backbone, position: str, text: str) -> None:
    model, tok = backbone.model, backbone.tokenizer
    words = torch.stack([tok([w])[0, 1] for w in ("big", "small")])  # one BPE token each
    tokens = tok(["a red circle", "a red circle"])
    with torch.no_grad():
        noise = model.token_embedding(words).view(1, 2, -1)  # one draw shared by the batch
        got = encode_text_with_noise(model, tokens, 2, position=position, noise=noise)
        ref = model.encode_text(tok([text, text]))  # the same batch shape: bit-exact
    assert torch.equal(got, ref)


def test_ign_truncation_keeps_eot(backbone) -> None:
    model, tok = backbone.model, backbone.tokenizer
    long_text = " ".join(["red circle"] * 40)  # longer than the context length
    tokens = tok([long_text])
    assert tokens[0, -1] == tokens.max()  # the tokenizer put EOT at the last position
    with torch.no_grad():
        noise = model.token_embedding(tok(["big"])[0, 1:2]).view(1, 1, -1)
        got = encode_text_with_noise(model, tokens, 1, position="front", noise=noise)
        ref = model.encode_text(tok(["big " + long_text]))
        noisy = encode_text_with_noise(model, tokens, 30, 0.1, "end", torch.Generator())
    assert torch.equal(got, ref)  # the same operations on the same shapes: bit-exact
    assert noisy.shape == (1, backbone.embed_dim) and torch.isfinite(noisy).all()
    with pytest.raises(ValueError, match="position"):
        encode_text_with_noise(model, tokens, 1, position="side")


# ----------------------------------------------------------------------------- losses


def test_info_nce_matches_hand_computation() -> None:
    # float64 (as the math module): differences are a few roundings of 1.1e-16 on values ~1
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    # logits = a @ b.T = [[1, 0.6], [0, 0.8]]; row losses log(1+e^-0.4), log(1+e^-0.8)
    expected = (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(-0.8))) / 2
    cv = {"form": "cross_view"}  # the paper's equation (the default is the authors' SimCLR form)
    assert info_nce(a, b, tau=1.0, **cv).item() == pytest.approx(expected, abs=1e-12)  # float64
    # rounded to 6 decimals: within half a unit of the 6th, 5e-7 (the 0.442061 written here
    # before was wrong in its 6th digit, hidden by a guessed abs=1e-5)
    assert info_nce(a, b, tau=1.0, **cv).item() == pytest.approx(0.442058, abs=5e-7)
    # float32 in, float32 out (the training path): 2-term dots and a 2-term logsumexp of
    # values <= 2 round by a few 2^-24 = 6e-8 each, < 1e-6
    assert info_nce(a.float(), b.float(), 1.0, **cv).item() == pytest.approx(expected, abs=1e-6)
    # tau = 0.5 doubles every logit; normalisation makes the scale of a and b irrelevant
    exp_half = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    assert info_nce(3 * a, 2 * b, tau=0.5, **cv).item() == pytest.approx(exp_half, abs=1e-12)
    # SimCLR form: 4 rows, intra-view negatives without self-similarity
    e = math.exp
    rows = [
        math.log(e(1) + e(0.6) + e(0)) - 1,  # a0: [a0.b0, a0.b1, a0.a1]
        math.log(e(0) + e(0.8) + e(0)) - 0.8,  # a1: [a1.b0, a1.b1, a1.a0]
        math.log(e(1) + e(0) + e(0.6)) - 1,  # b0: [b0.a0, b0.a1, b0.b1]
        math.log(e(0.6) + e(0.8) + e(0.6)) - 0.8,  # b1: [b1.a0, b1.a1, b1.b0]
    ]
    simclr = info_nce(a, b, tau=1.0, form="symmetric_simclr").item()
    assert simclr == pytest.approx(sum(rows) / 4, abs=1e-12)  # float64, as above
    assert info_nce(a, b, tau=1.0).item() == simclr  # the default form
    with pytest.raises(ValueError, match="same shape"):
        info_nce(a, b[:1])
    with pytest.raises(ValueError, match="tau"):
        info_nce(a, b, tau=0)
    with pytest.raises(ValueError, match="cross_view"):
        info_nce(a, b, form="other")


def test_clap_loss_is_sum_of_terms() -> None:
    g = torch.Generator().manual_seed(0)
    x, y, c = (torch.randn(5, 7, generator=g) for _ in range(3))
    total = clap_loss(x, y, c, tau=0.3, tau_c=1.0, lambda_c=0.25)
    expected = info_nce(x, y, 0.3) + 0.25 * info_nce(y, c, 1.0)
    # the same operations in the same order: bit-exact
    assert torch.equal(total, expected)
    assert torch.equal(clap_loss(x, y, c, lambda_c=0.0), info_nce(x, y, 0.5))


def _authors_simclr(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """The authors' SimCLR loss (CLAP ``utils/loss.py``, ``InfoNCELoss``), written out here.

    Cosine similarities by broadcasting; self-similarities within a view are -inf; the
    score matrix is ``[[xy, xx], [yy, xy^T]]`` and the target of row ``r`` is column ``r``.
    """
    cos = torch.nn.CosineSimilarity(dim=-1)
    xx = cos(x.unsqueeze(-2), x.unsqueeze(-3)) / tau
    yy = cos(y.unsqueeze(-2), y.unsqueeze(-3)) / tau
    xy = cos(x.unsqueeze(-2), y.unsqueeze(-3)) / tau
    n = xy.shape[-1]
    xx[range(n), range(n)] = float("-inf")
    yy[range(n), range(n)] = float("-inf")
    scores = torch.cat([torch.cat([xy, xx], -1), torch.cat([yy, xy.T], -1)], -2)
    log_p = scores.log_softmax(-1)
    return -log_p[range(2 * n), range(2 * n)].mean()


def test_symmetric_simclr_form_is_the_authors_whole_objective() -> None:
    """main/trainer.py: InfoNCELoss(tau_txt)(z_t, z_t_) + scale_coef * InfoNCELoss(tau_cnt)(z_t_, z_c)."""
    g = torch.Generator().manual_seed(3)
    f64 = {"generator": g, "dtype": torch.float64}  # float64: the two differ by rounding only
    z_t, z_aug = torch.randn(6, 5, **f64), torch.randn(6, 5, **f64)
    classes = torch.randn(3, 5, **f64)
    z_c = classes[torch.tensor([0, 1, 2, 0, 1, 2])]  # repeated class names in one batch
    authors = _authors_simclr(z_t, z_aug, 0.5) + 0.7 * _authors_simclr(z_aug, z_c, 1.0)
    ours = clap_loss(z_t, z_aug, z_c, tau=0.5, tau_c=1.0, lambda_c=0.7, form="symmetric_simclr")
    # float64: logsumexps of 11 terms <= 2 in size, 12 rows: < 100 * 1.1e-16 * 2 per term
    torch.testing.assert_close(ours, authors, atol=1e-12, rtol=0)
    # the paper's cross-view form is a different objective on the same tensors
    paper = clap_loss(z_t, z_aug, z_c, tau=0.5, tau_c=1.0, lambda_c=0.7, form="cross_view")
    assert abs(float(paper) - float(authors)) > 0.1


# ----------------------------------------------------------------------------- training


def _toy_prompts() -> list[PromptAttributes]:
    return [
        p
        for c in ["circle", "square", "star"]
        for p in clap_prompts(
            c, ["red", "blue"], ["large", "small"], ["photo", "sketch"], ["realistic"]
        )
    ]


def test_training_lowers_the_loss_and_caches_strings() -> None:
    prompts = _toy_prompts()
    res = train_clap(
        _word_encoder(), prompts, steps=80, lr=1e-2, batch_size=12, hidden=16, seed=0,
        device="cpu", progress=False,
    )  # fmt: skip
    losses = res.history["loss"]
    assert len(losses) == 80 and res.best_step == 80 and not res.network.training
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.05
    # strings: 24 prompts + 3 class names + their augmented variants (at most 8 each)
    assert res.cached_strings <= 24 + 3 + 24 * 8
    again = train_clap(
        _word_encoder(), prompts, steps=80, lr=1e-2, batch_size=12, hidden=16, seed=0,
        device="cpu", progress=False,
    )  # fmt: skip
    assert again.history["loss"] == losses  # deterministic given the seed


def test_selection_on_validation_keeps_best_step_and_stops_early() -> None:
    prompts = _toy_prompts()
    # a validation score that is best for the identity network: step 0 must be kept
    res = train_clap(
        _word_encoder(), prompts, steps=30, lr=1e-2, batch_size=8, hidden=8, seed=0,
        val_fn=lambda net: -float(net.projection.weight.abs().sum()), eval_every=10,
        device="cpu", progress=False,
    )  # fmt: skip
    assert res.best_step == 0 and res.history["val_step"] == [0, 10, 20, 30]
    assert torch.count_nonzero(res.network.projection.weight) == 0
    # a flat score with patience 2: stops after two evaluations without improvement
    flat = train_clap(
        _word_encoder(), prompts, steps=100, batch_size=8, hidden=8, seed=0,
        val_fn=lambda net: 1.0, eval_every=5, patience=2, device="cpu", progress=False,
    )  # fmt: skip
    assert len(flat.history["loss"]) == 10 and flat.best_step == 0


def test_ign_training_with_backbone_and_errors(backbone) -> None:
    prompts = _toy_prompts()[:6]
    res = train_clap(
        backbone, prompts, steps=3, batch_size=4, hidden=8, ign=True, seed=0, progress=False
    )
    assert len(res.history["loss"]) == 3 and all(math.isfinite(v) for v in res.history["loss"])
    with pytest.raises(ValueError, match="ign=True needs the open_clip model"):
        train_clap(_word_encoder(), prompts, steps=1, ign=True, device="cpu", progress=False)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        train_clap(_word_encoder(), prompts[:1], steps=1, device="cpu", progress=False)


def test_image_variant_trains_on_view_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 20, 8, generator=g)
    views = F.normalize(base + 0.3 * torch.randn(4, 20, 8, generator=g), dim=-1)
    res = train_clap_image_features(
        views, steps=60, lr=1e-2, batch_size=10, hidden=16, seed=0, device="cpu", progress=False
    )
    losses = res.history["loss"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    with pytest.raises(ValueError, match="V >= 2"):
        train_clap_image_features(views[:1], steps=1, device="cpu", progress=False)
    with pytest.raises(TypeError, match="no_such_setting"):
        train_clap_image_features(views, no_such_setting=1, device="cpu", progress=False)


def test_identity_at_start_and_lr_zero_keeps_step_zero() -> None:
    """Step 0 is the identity network; with lr = 0 no step can beat it, so it is kept."""
    prompts = _toy_prompts()
    x = torch.randn(7, 16)
    start = train_clap(_word_encoder(), prompts, steps=0, hidden=8, device="cpu", progress=False)
    assert torch.equal(start.network(x), x) and start.best_step == 0
    calls = []

    def val_fn(net: DisentangleNetwork) -> float:  # validation: a fixed random problem
        calls.append(1)
        return float((refine(x, net) @ x.T).diagonal().sum())

    res = train_clap(
        _word_encoder(), prompts, steps=40, lr=0.0, batch_size=8, hidden=8, eval_every=10,
        patience=0, val_fn=val_fn, device="cpu", progress=False,
    )  # fmt: skip
    assert res.best_step == 0 and res.steps_run == 40 and len(calls) == 5
    assert res.history["val_step"] == [0, 10, 20, 30, 40]
    assert torch.count_nonzero(res.network.projection.weight) == 0
    assert torch.equal(res.network(x), x)


def test_default_batch_is_just_above_the_number_of_classes() -> None:
    # the authors' configs: 8 for PACS (7 classes) and VLCS (5); always more than the classes
    assert clap.default_batch_size(5) == clap.default_batch_size(7) == 8
    assert clap.default_batch_size(10) == 16
    for c in range(1, 400):
        b = clap.default_batch_size(c)
        assert c < b <= c + 8 and b % 8 == 0


# ----------------------------------------------------------------------------- inference


def _random_network(dim: int = 6, seed: int = 0) -> DisentangleNetwork:
    torch.manual_seed(seed)
    net = DisentangleNetwork(dim, hidden=12)  # float32, as the trained network
    with torch.no_grad():
        net.projection.weight.normal_(0, 3.0)
    return net.eval()


def test_refine_and_refined_classifier() -> None:
    net = _random_network().double()  # float64: equivalent computations agree to ~1e-15
    x = torch.randn(5, 6, dtype=torch.float64)
    r = refine(x, net, 0.4)
    assert r.dtype == torch.float64
    assert refine(x.float(), _random_network(), 0.4).dtype == torch.float32  # shipped path
    # float64 unit rows, D = 6: the norm rounds <= D + 2 times by 1.1e-16
    torch.testing.assert_close(
        r.norm(dim=-1), torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert torch.equal(refine(x, net, 0.0), F.normalize(x, dim=-1))  # lam = 0: net is x exactly
    t = torch.randn(4, 3, 6, dtype=torch.float64)  # (C, M, D): 4 classes, 3 templates
    w = refined_classifier(t, net, 0.4)
    refined = F.normalize(net(t, lam=0.4), dim=-1)
    # float64: means and norms of unit vectors, <= 3 + 2 D roundings of 1.1e-16
    torch.testing.assert_close(w, F.normalize(refined.mean(1), dim=-1), atol=1e-12, rtol=0)
    assert w.shape == (4, 6)
    w1 = refined_classifier(t[:, 0], net, 0.4)  # one template: the refined rows (float64 bound)
    torch.testing.assert_close(w1, refine(t[:, 0], net, 0.4), atol=1e-12, rtol=0)
    # lam = 0: CLIP's prompt ensemble over the (C, M, D) layout (float64 bound as above)
    torch.testing.assert_close(
        refined_classifier(t, net, 0.0), prompt_ensemble(t), atol=1e-12, rtol=0
    )
    with pytest.raises(ValueError, match=r"\(C, M, D\)"):
        refined_classifier(t.unsqueeze(0), net, 0.4)


def test_lambda_is_selected_on_the_given_validation_split() -> None:
    net = _random_network()
    g = torch.Generator().manual_seed(1)
    feats, text = torch.randn(60, 6, generator=g), torch.randn(5, 6, generator=g)

    def predictions(lam: float) -> torch.Tensor:
        with torch.no_grad():
            return (refine(feats, net, lam) @ refined_classifier(text, net, lam).T).argmax(-1)

    assert (predictions(0.0) != predictions(1.0)).float().mean() > 0.2
    # labels that CLIP (lam = 0) gets right -> lam = 0; labels the full network gets right -> 1
    lam_a, scores_a = select_lambda(feats, predictions(0.0), text, net, grid=(0.0, 0.5, 1.0))
    lam_b, scores_b = select_lambda(feats, predictions(1.0), text, net, grid=(0.0, 0.5, 1.0))
    assert lam_a == 0.0 and scores_a[0.0] == 100.0
    assert lam_b == 1.0 and scores_b[1.0] == 100.0 and scores_b[0.0] < 100.0
    # equal accuracies: the lower validation cross-entropy (logit scale 100) wins
    small = _random_network()
    with torch.no_grad():
        small.projection.weight.mul_(1e-3)  # moves logits, not the argmax
    grid = (0.0, 0.5, 1.0)
    with torch.no_grad():
        preds = [
            (refine(feats, small, v) @ refined_classifier(text, small, v).T).argmax(-1)
            for v in grid
        ]
    stable = (preds[0] == preds[1]) & (preds[0] == preds[2])  # rows whose argmax never moves
    feats = feats[stable]
    labels = torch.randint(0, 5, (len(feats),), generator=g)
    _, accs = select_lambda(feats, labels, text, small, grid=grid)
    assert len(set(accs.values())) == 1  # the three lams tie on accuracy

    def cross_entropy(lam: float) -> float:
        with torch.no_grad():
            logits = 100 * refine(feats, small, lam) @ refined_classifier(text, small, lam).T
        log_p = logits - logits.logsumexp(-1, keepdim=True)
        return float(-log_p[torch.arange(len(labels)), labels].mean())

    lam_ce, _ = select_lambda(feats, labels, text, small, grid=grid)
    assert lam_ce == min(grid, key=cross_entropy)
    assert len({round(cross_entropy(v), 6) for v in grid}) == 3
    # exact ties (the identity network) go to the first lam of the grid
    identity = DisentangleNetwork(6, hidden=4)
    assert select_lambda(feats, labels, text, identity, grid=(0.5, 0.0, 1.0))[0] == 0.5
    with pytest.raises(ValueError, match="empty grid"):
        select_lambda(feats, predictions(0.0), text, net, grid=())


def test_runner_chooses_lam_on_validation(backbone) -> None:
    """End to end with a stub Context: selection uses val features only."""
    classnames = ["circle", "square", "star"]
    g = torch.Generator().manual_seed(0)
    dim = backbone.embed_dim
    requested: list[str] = []

    def feature_set(n: int) -> SimpleNamespace:
        return SimpleNamespace(
            features=F.normalize(torch.randn(n, dim, generator=g), dim=-1),
            labels=torch.arange(n) % 3,
        )

    sets = {"train": feature_set(9), "val": feature_set(9), "test": feature_set(12)}

    def features(split: str) -> SimpleNamespace:
        requested.append(split)
        return sets[split]

    def report(predict) -> dict:
        out = {}
        for split in ("val", "test"):
            fs = sets[split]
            acc = (predict(fs.features).argmax(-1) == fs.labels).float().mean() * 100
            out[f"{split}_accuracy"] = float(acc)
        return out

    ctx = SimpleNamespace(
        backbone=backbone,
        dataset=SimpleNamespace(
            name="toy", classnames=classnames, templates=["a {}.", "a photo of a {}."]
        ),
        seed=0,
        num_classes=3,
        features=features,
        report=report,
    )
    # the stub holds L2-normalised features only: the package's earlier network input
    res = clap.run_clap(
        ctx, steps=4, eval_every=2, hidden=8, input_features="normalized", progress=False
    )
    assert requested[0] == "val" and "test" in requested  # val first; test only for reporting
    assert set(res["zero_shot_by_prompt"]) == {"C", "PC", "CP", "NC"}
    assert set(res["zero_shot_by_prompt"]["NC"]) == {"clip", "refined"}
    best = max(res["lam_val_accuracy"].values())
    assert res["lam_val_accuracy"][f"{res['lam']:g}"] == best
    assert res["history"]["val_step"] == [0, 2, 4] and res["steps_run"] == 4
    assert len(res["history"]["val_accuracy_at_1"]) == 3
    # with a probe, the zero-shot numbers stay in the sweep's rows as scalars
    probed = clap.run_clap(
        ctx, steps=4, eval_every=2, hidden=8, input_features="normalized", probe=True,
        progress=False,
    )  # fmt: skip
    zero_shot = {k: res[k] for k in ("val_accuracy", "test_accuracy")}
    assert probed["zero_shot_refined"] == zero_shot  # same seed, same network
    row = flatten_result(probed)
    assert row["zero_shot_test_accuracy"] == res["test_accuracy"]
    assert row["zero_shot_val_accuracy"] == res["val_accuracy"]
    assert row["test_accuracy"] == probed["test_accuracy"] and "probe_C" in row
    # text features in the (C, M, D) layout of every other module
    fitted = clap.train_clap_episode(ctx, steps=0, input_features="normalized", progress=False)
    assert fitted.text_features.shape == (3, 2, dim) and fitted.result.best_step == 0
    with pytest.raises(ValueError, match="'val'"):
        clap.run_clap(ctx, steps=1, lam="best", progress=False)
    with pytest.raises(ValueError, match="has no option"):
        clap.run_clap(ctx, stpes=1, progress=False)


def test_pixel_space_classifier_matches_backbone_features(backbone) -> None:
    """Attacks see [0, 1] pixels; NormalizedClassifier must reproduce the backbone's logits."""
    from PIL import Image

    from fewclip_tutorial.attacks import NormalizedClassifier, pixel_transform

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    pixels = torch.stack([pixel_transform(backbone.preprocess)(im) for im in imgs])
    assert pixels.min() >= 0 and pixels.max() <= 1
    head = F.normalize(torch.randn(4, backbone.embed_dim), dim=-1)
    net = _random_network(backbone.embed_dim)
    clf = NormalizedClassifier(
        backbone.model.visual, backbone.mean, backbone.std, head, lambda f: refine(f, net, 0.3)
    )
    feats = backbone.encode_images(torch.stack([backbone.preprocess(im) for im in imgs]))
    expected = 100.0 * refine(feats, net, 0.3) @ head.T
    # float32 (attacks.NormalizedClassifier computes in float32, so float64 is not available):
    # logits are 100 * <unit, unit>, |logit| <= 100; the tower runs on batches of another size,
    # so each D = 128 dot may sum in another order: <= 128 * 2^-24 = 7.6e-6 relative per layer,
    # through the tower's few layers and the head: 1e-3 absolute = 1e-5 of the logit range
    with torch.no_grad():
        torch.testing.assert_close(clf(pixels), expected, atol=1e-3, rtol=1e-4)


def test_exercises_are_registered() -> None:
    from fewclip_tutorial.course.exercises import get_exercise

    ocd = get_exercise("prompt_augmentation")
    assert ocd.check(lambda p: delete_color(p).render(), verbose=False)
    assert not ocd.check(lambda p: delete_size(p).render(), verbose=False)
    nce = get_exercise("info_nce")
    # the exercise is the paper's equation: the cross-view form (not the default SimCLR form)
    assert nce.check(lambda a, b, tau: info_nce(a, b, tau, form="cross_view"), verbose=False)
    assert not nce.check(lambda a, b, tau: info_nce(a, b, 1.0, form="cross_view"), verbose=False)


@pytest.mark.parametrize("task", ["shapeworld", "shapeworld-patterns"])
def test_imaug_renders_each_prompt_with_its_class_and_style(task):
    from fewclip_tutorial.data import shapeworld as sw
    from fewclip_tutorial.methods.clap import PromptAttributes
    from fewclip_tutorial.methods.clap.runner import _render_shapeworld_prompts

    t = sw.TASKS[task]
    prompts = [
        PromptAttributes(name, color="red", image_type="cartoon", size="large")
        for name in t.classnames
    ]
    split = _render_shapeworld_prompts(prompts, 32, seed=0, task=task)
    assert list(split.labels) == list(range(len(t.classnames)))
    assert all(np.asarray(split.load_image(i)).shape == (32, 32, 3) for i in range(len(split)))
    # the rendered factors follow the prompts: the same prompts with another colour differ
    blue = [PromptAttributes(p.classname, color="blue", image_type="cartoon") for p in prompts]
    other = _render_shapeworld_prompts(blue, 32, seed=0, task=task)
    assert not np.array_equal(np.asarray(split.load_image(0)), np.asarray(other.load_image(0)))


def test_prompt_form_classifiers_are_the_papers_prompts(backbone):
    from fewclip_tutorial.methods.clap import prompt_form_classifier

    names = ["circle", "plus sign", "moon"]
    pc = prompt_form_classifier(backbone, names, "PC")
    # the "PC" form is encode_text of these very prompts: the same operations, exactly
    assert torch.equal(pc, backbone.encode_text([f"a photo of a {c}" for c in names]))
    c = prompt_form_classifier(backbone, names, "C")
    nc1 = prompt_form_classifier(backbone, names, "NC", seed=3)
    nc2 = prompt_form_classifier(backbone, names, "NC", seed=3)
    # a "differs" check: different prompts move unit features by far more than 1e-3
    assert torch.equal(nc1, nc2) and not torch.allclose(nc1, c, atol=1e-3)
    # float32 unit rows, D = 128: the norm rounds <= D + 2 times by 2^-24: 7.7e-6 < 1e-5
    assert torch.allclose(nc1.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Unknown prompt form 'XC'"):
        prompt_form_classifier(backbone, names, "XC")
