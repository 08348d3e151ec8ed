"""CLAP's defaults against the authors' code (Cai et al., ECCV 2024; github.com/YichaoCai1/CLAP).

Each authors' procedure is re-written here, independently of the package, from their files:
``gen_prompts.py`` (the prompt list), ``utils/data_utils.py`` (the string augmentations),
``main/evaluate.py`` (the attack), and their defaults are written out literally.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewclip_tutorial.attacks import NormalizedClassifier, fgsm, pgd
from fewclip_tutorial.methods.clap import (
    AugmentConfig,
    CLAPConfig,
    CLAPOptions,
    PromptAttributes,
    augment_prompt,
    authors_augment,
    authors_word_lists,
    clap_prompts,
    train_clap,
)

# The authors' attribute lists (data/color.yaml, data/image_type.yaml, data/art_style.yaml;
# the sizes of ImageTextDataset in utils/data_utils.py), in their order.
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown",
          "multicolored"]  # fmt: skip
SIZES = ["large", "normal sized", "small"]
IMAGE_TYPES = ["painting", "sketch", "cartoon", "clipart", "photograph", "infograph",
               "mosaic art", "sculpture"]  # fmt: skip
ART_STYLES = ["realistic", "impressionistic"]
PACS = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


def _gen_prompts(name: str) -> list[str]:
    """gen_prompts.py: product nesting name x image type, x size, x art style, x colour."""

    def quantified(text: str) -> str:
        return "an " + text if text[0] in "aeiou" else "a " + text

    out = []
    for ((((nm, imstl), sz), cond), clr) in itertools.product(
        itertools.product(itertools.product(itertools.product([name], IMAGE_TYPES), SIZES),
                          ART_STYLES), COLORS):  # fmt: skip
        obj = " ".join([sz, clr, nm])
        style = quantified(" ".join([cond, imstl]).strip())
        out.append(f"{style} of " + quantified(obj.strip()))
    return out


# ImageTextDataset.__init__ (utils/data_utils.py), with its spacing, written out literally
_SIZE_WORDS = [" large ", " normal sized ", " small "]
_COLOR_WORDS = [" red", " blue ", " green ", " yellow ", " purple ", " orange ", " black ",
                " white ", " brown ", " multicolored "]  # fmt: skip
_STYLE_WORDS = [" realistic ", " impressionistic "]
_TYPE_WORDS = ["painting ", " sketch ", " cartoon ", " clipart ", " photograph ", " infograph ",
               " mosaic art ", " sculpture "]  # fmt: skip


def _authors_transform(prompt: str, u: list[float], p: dict[str, float]) -> str:
    """ImageTextDataset.__random_transform_prompt with replace=False, given its five uniforms."""

    def drop(text: str, words: list[str]) -> str:
        for w in words:
            if w in text:
                return text.replace(w, " ")
        return text

    if u[0] < p["object_size"]:
        prompt = drop(prompt, _SIZE_WORDS)
    if u[1] < p["object_color"]:
        prompt = drop(prompt, _COLOR_WORDS)
    if u[2] < p["art_style"]:
        prompt = drop(prompt, _STYLE_WORDS)
    if u[3] < p["img_type"]:
        prompt = drop(prompt, _TYPE_WORDS)
    if u[4] < p["reverse"]:
        at = prompt.find(" of ")
        if at != -1:
            prompt = prompt[at + 4 :] + " in " + prompt[:at] + " style"
    return prompt.replace("  ", " ")


def test_prompt_list_is_gen_prompts_in_its_order() -> None:
    for name in ["dog", "elephant", "ice cream"]:
        ours = [p.authors_text() for p in clap_prompts(name)]  # default order: the authors'
        assert ours == _gen_prompts(name)
    first = clap_prompts("circle")[0].authors_text()
    assert first == "a realistic painting of a large red circle"
    assert clap_prompts("circle")[1].authors_text() == "a realistic painting of a large blue circle"
    # the structured order is kept as an option, with the same set of prompts
    old = clap_prompts("dog", order="grammatical")
    assert [p.render() for p in old[:2]] == [
        "a realistic painting of a large red dog", "a realistic painting of a large blue dog"
    ]  # fmt: skip
    assert old[10].image_type == "painting" and old[10].size == "normal sized"
    assert {p.authors_text() for p in old} == set(_gen_prompts("dog"))


def test_word_lists_are_the_authors() -> None:
    w = authors_word_lists()
    assert list(w["size"]) == _SIZE_WORDS and list(w["color"]) == _COLOR_WORDS
    assert list(w["art_style"]) == _STYLE_WORDS and list(w["image_type"]) == _TYPE_WORDS


@pytest.mark.parametrize(
    "probs",
    [
        # configs/train_CLAP_VLCS_ViTB.yaml, runs/Results_CLAP_ViTB/PACS/config.yml
        {"object_size": 0.5, "object_color": 0.5, "art_style": 0.0, "img_type": 0.0,
         "reverse": 0.5},
        # every branch (the ablations' ITD and ASD too)
        {"object_size": 0.5, "object_color": 0.5, "art_style": 0.5, "img_type": 0.5,
         "reverse": 0.5},
    ],
)  # fmt: skip
def test_augmented_strings_equal_the_authors_for_every_prompt(probs: dict[str, float]) -> None:
    """Same five uniforms per prompt (size, colour, art style, image type, swap): same string."""
    cfg = AugmentConfig(
        osd=probs["object_size"], ocd=probs["object_color"], asd=probs["art_style"],
        itd=probs["img_type"], spo=probs["reverse"],
    )  # fmt: skip
    ours_rng, ref_rng = random.Random(5), random.Random(5)
    words = authors_word_lists()
    n, changed = 0, 0
    for name in PACS:
        for p, text in zip(clap_prompts(name), _gen_prompts(name), strict=True):
            for _ in range(2):
                got = augment_prompt(p, cfg, ours_rng, "authors", words)
                ref = _authors_transform(text, [ref_rng.random() for _ in range(5)], probs)
                assert got == ref, (text, got, ref)
                n += 1
                changed += got != text
    assert n == 2 * 480 * len(PACS) and changed > n // 2  # the augmentations did act


def test_authors_strings_worked_examples() -> None:
    every = AugmentConfig(osd=0, ocd=0, itd=0, asd=0, spo=1)
    text = "a realistic painting of a large red circle"
    assert authors_augment(text, every) == "a large red circle in a realistic painting style"
    size = AugmentConfig(osd=1, ocd=0, itd=0, asd=0, spo=0)
    # the article is not repaired, as in the authors' strings
    assert authors_augment("a realistic sketch of a large orange circle", size) == (
        "a realistic sketch of a orange circle"
    )
    itd = AugmentConfig(osd=0, ocd=0, itd=1, asd=0, spo=1)
    assert authors_augment(text, itd) == "a large red circle in a realistic style"
    p = PromptAttributes("apple", size="large", color="orange", image_type="sketch",
                         art_style="impressionistic")  # fmt: skip
    assert p.authors_text() == "an impressionistic sketch of a large orange apple"
    assert p.text("grammatical") == p.render()
    with pytest.raises(ValueError, match="grammatical"):
        p.text("other")


def test_defaults_are_the_authors() -> None:
    """The authors' small-dataset protocol, written out (runs/Results_CLAP_ViTB/PACS/config.yml,
    configs/train_CLAP_VLCS_ViTB.yaml, main/trainer.py, utils/loss.py, main/evaluate.py)."""
    c = CLAPConfig()
    assert c.steps == 8000  # total_steps: 8000
    assert c.lr == 1e-4  # optimizer: torch.optim.Adam, learning_rate: 0.0001
    assert c.tau == 0.5  # tau_txt: 0.5
    assert c.tau_c == 1.0  # tau_cnt: 1
    assert c.lambda_c == 1.0  # scale_coef: 1
    assert c.loss_form == "symmetric_simclr"  # InfoNCELoss (utils/loss.py) for both terms
    assert c.input_features == "raw"  # clip.encode_text / encode_image, unnormalised, to the net
    assert c.prompt_form == "authors"  # gen_prompts.py, ImageTextDataset augmentations
    assert c.hidden == 256  # latent_dim: 256 (PACS)
    assert c.batch_size == 0  # rule: just above the number of classes (batch_size: 8 for PACS)
    a = AugmentConfig()  # prompt_aug_params
    assert (a.osd, a.ocd, a.spo) == (0.5, 0.5, 0.5)  # object_size, object_color, reverse
    assert (a.itd, a.asd) == (0.0, 0.0)  # img_type: 0, art_style: 0
    o = CLAPOptions()
    assert o.ign is True and o.noise_tokens == 4 and o.noise_std == 0.02  # noise_len 4, std 0.02
    assert o.attack_convention == "authors"  # main/evaluate.py: pgd_attack on normalised images
    assert o.attack_step == "clap"  # step_size = epsilon / 10
    assert o.training == c
    with pytest.raises(ValueError, match="input_features"):
        CLAPConfig(input_features="unit")


def _raw_encoder(dim: int = 8, scale: float = 5.0):
    gen = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            for w in t.split():
                table.setdefault(w, torch.randn(dim, generator=gen))
            rows.append(scale * F.normalize(sum(table[w] for w in t.split()), dim=-1))
        return torch.stack(rows)

    return encode


def test_network_sees_raw_or_normalized_features() -> None:
    prompts = [p for c in ["circle", "star"] for p in clap_prompts(c, ["red"], ["large"],
               ["sketch"], ["realistic"])]  # fmt: skip
    for mode in ("raw", "normalized"):
        res = train_clap(
            _raw_encoder(), prompts, steps=2, batch_size=2, hidden=4, input_features=mode,
            device="cpu", progress=False, seed=0,
        )  # fmt: skip
        assert res.network.in_dim == 8 and len(res.history["loss"]) == 2
    # the cache holds what the network takes: raw norms 5, normalised 1
    from fewclip_tutorial.methods.clap.train import _text_cache_for

    for mode, norm in (("raw", 5.0), ("normalized", 1.0)):
        cache = _text_cache_for(_raw_encoder(), torch.device("cpu"), mode)
        torch.testing.assert_close(
            cache(["a red circle", "a star"]).norm(dim=-1), torch.full((2,), norm)
        )
    with pytest.raises(ValueError, match="ign=True needs the open_clip model"):
        train_clap(_raw_encoder(), prompts, steps=1, ign=True, device="cpu", progress=False)


def _authors_pgd(visual, net, text, images, labels, step, k, eps, loss_fn="ce"):
    """main/evaluate.py pgd_attack without the random start (k == 1, or a zero start)."""
    cos = nn.CosineSimilarity(dim=-1)
    x = images
    for _ in range(k):
        x = x.detach().requires_grad_(True)
        z = net(visual(x))
        z = cos(z.unsqueeze(-2), text.unsqueeze(-3))
        if loss_fn == "ce":
            loss = nn.CrossEntropyLoss(reduction="none")(z, labels).sum()
        else:
            onehot = F.one_hot(labels, z.shape[1]).to(z.dtype)
            real = (onehot * z).sum(1)
            other = ((1.0 - onehot) * z - onehot * 10000.0).max(1)[0]
            loss = (-torch.clamp(real - other + 50, min=0.0)).sum()
        (grad,) = torch.autograd.grad(loss, [x])
        x_adv = x.data + step * torch.sign(grad.data)
        x = torch.clamp(torch.min(torch.max(x_adv, images - eps), images + eps), 0.0, 1.0)
    return x


def test_authors_attack_convention_matches_their_pgd() -> None:
    """Normalised images, raw cosines (no x100), the clamp to [0, 1], raw features to the net."""
    g = torch.Generator().manual_seed(0)
    # float32: NormalizedClassifier computes in float32 (as the encoders); identical signs of
    # the gradient are all that FGSM/PGD use, so the images agree exactly
    f32 = {"dtype": torch.float32}
    visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6)).to(**f32)
    net = nn.Linear(6, 6).to(**f32)
    text = F.normalize(torch.randn(3, 6, generator=g, **f32), dim=-1)
    images = torch.randn(5, 3, 4, 4, generator=g, **f32)  # CLIP-normalised: negatives too
    labels = torch.tensor([0, 1, 2, 0, 1])
    clf = NormalizedClassifier(
        visual, (0.5,) * 3, (0.25,) * 3, text, lambda f: net(f), logit_scale=1.0,
        refine_input="raw", input_space="normalized",
    )  # fmt: skip
    eps = 0.031
    ours = fgsm(clf, images, labels, eps, pixels=False)
    ref = _authors_pgd(visual, net, text, images, labels, eps, 1, eps)
    assert torch.equal(ours, ref)
    assert float(ours.min()) >= 0.0  # the authors' clamp cuts the normalised negatives
    for loss in ("ce", "cw"):
        ours = pgd(clf, images, labels, eps, "clap", 20, False, loss, pixels=False)
        ref = _authors_pgd(visual, net, text, images, labels, eps / 10, 20, eps, loss)
        assert torch.equal(ours, ref)
    with pytest.raises(ValueError, match="pixels=False"):
        fgsm(clf, images, labels, eps)
