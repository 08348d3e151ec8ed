"""Contrastive pretraining of ``shapeworld-tiny`` on ShapeWorld captions.

The standard CLIP objective, a symmetric cross-entropy over the image-text
similarity matrix of a batch, with one change that matters in a small world:
captions that are *identical* in a batch (``"a red circle"`` appears often) are
treated as positives of each other's images instead of negatives.  The target of
row ``i`` is uniform over all ``j`` whose caption equals caption ``i``.

Every batch is generated from ``(seed, step)`` alone, so a resumed run sees
exactly the batches the uninterrupted run would have seen.

Run ``fewclip pretrain --help`` (or ``python -m fewclip_tutorial.pretrain``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fewclip_tutorial.data import shapeworld as sw
from fewclip_tutorial.zeroshot import prompt_ensemble

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_NAME = "shapeworld-tiny"
MODEL_CONFIG = ASSETS / f"{MODEL_NAME}.json"
#: Logs and configs of the earlier pretraining attempts the appendix compares (shipped in the
#: package so the appendix runs anywhere, Colab included): ``<stem>.log.jsonl`` and ``<stem>.config.json``.
ATTEMPTS = ASSETS / "pretrain_attempts"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PretrainConfig:
    """Everything that determines a pretraining run."""

    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    seed: int = 0
    image_size: int = 32
    domain_probs: dict[str, float] = field(
        # photos dominate, as on the web; the shifted domains are rarer, blueprints almost absent
        default_factory=lambda: {
            "photo": 0.905,
            "painting": 0.04,
            "cartoon": 0.03,
            "sketch": 0.02,
            "blueprint": 0.005,
        }
    )
    eval_every: int = 200
    checkpoint_every: int = 200
    eval_per_class: int = 20


def register_model_config() -> None:
    """Register ``shapeworld-tiny`` with open_clip (idempotent)."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(str(MODEL_CONFIG))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float, normalised with CLIP's mean and std.

    Equal to open_clip's eval preprocess for images already at the model's size.
    """
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def make_batch(
    cfg: PretrainConfig, step: int, tokenizer
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The batch of ``step``: images ``(B, 3, H, W)``, tokens ``(B, L)`` and captions."""
    rng = np.random.default_rng([cfg.seed, step, 7])
    domains = list(cfg.domain_probs)
    f = sw.sample_factors(
        cfg.batch_size, rng, image_types=domains, image_type_probs=list(cfg.domain_probs.values())
    )
    images = sw.render(f, cfg.image_size)
    caps = sw.captions(f, rng)
    return to_tensor(images), tokenizer(caps), caps


