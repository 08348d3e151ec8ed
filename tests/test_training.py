"""The shared training loop: selection, schedules, patience and mixed precision."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from fewclip_tutorial.training import fit, schedule_factor


def _regression(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 1)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    return model, x, y


def test_keeps_the_start_when_no_step_improves_validation():
    model, x, y = _regression()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # validation rewards closeness to the starting weights: every step makes it worse
    res = fit(
        model,
        lambda s: ((model(x) - y) ** 2).mean(),
        steps=6,
        optimizer=opt,
        evaluate=lambda: (
            -float(sum((p - start[k]).abs().sum() for k, p in model.named_parameters()))
        ),
    )
    assert res.best_step == 0
    assert res.history["val_step"] == [0, 1, 2, 3, 4, 5, 6]
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k])


def test_restores_the_best_and_first_best_wins_on_ties():
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scores = iter([0.0, 1.0, 3.0, 3.0, 2.0])
    states = []

    def evaluate():
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    res = fit(
        model, lambda s: ((model(x) - y) ** 2).mean(), steps=4, optimizer=opt, evaluate=evaluate
    )
    assert res.best_step == 2 and res.best_score == 3.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[2][k])


def test_tuple_scores_break_accuracy_ties_by_the_second_entry():
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scores = iter([(50.0, -2.0), (50.0, -1.0), (50.0, -1.5)])
    res = fit(
        model,
        lambda s: ((model(x) - y) ** 2).mean(),
        steps=2,
        optimizer=opt,
        evaluate=lambda: next(scores),
    )
    assert res.best_step == 1


def test_patience_stops_and_the_last_step_is_always_evaluated():
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    res = fit(
        model,
        lambda s: ((model(x) - y) ** 2).mean(),
        steps=100,
        optimizer=opt,
        evaluate=lambda: 1.0,
        eval_every=10,
        patience=2,
    )
    assert res.stopped_early and res.steps_run == 20 and res.best_step == 0
    res = fit(
        model,
        lambda s: ((model(x) - y) ** 2).mean(),
        steps=7,
        optimizer=opt,
        evaluate=lambda: 0.0,
        eval_every=5,
    )
    assert res.history["val_step"] == [0, 5, 7]


def test_cosine_schedule_equals_torch_cosine_annealing():
    model, _, _ = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=9)
    expected = []
    for _ in range(9):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    model2, x, y = _regression()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.3)
    res = fit(
        model2, lambda s: ((model2(x) - y) ** 2).mean(), steps=9, optimizer=opt2, schedule="cosine"
    )
    # Python floats (float64) on both sides: the recursive CosineAnnealingLR and the closed
    # form differ by a few roundings of values <= 0.3 per step, far below 1e-12
    assert res.history["lr"] == pytest.approx(expected, rel=0, abs=1e-12)


def test_warmup_is_linear_then_cosine_reaches_zero():
    assert [schedule_factor(s, 10, "cosine", warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule_factor(10, 10, "cosine", warmup=4) == pytest.approx(0.0)
    assert schedule_factor(7, 10, "cosine", 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule_factor(7, 10, "constant", 4) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        schedule_factor(0, 1, "linear")


def test_without_evaluate_the_last_state_is_kept():
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    res = fit(model, lambda s: ((model(x) - y) ** 2).mean(), steps=3, optimizer=opt)
    assert res.best_step == 3 and res.best_score is None


def test_extra_terms_are_logged_with_prefixes():
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(s):
        mse = ((model(x) - y) ** 2).mean()
        return {"loss": mse, "mse": mse.detach()}

    res = fit(model, step, steps=2, optimizer=opt, evaluate=lambda: {"score": 1.0, "kl": 0.5})
    assert res.history["train_mse"] == pytest.approx(res.history["loss"])
    assert res.history["val_kl"] == [0.5, 0.5, 0.5]


def test_amp_simulated_on_cpu_runs_the_step_in_bfloat16():
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtypes = []

    def step(s):
        out = model(x)
        dtypes.append(out.dtype)
        return ((out.float() - y) ** 2).mean()

    fit(model, step, steps=2, optimizer=opt, amp=True)
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert model.weight.dtype == torch.float32
    dtypes.clear()
    fit(model, step, steps=1, optimizer=opt)  # CPU default: no autocast, exact fp32
    assert dtypes == [torch.float32]


@pytest.mark.parametrize("kw", [{"steps": -1}, {"eval_every": 0}, {"warmup": -1}, {"patience": 0}])
def test_bad_arguments_name_the_problem(kw):
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    args = {"steps": 1} | kw
    with pytest.raises(ValueError, match=next(iter(kw))):
        fit(model, lambda s: ((model(x) - y) ** 2).mean(), optimizer=opt, **args)


def _stopping_fit(progress: bool, patience: int | None = 2, steps: int = 10):
    model, x, y = _regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return fit(
        model,
        lambda s: ((model(x) - y) ** 2).mean(),
        steps=steps,
        optimizer=opt,
        evaluate=lambda: 0.0,  # never improves on the starting state: patience stops it
        patience=patience,
        progress=progress,
        desc="probe",
    )


def test_progress_bar_says_why_patience_ended_training(capsys: pytest.CaptureFixture[str]):
    res = _stopping_fit(progress=True)
    assert res.stopped_early and res.steps_run == 2
    err = capsys.readouterr().err
    lines = [line.strip() for line in re.split(r"[\r\n]", err)]
    expected = "probe: stopped early at step 2 of 10: no validation gain in 2 evaluations"
    assert f"{expected} (best: step 0)" in lines  # a line of its own, left after the bar
    assert any(line.startswith("probe (stopped early):") for line in lines)  # the bar itself


def test_no_early_stop_line_without_a_bar_or_an_early_stop(capsys: pytest.CaptureFixture[str]):
    assert _stopping_fit(progress=False).stopped_early
    assert "stopped early" not in capsys.readouterr().err
    res = _stopping_fit(progress=True, patience=None, steps=3)
    assert not res.stopped_early and res.steps_run == 3
    assert "stopped early" not in capsys.readouterr().err
