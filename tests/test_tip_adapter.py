"""Tests of Tip-Adapter / Tip-Adapter-F (fewclip_tutorial.methods.tip_adapter)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from fewclip_tutorial.methods import tip_adapter as ta
from fewclip_tutorial.methods.tip_adapter import (
    TipAdapterError,
    TipAdapterF,
    affinity,
    build_cache_keys,
    build_cache_values,
    default_search_grid,
    search_hparams,
    search_hparams_loop,
    tip_logits,
    train_tip_adapter_f,
)
from fewclip_tutorial.zeroshot import zero_shot_logits

SMALL_GRID = default_search_grid(beta_steps=12, alpha_steps=6)


def unit(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def problem(
    seed: int,
    noise: float = 2.0,
    num_classes: int = 4,
    dim: int = 16,
    shots: int = 8,
    views: int = 4,
    val_per_class: int = 8,
) -> dict[str, torch.Tensor]:
    """Class-structured unit features; the text classifier confuses neighbouring classes."""
    g = torch.Generator().manual_seed(seed)
    means = unit(num_classes, dim, generator=g)
    clip_weights = F.normalize(means + means.roll(1, 0), dim=-1)
    train_labels = torch.arange(num_classes).repeat_interleave(shots)
    train_views = F.normalize(
        means[train_labels]
        + noise * torch.randn(views, len(train_labels), dim, generator=g) / dim**0.5,
        dim=-1,
    )
    val_labels = torch.arange(num_classes).repeat_interleave(val_per_class)
    val = F.normalize(
        means[val_labels] + noise * torch.randn(len(val_labels), dim, generator=g) / dim**0.5,
        dim=-1,
    )
    keys = build_cache_keys(train_views)
    values = build_cache_values(train_labels, num_classes)
    return {
        "train_views": train_views,
        "train_labels": train_labels,
        "val": val,
        "val_labels": val_labels,
        "clip_weights": clip_weights,
        "keys": keys,
        "values": values,
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).double().mean() * 100)


# ------------------------------------------------------------------ cache construction


def test_cache_keys_are_normalised_average_of_normalised_views() -> None:
    views = torch.tensor(
        [
            [[3.0, 4.0], [2.0, 0.0]],  # view 1: image 0 -> (0.6, 0.8), image 1 -> (1, 0)
            [[0.0, 5.0], [0.0, 0.5]],  # view 2: image 0 -> (0, 1),     image 1 -> (0, 1)
        ]
    )
    keys = build_cache_keys(views)
    mean0 = torch.tensor([0.3, 0.9])
    expected = torch.stack([mean0 / math.sqrt(0.9), torch.tensor([1.0, 1.0]) / math.sqrt(2.0)])
    torch.testing.assert_close(keys, expected)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(2))
    # A single (N, D) view is taken as V = 1: keys are just the normalised features.
    torch.testing.assert_close(build_cache_keys(views[0]), F.normalize(views[0], dim=-1))


def test_cache_values_are_one_hot() -> None:
    values = build_cache_values(torch.tensor([2, 0, 1, 2]), 3)
    expected = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float32)
    assert values.dtype == torch.float32
    assert torch.equal(values, expected)


# ------------------------------------------------------------------ Eq. (5) and (6)


def test_affinity_is_one_at_a_key_and_decays_with_angle() -> None:
    keys = torch.eye(3)
    f = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    beta = 2.5
    a = affinity(f, keys, beta)
    assert a.shape == (2, 3)
    assert a[0, 0].item() == 1.0  # f == key
    torch.testing.assert_close(a[0, 1:], torch.full((2,), math.exp(-beta)))  # orthogonal
    torch.testing.assert_close(a[1, 0], torch.tensor(math.exp(-2 * beta)))  # opposite
    # beta = 0: every entry of the cache counts equally.
    assert torch.equal(affinity(f, keys, 0.0), torch.ones(2, 3))


def test_tip_logits_match_hand_computation() -> None:
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    alpha, beta = 2.0, 3.0
    e = math.exp
    expected = torch.tensor(
        [
            [100.0 + alpha * 1.0, 0.0 + alpha * 2 * e(-beta)],
            [60.0 + alpha * e(-beta * 0.4), 80.0 + alpha * 2 * e(-beta * 0.2)],
        ]
    )
    torch.testing.assert_close(tip_logits(f, w, keys, values, alpha, beta), expected)
    # Only the CLIP branch is scaled.
    torch.testing.assert_close(
        tip_logits(f, w, keys, values, alpha, beta, logit_scale=1.0),
        expected - torch.tensor([[99.0, 0.0], [59.4, 79.2]]),
    )


@pytest.mark.parametrize("beta", [0.0, 1.0, 5.5])
def test_alpha_zero_gives_exact_zero_shot_logits(beta: float) -> None:
    data = problem(0)
    f, w = data["val"], data["clip_weights"]
    logits = tip_logits(f, w, data["keys"], data["values"], 0.0, beta)
    assert torch.equal(logits, 100.0 * f @ w.T)
    assert torch.equal(logits, zero_shot_logits(f, w, 100.0))  # the package's zero-shot


# ------------------------------------------------------------------ search


def test_default_grid_matches_the_paper_ranges() -> None:
    betas, alphas = default_search_grid()
    assert betas.shape == (200,) and alphas.shape == (20,)
    assert betas[0].item() == pytest.approx(0.1) and betas[-1].item() == pytest.approx(7.0)
    assert alphas[0].item() == pytest.approx(0.1) and alphas[-1].item() == pytest.approx(3.0)
    assert bool((betas.diff() > 0).all()) and bool((alphas.diff() > 0).all())


def _first_best_in_scan_order(acc: torch.Tensor) -> tuple[int, int]:
    best, pair = -1.0, (0, 0)
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            if acc[i, j].item() > best:
                best, pair = acc[i, j].item(), (i, j)
    return pair


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("num_val_per_class", [1, 6])  # 1: few values -> many exact ties
def test_vectorised_search_equals_loop(seed: int, num_val_per_class: int) -> None:
    data = problem(seed, noise=3.0, val_per_class=num_val_per_class)
    betas, alphas = default_search_grid(beta_steps=25, alpha_steps=8)
    args = (data["val"], data["val_labels"], data["clip_weights"], data["keys"], data["values"])
    loop = search_hparams_loop(*args, betas, alphas)
    fast = search_hparams(*args, betas, alphas)
    assert fast.accuracy.shape == (25, 8)
    assert torch.equal(loop.accuracy, fast.accuracy)
    assert (fast.best_alpha, fast.best_beta) == (loop.best_alpha, loop.best_beta)
    assert fast.best_accuracy == loop.best_accuracy == fast.accuracy.max().item()
    i, j = _first_best_in_scan_order(fast.accuracy)
    assert fast.best_beta == betas[i].item() and fast.best_alpha == alphas[j].item()
    # The grid is the accuracy of tip_logits at each pair.
    acc = accuracy(tip_logits(*args[:1], *args[2:], alphas[j].item(), betas[i].item()), args[1])
    assert fast.accuracy[i, j].item() == pytest.approx(acc)


def test_search_ties_pick_the_first_pair_in_beta_major_order() -> None:
    data = problem(0, val_per_class=1)  # 4 validation images: accuracies tie a lot
    args = (data["val"], data["val_labels"], data["clip_weights"], data["keys"], data["values"])
    betas, alphas = SMALL_GRID
    fast = search_hparams(*args, betas, alphas)
    loop = search_hparams_loop(*args, betas, alphas)
    assert int((fast.accuracy == fast.accuracy.max()).sum()) > 1  # the best is tied
    i, j = _first_best_in_scan_order(fast.accuracy)
    assert (fast.best_beta, fast.best_alpha) == (betas[i].item(), alphas[j].item())
    assert (loop.best_beta, loop.best_alpha) == (betas[i].item(), alphas[j].item())
    # Duplicated grid values give duplicated rows / columns of the accuracy grid.
    dup = search_hparams(*args, torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.5, 0.5]))
    assert torch.equal(dup.accuracy[0], dup.accuracy[1])
    assert torch.equal(dup.accuracy[:, 0], dup.accuracy[:, 1])


def test_search_alpha_zero_column_is_zero_shot_accuracy() -> None:
    # With alpha = 0 the cache cannot change predictions: every beta gives zero-shot accuracy.
    data = problem(1)
    zs = accuracy(data["val"] @ data["clip_weights"].T, data["val_labels"])
    res = search_hparams(
        data["val"],
        data["val_labels"],
        data["clip_weights"],
        data["keys"],
        data["values"],
        betas=torch.tensor([0.5, 3.0]),
        alphas=torch.tensor([0.0]),
    )
    torch.testing.assert_close(res.accuracy, torch.full((2, 1), zs, dtype=torch.float64))


# ------------------------------------------------------------------ Tip-Adapter-F


def test_tip_adapter_f_initial_forward_equals_tip_logits() -> None:
    data = problem(2)
    model = TipAdapterF(data["keys"], data["values"])
    params = list(model.parameters())
    assert len(params) == 1 and params[0].shape == data["keys"].shape  # only the keys train
    assert isinstance(model.cache_keys, torch.nn.Linear) and model.cache_keys.bias is None
    out = model(data["val"], data["clip_weights"], 1.7, 3.2)
    ref = tip_logits(data["val"], data["clip_weights"], data["keys"], data["values"], 1.7, 3.2)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # The model owns copies: training it does not modify the caller's cache.
    with torch.no_grad():
        model.cache_keys.weight.add_(1.0)
    assert not torch.equal(model.keys, data["keys"])


def _train(data: dict[str, torch.Tensor], val_labels: torch.Tensor, **kw: object):
    return train_tip_adapter_f(
        data["train_views"],
        data["train_labels"],
        data["val"],
        val_labels,
        data["clip_weights"],
        data["keys"],
        data["values"],
        alpha=10.0,
        beta=5.0,
        epochs=10,
        lr=1e-2,
        batch_size=8,
        progress=False,
        search_grid=SMALL_GRID,
        **kw,
    )


def test_training_raises_validation_accuracy_and_selects_best_epoch() -> None:
    data = problem(3)
    before = accuracy(
        tip_logits(data["val"], data["clip_weights"], data["keys"], data["values"], 10.0, 5.0),
        data["val_labels"],
    )
    result = _train(data, data["val_labels"])
    val_accs = [h["val_accuracy"] for h in result.history]
    assert len(result.history) == 10 and [h["epoch"] for h in result.history] == list(range(1, 11))
    assert result.best_val_accuracy > before
    # First best epoch, and the returned keys are that epoch's keys.
    assert result.best_epoch == 1 + val_accs.index(max(val_accs))
    assert result.best_val_accuracy == max(val_accs)
    after = accuracy(result.model(data["val"], data["clip_weights"], 10.0, 5.0), data["val_labels"])
    assert after == pytest.approx(result.best_val_accuracy)
    # alpha/beta re-searched on validation with the trained keys.
    assert (result.alpha, result.beta) == (result.search.best_alpha, result.search.best_beta)
    assert torch.equal(result.cache_keys, result.model.keys)
    # The learning rate follows a cosine decay over the iterations.
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(1e-2) and all(a > b for a, b in zip(lrs, lrs[1:]))


def test_selection_uses_validation_only() -> None:
    # No test split can even be passed.
    params = inspect.signature(train_tip_adapter_f).parameters
    assert not [p for p in params if "test" in p]
    data = problem(3)
    honest = _train(data, data["val_labels"])
    # Corrupt the validation labels: make them the untrained adapter's own predictions, so
    # training (which fits the true training labels) can only move away from them.
    untrained = tip_logits(data["val"], data["clip_weights"], data["keys"], data["values"], 10, 5)
    corrupted = _train(data, untrained.argmax(1))
    # Training itself is identical (same seed, never sees validation data) ...
    assert [h["train_loss"] for h in honest.history] == [h["train_loss"] for h in corrupted.history]
    # ... but the chosen epoch, and so the returned keys, follow the validation labels.
    assert honest.best_epoch != corrupted.best_epoch
    assert not torch.equal(honest.cache_keys, corrupted.cache_keys)
    for run in (honest, corrupted):
        accs = [h["val_accuracy"] for h in run.history]
        assert run.best_epoch == 1 + accs.index(max(accs))


def test_training_is_deterministic_on_cpu() -> None:
    data = problem(1)
    a = _train(data, data["val_labels"], seed=7)
    b = _train(data, data["val_labels"], seed=7)
    assert torch.equal(a.cache_keys, b.cache_keys)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in b.history]


# ------------------------------------------------------------------ errors


def test_clear_errors_for_bad_input() -> None:
    data = problem(0)
    f, w, keys, values = data["val"], data["clip_weights"], data["keys"], data["values"]
    with pytest.raises(TipAdapterError, match="feature dimension mismatch.*same image encoder"):
        tip_logits(f[:, :8], w, keys, values, 1.0, 1.0)
    with pytest.raises(TipAdapterError, match="feature dimension mismatch.*text classifier"):
        tip_logits(f, w[:, :8], keys, values, 1.0, 1.0)
    with pytest.raises(TipAdapterError, match="cache size mismatch.*same training"):
        tip_logits(f, w, keys, values[:-1], 1.0, 1.0)
    with pytest.raises(TipAdapterError, match="class count mismatch"):
        tip_logits(f, w[:3], keys, values, 1.0, 1.0)
    empty = values.clone()
    empty[:, 2] = 0
    with pytest.raises(TipAdapterError, match=r"class\(es\) \[2\] have no cache entries"):
        tip_logits(f, w, keys, empty, 1.0, 1.0)
    with pytest.raises(TipAdapterError, match=r"\[1\] have no cache entries.*one training shot"):
        build_cache_values(torch.tensor([0, 0, 2]), 3)
    with pytest.raises(TipAdapterError, match=r"must lie in \[0, 3\)"):
        build_cache_values(torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(TipAdapterError, match=r"must be 2-D.*unsqueeze\(0\)"):
        tip_logits(f[0], w, keys, values, 1.0, 1.0)
    with pytest.raises(TipAdapterError, match=r"must be 2-D.*build_cache_keys"):
        affinity(f, data["train_views"], 1.0)
    with pytest.raises(TipAdapterError, match="beta must be a finite number >= 0"):
        affinity(f, keys, -0.5)
    with pytest.raises(TipAdapterError, match="beta must be a finite number >= 0"):
        search_hparams(f, data["val_labels"], w, keys, values, torch.tensor([1.0, -1.0]), [1.0])
    with pytest.raises(TipAdapterError, match="val_labels has 3 entries"):
        search_hparams(f, data["val_labels"][:3], w, keys, values)
    with pytest.raises(TipAdapterError, match="must be a torch.Tensor"):
        affinity(f.tolist(), keys, 1.0)
    with pytest.raises(TipAdapterError, match="train_view_features has"):
        train_tip_adapter_f(
            data["train_views"][:, :-1], data["train_labels"][:-1], f, data["val_labels"],
            w, keys, values, 1.0, 1.0, epochs=1, progress=False,
        )  # fmt: skip
    assert issubclass(TipAdapterError, ValueError)


def test_module_exports_exist() -> None:
    for name in ta.__all__:
        assert hasattr(ta, name), name


def test_runners_and_exercises_are_registered() -> None:
    import fewclip_tutorial.methods  # noqa: F401  (registers methods and exercises)
    from fewclip_tutorial.exercises import get_exercise
    from fewclip_tutorial.experiment import METHODS

    assert set(METHODS["tip-adapter"].options) == {
        "views", "beta_scale", "alpha_scale", "beta_steps", "alpha_steps",
    }  # fmt: skip
    assert {"epochs", "lr", "batch_size"} <= set(METHODS["tip-adapter-f"].options)
    assert METHODS["tip-adapter"].options["views"].default == 10
    assert METHODS["tip-adapter-f"].options["epochs"].default == 20

    ex = get_exercise("tip_affinity")
    assert ex.check(affinity, verbose=False)
    # A classic slip: forgetting the minus sign.
    assert not ex.check(lambda f, k, b: torch.exp(b * (1 - f @ k.T)), verbose=False)
    ex = get_exercise("tip_cache_logits")
    assert ex.check(tip_logits, verbose=False)
    # Another one: scaling the cache branch by 100 too.
    wrong = lambda f, w, k, v, a, b: 100 * (f @ w.T + a * affinity(f, k, b) @ v)  # noqa: E731
    assert not ex.check(wrong, verbose=False)


def test_runners_end_to_end_on_a_tiny_episode() -> None:
    from fixtures_data import make_spec

    from fewclip_tutorial.backbones import load_backbone
    from fewclip_tutorial.experiment import build_context, run_method

    backbone = load_backbone("shapeworld-tiny", pretrained=None, device="cpu")
    ctx = build_context(
        make_spec([5, 5, 5]), backbone, shots=2, seed=1, cache_dir=None, progress=False
    )
    grid = {"views": 2, "beta_steps": 5, "alpha_steps": 4}
    tip = run_method("tip-adapter", context=ctx, **grid)
    val_f = ctx.features("val").features
    val_y = ctx.features("val").labels
    cache = ctx.features("train", views=2, augment=True)
    keys = build_cache_keys(cache.features)
    values = build_cache_values(cache.labels, 3)
    best = search_hparams(
        val_f, val_y, ctx.text_classifier, keys, values, *default_search_grid(7, 3, 5, 4)
    )
    assert (tip["alpha"], tip["beta"]) == (best.best_alpha, best.best_beta)
    assert tip["val_accuracy"] == pytest.approx(best.best_accuracy)
    assert set(tip["ood_accuracy"]) == {"sketch"} and tip["cache_size"] == 6
    tip_f = run_method("tip-adapter-f", context=ctx, epochs=2, batch_size=4, **grid)
    assert tip_f["best_epoch"] in (1, 2) and len(tip_f["history"]) == 2
    # The reported validation accuracy is the one the selection saw.
    assert tip["val_accuracy"] == pytest.approx(tip["selection_val_accuracy"])
    assert tip_f["val_accuracy"] == pytest.approx(tip_f["selection_val_accuracy"])
    # Training starts at the searched pair, which is in the final grid too: the final search
    # can only match or beat the best epoch.
    best_epoch_acc = max(h["val_accuracy"] for h in tip_f["history"])
    assert tip_f["selection_val_accuracy"] >= best_epoch_acc - 1e-6
