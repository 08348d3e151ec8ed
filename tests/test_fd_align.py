"""Tests of fewclip_tutorial.methods.fd_align (FD-Align, Song et al. 2023).

Every numeric check compares against an independent computation: the paper's equations
written out here, or the authors' formulas from ``skingorz/FD-Align``
(``modules/FD_Align_SCP_CoOp.py``, ``architectures/feature_extractor/clip.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision import transforms as T

from fewclip_tutorial.backbones import Backbone, state_dict_digest
from fewclip_tutorial.data.base import DatasetSpec, ListSplit
from fewclip_tutorial.methods import fd_align as fd
from fewclip_tutorial.methods.fd_align import (
    class_prototypes,
    encode_pair,
    fd_align_loss,
    finetuned_backbone,
    spurious_distribution,
    spurious_kl,
    spurious_prototype_correction,
    spurious_prototypes,
    train_fd_align,
    trainable_parameter_names,
)

torch.set_num_threads(1)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- fixtures


def _tiny_backbone() -> Backbone:
    """An untrained 2-block ViT CLIP at 16 px: fast enough for a few training steps."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=16),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=49408, width=32, heads=2, layers=1),
    )
    model.eval().requires_grad_(False)
    preprocess = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize(MEAN, STD)])
    return Backbone(
        name="tiny-test",
        pretrained=None,
        model=model,
        preprocess=preprocess,
        tokenizer=SimpleTokenizer(context_length=8),
        device=torch.device("cpu"),
        image_size=16,
        mean=MEAN,
        std=STD,
        identifier="tiny-test:none",
        logit_scale=100.0,
    )


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return _tiny_backbone()


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8))


def _split(n_per_class: int, n_classes: int = 2, offset: int = 0, name: str = "s") -> ListSplit:
    labels = [c for c in range(n_classes) for _ in range(n_per_class)]
    return ListSplit([_image(offset + i) for i in range(len(labels))], labels, name=name)


def _protos(backbone: Backbone, n_classes: int = 2, n_templates: int = 3, seed: int = 0):
    """CLIP-like text features: a shared direction + a class part + a small template part,
    so the spurious softmax (scale 100) is not saturated."""
    g = torch.Generator().manual_seed(seed)
    d = backbone.embed_dim
    common = 3.0 * F.normalize(torch.randn(d, generator=g), dim=0)
    per_class = torch.randn(n_classes, 1, d, generator=g)
    per_template = 0.05 * torch.randn(1, n_templates, d, generator=g)
    text = common + per_class + per_template
    return class_prototypes(text), spurious_prototypes(text)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _episode(backbone: Backbone, cache_dir=None):
    from fewclip_tutorial.episode import build_context

    spec = DatasetSpec(
        name="tiny",
        classnames=["circle", "star"],
        templates=["a {}.", "a red {}.", "a sketch of a {}.", "a photo of a {}."],
        train=_split(4, name="train"),
        val=None,
        test=_split(2, offset=300, name="test"),
        ood_test={"sketch": _split(2, offset=400, name="test:sketch")},
    )
    return build_context(spec, backbone, shots=2, seed=1, cache_dir=cache_dir, progress=False)


COMMON = {"epochs": 2, "blocks": 0, "lr": 0.05, "batch_size": 4, "templates": "dataset"}


# --------------------------------------------------------------------------- prototypes


