"""The checks every registered method goes through (as PEFT's common tester does).

For each method of :data:`fewclip_tutorial.methods.registry.METHODS`:

* its options are derived from its config dataclass: same names, order, types, defaults,
  help and choices (so the command line, ``run_method`` and the runner agree);
* a run on a toy episode returns the JSON keys of its result (the episode header, the
  accuracies, and the method's own keys), and the result is JSON-serialisable;
* a trained method keeps its starting state when no step improves (learning rate 0);
* a bad option value, or an unknown option, is rejected with a clear error, both through
  ``run_method`` and by the runner called directly.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing

import pytest
from fixtures_data import make_spec

from fewclip_tutorial.backbones import load_backbone
from fewclip_tutorial.episode import build_context
from fewclip_tutorial.methods.registry import (
    METHODS,
    config_options,
    flat_values,
    get_method,
    run_method,
)

pytestmark = pytest.mark.filterwarnings("ignore:no batch size in:UserWarning")

BUILTIN = (
    "zero-shot",
    "linear-probe",
    "tip-adapter",
    "tip-adapter-f",
    "cross-modal",
    "fd-align",
    "clap",
)

HEADER = {
    "method", "dataset", "backbone", "shots", "seed", "config", "val_accuracy", "test_accuracy",
}  # fmt: skip

#: The method's own keys of its result (besides the header and the accuracies).
KEYS: dict[str, set[str]] = {
    "zero-shot": {"per_class_accuracy", "templates"},
    "linear-probe": {"C", "C_search", "protocol"},
    "tip-adapter": {
        "alpha", "beta", "cache_size", "logit_scale", "selection_val_accuracy", "views",
        "zero_shot_val_accuracy",
    },
    "tip-adapter-f": {
        "alpha", "beta", "best_step", "cache_size", "history", "logit_scale",
        "selection_val_accuracy", "steps", "train_alpha", "train_beta",
        "training_free_val_accuracy", "views", "zero_shot_val_accuracy",
    },
    "cross-modal": {
        "best_step", "final_train_loss", "flip", "grid", "history", "hparams", "modality",
        "selection_val_accuracy", "templates", "variant",
    },
    "fd-align": {
        "best_epoch", "history", "kept_original", "logit_scale", "n_spurious_prototypes",
        "n_templates", "removed_templates", "start",
    },
    "clap": {
        "best_step", "final_train_loss", "history", "lam", "lam_val_accuracy", "residual_norm",
        "steps_run", "variant", "zero_shot_by_prompt",
    },
}  # fmt: skip

#: Cheap options for a run on the toy episode.
CHEAP: dict[str, dict[str, typing.Any]] = {
    "zero-shot": {},
    "linear-probe": {},
    "tip-adapter": {"views": 2, "beta_steps": 5, "alpha_steps": 3},
    "tip-adapter-f": {"views": 2, "beta_steps": 5, "alpha_steps": 3, "epochs": 1, "min_steps": 2},
    "cross-modal": {"iters": 2, "grid": "small"},
    "fd-align": {"epochs": 1, "blocks": 0, "batch_size": 4, "templates": "dataset", "spc": False},
    "clap": {"steps": 2, "eval_every": 1, "hidden": 8},
}

#: Options under which no training step can improve, and the key that says what was kept.
STILL: dict[str, tuple[dict[str, typing.Any], str]] = {
    "tip-adapter-f": ({"lr": 0.0}, "best_step"),
    "cross-modal": ({"iters": 0}, "best_step"),
    "fd-align": ({"lr": 0.0}, "best_epoch"),
    "clap": ({"lr": 0.0}, "best_step"),
}


@pytest.fixture(scope="module")
def ctx():
    bb = load_backbone("shapeworld-tiny", pretrained=None, device="cpu")
    spec = make_spec([5, 5, 5])
    return build_context(spec, bb, shots=2, seed=1, cache_dir=None, progress=False, device="cpu")


def test_every_builtin_method_is_registered_with_a_config() -> None:
    assert set(BUILTIN) <= set(METHODS)
    for name in BUILTIN:
        spec = get_method(name)
        assert spec.config is not None, name
        assert dataclasses.is_dataclass(spec.config) and spec.config.__dataclass_params__.frozen
        assert set(KEYS) == set(BUILTIN) == set(CHEAP)


@pytest.mark.parametrize("name", BUILTIN)
def test_registered_options_are_the_config_fields(name: str) -> None:
    spec = get_method(name)
    assert spec.options == config_options(spec.config)
    defaults = flat_values(spec.config())
    assert list(spec.options) == list(defaults)  # same names, same order
    assert {k: o.default for k, o in spec.options.items()} == defaults
    for opt_name, opt in spec.options.items():
        assert opt.help, f"{name}: option {opt_name} has no help"
        assert opt.type in (int, float, str, bool)
        assert opt.default is None or opt.coerce(opt_name, opt.default) == opt.default
        if opt.choices is not None:
            assert opt.default in opt.choices
    params = inspect.signature(spec.fn).parameters
    assert list(params)[:2] == ["ctx", "config"], name


def _flatten(config: dict[str, typing.Any]) -> dict[str, typing.Any]:
    out: dict[str, typing.Any] = {}
    for key, value in config.items():
        out.update(_flatten(value) if isinstance(value, dict) else {key: value})
    return out


@pytest.mark.parametrize("name", BUILTIN)
def test_json_keys(ctx, name: str) -> None:
    out = run_method(name, context=ctx, progress=False, **CHEAP[name])
    assert HEADER | {"ood_accuracy"} | KEYS[name] <= set(out), name
    assert (out["method"], out["shots"], out["seed"]) == (name, 2, 1)
    assert set(out["ood_accuracy"]) == {"sketch"}
    json.dumps(out, default=str)  # the CLI's --json
    # the configuration that ran: every option, given or default
    spec = get_method(name)
    want = {k: opt.default for k, opt in spec.options.items()} | CHEAP[name]
    assert out["config"] == {k: spec.options[k].coerce(k, v) for k, v in want.items()}, name
    if name == "fd-align":  # its options are echoed in the result
        assert set(get_method(name).options) <= set(out)


@pytest.mark.parametrize("name", sorted(STILL))
def test_keeps_the_start_when_no_step_improves(ctx, name: str) -> None:
    options, key = STILL[name]
    out = run_method(name, context=ctx, progress=False, **{**CHEAP[name], **options})
    assert out[key] == 0, name


def _bad_values(opt: typing.Any) -> list[typing.Any]:
    if opt.type is bool:
        return ["maybe"]
    if opt.type in (int, float):
        return ["many"] + ([2.5] if opt.type is int else [])
    return ["__nonsense__"] if opt.choices is not None else []


@pytest.mark.parametrize("name", BUILTIN)
def test_bad_option_values_are_rejected_clearly(name: str) -> None:
    spec = get_method(name)
    with pytest.raises(ValueError, match="has no option.*its options are"):
        run_method(name, context=None, not_an_option=1)
    with pytest.raises(ValueError, match="has no option"):
        spec.fn(None, not_an_option=1)  # a runner called directly checks before any work
    for opt_name, opt in spec.options.items():
        for bad in _bad_values(opt):
            match = rf"Option '{opt_name}' (expects|must be one of)"
            with pytest.raises(ValueError, match=match):
                run_method(name, context=None, **{opt_name: bad})
            with pytest.raises(ValueError, match=match):
                spec.fn(None, **{opt_name: bad})
