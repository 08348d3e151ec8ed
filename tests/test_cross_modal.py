"""Tests of cross-modal adaptation (fewclip_tutorial.methods.cross_modal).

Where a test checks a formula, the expected value is written out here from the paper
or from the authors' code (``linzhiqiu/cross_modal_adaptation``: ``LogitHead`` in
``engine/model/logit.py``, ``get_zero_shot_weights`` in ``engine/model/head.py``,
``train()``, ``get_wiseft`` and the loaders of ``train.py``), not taken from the module.
"""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from fewclip_tutorial.methods import cross_modal as cm

sys.path.insert(0, str(Path(__file__).parent))

F64 = torch.float64  # equivalence checks run in float64, where orders of summation agree to 1e-15


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _shifted_problem():
    """Images of class c cluster at mu_c; the text of class c sits at mu_{c+1}.

    So the text-initialised head is wrong on every image until trained on images.
    """
    C, D = 4, 16
    g = torch.Generator().manual_seed(3)
    mu = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    text = mu.roll(-1, dims=0)[:, None]  # (C, 1, D): class c -> mu_{c+1}
    labels = torch.arange(C).repeat(4)
    feats = F.normalize(mu[labels] + 0.05 * torch.randn(len(labels), D, generator=g), dim=-1)
    val_labels = torch.arange(C).repeat(2)
    val = F.normalize(mu[val_labels] + 0.05 * torch.randn(len(val_labels), D, generator=g), dim=-1)
    return feats, labels, text, val, val_labels