def caption_targets(tokens: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Soft targets of the contrastive loss, with identical captions as positives.

    Args:
        tokens: ``(B, L)`` caption token ids; two equal rows are the same caption.
        dtype: of the targets (default float32).

    Returns:
        ``(B, B)`` float ``P[i, j] = 1[c_i == c_j] / #{k : c_k == c_i}``: each row sums to 1,
        ``P`` is symmetric, and it is the identity when all captions differ.
    """
    if tokens.ndim != 2:
        raise ValueError(
            f"tokens must be (B, L) token ids, one row per caption; got shape {tuple(tokens.shape)}."
        )
    same = (tokens[:, None, :] == tokens[None, :, :]).all(-1).to(dtype or torch.float32)
    return same / same.sum(1, keepdim=True)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    tokens: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric CLIP loss with identical captions as positives.

    Args:
        image_features: ``(B, D)`` L2-normalised.
        text_features: ``(B, D)`` L2-normalised.
        tokens: ``(B, L)`` caption token ids; equal rows are positives of each other.
        logit_scale: scalar, ``exp`` of the learnt log-scale.

    Returns:
        ``0.5 * (CE(image -> text) + CE(text -> image))`` with soft targets
        ``P[i, j] = 1[c_i == c_j] / #{k : c_k == c_i}``.
    """
    logits = logit_scale * image_features @ text_features.T
    # float32 targets (float64 ones for float64 features, as in equivalence tests)
    targets = caption_targets(tokens, torch.float64 if logits.dtype == torch.float64 else None)
    loss_i = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t = torch.sum(-targets * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def lr_at(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@torch.inference_mode()
def _task_classifier(model, tokenizer, task: sw.Task) -> torch.Tensor:
    """``(C, D)`` prompt-ensemble classifier of ``task`` (its class names and templates)."""
    prompts = [tp.format(c) for c in task.classnames for tp in task.templates]
    text = model.encode_text(tokenizer(prompts)).view(len(task.classnames), len(task.templates), -1)
    return prompt_ensemble(text)


@torch.inference_mode()
def _task_accuracy(model, W, task: sw.Task, domain: str, n: int, image_size: int, rng) -> float:
    """Zero-shot accuracy (%) of classifier ``W`` on ``n`` fresh images per class in ``domain``."""
    labels = np.repeat(np.arange(len(task.classnames)), n)
    f = sw.task_factors(task, labels, rng, [domain])
    feats = F.normalize(model.encode_image(to_tensor(sw.render(f, image_size))), dim=-1)
    pred = (feats @ W.T).argmax(1).numpy()
    return float((pred == labels).mean() * 100)


@torch.inference_mode()
def evaluate_zero_shot(model, tokenizer, cfg: PretrainConfig) -> dict:
    """Zero-shot accuracy (%) on fixed evaluation sets (seed 12345).

    Returns the main target (``shapeworld``) per rendering domain, and under ``"tasks"``
    every benchmark of :data:`~fewclip_tutorial.data.shapeworld.TASKS` on its own domain.
    """
    model.eval()
    rng = np.random.default_rng(12345)
    W = {name: _task_classifier(model, tokenizer, t) for name, t in sw.TASKS.items()}
    main = sw.TASKS["shapeworld"]
    n, size = cfg.eval_per_class, cfg.image_size
    out: dict = {
        d: _task_accuracy(model, W["shapeworld"], main, d, n, size, rng) for d in sw.IMAGE_TYPES
    }
    out["tasks"] = {
        name: _task_accuracy(model, W[name], t, t.train_domains[0], n, size, rng)
        for name, t in sw.TASKS.items()
    }
    model.train()
    return out


def save_checkpoint(path: Path, model, opts, step: int, cfg: PretrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    opt, opt_emb = opts
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "opt_emb": opt_emb.state_dict(),
        "step": step,
        "config": asdict(cfg),
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def export_checkpoint(ckpt_path: Path, out_dir: Path = ASSETS, metrics: dict | None = None) -> Path:
    """Write the shipped fp16 weights and their training record (config + sha256)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    weights = out_dir / f"{MODEL_NAME}.pt"
    tmp = weights.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    record = {
        "model": MODEL_NAME,
        "weights": weights.name,
        "sha256": sha,
        "dtype": "float16",
        "step": ckpt["step"],
        "config": ckpt["config"],
        "metrics": metrics or {},
        "command": "fewclip pretrain --out runs/pretrain && fewclip pretrain --export runs/pretrain/last.pt",
    }
    (out_dir / f"{MODEL_NAME}.train.json").write_text(json.dumps(record, indent=2) + "\n")
    log = Path(ckpt_path).parent / "log.jsonl"
    if log.exists():  # the training curves, shown in the book's appendix
        (out_dir / f"{MODEL_NAME}.log.jsonl").write_text(log.read_text())
    return weights


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    max_steps: int | None = None,
    threads: int | None = None,
) -> dict:
    """Train (or resume) ``shapeworld-tiny``; returns the final log record.

    Writes ``out_dir/last.pt`` every ``checkpoint_every`` steps and a JSON-lines
    log ``out_dir/log.jsonl`` with loss, learning rate, logit scale and the
    per-domain zero-shot accuracy every ``eval_every`` steps.  ``max_steps`` stops
    early (the schedule still follows ``cfg.steps``), which is how the tests run a
    few steps and resume.
    """
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    register_model_config()
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(MODEL_NAME)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    # The 49,408-row token embedding gets sparse gradients and SparseAdam: a batch uses a few
    # hundred token ids, so a dense AdamW step over all rows would cost a third of each step.
    model.token_embedding.sparse = True
    params = [(n, p) for n, p in model.named_parameters() if n != "token_embedding.weight"]
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    opt_emb = torch.optim.SparseAdam(
        [model.token_embedding.weight], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    dense_params = decay + no_decay
    start = 0
    last = out_dir / "last.pt"
    if resume and last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        if ckpt["config"] != asdict(cfg):
            raise ValueError(
                f"{last} was written with a different configuration; use a new --out "
                "directory or pass the same settings to resume."
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        opt_emb.load_state_dict(ckpt["opt_emb"])
        start = ckpt["step"]
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
    model.train()
    record: dict = {}
    log = open(out_dir / "log.jsonl", "a")
    bar = tqdm(
        range(start, end), initial=start, total=cfg.steps, disable=not progress, desc="pretrain"
    )
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups + opt_emb.param_groups:
            g["lr"] = lr_at(cfg, step)
        images, tokens, _ = make_batch(cfg, step, tokenizer)
        img_f, txt_f, scale = model(images, tokens)
        loss = contrastive_loss(img_f, txt_f, tokens, scale)
        opt.zero_grad(set_to_none=True)
        opt_emb.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense_params, 1.0)
        opt.step()
        opt_emb.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        record = {
            "step": step + 1,
            "loss": round(loss.item(), 4),
            "lr": lr_at(cfg, step),
            "logit_scale": round(float(scale.item()), 3),
            "seconds": round(time.time() - t0, 1),
        }
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record["zero_shot"] = evaluate_zero_shot(model, tokenizer, cfg)
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if done % cfg.checkpoint_every == 0 or done == end:
            save_checkpoint(last, model, (opt, opt_emb), done, cfg)
    log.close()
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fewclip pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/pretrain", help="run directory (checkpoints and log)")
    p.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr)
    p.add_argument("--seed", type=int, default=PretrainConfig.seed)
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (resume later)"
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start from scratch even if a checkpoint exists"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--export", metavar="CKPT", help="export CKPT as the shipped fp16 weights and exit"
    )
    a = p.parse_args(argv)
    if a.export:
        w = export_checkpoint(Path(a.export))
        print(f"wrote {w} ({w.stat().st_size / 1e6:.1f} MB)")
        return 0
    cfg = PretrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    rec = pretrain(
        cfg,
        a.out,
        resume=not a.no_resume,
        progress=not a.no_progress,
        max_steps=a.max_steps,
        threads=a.threads,
    )
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
