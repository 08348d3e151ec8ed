"""Pretraining of shapeworld-tiny: the loss, a short run, exact resume, export."""

from __future__ import annotations

import hashlib
import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fewclip_tutorial import pretrain


def test_contrastive_loss_matches_clip_loss_when_captions_are_distinct():
    g = torch.Generator().manual_seed(0)
    f64 = {"generator": g, "dtype": torch.float64}  # float64: the two differ by rounding only
    a = F.normalize(torch.randn(5, 8, **f64), dim=-1)
    b = F.normalize(torch.randn(5, 8, **f64), dim=-1)
    tokens = torch.arange(5).view(5, 1)
    logits = 7.0 * a @ b.T
    expected = 0.5 * (
        F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))
    )
    got = pretrain.contrastive_loss(a, b, tokens, torch.tensor(7.0, dtype=torch.float64))
    # float64: logits <= 7, log-softmax over 5 and means: < 100 * 1.1e-16 * 7, < 1e-12
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_identical_captions_are_positives_not_negatives():
    # two images with the same caption, and text features equal to the image features:
    # with duplicates as positives the soft target is 1/2 on each copy, by hand.
    a = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), -1)
    tokens = torch.tensor([[3, 4], [3, 4], [5, 6]])
    s = torch.tensor(5.0, dtype=torch.float64)
    logits = s * a @ a.T
    logp = F.log_softmax(logits, dim=1)
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=a.dtype)
    by_hand = -(target * logp).sum(1).mean()  # symmetric: logits.T == logits here
    # float64: a few roundings of 1.1e-16 on values <= 5
    got = pretrain.contrastive_loss(a, a, tokens, s)
    torch.testing.assert_close(got, by_hand, atol=1e-12, rtol=0)


def test_batches_depend_only_on_seed_and_step():
    cfg = pretrain.PretrainConfig(batch_size=8)
    tok = open_clip.get_tokenizer("ViT-B-32")
    x1, t1, c1 = pretrain.make_batch(cfg, 5, tok)
    x2, t2, c2 = pretrain.make_batch(cfg, 5, tok)
    x3, _, _ = pretrain.make_batch(cfg, 6, tok)
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and c1 == c2
    assert not torch.equal(x1, x3)


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    cfg = pretrain.PretrainConfig(
        steps=6, batch_size=64, lr=5e-4, warmup=2, eval_every=1000, checkpoint_every=3
    )
    full = tmp_path_factory.mktemp("full")
    pretrain.pretrain(cfg, full, progress=False, threads=1)
    split = tmp_path_factory.mktemp("split")
    pretrain.pretrain(cfg, split, progress=False, max_steps=3, threads=1)
    first_half = torch.load(split / "last.pt", weights_only=False)["step"]
    pretrain.pretrain(cfg, split, progress=False, threads=1)  # resumes from step 3
    return cfg, full, split, first_half


def test_short_run_lowers_the_loss(short_runs):
    # the loss on a fixed batch (the first one) before and after six steps
    cfg, full, _, _ = short_runs
    losses = [json.loads(line)["loss"] for line in (full / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6
    pretrain.register_model_config()
    tok = open_clip.get_tokenizer(pretrain.MODEL_NAME)
    images, tokens, _ = pretrain.make_batch(cfg, 0, tok)
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(pretrain.MODEL_NAME).eval()

    def loss_now() -> float:
        with torch.no_grad():
            a, b, s = model(images, tokens)
            return float(pretrain.contrastive_loss(a, b, tokens, s))

    before = loss_now()
    model.load_state_dict(torch.load(full / "last.pt", weights_only=False)["model"])
    assert loss_now() < before


def test_resume_reproduces_the_uninterrupted_run(short_runs):
    _, full, split, first_half = short_runs
    assert first_half == 3
    a = torch.load(full / "last.pt", weights_only=False)
    b = torch.load(split / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        # the same operations on the same machine, the state restored bit for bit: exact
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_refuses_a_different_configuration(short_runs):
    cfg, _, split, _ = short_runs
    other = pretrain.PretrainConfig(**{**cfg.__dict__, "lr": 1e-4})
    with pytest.raises(ValueError, match="different configuration"):
        pretrain.pretrain(other, split, progress=False, threads=1)


def test_export_writes_fp16_weights_with_their_hash(short_runs, tmp_path):
    _, full, _, _ = short_runs
    weights = pretrain.export_checkpoint(full / "last.pt", out_dir=tmp_path)
    record = json.loads((tmp_path / "shapeworld-tiny.train.json").read_text())
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    state = torch.load(weights, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert (tmp_path / "shapeworld-tiny.log.jsonl").exists()


def test_caption_targets_by_hand():
    # captions 0 and 2 are equal, 1 and 3 differ only in their last token
    tokens = torch.tensor([[49406, 5, 49407], [49406, 6, 7], [49406, 5, 49407], [49406, 6, 8]])
    expected = torch.tensor(
        [
            [0.5, 0.0, 0.5, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.5, 0.0, 0.5, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    assert torch.equal(pretrain.caption_targets(tokens), expected)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        pretrain.caption_targets(tokens[0])


def test_contrastive_loss_against_a_loop_over_pairs():
    # the soft-target cross-entropy written out term by term, with repeated captions
    g = torch.Generator().manual_seed(3)
    f64 = {"generator": g, "dtype": torch.float64}  # float64, as the Python loop
    a = F.normalize(torch.randn(5, 6, **f64), dim=-1)
    b = F.normalize(torch.randn(5, 6, **f64), dim=-1)
    captions = [1, 2, 1, 3, 1]
    tokens = torch.tensor(captions).view(5, 1)
    s = 12.5
    total = 0.0
    for i in range(5):
        positives = [j for j in range(5) if captions[j] == captions[i]]
        row_i = [math.exp(s * float(a[i] @ b[j])) for j in range(5)]
        row_t = [math.exp(s * float(b[i] @ a[j])) for j in range(5)]
        for j in positives:
            total -= math.log(row_i[j] / sum(row_i)) / len(positives)
            total -= math.log(row_t[j] / sum(row_t)) / len(positives)
    by_hand = total / (2 * 5)
    got = pretrain.contrastive_loss(a, b, tokens, torch.tensor(s, dtype=torch.float64))
    # float64: logits <= 12.5, sums of 5 exps: < 100 * 1.1e-16 * 12.5, < 1e-12
    assert float(got) == pytest.approx(by_hand, abs=1e-12)


def test_appendix_exercises_accept_rewrites_and_reject_the_plain_clip_loss(capsys):
    from fewclip_tutorial.course.exercises import get_exercise

    def student_targets(tokens):
        n = tokens.shape[0]
        same = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                same[i, j] = float(torch.equal(tokens[i], tokens[j]))
        return same / same.sum(1, keepdim=True)

    def plain_clip_loss(image_features, text_features, tokens, logit_scale):
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(len(logits))
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    def first_token_only(tokens):
        same = (tokens[:, None, 0] == tokens[None, :, 0]).float()
        return same / same.sum(1, keepdim=True)

    targets = get_exercise("pretrain_caption_targets")
    loss = get_exercise("pretrain_contrastive_loss")
    assert targets.check(pretrain.caption_targets, verbose=False)
    assert targets.check(student_targets, verbose=False)
    assert loss.check(pretrain.contrastive_loss, verbose=False)
    assert not targets.check(first_token_only, verbose=False)
    assert not loss.check(plain_clip_loss)
    assert "values differ" in capsys.readouterr().out