def test_prototypes_match_hand_computation() -> None:
    # C=2 classes, M=3 templates, D=2.  Rows are normalised before averaging.
    text = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 3.0], [5.0, 0.0]],  # class 0 -> e0, e1, e0
            [[0.0, 1.0], [0.0, 4.0], [1.0, 0.0]],  # class 1 -> e1, e1, e0
        ],
        dtype=torch.float64,
    )
    s5, r2 = math.sqrt(5.0), 1 / math.sqrt(2.0)
    # class 0: mean(e0, e1, e0) -> (2, 1)/sqrt5; class 1: mean(e1, e1, e0) -> (1, 2)/sqrt5
    expected_cls = torch.tensor([[2 / s5, 1 / s5], [1 / s5, 2 / s5]], dtype=torch.float64)
    # template 0: mean(e0, e1) -> (1, 1)/sqrt2; template 1: e1; template 2: e0
    expected_spur = torch.tensor([[r2, r2], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    # float64 throughout: two normalisations of 2-vectors and a mean of 3, a few roundings
    # of 1.1e-16 each on values <= 1
    tight = {"atol": 1e-15, "rtol": 0}
    torch.testing.assert_close(class_prototypes(text), expected_cls, **tight)  # unit rows
    torch.testing.assert_close(spurious_prototypes(text), expected_spur, **tight)
    assert class_prototypes(text.float()).dtype == torch.float32  # float32 stays float32
    with pytest.raises(ValueError, match=r"\(C, M, D\)"):
        class_prototypes(torch.randn(4, 8))
    with pytest.raises(ValueError, match="non-empty"):
        spurious_prototypes(torch.randn(2, 0, 8))


def test_classification_logits_are_scaled_cosines() -> None:
    g = torch.Generator().manual_seed(1)
    f64 = {"generator": g, "dtype": torch.float64}  # float64: the two differ by rounding only
    f, w = torch.randn(5, 4, **f64), torch.randn(3, 4, **f64)
    y = torch.tensor([0, 1, 2, 1, 0])
    cos = torch.tensor(
        [[float(a @ b / (a.norm() * b.norm())) for b in w] for a in f], dtype=torch.float64
    )
    expected = F.cross_entropy(100.0 * cos, y)
    out = fd_align_loss(f, None, y, w, None, beta=0.0)
    # float64, D = 4: cosines round by ~10 * 1.1e-16, logits (x100) by ~1e-13, CE by 2x that
    torch.testing.assert_close(out.classification, expected, atol=1e-12, rtol=0)
    assert math.isnan(out.spurious.item())
    with pytest.raises(ValueError, match="same D"):
        fd.classification_logits(torch.randn(5, 3), w)


# --------------------------------------------------------------------------- spurious KL


def test_spurious_kl_hand_computation_and_directions_differ() -> None:
    # float64, as the math module: differences are a few roundings of 1.1e-16 on values ~1
    protos = torch.eye(2, dtype=torch.float64)
    ft = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # cosines (1, 0)
    fr = torch.tensor([[1.0, 1.0]], dtype=torch.float64)  # cosines (0.707, 0.707) -> uniform
    e = math.e
    p, q = [e / (1 + e), 1 / (1 + e)], [0.5, 0.5]  # logit scale 1
    kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    got = spurious_distribution(ft, protos, 1.0)
    want = torch.tensor([p], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)  # float64: a few 1.1e-16
    paper = spurious_kl(ft, fr, protos, 1.0, direction="paper")
    code = spurious_kl(ft, fr, protos, 1.0, direction="code")
    assert paper.item() == pytest.approx(kl_pq, abs=1e-12)  # float64, as above
    assert code.item() == pytest.approx(kl_qp, abs=1e-12)  # float64, as above
    assert abs(paper.item() - code.item()) > 1e-3
    with pytest.raises(ValueError, match="reduction"):
        spurious_kl(ft, fr, protos, reduction="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction"):
        spurious_kl(ft, fr, protos, direction="backwards")  # type: ignore[arg-type]


class _AuthorsHead(torch.nn.Linear):
    """The authors' ``ClassificationHead(normalize=True, weights)``: normalise the input,
    then a linear layer with the given weights and a zero bias."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__(weights.shape[1], weights.shape[0])
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(torch.zeros(weights.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x / x.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("n_protos", [5, 20])
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_code_form_equals_the_authors_kldivloss(n_protos: int) -> None:
    # CLIP-like: every feature near one common direction, so that at scale 100 the authors'
    # log(softmax(.)) does not underflow to -inf
    # float64: the authors' formula and ours differ by rounding only
    g = torch.Generator().manual_seed(2)
    f64 = {"generator": g, "dtype": torch.float64}
    common = 3.0 * F.normalize(torch.randn(8, **f64), dim=0)
    data = common + 0.3 * torch.randn(6, 8, **f64)
    zero_data = common + 0.3 * torch.randn(6, 8, **f64)
    unit = F.normalize(common + 0.3 * torch.randn(n_protos, 8, **f64), dim=-1)
    head = _AuthorsHead(100.0 * unit).double()
    with torch.no_grad():
        # FD_Align_SCP_CoOp.train_forward: loss_ctx(log softmax(ctx(data)), softmax(ctx(zero_data)))
        authors = torch.nn.KLDivLoss()(
            torch.log(F.softmax(head(data), dim=1)), F.softmax(head(zero_data), dim=1)
        )
    ours = spurious_kl(data, zero_data, unit, direction="code", reduction="elementwise-mean")
    # float64: logits (x100, D = 8) round by ~8 * 1.1e-16 * 100 = 1e-13; log-softmax and KL
    # terms of size <= 100 by a few 1.1e-16 * 100 each: < 1e-12
    torch.testing.assert_close(ours, authors, atol=1e-12, rtol=0)
    # the authors' weight 20 on that mean is 20 / S on the per-image KL (the paper's scale)
    per_image_code = spurious_kl(data, zero_data, unit, direction="code", reduction="batchmean")
    # float64: the same sum divided differently, a few roundings of 1.1e-16 * 20 * KL
    torch.testing.assert_close(
        20.0 * authors, (20.0 / n_protos) * per_image_code, atol=1e-12, rtol=0
    )
    # the paper's form: per-image KL(P_f || P_f0), averaged over the batch, in float64
    p = F.softmax(100.0 * F.normalize(data, dim=-1) @ unit.T, dim=1)
    q = F.softmax(100.0 * F.normalize(zero_data, dim=-1) @ unit.T, dim=1)
    paper = (p * (p / q).log()).sum(1).mean()
    # float64, as above: < 1e-12
    torch.testing.assert_close(spurious_kl(data, zero_data, unit), paper, atol=1e-12, rtol=0)
    # with the authors' objective: CE + 20 * KLDivLoss
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    cls = F.normalize(torch.randn(2, 8, **f64), dim=-1)
    out = fd_align_loss(
        data, zero_data, y, cls, unit, beta=20.0, direction="code", reduction="elementwise-mean"
    )
    ce = F.cross_entropy(_AuthorsHead(100.0 * cls).double()(data), y)
    # float64: CE of logits <= 100 and 20 x the KL above, each < 1e-12 off
    torch.testing.assert_close(out.total, ce + 20.0 * authors, atol=1e-11, rtol=0)


@pytest.mark.parametrize("direction", ["paper", "code"])
def test_spurious_kl_exactly_zero_for_unchanged_encoder(backbone: Backbone, direction: str) -> None:
    images = torch.stack([backbone.preprocess(_image(i)) for i in range(4)])
    frozen = copy.deepcopy(backbone.model.visual).eval()
    trainable = copy.deepcopy(backbone.model.visual).requires_grad_(True).train()
    _, spur = _protos(backbone, n_templates=5)
    f_ft, f_fr = encode_pair(trainable, frozen, images)
    assert f_ft.requires_grad and not f_fr.requires_grad
    loss = spurious_kl(f_ft, f_fr, spur, direction=direction)
    assert loss.item() == 0.0
    for reduction in ("elementwise-mean", "none"):
        out = spurious_kl(f_ft, f_fr, spur, direction=direction, reduction=reduction)
        assert bool((out == 0).all())
    loss.backward()  # the KL is at its minimum: its gradient vanishes (up to rounding)
    grads = [p.grad.abs().max().item() for p in trainable.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-5


def test_beta_zero_gives_pure_cross_entropy_gradient() -> None:
    g = torch.Generator().manual_seed(4)
    f0, fr = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cls = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    spur = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    f = f0.clone().requires_grad_(True)
    out = fd_align_loss(f, fr, y, cls, spur, alpha=1.0, beta=0.0)
    out.total.backward()
    f2 = f0.clone().requires_grad_(True)
    F.cross_entropy(100.0 * F.normalize(f2, dim=-1) @ cls.T, y).backward()
    assert torch.equal(f.grad, f2.grad)
    assert out.spurious.item() > 0  # still measured, without gradient
    f3 = f0.clone().requires_grad_(True)
    fd_align_loss(f3, fr, y, cls, spur, beta=20.0).total.backward()
    assert not torch.allclose(f3.grad, f.grad)
    with pytest.raises(ValueError, match="beta=0"):
        fd_align_loss(f0, None, y, cls, spur, beta=1.0)


# --------------------------------------------------------------------------- SPC


def _templates_with_outliers(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """30 templates in 3 tight clusters + 3 far-away templates, shuffled."""
    rng = np.random.default_rng(seed)
    d = 16
    centres = np.zeros((3, d))
    centres[0, :3] = [1, 0.2, 0]
    centres[1, :3] = [0.2, 1, 0.1]
    centres[2, :3] = [0.1, 0.2, 1]
    normal = np.repeat(centres, 10, axis=0) + 0.03 * rng.standard_normal((30, d))
    outliers = rng.standard_normal((3, d))
    x = np.concatenate([normal, outliers])
    perm = rng.permutation(33)
    outlier_positions = np.sort(np.argsort(perm)[30:])  # where rows 30..32 ended up
    return torch.tensor(x[perm], dtype=torch.float32), outlier_positions


def test_spc_removes_injected_outliers_and_finds_the_clusters() -> None:
    x, outliers = _templates_with_outliers()
    a = spurious_prototype_correction(x, keep=30, n_clusters=3, seed=0)
    np.testing.assert_array_equal(a.removed_indices, outliers)
    assert a.scores[outliers].max() < np.delete(a.scores, outliers).min()
    assert sorted(np.bincount(a.labels).tolist()) == [10, 10, 10]
    # float32 unit rows, D = 16, u = 2^-24: F.normalize's norm (D/2 + 1) u, its division u,
    # this norm (D/2 + 1) u: (D + 3) u
    torch.testing.assert_close(a.prototypes.norm(dim=-1), torch.ones(3), atol=19 * 2.0**-24, rtol=0)
    b = spurious_prototype_correction(x, keep=30, n_clusters=3, seed=0)
    assert torch.equal(a.prototypes, b.prototypes)


def test_spc_matches_the_authors_procedure_on_scaled_rows() -> None:
    """The authors' ``get_ILF_kmeans_weights_classifier`` runs on template rows scaled by 100
    and keeps the templates scoring strictly above the (n_keep+1)-th best; ours on unit rows.
    Their ``IsolationForest()`` is unseeded (here it gets our episode seed, as ours does);
    their ``KMeans(..., random_state=0)`` is seeded with 0, as ours by default."""
    from sklearn.cluster import KMeans
    from sklearn.ensemble import IsolationForest

    x, _ = _templates_with_outliers(seed=3)
    scaled = 100.0 * F.normalize(x.double(), dim=-1).numpy()
    n_keep, k, seed = 25, 4, 7
    scores = IsolationForest(random_state=seed).fit(scaled).decision_function(scaled)
    threshold = sorted(scores, reverse=True)[n_keep]
    kept = np.flatnonzero(scores > threshold)
    # scikit-learn 1.0.1 (the authors' env.yaml) defaults to n_init=10
    centres = KMeans(n_clusters=k, random_state=0, n_init=10).fit(scaled[kept]).cluster_centers_
    ours = spurious_prototype_correction(x, keep=n_keep, n_clusters=k, seed=seed)
    # kmeans_seed=None: k-means seeded with the episode seed too (the former default)
    episode = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(scaled[kept])
    by_seed = spurious_prototype_correction(
        x, keep=n_keep, n_clusters=k, seed=seed, kmeans_seed=None
    )
    # the same float32 -> float64 round trip as the default's check: atol 1e-6 bounds it
    np.testing.assert_allclose(
        by_seed.centres.double().numpy(), episode.cluster_centers_ / 100.0, atol=1e-6, rtol=0
    )
    # the two seedings give other centres: far beyond the 1e-6 round trip above
    assert not np.allclose(by_seed.centres.numpy(), ours.centres.numpy(), atol=1e-3)
    np.testing.assert_array_equal(ours.kept_indices, kept)
    # float32 (spurious_prototype_correction normalises in float32 and returns float32):
    # unit rows of D = 16 carry <= (D/2 + 2) 2^-24 = 6e-7 of float32 normalisation, which
    # k-means means do not amplify, plus 2^-24 for the float32 result: 6.6e-7 < 1e-6
    np.testing.assert_allclose(ours.centres.double().numpy(), centres / 100.0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        ours.prototypes.double().numpy(),
        centres / np.linalg.norm(centres, axis=1, keepdims=True),
        atol=1e-6,  # the same bound (re-normalising a row of norm ~1 adds < 1e-7)
        rtol=0,
    )


def test_spc_keep_fraction_and_clipping() -> None:
    x, _ = _templates_with_outliers()
    frac = spurious_prototype_correction(x, keep=0.75, n_clusters=20, seed=1)
    assert len(frac.kept_indices) == round(0.75 * 33) and frac.prototypes.shape[0] == 20
    everything = spurious_prototype_correction(x, keep=60, n_clusters=40, seed=1)
    assert len(everything.kept_indices) == 33 and len(everything.removed_indices) == 0
    assert everything.n_clusters == 33
    with pytest.raises(ValueError, match="keep"):
        spurious_prototype_correction(x, keep=0)
    with pytest.raises(ValueError, match="at least 2 templates"):
        spurious_prototype_correction(x[:1])
    with pytest.raises(ValueError, match="n_clusters"):
        spurious_prototype_correction(x, n_clusters=0)


# --------------------------------------------------------------------------- trainer


def test_trainable_parameter_names(backbone: Backbone) -> None:
    visual = backbone.model.visual
    everything = trainable_parameter_names(visual, None)
    assert everything == [n for n, _ in visual.named_parameters()]
    assert trainable_parameter_names(visual, -1) == everything
    assert set(trainable_parameter_names(visual, 0)) == {"proj", "ln_post.weight", "ln_post.bias"}
    last = trainable_parameter_names(visual, 1)
    assert any(n.startswith("transformer.resblocks.1.") for n in last)
    assert not any(n.startswith("transformer.resblocks.0.") for n in last)
    with pytest.raises(ValueError, match="only 2 blocks"):
        trainable_parameter_names(visual, 3)


def test_frozen_copy_untouched_and_trainable_copy_moves(backbone: Backbone) -> None:
    original = _params(backbone.model.visual)
    cls, spur = _protos(backbone)
    scores = iter([0.0, 1.0])  # the epoch beats the start, so it is kept
    result = train_fd_align(
        backbone,
        _split(3),
        lambda v: next(scores),
        cls,
        spur,
        epochs=1,
        lr=0.5,
        batch_size=3,
        blocks=1,
        optimizer="sgd",
    )
    for name, p in result.reference_visual.named_parameters():
        assert p.grad is None and not p.requires_grad and torch.equal(p, original[name])
    for name, p in backbone.model.visual.named_parameters():
        assert torch.equal(p, original[name]) and not p.requires_grad
    tuned = _params(result.visual)
    changed = {n for n in tuned if not torch.equal(tuned[n], original[n])}
    assert "proj" in changed and changed <= set(result.trainable_parameters)
    assert "conv1.weight" not in changed
    assert result.best_epoch == 1 and result.steps_per_epoch == 2
    h = result.fit.history
    # every step's loss is CE + 20 * KL of that step (the paper's weights)
    for total, ce, kl in zip(h["loss"], h["train_class"], h["train_spurious_kl"]):
        # float32 total = fl(ce + fl(20 kl)): two roundings of 2^-24 |total| (ce, kl >= 0)
        assert total == pytest.approx(ce + 20.0 * kl, rel=1.2e-7, abs=0)
    # first step: the encoder has not moved yet (zero up to rounding: with 3 images the
    # gradient-tracking forward takes other kernels than the frozen one)
    assert abs(h["train_spurious_kl"][0]) < 1e-7 < h["train_spurious_kl"][1]


def test_selection_keeps_the_best_validated_state_including_the_start(backbone: Backbone) -> None:
    assert "test" not in " ".join(inspect.signature(train_fd_align).parameters)
    cls, spur = _protos(backbone)
    kw = {"epochs": 3, "lr": 0.5, "batch_size": 4, "blocks": 0, "optimizer": "sgd"}
    for scripted, best in (([0.0, 10.0, 50.0, 20.0], 2), ([50.0, 10.0, 50.0, 20.0], 0)):
        values, snapshots = iter(scripted), []

        def val_fn(visual: torch.nn.Module, values=values, snapshots=snapshots) -> float:
            snapshots.append(_params(visual))
            return next(values)

        result = train_fd_align(backbone, _split(2), val_fn, cls, spur, **kw)
        assert result.best_epoch == best and result.best_val_accuracy == 50.0
        assert result.fit.history["val_accuracy"] == scripted
        final = _params(result.visual)
        assert all(torch.equal(final[k], snapshots[best][k]) for k in final)
        assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)
    # cosine decay per step (one step per epoch here), as CosineAnnealingLR
    cosine = [0.25 * (1 + math.cos(math.pi * i / 3)) for i in range(3)]
    # Python floats: CosineAnnealingLR's recursive form rounds a few times by 1.1e-16 a step
    assert result.fit.history["lr"] == pytest.approx(cosine, abs=1e-12)


def test_original_encoder_kept_when_no_epoch_improves(backbone: Backbone) -> None:
    """lr = 0: nothing moves, validation never improves, and the run reports the original
    encoder scored with the class prototypes, its start, like for like."""
    ctx = _episode(backbone)
    out = fd.run_fd_align(ctx, progress=False, **{**COMMON, "lr": 0.0})
    assert out["best_epoch"] == 0 and out["kept_original"]
    assert out["val_accuracy"] == out["start"]["val_accuracy"]
    assert out["test_accuracy"] == out["start"]["test_accuracy"]
    assert out["history"]["val_spurious_kl"] == [0.0, 0.0, 0.0]
    # independent: the original encoder's test accuracy with the prototypes of the 4 templates
    text = torch.stack(
        [
            F.normalize(backbone.encode_text([t.format(c) for t in ctx.dataset.templates]), dim=-1)
            for c in ctx.classnames
        ]
    )
    w = F.normalize(F.normalize(text, dim=-1).mean(1), dim=-1)
    images = torch.stack([backbone.preprocess(img) for img in ctx.splits.test.images])
    pred = (backbone.encode_images(images) @ w.T).argmax(1).numpy()
    # one test image = 100/N points: the independent path batches the images and texts
    # differently, which may flip one near-tie of the untrained backbone
    one_image = 100.0 / len(ctx.splits.test)
    want = 100.0 * np.mean(pred == ctx.splits.test.labels)
    assert out["test_accuracy"] == pytest.approx(want, abs=one_image)


def test_training_is_deterministic_and_beta_matters(backbone: Backbone) -> None:
    cls, spur = _protos(backbone)
    kw = {"epochs": 1, "lr": 0.5, "batch_size": 2, "blocks": 0, "optimizer": "sgd"}
    runs = [
        train_fd_align(backbone, _split(2), lambda v: 0.0, cls, spur, beta=b, seed=3, **kw)
        for b in (20.0, 20.0, 0.0)
    ]
    a, b, plain = (r.fit.history["loss"] for r in runs)
    assert a == b and a != plain
    with pytest.raises(ValueError, match="only 2 rows"):
        train_fd_align(backbone, _split(1, n_classes=3), lambda v: 0.0, cls, spur, **kw)
    with pytest.raises(ValueError, match="optimizer"):
        train_fd_align(backbone, _split(1), lambda v: 0.0, cls, spur, optimizer="adam")


def test_trained_head_starts_at_the_prototypes_and_moves(backbone: Backbone) -> None:
    """``head="trained"``: the authors' CoOp_head, weights 100 * t_c and bias 0, trained."""
    cls, spur = _protos(backbone)
    values = iter([0.0, 1.0])
    result = train_fd_align(
        backbone,
        _split(2),
        lambda v: next(values),
        cls,
        spur,
        head="trained",
        epochs=1,
        lr=0.5,
        batch_size=4,
        blocks=0,
        optimizer="sgd",
    )
    head = result.classifier
    assert isinstance(head, torch.nn.Linear) and not head.weight.requires_grad
    assert not torch.allclose(head.weight, 100.0 * cls)  # it was trained
    # float64 (unit rows re-normalised in float64): the two differ by rounding only
    x, cls64 = torch.randn(3, cls.shape[1], dtype=torch.float64), F.normalize(cls.double(), dim=-1)
    authors = fd.classification_logits(x, _AuthorsHead(100.0 * cls64).double())
    # dots of D = 128 unit vectors times 100: <= 128 * 1.1e-16 * 100 = 1.4e-12
    torch.testing.assert_close(authors, fd.classification_logits(x, cls64), atol=1e-11, rtol=0)


def test_finetuned_backbone_swaps_the_image_encoder(backbone: Backbone) -> None:
    cls, spur = _protos(backbone)
    values = iter([0.0, 1.0])
    result = train_fd_align(
        backbone,
        _split(2),
        lambda v: next(values),
        cls,
        spur,
        epochs=1,
        lr=0.5,
        batch_size=4,
        blocks=0,
    )
    tuned = finetuned_backbone(backbone, result.visual)
    assert tuned.model.visual is result.visual and backbone.model.visual is not result.visual
    assert tuned.model.transformer is backbone.model.transformer  # text tower shared
    assert tuned.identifier == f"{backbone.identifier}+fd-align-{state_dict_digest(result.visual)}"
    images = torch.stack([backbone.preprocess(_image(i)) for i in range(3)])
    with torch.no_grad():
        expected = F.normalize(result.visual(images), dim=-1)
    # encode_images runs this visual tower and this F.normalize on the same images: exact
    assert torch.equal(tuned.encode_images(images), expected)
    assert not torch.allclose(backbone.encode_images(images), expected)


# --------------------------------------------------------------------------- integration


def test_options_are_the_config_and_presets() -> None:
    from fewclip_tutorial.methods.registry import get_method

    spec = get_method("fd-align")
    fields = {f.name: f.default for f in dataclasses.fields(fd.FDAlignConfig)}
    assert {n: o.default for n, o in spec.options.items()} == fields
    assert spec.options["kl_direction"].choices == ["code", "paper"]
    assert fd.preset("embedded") == fd.FDAlignConfig()
    # another setup takes the authors' rate for its own dataset: Oxford Pets, one rate
    assert fd.preset("colab-pets") == dataclasses.replace(fd.preset("colab"), lr=6e-5)
    with pytest.raises(ValueError, match="kl_direction"):
        fd.FDAlignConfig(kl_direction="backwards")
    with pytest.raises(ValueError, match="logit_scale"):
        fd.FDAlignConfig(logit_scale=-1.0)
    with pytest.raises(ValueError, match="kmeans_seed"):
        fd.FDAlignConfig(kmeans_seed=-2)
    with pytest.raises(ValueError, match="shots"):
        fd.preset("colab", shots=3)  # the authors tuned EuroSAT at 1, 2, 4, 8 and 16 shots
    # the paper's objective, one call away, on any preset; the schedule unchanged
    paper = fd.preset("colab", shots=16).paper()
    assert (paper.head, paper.kl_direction, paper.kl_reduction) == ("fixed", "paper", "batchmean")
    assert dataclasses.replace(paper, head="trained", kl_direction="code") == dataclasses.replace(
        fd.preset("colab", shots=16), kl_reduction="batchmean"
    )


def test_defaults_are_the_authors_code() -> None:
    """The authors' values, written out (``skingorz/FD-Align``)."""
    cfg = fd.FDAlignConfig()
    # modules/FD_Align_SCP_CoOp.py, shared_step: final_loss = loss + ctx_loss, with
    # ctx_loss = cscale * KLDivLoss()(log(softmax(context(data))), softmax(context(zero_data))),
    # cscale = context_scale=20 in tools/FT_alldataset.sh
    assert cfg.alpha == 1.0 and cfg.beta == 20.0
    assert cfg.kl_direction == "code"  # KLDivLoss(input=log P_ft, target=P_frozen)
    assert cfg.kl_reduction == "elementwise-mean"  # KLDivLoss() default reduction='mean'
    # FD_Align_SCP_CoOp.py: self.classifier = CoOp_head(normalize=True, weights=zero_shot_weight),
    # its parameters requires_grad = True
    assert cfg.head == "trained"
    # architectures/feature_extractor/clip.py, get_zeroshot_weight / get_context_weights:
    # weights *= clip_model.logit_scale.exp(), the model's own scale
    assert cfg.logit_scale == 0.0
    # get_ILF_kmeans_weights_classifier(clip_model_, openai_imagenet_template, classname,
    # cnumber, 60): 60 of CLIP's 80 templates, KMeans(n_clusters=cnumber, random_state=0),
    # context_numbers=(20) in tools/FT_alldataset.sh
    assert cfg.spc and cfg.n_clusters == 20 and round(cfg.keep * 80) == 60
    assert cfg.kmeans_seed == 0
    colab = fd.preset("colab", shots=16)
    # config/set_FT_CoOp_config.py: weight_decay 5e-4, decay_scheduler "cosine",
    # per_gpu_train_batchsize 256, lr_scale = train_batchsize / 256; modules/utils.py,
    # set_schedule: SGD(momentum=0.9, nesterov=True); tools/FT_alldataset.sh: epoch=60,
    # optim=sgd, the whole ViT_B_32_clip
    assert (colab.optimizer, colab.weight_decay, colab.epochs, colab.batch_size) == (
        "sgd",
        5e-4,
        60,
        256,
    )
    assert colab.blocks == -1 and colab.lr_scaling == "batch" and colab.templates == "auto"
    # config/lr/lr_config.py, eurosat_config["full_lr"]: 2e-4 at 1 shot, 9e-5 at 16; times
    # train_batchsize / 256 with train_batchsize = min(N, 256): 10 and 160 images
    one = fd.preset("colab", shots=1)
    assert one.lr == 2e-4 and colab.lr == 9e-5
    # one multiplication and one division in float64: at most 2 ulp apart, under 1e-15
    assert one.resolved_lr(10) == pytest.approx(2e-4 * 10 / 256, rel=1e-15)
    assert colab.resolved_lr(160) == pytest.approx(9e-5 * 160 / 256, rel=1e-15)
    assert colab.resolved_lr(1000) == 9e-5  # a full batch of 256: unscaled
    # the former Colab rate, 5e-5 at every shot count, was 6.4x theirs at 1-shot EuroSAT
    assert 5e-5 / one.resolved_lr(10) == pytest.approx(6.4, rel=1e-12)
    # imagenet_config["full_lr"] = 5e-5, also the rate for datasets they did not tune
    assert fd.authors_base_lr("imagenet", 4) == 5e-5 == fd.authors_base_lr("shapeworld", 16)
    # the embedded schedule keeps its own rate, unscaled
    assert (cfg.lr, cfg.lr_scaling, cfg.optimizer) == (3e-4, "none", "adamw")


def _authors_zeroshot_weight(text: torch.Tensor, scale: float) -> torch.Tensor:
    """``get_zeroshot_weight``: per class, the mean of the unit template embeddings,
    renormalised, times ``logit_scale.exp()``; ``(C, M, D) -> (C, D)``."""
    rows = []
    for per_class in text:
        e = per_class / per_class.norm(dim=-1, keepdim=True)
        e = e.mean(dim=0)
        rows.append(scale * e / e.norm())
    return torch.stack(rows)


def _authors_context_weights(text: torch.Tensor, scale: float) -> torch.Tensor:
    """``get_context_weights``: the same per template, over the classes; ``-> (M, D)``."""
    return _authors_zeroshot_weight(text.transpose(0, 1), scale)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_default_loss_is_the_authors_total_loss() -> None:
    """On identical float64 tensors, ``fd_align_loss`` at ``FDAlignConfig()``'s options with the
    package's trained head equals the authors' ``shared_step`` total, ``CE(head(data)) +
    20 * KLDivLoss()(log softmax(context(data)), softmax(context(zero_data)))``, and differs
    from the paper's objective (fixed prototypes, per-image KL(P_ft || P_frozen))."""
    g = torch.Generator().manual_seed(11)
    f64 = {"generator": g, "dtype": torch.float64}
    n_cls, n_tpl, d, b, scale = 4, 20, 8, 6, 35.0  # S = 20 prototypes, a small model's scale
    common = 3.0 * F.normalize(torch.randn(d, **f64), dim=0)
    text = (
        common
        + torch.randn(n_cls, 1, d, **f64)
        + 0.3 * torch.randn(1, n_tpl, d, **f64)
        + 0.05 * torch.randn(n_cls, n_tpl, d, **f64)
    )
    data = common + 0.5 * torch.randn(b, d, **f64)
    zero_data = data + 0.2 * torch.randn(b, d, **f64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    # the authors' modules: CoOp_head and ClassificationHead, both normalise then linear
    head = _AuthorsHead(_authors_zeroshot_weight(text, scale)).double()
    context = _AuthorsHead(_authors_context_weights(text, scale)).double()
    with torch.no_grad():
        ctx_loss = torch.nn.KLDivLoss()(
            torch.log(F.softmax(context(data), dim=1)), F.softmax(context(zero_data), dim=1)
        )
        authors = F.cross_entropy(head(data), y) + 20.0 * ctx_loss
    cfg = fd.FDAlignConfig()
    ours_head = fd.trained_head(class_prototypes(text), scale)
    assert ours_head.weight.dtype == torch.float64
    # float64: the two heads differ by rounding only (C x D weights of size <= 35)
    torch.testing.assert_close(ours_head.weight, head.weight, atol=1e-12, rtol=0)
    args = (data, zero_data, y, ours_head, spurious_prototypes(text), cfg.alpha, cfg.beta)
    with torch.no_grad():
        ours = fd_align_loss(*args, cfg.kl_direction, cfg.kl_reduction, logit_scale=scale)
        paper_cfg = cfg.paper()
        assert paper_cfg.head == "fixed"
        paper = fd_align_loss(
            data,
            zero_data,
            y,
            class_prototypes(text),
            spurious_prototypes(text),
            paper_cfg.alpha,
            paper_cfg.beta,
            paper_cfg.kl_direction,
            paper_cfg.kl_reduction,
            logit_scale=scale,
        )
    # float64: logits of size <= 35 from D = 8 dots round by ~1e-14; CE and 20 x the KL
    # by a few of those: < 1e-11
    torch.testing.assert_close(ours.total, authors, atol=1e-11, rtol=0)
    # the function's own defaults are the same objective
    with torch.no_grad():
        torch.testing.assert_close(fd_align_loss(*args, logit_scale=scale).total, ours.total)
    # the paper's form weighs the KL S = 20 times more (and in the other direction)
    assert abs(paper.total.item() - ours.total.item()) > 1e-3


def test_trainer_uses_the_backbones_logit_scale_and_the_scaled_rate(backbone: Backbone) -> None:
    """``logit_scale=0``: the trained head starts at the backbone's own ``tau * t_c``; a number
    forces it.  ``lr_scaling="batch"``: the peak rate is lr x min(N, batch) / 256."""
    cls, spur = _protos(backbone)
    own = dataclasses.replace(backbone, logit_scale=35.0)
    kw = {"epochs": 1, "batch_size": 4, "blocks": 0, "optimizer": "sgd", "lr": 0.0}
    unit = F.normalize(cls, dim=-1)
    for bb, forced, want in ((own, 0.0, 35.0), (own, 100.0, 100.0), (backbone, 0.0, 100.0)):
        r = train_fd_align(bb, _split(2), lambda v: 0.0, cls, spur, logit_scale=forced, **kw)
        assert r.logit_scale == want and r.config.head == "trained"
        # lr = 0 and SGD: the head has not moved from its start (float32: scale x unit rows)
        torch.testing.assert_close(r.classifier.weight, want * unit, atol=1e-5, rtol=0)
    r = train_fd_align(
        backbone,
        _split(3),
        lambda v: 0.0,
        cls,
        spur,
        **{**kw, "lr": 0.5, "lr_scaling": "batch"},
    )
    assert r.lr == 0.5 * 4 / 256  # 6 images, batches of 4
    assert r.fit.history["lr"][0] == pytest.approx(r.lr, rel=1e-12)


def test_exercises_are_registered_and_catch_wrong_forms() -> None:
    from fewclip_tutorial.course.exercises import get_exercise

    assert get_exercise("spurious_prototypes").check(spurious_prototypes, verbose=False)
    assert get_exercise("spurious_kl").check(spurious_kl, verbose=False)

    def wrong_direction(ft, fr, protos, scale):
        return spurious_kl(ft, fr, protos, scale, direction="code")

    def no_second_norm(text):
        return F.normalize(text, dim=-1).mean(0)

    assert not get_exercise("spurious_kl").check(wrong_direction, verbose=False)
    assert not get_exercise("spurious_prototypes").check(no_second_norm, verbose=False)


def test_spurious_templates_choice() -> None:
    from fewclip_tutorial.data.templates import IMAGENET_TEMPLATES

    assert fd.spurious_templates("eurosat", ["a {}."], "auto") == IMAGENET_TEMPLATES
    assert fd.spurious_templates("eurosat", ["a {}."], "dataset") == ["a {}."]
    sw = fd.spurious_templates("shapeworld", ["a {}."], "auto")
    assert len(sw) > 20 and any("sketch" in t for t in sw)
    with pytest.raises(ValueError, match="auto"):
        fd.spurious_templates("eurosat", [], "mine")


def test_runner_end_to_end_and_feature_cache(backbone: Backbone, tmp_path, monkeypatch) -> None:
    from fewclip_tutorial import features
    from fewclip_tutorial.methods.registry import run_method

    encoded: list[tuple[str, str]] = []
    real = features._encode_view

    def spy(bb, dataset, *args, **kwargs):
        encoded.append((bb.identifier, dataset.split.name))
        return real(bb, dataset, *args, **kwargs)

    monkeypatch.setattr(features, "_encode_view", spy)
    ctx = _episode(backbone, cache_dir=tmp_path)
    # head="trained": the kept state always differs from the original, so the fine-tuned
    # encoder's features go through the cache under its own identity
    opts = {"keep": 3, "n_clusters": 2, "head": "trained", **COMMON}
    out = run_method("fd-align", context=ctx, **opts)
    assert out["beta"] == 20.0 and out["spc"] is True and out["n_spurious_prototypes"] == 2
    # the configuration that ran, every option (defaults included), and what it resolved to
    ran = fd.FDAlignConfig(**opts).options()
    assert {k: out[k] for k in ran} == ran and out["kl_direction"] == "code"
    assert out["resolved"] == {
        "logit_scale": backbone.logit_scale,
        "lr": COMMON["lr"],
        "kmeans_random_state": 0,
        "isolation_forest_random_state": ctx.seed,
        "n_train_images": len(ctx.splits.train),
    }
    assert len(out["removed_templates"]) == 1 and out["n_templates"] == 4
    h = out["history"]
    assert h["epoch"] == [0, 1, 2] and h["val_spurious_kl"][0] == 0.0
    # one validation image = 100/N points: the reported accuracy re-encodes through the cache
    # (other batches than the epoch's validation), which may flip one near-tie
    one_image = 100.0 / len(ctx.splits.val)
    assert out["val_accuracy"] == pytest.approx(h["val_accuracy"][out["best_epoch"]], abs=one_image)
    assert set(out["ood_accuracy"]) == {"sketch"}
    names = sorted(ctx.split(n).name for n in ("val", "test", "ood:sketch"))
    # the original encoder's splits are encoded once (for the start), into the cache
    assert sorted(s for i, s in encoded if i == backbone.identifier) == names
    tuned = {i for i, _ in encoded if i.startswith(backbone.identifier + "+fd-align-")}
    assert len(tuned) == 1 and sorted(s for i, s in encoded if i in tuned) == names
    encoded.clear()
    again = run_method("fd-align", context=_episode(backbone, cache_dir=tmp_path), **opts)
    assert again["test_accuracy"] == out["test_accuracy"]
    # the same run again: only the in-training validation passes encode anything
    assert {s for _, s in encoded} == {ctx.split("val").name} and len(encoded) == 2
    plain = run_method("fd-align", context=ctx, beta=0.0, spc=False, **COMMON)
    assert (
        plain["removed_templates"] == []
        and plain["history"]["loss"][1:] == plain["history"]["train_class"][1:]
    )


def test_paper_options_are_what_paper_changes():
    opts = fd.paper_options()
    assert opts == {"head": "fixed", "kl_direction": "paper", "kl_reduction": "batchmean"}
    assert fd.FDAlignConfig(**opts) == fd.FDAlignConfig().paper()
