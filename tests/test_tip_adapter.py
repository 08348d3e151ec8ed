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


@pytest.fixture(params=["rows_innermost", "classes_innermost"])
def both_layouts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a search test under both block layouts of search_hparams (chosen by class count)."""
    monkeypatch.setattr(
        ta.search, "_FEW_CLASSES", 10**6 if request.param == "rows_innermost" else 0
    )
    return request.param


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


def test_tip_logits_are_the_paper_equation_on_random_inputs() -> None:
    # logits = 100 f W^T + alpha exp(-beta (1 - f F^T)) L, written out element by element.
    data = problem(4)
    f, w, keys, values = data["val"][:5], data["clip_weights"], data["keys"], data["values"]
    alpha, beta = 1.7, 3.2
    expected = torch.zeros(5, w.shape[0], dtype=torch.float64)
    for m in range(5):
        for c in range(w.shape[0]):
            cache = sum(
                math.exp(-beta * (1 - float(f[m] @ keys[n]))) * float(values[n, c])
                for n in range(keys.shape[0])
            )
            expected[m, c] = 100 * float(f[m] @ w[c]) + alpha * cache
    got = tip_logits(f, w, keys, values, alpha, beta).double()
    # float32 (tip_adapter computes in float32; the reference's dots are float32 too): each
    # side's dot of D unit entries rounds by <= D 2^-24; x100 for the CLIP term; the cache term
    # sums N values exp(-beta (1 - f.k)) <= 1, each off by <= (beta D + 2) 2^-24, plus N 2^-24
    D, N = f.shape[1], keys.shape[0]
    bound = 2 * 2**-24 * (100 * D + alpha * N * (beta * D + 3))
    torch.testing.assert_close(got, expected, atol=bound, rtol=0)
    # Tip-Adapter-F's untrained forward is the same equation.
    model = TipAdapterF(keys, values)
    # the same float32 bound as above
    torch.testing.assert_close(model(f, w, alpha, beta).double(), expected, atol=bound, rtol=0)


def test_logit_scale_is_zeroshots() -> None:
    from fewclip_tutorial import zeroshot

    assert ta.CLIP_LOGIT_SCALE is zeroshot.CLIP_LOGIT_SCALE and ta.CLIP_LOGIT_SCALE == 100.0


# ------------------------------------------------------------------ search grid


def authors_grid(scale: float, steps: int) -> list[float]:
    # Tip-Adapter utils.py, search_hp: the list comprehension for beta_list / alpha_list.
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


@pytest.mark.parametrize(
    ("bs", "as_", "bn", "an"), [(7, 3, 200, 20), (12, 10, 200, 20), (5, 1, 7, 3)]
)
def test_default_grid_is_the_authors_grid(bs: float, as_: float, bn: int, an: int) -> None:
    betas, alphas = default_search_grid(bs, as_, bn, an)
    assert torch.equal(betas, torch.tensor(authors_grid(bs, bn), dtype=torch.float32))
    assert torch.equal(alphas, torch.tensor(authors_grid(as_, an), dtype=torch.float32))
    # The endpoint is excluded: the last value is one step short of the scale.
    assert betas[-1].item() == pytest.approx(bs - (bs - 0.1) / bn)
    assert betas[0].item() == pytest.approx(0.1)


def test_linspace_grid_is_kept_as_an_option() -> None:
    betas, alphas = default_search_grid(7, 3, 200, 20, spacing="linspace")
    assert betas[-1].item() == pytest.approx(7.0) and alphas[-1].item() == pytest.approx(3.0)
    assert not torch.equal(betas, default_search_grid()[0])
    with pytest.raises(TipAdapterError, match="spacing"):
        default_search_grid(spacing="log")


# ------------------------------------------------------------------ search


def authors_search(f, labels, w, keys, values, beta_list, alpha_list):
    """The authors' search_hp loop, in their style: (D, N) keys, (D, C) weights, topk
    accuracy in percent, best_acc starting at 0 and a strict '>'."""
    cache_keys, clip_weights = keys.T, w.T
    best_acc, best = 0.0, (0, 0)
    grid = torch.zeros(len(beta_list), len(alpha_list), dtype=torch.float64)
    for i, beta in enumerate(beta_list):
        for j, alpha in enumerate(alpha_list):
            aff = f @ cache_keys
            cache_logits = ((-1) * (beta - beta * aff)).exp() @ values
            clip_logits = 100.0 * f @ clip_weights
            pred = (clip_logits + cache_logits * alpha).topk(1, 1, True, True)[1].t()
            acc = 100 * float(pred.eq(labels.view(1, -1)).float().sum()) / labels.shape[0]
            grid[i, j] = acc
            if acc > best_acc:
                best_acc, best = acc, (i, j)
    return best, grid


def _args(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return data["val"], data["val_labels"], data["clip_weights"], data["keys"], data["values"]


def check_against_authors(args, beta_list, alpha_list) -> None:
    (i, j), grid = authors_search(*args, beta_list, alpha_list)
    betas, alphas = torch.tensor(beta_list), torch.tensor(alpha_list)
    for search in (search_hparams, search_hparams_loop):
        res = search(*args, betas, alphas)
        # percentages of the same counts: 100 k / n written two ways differ by an ulp of 100
        # (1.4e-14); 1e-9 is larger but cannot hide one image (100/n points)
        torch.testing.assert_close(res.accuracy, grid, rtol=0, atol=1e-9)
        assert (res.best_beta, res.best_alpha) == (betas[i].item(), alphas[j].item())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("val_per_class", [1, 6])  # 1: a few images -> many tied pairs
def test_search_chooses_what_the_authors_loop_chooses(
    seed: int, val_per_class: int, both_layouts: str
) -> None:
    data = problem(seed, noise=3.0, val_per_class=val_per_class)
    check_against_authors(_args(data), authors_grid(7, 25), authors_grid(3, 8))


def test_ties_keep_the_first_best_pair_in_the_authors_order(both_layouts: str) -> None:
    data = problem(0, val_per_class=1)  # 4 validation images: accuracies tie a lot
    beta_list, alpha_list = authors_grid(7, 12), authors_grid(3, 6)
    (i, j), grid = authors_search(*_args(data), beta_list, alpha_list)
    tied = (grid == grid.max()).nonzero().tolist()
    assert len(tied) > 1 and tied[0] == [i, j]  # the best is tied; the authors keep the first
    res = search_hparams(*_args(data), torch.tensor(beta_list), torch.tensor(alpha_list))
    betas, alphas = torch.tensor(beta_list), torch.tensor(alpha_list)  # float32, as searched
    assert (res.best_beta, res.best_alpha) == (betas[i].item(), alphas[j].item())


def test_exact_logit_ties_between_classes_follow_argmax(both_layouts: str) -> None:
    # Classes 1 and 2 are copies (same text weight, same keys): their logits tie exactly, and
    # the authors' top-1 and our search both give the first class.
    g = torch.Generator().manual_seed(5)
    w = unit(3, 8, generator=g)
    w[2] = w[1]
    keys1 = unit(3, 8, generator=g)
    keys = torch.cat([unit(3, 8, generator=g), keys1, keys1])
    values = build_cache_values(torch.arange(3).repeat_interleave(3), 3)
    f = F.normalize(torch.cat([w[0:1], w[1:2], w[1:2], keys1[:2]]) + 0.3 * unit(5, 8, generator=g))
    labels = torch.tensor([0, 1, 2, 2, 1])
    check_against_authors((f, labels, w, keys, values), authors_grid(7, 10), authors_grid(3, 5))


def test_search_in_small_blocks_equals_one_block(
    monkeypatch: pytest.MonkeyPatch, both_layouts: str
) -> None:
    data = problem(2, noise=3.0, num_classes=5, shots=3, val_per_class=7)
    args, grid = _args(data), default_search_grid(beta_steps=17, alpha_steps=5)
    whole = search_hparams(*args, *grid)
    monkeypatch.setitem(ta.search._BLOCK_ELEMENTS, "cpu", 40)  # one row, one beta per block
    blocks = search_hparams(*args, *grid)
    assert torch.equal(whole.accuracy, blocks.accuracy)
    check_against_authors(args, grid[0].tolist(), grid[1].tolist())


def test_unequal_classes_and_soft_values(both_layouts: str) -> None:
    data = problem(1, noise=3.0)
    keep = torch.ones(len(data["train_labels"]), dtype=torch.bool)
    keep[[0, 1, 2, 9]] = False  # class 0 keeps 5 keys, class 1 keeps 7, others 8
    labels = data["train_labels"][keep]
    keys, values = data["keys"][keep], build_cache_values(labels, 4)
    args = (data["val"], data["val_labels"], data["clip_weights"], keys, values)
    check_against_authors(args, authors_grid(7, 15), authors_grid(3, 6))
    soft = values * 0.8 + 0.05  # label smoothing: not one-hot, the search uses A @ L
    check_against_authors(args[:4] + (soft,), authors_grid(7, 15), authors_grid(3, 6))


@pytest.mark.parametrize("drop", [[], [0, 5, 6]])
def test_segment_sum_equals_the_matmul(drop: list[int]) -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(4).repeat_interleave(4)[torch.randperm(16, generator=g)]
    labels = labels[[i for i in range(16) if i not in drop]]
    values = build_cache_values(labels, 4)
    a = torch.rand(2, 6, len(labels), generator=g)
    per_class = torch.stack([a[..., labels == c].sum(-1) for c in range(4)], dim=-1)
    torch.testing.assert_close(ta.class_sums(a, values), per_class)
    torch.testing.assert_close(ta.class_sums(a, values), a @ values)
    soft = values * 0.5 + 0.1
    torch.testing.assert_close(ta.class_sums(a, soft), a @ soft)


def test_search_alpha_zero_column_is_zero_shot_accuracy() -> None:
    # With alpha = 0 the cache cannot change predictions: every beta gives zero-shot accuracy.
    data = problem(1)
    zs = accuracy(data["val"] @ data["clip_weights"].T, data["val_labels"])
    res = search_hparams(*_args(data), betas=torch.tensor([0.5, 3.0]), alphas=torch.tensor([0.0]))
    torch.testing.assert_close(res.accuracy, torch.full((2, 1), zs, dtype=torch.float64))


# ------------------------------------------------------------------ Tip-Adapter-F


def _train(data: dict[str, torch.Tensor], val_labels: torch.Tensor, **kw: object):
    options = dict(alpha=10.0, beta=5.0, epochs=10, lr=1e-2, batch_size=8, min_steps=0)
    options.update(kw)
    return train_tip_adapter_f(
        data["train_views"], data["train_labels"], data["val"], val_labels,
        data["clip_weights"], data["keys"], data["values"],
        progress=False, search_grid=SMALL_GRID, **options,
    )  # fmt: skip


def test_training_length_rule() -> None:
    # max(epochs * ceil(N / batch), min_steps): the floor only binds on small sets.
    assert ta.tip_f_steps(192, 256, 20, 100) == 100  # one batch per epoch -> the floor
    assert ta.tip_f_steps(16_000, 256, 20, 100) == 20 * 63  # 16-shot ImageNet: the authors'
    assert ta.tip_f_steps(160, 256, 100, 100) == 100  # EuroSAT's 100 epochs of one batch
    data = problem(3)  # N = 32 training images
    run = _train(data, data["val_labels"], batch_size=8, epochs=10, min_steps=50)
    assert run.steps == 50 and run.history["step"] == list(range(1, 51))
    # Validation at the start and after every epoch (4 steps), and at the end.
    assert run.history["val_step"] == [0, *range(4, 50, 4), 50]


def test_lr_follows_a_cosine_per_step() -> None:
    data = problem(3)
    run = _train(data, data["val_labels"], epochs=3, lr=0.02)  # 12 steps
    total = 12
    expected = [0.02 * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    assert run.history["lr"] == pytest.approx(expected)


def test_lr_zero_keeps_the_start() -> None:
    data = problem(3)
    run = _train(data, data["val_labels"], lr=0.0)
    assert run.best_step == 0 and torch.equal(run.cache_keys, data["keys"])
    start = search_hparams(*_args(data), *SMALL_GRID)
    assert (run.alpha, run.beta) == (start.best_alpha, start.best_beta)
    assert len(set(run.history["val_score"])) == 1  # nothing moved


def test_training_raises_validation_accuracy_and_keeps_the_best_step() -> None:
    data = problem(3)
    before = accuracy(
        tip_logits(data["val"], data["clip_weights"], data["keys"], data["values"], 10.0, 5.0),
        data["val_labels"],
    )
    run = _train(data, data["val_labels"])
    scores, steps = run.history["val_score"], run.history["val_step"]
    assert scores[0] == pytest.approx(before)  # step 0 is the starting keys
    assert run.best_val_accuracy > before and run.best_step > 0
    assert run.best_step == steps[scores.index(max(scores))]  # first best
    after = accuracy(run.model(data["val"], data["clip_weights"], 10.0, 5.0), data["val_labels"])
    assert after == pytest.approx(run.best_val_accuracy)
    assert torch.equal(run.cache_keys, run.model.keys) and not torch.equal(
        run.cache_keys, data["keys"]
    )
    assert (run.alpha, run.beta) == (run.search.best_alpha, run.search.best_beta)


def test_selection_uses_validation_only() -> None:
    params = inspect.signature(train_tip_adapter_f).parameters
    assert not [p for p in params if "test" in p]  # no test split can even be passed
    data = problem(3)
    honest = _train(data, data["val_labels"])
    # Validation labels = the untrained adapter's own predictions: training (on the true
    # training labels) can only move away from them, so the start is kept.
    untrained = tip_logits(data["val"], data["clip_weights"], data["keys"], data["values"], 10, 5)
    corrupted = _train(data, untrained.argmax(1))
    assert honest.history["loss"] == corrupted.history["loss"]  # training never sees val
    assert honest.best_step > 0 and corrupted.best_step == 0
    assert torch.equal(corrupted.cache_keys, data["keys"])


def test_training_is_deterministic_on_cpu() -> None:
    data = problem(1)
    a = _train(data, data["val_labels"], seed=7)
    b = _train(data, data["val_labels"], seed=7)
    assert torch.equal(a.cache_keys, b.cache_keys) and a.history == b.history


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


def test_exercises_are_registered() -> None:
    from fewclip_tutorial.course.exercises import get_exercise

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
    from fewclip_tutorial.episode import build_context
    from fewclip_tutorial.methods.registry import run_method

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
    tip_f = run_method("tip-adapter-f", context=ctx, epochs=2, batch_size=4, min_steps=5, **grid)
    assert tip_f["steps"] == 5 and tip_f["history"]["step"] == [1, 2, 3, 4, 5]
    assert tip_f["best_step"] in tip_f["history"]["val_step"]
    with pytest.raises(ValueError, match="no option"):
        run_method("tip-adapter", context=ctx, epochs=3)
    # The reported validation accuracy is the one the selection saw.
    assert tip["val_accuracy"] == pytest.approx(tip["selection_val_accuracy"])
    assert tip_f["val_accuracy"] == pytest.approx(tip_f["selection_val_accuracy"])
    # Training starts at the searched pair, which is in the final grid too: the final search
    # can only match or beat the kept step, which is at least the training-free start.
    assert tip_f["selection_val_accuracy"] >= max(tip_f["history"]["val_score"]) - 1e-6
    assert max(tip_f["history"]["val_score"]) >= tip_f["history"]["val_score"][0]


# ------------------------------------------------------------------ the search's screen


def _full_search(monkeypatch: pytest.MonkeyPatch, *args):
    """search_hparams with the screen off: every (beta, row, alpha, class) logit computed."""
    with monkeypatch.context() as m:
        m.setattr(ta.search, "_screen_tolerance", lambda *a, **k: math.inf)
        return search_hparams(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_screened_search_equals_every_logit_computed(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, seed: int, both_layouts: str
) -> None:
    # The screen decides most (beta, image) cells from the two ends of the alpha range; the
    # counts must be exactly those of computing every logit, including tied classes.
    data = problem(seed, noise=3.0, num_classes=6, shots=4, val_per_class=9)
    w = data["clip_weights"].clone()
    w[5] = w[4]  # classes 4 and 5 share a text weight and (below) their keys: exact ties
    keys = data["keys"].clone()
    keys[20:24] = keys[16:20]
    args = [data["val"], data["val_labels"], w, keys, data["values"]]
    args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    alpha_grids = [
        torch.tensor(authors_grid(3, 8)),
        torch.tensor([2.0, 0.5, 1.0]),  # unsorted
        torch.tensor([-1.0, 0.0, 1.5]),  # a negative alpha: no dominance shortcut
        torch.tensor([1.0]),
    ]
    betas = torch.tensor(authors_grid(7, 15))
    for alphas in alpha_grids:
        screened = search_hparams(*args, betas, alphas)
        full = _full_search(monkeypatch, *args, betas, alphas)
        assert torch.equal(screened.accuracy, full.accuracy), alphas
        assert (screened.best_beta, screened.best_alpha) == (full.best_beta, full.best_alpha)


def test_screen_decides_nothing_on_non_finite_inputs() -> None:
    data = problem(0)
    f = data["val"].clone()
    f[0, 0] = math.nan
    clip = 100.0 * f @ data["clip_weights"].T
    shifted = f @ data["keys"].T - 1
    tol = ta.search._screen_tolerance(clip, shifted, 8.0, *SMALL_GRID)
    assert tol == math.inf
    finite = ta.search._screen_tolerance(clip.nan_to_num(), shifted.nan_to_num(), 8.0, *SMALL_GRID)
    assert 0 < finite < 1e-2  # a few float32 roundings of logits near 100 + 3 x 8 x 2


def test_search_in_float64_equals_the_loop_everywhere(both_layouts: str) -> None:
    # In float64 no two logits of these problems agree to within rounding, so the segment
    # sums (another order of additions than A @ L) give the loop's grid exactly.
    for seed in range(3):
        data = problem(seed, noise=3.0, num_classes=5, shots=6, val_per_class=7)
        args = [t.double() if t.is_floating_point() else t for t in _args(data)]
        grid = default_search_grid(beta_steps=30, alpha_steps=10)
        fast = search_hparams(*args, *grid)
        loop = search_hparams_loop(*args, *grid)
        assert torch.equal(fast.accuracy, loop.accuracy)
        assert (fast.best_beta, fast.best_alpha) == (loop.best_beta, loop.best_alpha)


def test_both_block_layouts_give_the_same_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows innermost (few classes) and classes innermost (many) add the same class sums in
    # the same order of keys; in float64 no logits of these problems come within rounding
    # of each other, so the two grids are equal.
    data = problem(4, noise=3.0, num_classes=6, shots=5, val_per_class=8)
    args = [t.double() if t.is_floating_point() else t for t in _args(data)]
    grid = default_search_grid(beta_steps=25, alpha_steps=9)
    monkeypatch.setattr(ta.search, "_FEW_CLASSES", 10**6)
    rows_inner = search_hparams(*args, *grid)
    monkeypatch.setattr(ta.search, "_FEW_CLASSES", 0)
    classes_inner = search_hparams(*args, *grid)
    assert torch.equal(rows_inner.accuracy, classes_inner.accuracy)
    assert ta.search._FEW_CLASSES == 0 and rows_inner.accuracy.std() > 0  # a grid that varies
