"""The one training loop every trained method goes through.

A method supplies what is particular to it: the modules whose weights are trained
(and selected), an optimiser over their parameters, a loss for one optimiser step and
a validation score.  :func:`fit` owns everything else, so every method behaves the
same way:

* the learning-rate schedule (``"constant"`` or linear warm-up then ``"cosine"`` to 0,
  applied per optimiser step);
* evaluation at step 0 (the starting state) and every ``eval_every`` steps and at the end;
* the best state: the starting state is always a candidate, a later state replaces it
  only when its score is strictly higher (scores may be tuples, compared
  lexicographically, e.g. ``(accuracy, -loss)``), and the best state is restored;
* early stopping after ``patience`` evaluations without improvement;
* mixed precision on CUDA (autocast around the step's loss, and a ``GradScaler`` when
  the autocast dtype is fp16); nothing on CPU, so CPU runs stay bit-exact;
* a tqdm progress bar (which, when patience ends training, says so in one line on stderr)
  and one history format (:class:`FitResult`).

This follows open_clip's split between a task (the loss) and the shared loop
(``open_clip_train/train.py``).

Examples:
    >>> import torch
    >>> w = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(w.parameters(), lr=0.1)
    >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
    >>> res = fit(w, lambda step: ((w(x) - y) ** 2).mean(), steps=5, optimizer=opt)
    >>> res.best_step, len(res.history["loss"])
    (5, 5)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fewclip_tutorial.device import autocast, autocast_dtype

__all__ = ["FitResult", "Score", "fit", "schedule_factor", "snapshot", "restore"]

#: A validation score: higher is better; tuples compare lexicographically.
Score = float | tuple[float, ...]
Schedule = Literal["constant", "cosine"]


def schedule_factor(step: int, total: int, schedule: Schedule = "cosine", warmup: int = 0) -> float:
    """Learning-rate factor for the update with 0-based index ``step`` of ``total``.

    Warm-up: ``(step + 1) / warmup`` for ``step < warmup``.  Then ``"constant"`` gives 1
    and ``"cosine"`` gives ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``,
    which is ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total)`` in closed form
    when ``warmup = 0`` (the schedule of Tip-Adapter-F and of cross-modal adaptation).
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule={schedule!r}: use 'constant' or 'cosine'.")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _as_modules(modules: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [modules] if isinstance(modules, nn.Module) else list(modules)


def snapshot(modules: nn.Module | Sequence[nn.Module]) -> list[dict[str, Tensor]]:
    """Detached copies of the modules' state dicts (parameters and buffers)."""
    return [
        {k: v.detach().clone() for k, v in m.state_dict().items()} for m in _as_modules(modules)
    ]


def restore(modules: nn.Module | Sequence[nn.Module], state: list[dict[str, Tensor]]) -> None:
    """Load a :func:`snapshot` back into the same modules."""
    for m, s in zip(_as_modules(modules), state, strict=True):
        m.load_state_dict(s)


@dataclass
class FitResult:
    """What :func:`fit` reports, the same for every method.

    Attributes:
        best_step: the optimiser step whose state was kept (0: the starting state).
        best_score: its validation score (``None`` without ``evaluate``).
        steps_run: optimiser steps taken (fewer than asked when patience stopped it).
        stopped_early: whether patience ended training.
        history: ``"step"``, ``"loss"``, ``"lr"`` per step (plus ``"train_<name>"`` for
            extra terms the step returned), and ``"val_step"``, ``"val_score"`` per
            evaluation (plus ``"val_<name>"`` for extra metrics the evaluation returned).
    """

    best_step: int
    best_score: Score | None
    steps_run: int
    stopped_early: bool
    history: dict[str, list] = field(default_factory=dict)


def _split(value: object, key: str, what: str) -> tuple[object, dict[str, float]]:
    if isinstance(value, Mapping):
        if key not in value:
            raise ValueError(f"{what} returned a mapping without the key {key!r}: {sorted(value)}.")
        extras = {k: float(v) for k, v in value.items() if k != key}
        return value[key], extras
    return value, {}


def _append(history: dict[str, list], prefix: str, extras: dict[str, float]) -> None:
    for k, v in extras.items():
        history.setdefault(f"{prefix}{k}", []).append(v)


def _global_mean(value: Tensor) -> float:
    """The mean of a per-rank scalar over the ranks (the value itself in one process)."""
    from fewclip_tutorial.distributed import dist_info

    info = dist_info()
    if info.enabled:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return float(value)