def _authors_logits(x: torch.Tensor, weight: torch.Tensor, logit: float) -> torch.Tensor:
    """``LogitHead(nn.Linear(D, C, bias=False))``: ``exp(logit) * Linear(normalize(x))``."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    with torch.no_grad():
        return linear(F.normalize(x, dim=1)) * torch.tensor([logit], dtype=x.dtype).exp()


# ------------------------------------------------------------------------- formulas


def test_text_samples_shapes_labels_and_normalisation() -> None:
    t = torch.randn(3, 4, 5, dtype=F64) * 7  # float64: differences are rounding only
    feats, labels = cm.text_samples(t)
    assert feats.shape == (12, 5) and feats.dtype == F64
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert labels.dtype == torch.int64
    # float64, D = 5: a norm and a division round (D + 2) times, each <= 1.1e-16 relative
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(12, dtype=F64), atol=1e-12, rtol=0)
    want = t[1, 2] / t[1, 2].norm()  # row c*M + m; same float64 bound as above
    torch.testing.assert_close(feats[1 * 4 + 2], want, atol=1e-12, rtol=0)
    assert cm.text_samples(t.float())[0].dtype == torch.float32  # float32 in, float32 out


def test_class_prototypes_are_unit_rows_and_the_authors_zero_shot_weights() -> None:
    scales = torch.tensor([1.0, 5.0, 0.2, 3.0], dtype=F64)[None, :, None]
    raw = torch.randn(3, 4, 5, dtype=F64) * scales  # float64: differences are rounding only
    protos = cm.class_prototypes(raw)
    # float64, D = 5, M = 4: <= 2 (D + M + 2) roundings of 1.1e-16 relative, < 1e-14
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(3, dtype=F64), atol=1e-12, rtol=0)
    # get_zero_shot_weights: mean over templates, then normalise (here on unit templates,
    # where CLIP's ensemble and the authors' mean coincide)
    unit = raw / raw.norm(dim=-1, keepdim=True)
    mean = unit.mean(dim=1)
    want = mean / mean.norm(dim=1, keepdim=True)  # same float64 bound as above
    torch.testing.assert_close(cm.class_prototypes(unit), want, atol=1e-12, rtol=0)


def test_head_logits_and_loss_match_the_authors_logit_head() -> None:
    # float64 (unnormalised on purpose): the two computations differ by rounding only
    W, x = torch.randn(4, 8, dtype=F64), torch.randn(6, 8, dtype=F64) * 3
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    head = cm.CrossModalHead(W)
    want = _authors_logits(x, W, 4.60517)  # CLIP's default: exp(4.60517) = 100
    # The scales differ: exp(4.60517) = 100 (1 - 1.9e-7), and the head keeps exp(4) as a
    # float32 buffer (relative 2^-24 = 6e-8): rtol 2.5e-7. The float64 dot products of 8 terms
    # round by <= 8 * 1.1e-16 * 100 * |W_c| |x| / |x| < 1e-12 absolute.
    torch.testing.assert_close(head(x), want, rtol=2.5e-7, atol=1e-12)
    log_softmax = want - want.logsumexp(dim=1, keepdim=True)
    ce = -log_softmax[torch.arange(6), y].mean()
    # CE = logsumexp - one logit moves by <= 2 max|logit| * 2.5e-7
    ce_bound = 2 * float(want.abs().max()) * 2.5e-7
    assert F.cross_entropy(head(x), y).item() == pytest.approx(ce.item(), abs=ce_bound)
    assert [n for n, _ in head.named_parameters()] == ["weight"]  # the scale is not learned
    partial = cm.CrossModalHead(W, logit_scale=cm.PARTIAL_FT_LOGIT_SCALE)
    torch.testing.assert_close(partial(x), _authors_logits(x, W, 4.0), rtol=2.5e-7, atol=1e-12)
    # float32 in, float32 out (the shipped path)
    assert cm.CrossModalHead(W.float())(x.float()).dtype == torch.float32


def test_wise_ft_ends_middle_and_the_authors_get_wiseft() -> None:
    learned, zs = torch.randn(4, 6, dtype=F64), F.normalize(torch.randn(4, 6, dtype=F64), dim=-1)
    assert torch.equal(cm.wise_ft(learned, zs, 0.0), zs)
    assert torch.equal(cm.wise_ft(learned, zs, 1.0), learned)
    # elementwise, same operations in the same order: exact on every CPU
    assert torch.equal(cm.wise_ft(learned, zs, 0.25), 0.75 * zs + 0.25 * learned)
    # get_wiseft(head, zero_shot, ratio): (1 - ratio) * head + ratio * normalize(zero_shot)
    ratio = 0.5
    authors = (1 - ratio) * learned + ratio * zs / zs.norm(dim=1, keepdim=True)
    # float64: re-normalising unit rows of D = 6 rounds <= 8 times, 1.1e-16 each
    torch.testing.assert_close(cm.wise_ft(learned, zs, 0.5), authors, atol=1e-12, rtol=0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            cm.wise_ft(learned, zs, bad)
    with pytest.raises(ValueError, match="shape"):
        cm.wise_ft(learned, zs[:3], 0.5)


# ------------------------------------------------------------------------- batches


def _rows_of(pool: torch.Tensor, x: torch.Tensor) -> list[int]:
    """The row of ``pool`` each row of ``x`` equals (rows of pool are distinct)."""
    return [int(((pool - r).abs().amax(-1) == 0).nonzero()[0, 0]) for r in x]


def test_one_epoch_shows_every_image_and_every_text_sample_once() -> None:
    views = _unit(2, 12, 6, seed=1)  # two views of 12 images: a pool of 24 image samples
    img_labels = torch.arange(12) % 3
    txt, txt_labels = cm.text_samples(_unit(3, 4, 6, seed=2))  # 12 text samples
    batches = list(
        cm.mixed_batches(views, img_labels, txt, txt_labels, 8, torch.Generator().manual_seed(0),
                         num_batches=6)
    )  # fmt: skip
    pool = views.reshape(24, 6)
    image_rows = [_rows_of(pool, b.x[~b.is_text]) for b in batches]
    text_rows = [_rows_of(txt, b.x[b.is_text]) for b in batches]
    assert sorted(sum(image_rows, [])) == list(range(24))  # 6 batches x 4 = one image epoch
    for epoch in range(2):  # 3 batches x 4 = one text epoch
        assert sorted(sum(text_rows[3 * epoch : 3 * epoch + 3], [])) == list(range(12))
    for b, rows in zip(batches, image_rows, strict=True):
        assert torch.equal(b.y[~b.is_text], img_labels.repeat(2)[rows])
    # reproducible from the seed
    again = cm.mixed_batches(views, img_labels, txt, txt_labels, 8,
                             torch.Generator().manual_seed(0), num_batches=6)  # fmt: skip
    assert all(torch.equal(a.x, b.x) for a, b in zip(batches, again, strict=True))


def test_epochs_drop_the_incomplete_last_batch() -> None:
    stream = cm.epoch_batches(10, 4, torch.Generator().manual_seed(1))
    first = [next(stream) for _ in range(2)]  # 8 of 10, then a fresh permutation
    assert len(set(torch.cat(first).tolist())) == 8
    counts = Counter(torch.cat([next(stream) for _ in range(2 * 50)]).tolist())
    assert set(counts) == set(range(10))  # every sample is drawn across epochs
    big = cm.epoch_batches(3, 4, torch.Generator().manual_seed(1))  # chained permutations
    assert sorted(torch.cat([next(big) for _ in range(3)]).tolist()) == sorted([0, 1, 2] * 4)


@pytest.mark.parametrize(
    ("batch_size", "ratio", "n_img"),
    [(8, 0.0, 0), (8, 1.0, 8), (9, 0.5, 5), (7, 0.5, 4), (32, 0.25, 8)],
)
def test_batch_split_follows_the_authors_text_batch_size(
    batch_size: int, ratio: float, n_img: int
) -> None:
    # train.py: text_batch_size = int(batch_size * ratio_text); images take the rest
    assert n_img == batch_size - int(batch_size * (1 - ratio))
    txt, txt_labels = cm.text_samples(_unit(4, 10, 4))
    img, img_labels = _unit(40, 4), torch.arange(40) % 4
    batch = next(cm.mixed_batches(img, img_labels, txt, txt_labels, batch_size, image_ratio=ratio))
    assert int((~batch.is_text).sum()) == n_img
    assert not bool(batch.is_text[:n_img].any()) and bool(batch.is_text[n_img:].all())


def test_training_draws_every_batch_through_the_taught_builder(monkeypatch) -> None:
    feats, labels, text, val, val_labels = _shifted_problem()
    txt, txt_labels = cm.text_samples(text)
    W0 = cm.class_prototypes(text)
    seen: list[cm.MixedBatch] = []
    taught = cm.build_mixed_batch

    def spy(*args, **kwargs):
        seen.append(taught(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(cm.core, "build_mixed_batch", spy)
    head = cm.CrossModalHead(W0)
    kw = {"lr": 1e-2, "weight_decay": 1e-2, "batch_size": 6, "seed": 5, "device": "cpu"}
    cm.train_head(head, feats, labels, txt, txt_labels, val, val_labels, iters=7, **kw)
    assert len(seen) == 7
    monkeypatch.setattr(cm.core, "build_mixed_batch", taught)
    stream = cm.mixed_batches(feats, labels, txt, txt_labels, 6, torch.Generator().manual_seed(5))
    assert all(torch.equal(b.x, next(stream).x) for b in seen)

    # one step, rebuilt independently: torch's AdamW on the authors' loss for that batch
    head1 = cm.CrossModalHead(W0)
    cm.train_head(head1, feats, labels, txt, txt_labels, val, val_labels, iters=1, warmup=0,
                select_best=False, **kw)  # fmt: skip
    w = torch.nn.Parameter(W0.clone())
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=1e-2)
    x, y, _ = seen[0]
    F.cross_entropy(100.0 * F.normalize(x, dim=1) @ w.T, y).backward()
    opt.step()
    # float32: Adam's first step is lr * g / (|g| + eps) = +-lr whatever g's rounding; the
    # weights (|w| <= 1) then round <= 4 times by 2^-24: <= 2.4e-7 < 1e-6
    torch.testing.assert_close(head1.weight.detach(), w.detach(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- training + selection


def _val_score(weight: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor):
    logits = 100.0 * F.normalize(val, dim=1) @ weight.T
    acc = 100.0 * int((logits.argmax(1) == val_labels).sum()) / len(val_labels)
    return acc, F.cross_entropy(logits, val_labels).item()


def test_trainer_keeps_its_start_when_no_step_improves_validation() -> None:
    feats, labels, text, val, val_labels = _shifted_problem()
    txt, txt_labels = cm.text_samples(text)
    W0 = cm.class_prototypes(text)
    common = {"weight_decay": 0.0, "batch_size": 8, "iters": 60, "eval_every": 20, "device": "cpu"}
    # lr = 0: nothing moves, so nothing is strictly better than the start
    head = cm.CrossModalHead(W0)
    res = cm.train_head(head, feats, labels, txt, txt_labels, val, val_labels, lr=0.0, **common)
    assert res.best_step == 0 and torch.equal(head.weight.detach(), W0)
    # adversarial validation: labelled as the (wrong) zero-shot head predicts, so training
    # on the images makes validation worse; the trainer returns the start exactly
    adversarial = (val_labels - 1) % 4
    assert _val_score(W0, val, adversarial)[0] == 100.0
    head = cm.CrossModalHead(W0)
    res = cm.train_head(head, feats, labels, txt, txt_labels, val, adversarial, lr=1e-2, **common)
    assert res.best_step == 0 and torch.equal(head.weight.detach(), W0)
    assert res.history["val_step"] == [0, 20, 40, 60] and len(res.history["loss"]) == 60


def test_grid_selects_on_validation_and_reports_the_kept_state() -> None:
    params = inspect.signature(cm.train_cross_modal).parameters
    assert not [p for p in params if "test" in p]
    feats, labels, text, val, val_labels = _shifted_problem()
    kw = {
        "modality": "image",
        "iters": 100,
        "warmup": 5,
        "eval_every": 20,
        "lrs": [1e-6, 1e-2],
        "weight_decays": [0.0],
        "batch_sizes": [8],
        "device": "cpu",
        "progress": False,
    }
    good = cm.train_cross_modal(feats, labels, text, val, val_labels, **kw)
    assert good.hparams["lr"] == 1e-2 and good.best_step > 0 and good.val_accuracy == 100.0
    acc, loss = _val_score(good.head.weight.detach(), val, val_labels)
    assert acc == good.val_accuracy  # the same count of correct images
    # float32, D = 16: normalise + dot round <= (2D + 2) 2^-24 |w_c| per logit, times 100;
    # the CE (logsumexp minus a logit) moves by <= 2 of those
    wmax = float(good.head.weight.detach().norm(dim=1).max())
    bound = 2 * (2 * 16 + 2) * 2**-24 * 100 * wmax
    assert loss == pytest.approx(good.val_loss, abs=bound)
    hist = good.history
    kept = max(zip(hist["val_accuracy"], [-v for v in hist["val_loss"]], hist["val_step"],
                   strict=True), key=lambda r: (r[0], r[1]))  # fmt: skip
    assert kept[2] == good.best_step
    assert [g["lr"] for g in good.grid] == [1e-6, 1e-2]
    bad = cm.train_cross_modal(feats, labels, text, val, (val_labels - 1) % 4, **kw)
    assert bad.best_step == 0 and bad.val_accuracy == 100.0
    assert bad.hparams["lr"] == 1e-6  # every run keeps its start: the tie goes to the first


def test_batch_sizes_that_do_not_fit_are_skipped_as_the_authors_do() -> None:
    feats, labels, text, val, val_labels = _shifted_problem()  # 16 images, 4 text samples
    t = torch.cat([text] * 5, dim=1)  # 5 templates: 20 text samples
    kw = {"iters": 2, "lrs": [1e-3], "weight_decays": [0.0], "device": "cpu", "progress": False}
    res = cm.train_cross_modal(feats, labels, t, val, val_labels, batch_sizes=[8, 32], **kw)
    # batch 32: 16 image samples, not fewer than the 16 images -> skipped
    assert [g["batch_size"] for g in res.grid] == [8] and res.extra["skipped_batch_sizes"] == [32]
    with pytest.warns(UserWarning, match="no batch size"):  # none fits: the smallest, warned
        res = cm.train_cross_modal(feats, labels, t, val, val_labels, batch_sizes=[48, 40], **kw)
    assert [g["batch_size"] for g in res.grid] == [40] and res.extra["skipped_batch_sizes"] == [48]


def test_template_choice_is_made_on_validation() -> None:
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(4, 6, 16, generator=g), dim=-1)
    feats, labels = _unit(12, 16, seed=1), torch.arange(12) % 4
    val, val_labels = _unit(40, 16, seed=2), torch.arange(40) % 4
    counts = [1, 2, 4, 6]
    kw = {"iters": 3, "lrs": [0.0], "weight_decays": [0.0], "batch_sizes": [4]}
    chosen, results = cm.sweep_templates(feats, labels, t, val, val_labels, counts,
                                         device="cpu", progress=False, **kw)  # fmt: skip
    # with lr 0 every head is the zero-shot head of its first m templates
    scores = {}
    for m in counts:
        mean = t[:, :m].mean(1)
        scores[m] = _val_score(mean / mean.norm(dim=1, keepdim=True), val, val_labels)
        assert results[m].val_accuracy == scores[m][0]
    best = max(counts, key=lambda m: (scores[m][0], -scores[m][1], -m))
    assert chosen == best
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        cm.sweep_templates(feats, labels, t, val, val_labels, [0, 7], **kw)


def test_text_only_training_keeps_a_zero_shot_like_head() -> None:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(6, 32, generator=g), dim=-1)
    t = F.normalize(centres[:, None] + 3.0 * torch.randn(6, 4, 32, generator=g) / 32**0.5, dim=-1)
    txt, txt_labels = cm.text_samples(t)
    W0 = cm.class_prototypes(t)
    head = cm.CrossModalHead(W0)
    cm.train_head(head, torch.zeros(0, 32), torch.zeros(0, dtype=torch.long), txt, txt_labels,
                W0, torch.arange(6), lr=1e-3, weight_decay=0.0, batch_size=8, iters=200,
                warmup=10, image_ratio=0.0, select_best=False, device="cpu")  # fmt: skip
    W = head.weight.detach()
    assert (W - W0).norm() > 1e-2  # it did train
    assert torch.equal(head(txt).argmax(-1), txt_labels)
    assert F.cosine_similarity(W, W0, dim=-1).min() > 0.99


def test_options_and_errors() -> None:
    feats, labels, text, val, val_labels = _shifted_problem()
    kw = {"iters": 2, "lrs": [1e-3], "weight_decays": [0.0], "batch_sizes": [6], "progress": False}
    image = cm.train_cross_modal(feats, labels, text, val, val_labels, modality="image", **kw)
    rand = cm.train_cross_modal(feats, labels, text, val, val_labels, init="random", **kw)
    assert image.image_ratio == 1.0 and rand.extra["init"] == "random"
    # a "differs" check: the unit prototypes' entries are ~1/sqrt(16) = 0.25, so a random
    # start differs from them by far more than 0.1 somewhere
    assert not torch.allclose(rand.head.weight.detach(), cm.class_prototypes(text), atol=0.1)
    with pytest.raises(ValueError, match="image_ratio must be 1"):
        cm.train_cross_modal(
            feats, labels, text, val, val_labels, modality="image", image_ratio=0.5
        )
    with pytest.raises(ValueError, match="modality"):
        cm.train_cross_modal(feats, labels, text, val, val_labels, modality="text")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        cm.train_cross_modal(feats, labels + 1, text, val, val_labels, **kw)
    with pytest.raises(ValueError, match="validation labels"):
        cm.train_cross_modal(feats, labels, text, val, val_labels + 4, **kw)
    with pytest.raises(ValueError, match="no images"):
        cm.train_cross_modal(feats[:0], labels[:0], text, val, val_labels, **kw)
    with pytest.raises(ValueError, match="dimension 5 but text features 16"):
        cm.train_cross_modal(feats[:, :5], labels, text, val, val_labels, **kw)
    with pytest.raises(ValueError, match=r"\(C, M, D\)"):
        cm.text_samples(torch.randn(3, 8))
    with pytest.raises(ValueError, match="image_ratio must be in"):
        next(cm.mixed_batches(feats, labels, *cm.text_samples(text), 4, image_ratio=1.5))
    with pytest.raises(ValueError, match="no text samples"):
        next(cm.mixed_batches(feats, labels, val[:0], val_labels[:0], 4))
    with pytest.raises(ValueError, match="head expects 16"):
        cm.CrossModalHead(val)(torch.randn(2, 5))


def test_every_trainer_goes_through_the_one_loop(monkeypatch) -> None:
    from fewclip_tutorial import training

    calls = []

    def counting_fit(*args, **kwargs):
        calls.append(kwargs["schedule"])
        return training.fit(*args, **kwargs)

    monkeypatch.setattr(cm.train, "fit", counting_fit)
    feats, labels, text, val, val_labels = _shifted_problem()
    cm.train_cross_modal(feats, labels, text, val, val_labels, iters=2, lrs=[1e-3, 1e-4],
                         weight_decays=[0.0], batch_sizes=[6], progress=False)  # fmt: skip
    assert calls == ["cosine", "cosine"]


# ------------------------------------------------------------------------- partial fine-tuning


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2, output_dim=16
    ).eval()


def test_split_visual_encoder_reproduces_the_full_forward() -> None:
    vit = _tiny_vit()
    x = torch.randn(5, 3, 16, 16)
    split = cm.split_visual_encoder(vit)
    with torch.no_grad():
        assert torch.equal(split.suffix(split.prefix(x)), vit(x))
    assert split.prefix(x).shape == (5, 5, 32)  # 4 patches + class token, width 32
    names = [type(m).__name__ for m in split.trainable]
    assert names[:2] == ["ResidualAttentionBlock", "LayerNorm"]
    assert split.trainable[0] is not vit.transformer.resblocks[-1]  # a deep copy
    resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=32, width=8)
    resnet.eval()
    xr = torch.randn(2, 3, 32, 32)
    rsplit = cm.split_visual_encoder(resnet)
    with torch.no_grad():
        assert torch.equal(rsplit.suffix(rsplit.prefix(xr)), resnet(xr))
    with pytest.raises(NotImplementedError, match="variant='linear'"):
        cm.split_visual_encoder(torch.nn.Linear(3, 3))


def test_partial_finetune_trains_a_copy_and_lr0_is_zero_shot() -> None:
    vit = _tiny_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 16, 16, generator=g), torch.tensor([0, 1, 2] * 2)
    val_images, val_labels = torch.randn(3, 3, 16, 16, generator=g), torch.arange(3)
    text = _unit(3, 2, 16, seed=4)
    common = {"iters": 10, "warmup": 2, "eval_every": 5, "device": "cpu", "progress": False}
    res = cm.train_partial_finetune(
        vit, images, labels, text, val_images, val_labels, lrs=[1e-2], **common
    )
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    prefix = res.extra["prefix"]
    with torch.no_grad():
        logits = res.head(res.suffix(prefix(val_images)))
    correct = int((logits.argmax(-1) == val_labels).sum())
    # the same count of correct images; 100 * k / n and 100 * (k / n) differ in the last bit
    assert res.val_accuracy == pytest.approx(100.0 * correct / len(val_labels), rel=1e-15)
    # lr = 0: encoder and head stay put, so the result is the frozen zero-shot classifier
    res0 = cm.train_partial_finetune(
        vit, images, labels, text, val_images, val_labels, lrs=[0.0], **common
    )
    assert res0.best_step == 0
    with torch.no_grad():
        got = res0.head(res0.suffix(prefix(val_images)))
        want = _authors_logits(vit(val_images), cm.class_prototypes(text), 4.0)
    # float32: the same encoder ops; the heads' dots of D = 16 unit vectors round by
    # <= 16 * 2^-24 * e^4 = 5.2e-5, the float32 scale by e^4 * 2^-24 = 3e-6: < 1e-4
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="outputs dimension 16 but text features have 8"):
        cm.train_partial_finetune(
            vit, images, labels, _unit(3, 1, 8), val_images, val_labels, **common
        )


def test_partial_finetune_defaults_are_the_authors() -> None:
    # linzhiqiu/cross_modal_adaptation, engine/optimizer/default.py, HYPER_DICT["partial"]
    # (run by partial_finetuning.sh with --hyperparams partial --logit 4.0)
    assert cm.PARTIAL_GRIDS["paper"] == {
        "lrs": (0.00001, 0.000001, 0.0000001),
        "weight_decays": (0.0, 0.001, 0.00001),
        "batch_sizes": (8,),
    }
    assert cm.CrossModalConfig().partial_grid == "paper"
    assert inspect.signature(cm.train_partial_finetune).parameters["grid"].default == "paper"
    # the package's earlier single configuration stays reachable
    assert cm.PARTIAL_GRIDS["single"] == {"lrs": (1e-4,), "weight_decays": (0.0,),
                                          "batch_sizes": (8,)}  # fmt: skip


def _partial_problem():
    vit = _tiny_vit()
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(9, 3, 16, 16, generator=g), torch.tensor([0, 1, 2] * 3)
    val_images, val_labels = torch.randn(6, 3, 16, 16, generator=g), torch.tensor([0, 1, 2] * 2)
    text = _unit(3, 4, 16, seed=5)
    split = cm.split_visual_encoder(vit)
    with torch.no_grad():  # prefix activations, as the runner caches them
        train_cache, val_cache = split.prefix(images).unsqueeze(0), split.prefix(val_images)
    return vit, split, train_cache, labels, text, val_cache, val_labels


def _explicit_search(split, train_cache, labels, text, val_cache, val_labels, configs, **kw):
    """The grid search written out: a fresh head and suffix per configuration, the best
    validation (accuracy, -loss), the earlier configuration on a tie."""
    import copy

    txt, txt_labels = cm.text_samples(text)
    best, scores = None, []
    for lr, wd, bs in configs:
        head = cm.CrossModalHead(cm.class_prototypes(text), logit_scale=cm.PARTIAL_FT_LOGIT_SCALE)
        suffix = copy.deepcopy(split.suffix)
        res = cm.train_head(head, train_cache, labels, txt, txt_labels, val_cache, val_labels,
                            lr=lr, weight_decay=wd, batch_size=bs, suffix=suffix,
                            image_ratio=0.5, **kw)  # fmt: skip
        scores.append(res.best_score)
        if best is None or res.best_score > best[1].best_score:
            best = ((lr, wd, bs), res, head)
    return best, scores


def test_partial_finetune_grid_keeps_the_best_validation_configuration() -> None:
    vit, split, train_cache, labels, text, val_cache, val_labels = _partial_problem()
    kw = {"iters": 12, "warmup": 2, "eval_every": 4, "seed": 1, "device": "cpu"}
    lrs, wds = (3e-2, 1e-3, 0.0), (0.0, 1e-1)
    res = cm.train_partial_finetune(
        vit, train_cache, labels, text, val_cache, val_labels, lrs=lrs, weight_decays=wds,
        batch_sizes=(4,), cached=True, progress=False, **kw,
    )  # fmt: skip
    configs = [(lr, wd, 4) for lr in lrs for wd in wds]
    (cfg, best, head), scores = _explicit_search(
        split, train_cache, labels, text, val_cache, val_labels, configs, **kw
    )
    assert len(set(scores)) > 1  # the configurations differ on validation
    assert res.hparams == {"lr": cfg[0], "weight_decay": cfg[1], "batch_size": cfg[2]}
    assert [(g["lr"], g["weight_decay"], g["batch_size"]) for g in res.grid] == configs
    # the same training, step for step (the same ops on the same tensors): equal scores
    assert [(g["val_accuracy"], -g["val_loss"]) for g in res.grid] == scores
    assert (res.val_accuracy, -res.val_loss) == best.best_score == max(scores)
    assert res.best_step == best.best_step
    assert torch.equal(res.head.weight, head.weight)
    # lr = 0 leaves every configuration at its start: the start is kept (step 0)
    still = cm.train_partial_finetune(
        vit, train_cache, labels, text, val_cache, val_labels, lrs=(0.0,), cached=True,
        progress=False, **kw,
    )  # fmt: skip
    assert still.best_step == 0 and len(still.grid) == 3  # the authors' 3 weight decays
    assert torch.equal(still.head.weight, cm.class_prototypes(text))


def test_partial_finetune_grid_of_one_is_the_single_configuration() -> None:
    vit, split, train_cache, labels, text, val_cache, val_labels = _partial_problem()
    kw = {"iters": 12, "warmup": 2, "eval_every": 4, "seed": 1, "device": "cpu"}
    res = cm.train_partial_finetune(vit, train_cache, labels, text, val_cache, val_labels,
                                    grid="single", cached=True, progress=False, **kw)  # fmt: skip
    (cfg, best, head), _ = _explicit_search(
        split, train_cache, labels, text, val_cache, val_labels, [(1e-4, 0.0, 8)], **kw
    )
    assert res.hparams == {"lr": 1e-4, "weight_decay": 0.0, "batch_size": 8}
    assert len(res.grid) == 1 and (res.val_accuracy, -res.val_loss) == best.best_score
    assert torch.equal(res.head.weight, head.weight)
    with pytest.raises(ValueError, match="grid must be one of"):
        cm.train_partial_finetune(vit, train_cache, labels, text, val_cache, val_labels,
                                  grid="small", cached=True, progress=False, **kw)  # fmt: skip


# ------------------------------------------------------------------------- runner + exercises


@pytest.fixture(scope="module")
def ctx():
    from fixtures_data import make_spec

    from fewclip_tutorial.backbones import load_backbone
    from fewclip_tutorial.episode import build_context

    bb = load_backbone("shapeworld-tiny", pretrained=None, device="cpu")
    spec = make_spec([5, 5, 5])
    return build_context(spec, bb, shots=2, seed=1, cache_dir=None, progress=False, device="cpu")


def test_runner_variants(ctx) -> None:
    from fewclip_tutorial.methods.registry import run_method

    kw = {"context": ctx, "iters": 10, "grid": "small", "progress": False}
    lin = run_method("cross-modal", **kw)
    # one validation image = 100/N points: the final evaluation batches the features
    # differently, which may flip one near-tie of the untrained backbone
    one_image = 100.0 / len(ctx.splits.val)
    assert lin["val_accuracy"] == pytest.approx(lin["selection_val_accuracy"], abs=one_image)
    assert set(lin["hparams"]) == {"lr", "weight_decay", "batch_size"}
    assert len(lin["grid"]) == 4 and "ood_accuracy" in lin
    zs = run_method("zero-shot", context=ctx, progress=False)
    wise0 = run_method("cross-modal", variant="wise-ft", wise_weight=0.0, **kw)
    assert (wise0["test_accuracy"], wise0["ood_accuracy"]) == (
        zs["test_accuracy"],
        zs["ood_accuracy"],
    )
    part = run_method("cross-modal", variant="partial", **kw)
    # re-encoded validation features agree with the cached prefix used for selection
    # (one validation image at most, as above)
    assert part["val_accuracy"] == pytest.approx(part["selection_val_accuracy"], abs=one_image)
    # the authors' grid by default, the package's earlier configuration on request
    assert part["partial_grid"] == "paper" and part["config"]["partial_grid"] == "paper"
    assert [(g["lr"], g["weight_decay"]) for g in part["grid"]] == [
        (lr, wd) for lr in (1e-5, 1e-6, 1e-7) for wd in (0.0, 1e-3, 1e-5)
    ]
    single = run_method("cross-modal", variant="partial", partial_grid="single", **kw)
    assert single["hparams"] == {"lr": 1e-4, "weight_decay": 0.0, "batch_size": 8}
    assert len(single["grid"]) == 1 and single["config"]["partial_grid"] == "single"


def test_exercises_registered_and_reference_passes() -> None:
    from fewclip_tutorial.course.exercises import get_exercise

    assert get_exercise("wise_ft").check(cm.wise_ft, verbose=False)
    batch = get_exercise("cross_modal_batch")

    def mine(img, img_labels, txt, txt_labels, i, t):
        x = torch.cat([img[i], txt[t]])
        return x, torch.cat([img_labels[i], txt_labels[t]]), torch.arange(len(x)) >= len(i)

    def wrong_order(img, img_labels, txt, txt_labels, i, t):
        x = torch.cat([txt[t], img[i]])
        return x, torch.cat([txt_labels[t], img_labels[i]]), torch.arange(len(x)) < len(t)

    assert batch.check(mine, verbose=False)
    assert not batch.check(wrong_order, verbose=False)


def test_flipped_views_follow_the_datasets_mirror_invariance() -> None:
    from fixtures_data import make_spec

    from fewclip_tutorial.backbones import load_backbone
    from fewclip_tutorial.episode import build_context
    from fewclip_tutorial.methods.registry import run_method

    bb = load_backbone("shapeworld-tiny", pretrained=None, device="cpu")
    kw = {"iters": 5, "grid": "small", "progress": False}
    spec = make_spec([5, 5, 5])
    ctx = build_context(spec, bb, shots=2, seed=1, cache_dir=None, progress=False, device="cpu")
    assert run_method("cross-modal", context=ctx, **kw)["flip"] is True  # the paper's default
    spec.info["hflip_invariant"] = False  # as ShapeWorld declares
    ctx = build_context(spec, bb, shots=2, seed=1, cache_dir=None, progress=False, device="cpu")
    no_flip = run_method("cross-modal", context=ctx, **kw)
    assert no_flip["flip"] is False
    assert run_method("cross-modal", context=ctx, flip=True, **kw)["flip"] is True  # explicit wins
