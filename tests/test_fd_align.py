"""Tests of fewclip_tutorial.methods.fd_align (FD-Align, Song et al. 2023)."""

from __future__ import annotations

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

from fewclip_tutorial.backbones import Backbone
from fewclip_tutorial.data.base import ListSplit
from fewclip_tutorial.methods import fd_align as fd
from fewclip_tutorial.methods.fd_align import (
    class_prototypes,
    classification_loss,
    encode_pair,
    fd_align_loss,
    finetune_fd_align,
    finetuned_backbone,
    spurious_distribution,
    spurious_kl,
    spurious_prototype_correction,
    spurious_prototypes,
    template_text_features,
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


# --------------------------------------------------------------------------- prototypes


def test_prototypes_match_hand_computation() -> None:
    # C=2 classes, M=3 templates, D=2.  Rows are normalised before averaging.
    text = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 3.0], [5.0, 0.0]],  # class 0 -> e0, e1, e0
            [[0.0, 1.0], [0.0, 4.0], [1.0, 0.0]],  # class 1 -> e1, e1, e0
        ]
    )
    cls = class_prototypes(text, logit_scale=100.0)
    # class 0: mean(e0, e1, e0) = (2/3, 1/3) -> (2, 1)/sqrt(5)
    # class 1: mean(e1, e1, e0) = (1/3, 2/3) -> (1, 2)/sqrt(5)
    s5 = math.sqrt(5.0)
    expected_cls = 100.0 * torch.tensor([[2 / s5, 1 / s5], [1 / s5, 2 / s5]])
    torch.testing.assert_close(cls, expected_cls)

    spur = spurious_prototypes(text, logit_scale=10.0)
    # template 0: mean(e0, e1) -> (1, 1)/sqrt2; template 1: e1; template 2: e0
    r2 = 1 / math.sqrt(2.0)
    expected_spur = 10.0 * torch.tensor([[r2, r2], [0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(spur, expected_spur)
    assert cls.shape == (2, 2) and spur.shape == (3, 2)


def test_prototypes_reject_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(C, M, D\)"):
        class_prototypes(torch.randn(4, 8))
    with pytest.raises(ValueError, match="empty"):
        spurious_prototypes(torch.randn(2, 0, 8))


def test_template_text_features_order(backbone: Backbone) -> None:
    classnames, templates = (
        ["circle", "star"],
        ["a {}.", "a red {}.", "a sketch of a {}."],
    )
    feats = template_text_features(backbone.encode_text, classnames, templates, batch_size=4)
    assert feats.shape == (2, 3, backbone.embed_dim)
    single = backbone.encode_text([templates[2].format(classnames[1])])[0]
    torch.testing.assert_close(feats[1, 2], single, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="placeholder"):
        template_text_features(backbone.encode_text, classnames, ["no slot"])


def test_classification_loss_is_cross_entropy_of_cosines() -> None:
    g = torch.Generator().manual_seed(1)
    f, w = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    y = torch.tensor([0, 1, 2, 1, 0])
    protos = 100.0 * F.normalize(w, dim=-1)
    expected = F.cross_entropy(100.0 * F.normalize(f, dim=-1) @ F.normalize(w, dim=-1).T, y)
    torch.testing.assert_close(classification_loss(f, protos, y), expected)
    with pytest.raises(ValueError, match="dimension mismatch"):
        classification_loss(torch.randn(5, 3), protos, y)


# --------------------------------------------------------------------------- spurious KL


def test_spurious_kl_hand_computation_and_directions_differ() -> None:
    protos = torch.eye(2)  # scale 1: logits are plain cosines
    ft = torch.tensor([[1.0, 0.0]])  # logits (1, 0)
    fr = torch.tensor([[1.0, 1.0]])  # logits (0.707, 0.707) -> uniform
    e = math.e
    p = [e / (1 + e), 1 / (1 + e)]
    q = [0.5, 0.5]
    kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    torch.testing.assert_close(spurious_distribution(ft, protos), torch.tensor([p]))
    paper = spurious_kl(ft, fr, protos, direction="paper")
    code = spurious_kl(ft, fr, protos, direction="code")
    assert paper.item() == pytest.approx(kl_pq, rel=1e-5)
    assert code.item() == pytest.approx(kl_qp, rel=1e-5)
    assert abs(paper.item() - code.item()) > 1e-3


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_spurious_kl_matches_torch_kl_div_conventions() -> None:
    g = torch.Generator().manual_seed(2)
    ft, fr = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    protos = 100.0 * F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    log_p_ft = F.log_softmax(F.normalize(ft, dim=-1) @ protos.T, dim=-1)
    log_p_fr = F.log_softmax(F.normalize(fr, dim=-1) @ protos.T, dim=-1)
    # The reference code: F.kl_div(log P_ft, P_frozen, reduction="mean").
    code_ref = F.kl_div(log_p_ft, log_p_fr.exp(), reduction="mean")
    torch.testing.assert_close(
        spurious_kl(ft, fr, protos, direction="code", reduction="elementwise-mean"),
        code_ref,
    )
    paper_ref = F.kl_div(log_p_fr, log_p_ft.exp(), reduction="batchmean")
    torch.testing.assert_close(spurious_kl(ft, fr, protos, direction="paper"), paper_ref)


@pytest.mark.parametrize("direction", ["paper", "code"])
def test_elementwise_mean_is_batchmean_over_s(direction: str) -> None:
    g = torch.Generator().manual_seed(3)
    ft, fr = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    protos = 100.0 * F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    batchmean = spurious_kl(ft, fr, protos, direction, "batchmean")
    elementwise = spurious_kl(ft, fr, protos, direction, "elementwise-mean")
    per_sample = spurious_kl(ft, fr, protos, direction, "none")
    torch.testing.assert_close(elementwise * 7, batchmean)
    torch.testing.assert_close(per_sample.mean(), batchmean)
    assert per_sample.shape == (4,) and bool((per_sample >= 0).all())
    with pytest.raises(ValueError, match="reduction"):
        spurious_kl(ft, fr, protos, direction, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction"):
        spurious_kl(ft, fr, protos, "backwards")  # type: ignore[arg-type]


@pytest.mark.parametrize("direction", ["paper", "code"])
def test_spurious_kl_exactly_zero_for_unchanged_encoder(backbone: Backbone, direction: str) -> None:
    import copy

    images = torch.stack([backbone.preprocess(_image(i)) for i in range(4)])
    frozen = copy.deepcopy(backbone.model.visual).eval()
    trainable = copy.deepcopy(backbone.model.visual).requires_grad_(True).train()
    _, spur = _protos(backbone, n_templates=5)
    f_ft, f_fr = encode_pair(trainable, frozen, images)
    assert f_ft.requires_grad and not f_fr.requires_grad
    loss = spurious_kl(f_ft, f_fr, spur, direction=direction)
    assert loss.item() == 0.0
    for reduction in ("elementwise-mean", "none"):
        out = spurious_kl(f_ft, f_fr, spur, direction, reduction)
        assert bool((out == 0).all())
    loss.backward()  # the KL is at its minimum: its gradient vanishes (up to rounding)
    grads = [p.grad.abs().max().item() for p in trainable.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-6


def test_beta_zero_gives_pure_cross_entropy_gradient() -> None:
    g = torch.Generator().manual_seed(4)
    f0 = torch.randn(6, 8, generator=g)
    fr = torch.randn(6, 8, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cls = 100.0 * F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    spur = 100.0 * F.normalize(torch.randn(4, 8, generator=g), dim=-1)

    f = f0.clone().requires_grad_(True)
    out = fd_align_loss(f, fr, y, cls, spur, alpha=1.0, beta=0.0)
    out.total.backward()
    grad_fd = f.grad.clone()

    f2 = f0.clone().requires_grad_(True)
    F.cross_entropy(F.normalize(f2, dim=-1) @ cls.T, y).backward()
    assert torch.equal(grad_fd, f2.grad)
    assert out.spurious.item() > 0  # still reported, without gradient

    f3 = f0.clone().requires_grad_(True)
    fd_align_loss(f3, fr, y, cls, spur, beta=20.0).total.backward()
    assert not torch.allclose(f3.grad, grad_fd)
    torch.testing.assert_close(
        fd_align_loss(f0, fr, y, cls, spur, alpha=2.0, beta=20.0).total,
        2.0 * classification_loss(f0, cls, y) + 20.0 * spurious_kl(f0, fr, spur),
    )
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
    # far away: random directions, large in the coordinates where the clusters are ~0
    outliers = rng.standard_normal((3, d))
    x = np.concatenate([normal, outliers])
    perm = rng.permutation(33)
    outlier_positions = np.sort(np.argsort(perm)[30:])  # where rows 30..32 ended up
    return torch.tensor(x[perm], dtype=torch.float32), outlier_positions


def test_spc_removes_injected_outliers_and_is_reproducible() -> None:
    x, outliers = _templates_with_outliers()
    a = spurious_prototype_correction(x, keep=30, n_clusters=3, seed=0)
    b = spurious_prototype_correction(x, keep=30, n_clusters=3, seed=0)
    np.testing.assert_array_equal(a.removed_indices, outliers)
    assert len(a.kept_indices) == 30 and not set(a.kept_indices) & set(a.removed_indices)
    np.testing.assert_array_equal(a.kept_indices, b.kept_indices)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert torch.equal(a.prototypes, b.prototypes)
    assert a.prototypes.shape == (3, 16)
    torch.testing.assert_close(a.prototypes.norm(dim=-1), torch.full((3,), 100.0))
    # the outliers have the lowest Isolation Forest scores
    assert a.scores[outliers].max() < np.delete(a.scores, outliers).min()
    # the three tight clusters are found: 10 templates each
    assert sorted(np.bincount(a.labels).tolist()) == [10, 10, 10]


def test_spc_keep_fraction_and_clipping() -> None:
    x, _ = _templates_with_outliers()
    frac = spurious_prototype_correction(x, keep=0.75, n_clusters=20, seed=1)
    assert len(frac.kept_indices) == round(0.75 * 33)
    assert frac.n_clusters == 20 and frac.prototypes.shape[0] == 20
    # keep > M keeps every template; n_clusters > kept is reduced to the number kept
    everything = spurious_prototype_correction(x, keep=60, n_clusters=40, seed=1)
    assert len(everything.kept_indices) == 33 and len(everything.removed_indices) == 0
    assert everything.n_clusters == 33 and everything.prototypes.shape == (33, 16)
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
    head = trainable_parameter_names(visual, 0)
    assert set(head) == {"proj", "ln_post.weight", "ln_post.bias"}
    last = trainable_parameter_names(visual, 1)
    assert any(n.startswith("transformer.resblocks.1.") for n in last)
    assert not any(n.startswith("transformer.resblocks.0.") for n in last)
    with pytest.raises(ValueError, match="only 2 blocks"):
        trainable_parameter_names(visual, 3)


def test_frozen_copy_untouched_and_trainable_copy_moves(backbone: Backbone) -> None:
    original = _params(backbone.model.visual)
    cls, spur = _protos(backbone)
    result = finetune_fd_align(
        backbone,
        _split(3),
        _split(1, offset=100, name="val"),
        cls,
        spur,
        epochs=1,
        lr=0.5,
        batch_size=3,
        blocks=1,
        seed=0,
        progress=False,
    )
    # the reference (frozen) copy: no gradients, unchanged, not trainable
    for name, p in result.reference_visual.named_parameters():
        assert p.grad is None and not p.requires_grad
        assert torch.equal(p, original[name]), name
    assert not result.reference_visual.training
    # the caller's backbone is untouched
    for name, p in backbone.model.visual.named_parameters():
        assert torch.equal(p, original[name]) and not p.requires_grad
    # the trainable copy moved, only where it was allowed to
    tuned = _params(result.visual)
    changed = {n for n in tuned if not torch.equal(tuned[n], original[n])}
    assert "proj" in changed and changed <= set(result.trainable_parameters)
    assert torch.equal(tuned["conv1.weight"], original["conv1.weight"])
    assert result.best_epoch == 1
    assert len(result.history["loss"]) == 1 and result.history["spurious_loss"][0] >= 0
    total = result.history["loss"][0]
    parts = result.history["classification_loss"][0] + 20.0 * result.history["spurious_loss"][0]
    assert total == pytest.approx(parts, rel=1e-5)


def test_selection_uses_validation_only(backbone: Backbone) -> None:
    assert "test" not in " ".join(inspect.signature(finetune_fd_align).parameters)
    cls, spur = _protos(backbone)
    scripted = iter([0.0, 10.0, 50.0, 20.0])  # before training, then epochs 1..3
    snapshots: list[dict[str, torch.Tensor]] = []

    def val_fn(visual: torch.nn.Module) -> float:
        snapshots.append(_params(visual))
        return next(scripted)

    result = finetune_fd_align(
        backbone,
        _split(2),
        val_fn,
        cls,
        spur,
        epochs=3,
        lr=0.5,
        batch_size=4,
        blocks=0,
        seed=0,
        progress=False,
    )
    assert result.history["val_accuracy"] == [10.0, 50.0, 20.0]
    assert result.best_epoch == 2 and result.best_val_accuracy == 50.0
    assert result.initial_val_accuracy == 0.0
    final = _params(result.visual)
    assert all(torch.equal(final[k], snapshots[2][k]) for k in final)
    assert not all(torch.equal(final[k], snapshots[3][k]) for k in final)
    # cosine schedule: lr decays to 0 at the last step
    assert result.history["lr"][-1] == pytest.approx(0.0, abs=1e-12)
    assert result.history["lr"][0] < 0.5


def test_initial_val_accuracy_is_prototype_accuracy(backbone: Backbone) -> None:
    cls, spur = _protos(backbone, seed=5)
    val = _split(3, offset=200, name="val")
    images = torch.stack([backbone.preprocess(img) for img in val.images])
    pred = (backbone.encode_images(images) @ cls.T).argmax(1).numpy()
    expected = 100.0 * float(np.mean(pred == val.labels))
    result = finetune_fd_align(
        backbone,
        _split(2),
        val,
        cls,
        spur,
        epochs=1,
        lr=1e-3,
        batch_size=4,
        blocks=0,
        beta=0.0,
        seed=0,
        progress=False,
    )
    assert result.initial_val_accuracy == pytest.approx(expected)


def test_training_is_deterministic_and_beta_matters(backbone: Backbone) -> None:
    cls, spur = _protos(backbone)
    kw = {
        "epochs": 1,
        "lr": 0.5,
        "batch_size": 2,
        "blocks": 0,
        "seed": 3,
        "progress": False,
    }
    runs = [
        finetune_fd_align(backbone, _split(2), lambda v: 0.0, cls, spur, beta=b, **kw)
        for b in (20.0, 20.0, 0.0)
    ]
    a, b, plain = (_params(r.visual) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    with pytest.raises(ValueError, match="only 2 rows"):
        finetune_fd_align(backbone, _split(1, n_classes=3), lambda v: 0.0, cls, spur, **kw)
    with pytest.raises(ValueError, match="optimizer"):
        finetune_fd_align(
            backbone,
            _split(1),
            lambda v: 0.0,
            cls,
            spur,
            optimizer="adam",
            **kw,  # type: ignore[arg-type]
        )


def test_finetuned_backbone_swaps_the_image_encoder(backbone: Backbone) -> None:
    cls, spur = _protos(backbone)
    result = finetune_fd_align(
        backbone,
        _split(2),
        lambda v: 0.0,
        cls,
        spur,
        epochs=1,
        lr=0.5,
        batch_size=4,
        blocks=0,
        optimizer="adamw",
        seed=0,
        progress=False,
    )
    tuned = finetuned_backbone(backbone, result.visual)
    assert tuned.model.visual is result.visual
    assert backbone.model.visual is not result.visual
    assert tuned.model.transformer is backbone.model.transformer  # text tower shared
    assert tuned.identifier.startswith(backbone.identifier + "+fd-align-")
    assert tuned.identifier != backbone.identifier
    images = torch.stack([backbone.preprocess(_image(i)) for i in range(3)])
    with torch.no_grad():
        expected = F.normalize(result.visual(images), dim=-1)
    torch.testing.assert_close(tuned.encode_images(images), expected)
    assert not torch.allclose(backbone.encode_images(images), expected)
    torch.testing.assert_close(tuned.encode_text(["a x."]), backbone.encode_text(["a x."]))


def test_module_exports() -> None:
    for name in fd.__all__:
        assert hasattr(fd, name), name


# --------------------------------------------------------------------------- integration


def test_method_and_exercises_are_registered() -> None:
    from fewclip_tutorial.exercises import get_exercise
    from fewclip_tutorial.experiment import get_method

    spec = get_method("fd-align")
    assert spec.options["beta"].default == 20.0 and spec.options["alpha"].default == 1.0
    assert spec.options["spc"].default is True
    assert spec.options["kl_direction"].choices == ["paper", "code"]
    assert get_exercise("spurious_prototypes").check(spurious_prototypes, verbose=False)
    assert get_exercise("spurious_kl").check(spurious_kl, verbose=False)

    def wrong_direction(ft, fr, protos):
        return spurious_kl(ft, fr, protos, direction="code")

    def no_second_norm(text, scale):
        return scale * F.normalize(text, dim=-1).mean(0)

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


def test_runner_end_to_end_on_a_tiny_episode(backbone: Backbone) -> None:
    from fewclip_tutorial.data.base import DatasetSpec
    from fewclip_tutorial.experiment import build_context, run_method

    spec = DatasetSpec(
        name="tiny",
        classnames=["circle", "star"],
        templates=["a {}.", "a red {}.", "a sketch of a {}.", "a photo of a {}."],
        train=_split(4, name="train"),
        val=None,
        test=_split(2, offset=300, name="test"),
        ood_test={"sketch": _split(2, offset=400, name="test:sketch")},
    )
    ctx = build_context(spec, backbone, shots=2, seed=1, cache_dir=None, progress=False)
    common = {"epochs": 2, "blocks": 0, "lr": 0.05, "batch_size": 4, "templates": "dataset"}
    out = run_method("fd-align", context=ctx, keep=3, n_clusters=2, **common)
    assert out["method"] == "fd-align" and out["beta"] == 20.0 and out["spc"] is True
    assert len(out["removed_templates"]) == 1 and out["removed_templates"][0] in spec.templates
    assert out["n_spurious_prototypes"] == 2 and out["n_templates"] == 4
    assert out["best_epoch"] in (1, 2)
    # the reported val accuracy is that of the selected epoch, on fine-tuned features
    assert out["val_accuracy"] == pytest.approx(
        out["history"]["val_accuracy"][out["best_epoch"] - 1]
    )
    assert set(out["ood_accuracy"]) == {"sketch"}
    plain = run_method("fd-align", context=ctx, beta=0.0, spc=False, **common)
    assert plain["beta"] == 0.0 and plain["removed_templates"] == []
    assert plain["history"]["loss"] == plain["history"]["classification_loss"]