def fit(
    modules: nn.Module | Sequence[nn.Module],
    step_loss: Callable[[int], Tensor | Mapping[str, Tensor]],
    *,
    steps: int,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule = "constant",
    warmup: int = 0,
    evaluate: Callable[[], Score | Mapping[str, float]] | None = None,
    eval_every: int = 1,
    patience: int | None = None,
    select_best: bool = True,
    device: torch.device | str = "cpu",
    amp: bool | None = None,
    progress: bool = False,
    desc: str = "train",
) -> FitResult:
    """Train ``modules`` for ``steps`` optimiser steps and keep the best validated state.

    Args:
        modules: the module(s) whose state is selected and restored (every trained
            parameter must belong to one of them).
        step_loss: ``step -> loss`` for the 1-based optimiser step ``step``; the method
            draws its own batch.  May return a mapping with ``"loss"`` and extra scalar
            terms to log (``history["train_<name>"]``).
        steps: number of optimiser steps (0: evaluate the starting state only).
        optimizer: over the trainable parameters; its ``lr`` is the base rate.
        schedule, warmup: see :func:`schedule_factor`.
        evaluate: ``() -> score`` on the validation split, higher is better (a float or
            a tuple); or a mapping with ``"score"`` and extra metrics to log.  Called in
            ``torch.no_grad()`` with the modules in eval mode.  Never pass a test score.
        eval_every: evaluate every this many steps (and after the last one).
        patience: stop after this many evaluations without improvement (None: never).
        select_best: restore the best state (the default); ``False`` keeps the last.
        device: where the step runs; CUDA turns on mixed precision unless ``amp=False``.
        amp: force mixed precision on/off (default: on for CUDA).  On CPU, ``amp=True``
            autocasts to bfloat16 (used in tests to simulate the GPU path).
        progress, desc: tqdm bar (rank 0 only under torchrun).

    Under ``torchrun`` the method wraps its trainable module in ``DistributedDataParallel``
    (:func:`fewclip_tutorial.distributed.wrap_ddp`) and passes the *unwrapped* module here;
    every rank evaluates the same synchronised weights, so all ranks select the same step.

    Returns:
        :class:`FitResult`.  The modules are left in eval mode holding the kept state.
    """
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0.")
    if eval_every < 1:
        raise ValueError(f"eval_every={eval_every} must be >= 1.")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0.")
    if patience is not None and patience < 1:
        raise ValueError(f"patience={patience} must be >= 1 or None.")
    mods = _as_modules(modules)
    device = torch.device(device)
    use_amp = device.type == "cuda" if amp is None else bool(amp)
    if use_amp and device.type == "cuda":
        amp_dtype = autocast_dtype(device)
    else:
        amp_dtype = torch.bfloat16 if use_amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def set_lr(step0: int) -> float:
        factor = schedule_factor(step0, steps, schedule, warmup)
        for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = base * factor
        return optimizer.param_groups[0]["lr"]

    def amp_context():
        if not use_amp:
            return autocast(device, enabled=False)
        if device.type == "cuda":
            return autocast(device)
        return torch.autocast(device.type, dtype=amp_dtype)

    history: dict[str, list] = {"step": [], "loss": [], "lr": [], "val_step": [], "val_score": []}
    best_state = snapshot(mods) if evaluate is not None and select_best else None
    best_step, best_score, bad = 0, None, 0

    def run_eval(step: int) -> bool:
        """Evaluate; return True when patience says stop."""
        nonlocal best_state, best_step, best_score, bad
        for m in mods:
            m.eval()
        with torch.no_grad():
            score, extras = _split(evaluate(), "score", "evaluate")
        score = tuple(float(s) for s in score) if isinstance(score, tuple) else float(score)
        history["val_step"].append(step)
        history["val_score"].append(score)
        _append(history, "val_", extras)
        if best_score is None or score > best_score:
            best_step, best_score, bad = step, score, 0
            if select_best:
                best_state = snapshot(mods)
        else:
            bad += 1
        return patience is not None and bad >= patience

    if evaluate is not None:
        run_eval(0)
    stopped = False
    from fewclip_tutorial.distributed import dist_info

    show = progress and dist_info().is_main  # under torchrun, rank 0 alone draws the bar
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not show, leave=False)
    for step in bar:
        for m in mods:
            m.train()
        lr_now = set_lr(step - 1)
        with amp_context():
            loss, extras = _split(step_loss(step), "loss", "step_loss")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss.float()).backward()
        scaler.step(optimizer)
        scaler.update()
        history["step"].append(step)
        history["loss"].append(_global_mean(loss.detach().double()))  # exact for fp16/32 losses
        history["lr"].append(lr_now)
        _append(history, "train_", extras)
        if show:
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
        if evaluate is not None and (step % eval_every == 0 or step == steps):
            if run_eval(step):
                stopped = True
                if show:  # say why the bar ends short of `steps` (it is cleared on close)
                    bar.set_description(f"{desc} (stopped early)")
                    tqdm.write(
                        f"{desc}: stopped early at step {step} of {steps}: no validation gain "
                        f"in {patience} evaluations (best: step {best_step})",
                        file=sys.stderr,
                    )
                break
    steps_run = len(history["step"])
    if evaluate is None:
        best_step = steps_run
    elif select_best:
        restore(mods, best_state)
    else:
        best_step, best_score = history["val_step"][-1], history["val_score"][-1]
    for m in mods:
        m.eval()
    return FitResult(
        best_step=best_step,
        best_score=best_score,
        steps_run=steps_run,
        stopped_early=stopped,
        history=history,
    )
