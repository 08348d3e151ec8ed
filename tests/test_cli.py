"""Tests of the `fewclip` command line (in-process, with a fake runner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from fewclip_tutorial import cli
from fewclip_tutorial.backbones import UnknownBackboneError
from fewclip_tutorial.data.splits import NotEnoughExamplesError
from fewclip_tutorial.methods.registry import METHODS, Option, register_method

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli_method() -> Iterator[str]:
    """A registered method with one option of each type, removed afterwards."""

    @register_method(
        "_cli-test",
        options={
            "beta_scale": Option(float, 7.0, "a float"),
            "views": Option(int, 10, "an int"),
            "variant": Option(str, "a", "a choice", choices=["a", "b"]),
            "flip": Option(bool, True, "a flag"),
        },
        help="test method",
    )
    def _run(ctx: object, **kw: object) -> dict:  # pragma: no cover - runner is faked
        return {}

    yield "_cli-test"
    METHODS.pop("_cli-test", None)


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> dict:
    calls: dict = {}

    def load(name: str, root: str | None, download: bool) -> types.SimpleNamespace:
        calls["load"] = (name, root, download)
        return types.SimpleNamespace(name=name)

    def run(method: str, **kwargs: object) -> dict:
        calls["method"] = method
        calls["kwargs"] = kwargs
        print("noise a method prints")  # must not corrupt --json output
        return {
            "method": method,
            "dataset": kwargs["dataset"].name,  # type: ignore[attr-defined]
            "backbone": kwargs["backbone"],
            "shots": kwargs["shots"],
            "seed": kwargs["seed"],
            "val_accuracy": 81.26,
            "test_accuracy": 79.94,
            "ood_accuracy": {"sketch": 40.04, "painting": 55.55},
            "C": 0.001,
            "history": list(range(20)),
        }

    monkeypatch.setattr(cli, "load_dataset", load)
    monkeypatch.setattr(cli, "run_method", run)
    return calls


def test_run_json_has_exactly_one_rounded_object(
    cli_method: str, fake_run: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "run",
            cli_method,
            "--dataset",
            "eurosat",
            "--shots",
            "4",
            "--seed",
            "2",
            "--json",
            "--beta-scale",
            "5",
            "--views",
            "3",
            "--variant",
            "b",
            "--no-flip",
            "--no-progress",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)  # the whole of stdout is one JSON object
    assert payload["method"] == cli_method
    assert payload["dataset"] == "eurosat" and payload["backbone"] == "shapeworld-tiny"
    assert payload["shots"] == 4 and payload["seed"] == 2
    assert payload["val_accuracy"] == 81.3 and payload["test_accuracy"] == 79.9
    assert payload["ood_accuracy"] == {"sketch": 40.0, "painting": 55.5}
    assert payload["C"] == 0.001  # hyperparameters are not rounded to one decimal
    assert "noise a method prints" in captured.err
    kwargs = fake_run["kwargs"]
    assert kwargs["beta_scale"] == 5.0 and isinstance(kwargs["beta_scale"], float)
    assert kwargs["views"] == 3 and kwargs["variant"] == "b" and kwargs["flip"] is False
    assert kwargs["progress"] is False and kwargs["pretrained"] == "default"
    assert kwargs["arch"] is None


def test_unset_options_fall_back_to_method_defaults(
    cli_method: str, fake_run: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", cli_method, "--pretrained", "none", "--cache-dir", "none"]) == 0
    kwargs = fake_run["kwargs"]
    assert not {"beta_scale", "views", "variant", "flip"} & set(kwargs)
    assert kwargs["pretrained"] is None and kwargs["cache_dir"] is None
    assert kwargs["shots"] == 16 and kwargs["seed"] == 1
    assert fake_run["load"] == ("shapeworld", None, False)
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["test_accuracy"].split()[-1] == "79.9"
    assert lines["sketch"].split()[-1] == "40.0"
    assert "[20 values]" in lines["history"]


def test_option_with_underscore_spelling_and_bad_choice(
    cli_method: str, fake_run: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", cli_method, "--beta_scale", "2.5", "--json", "--arch", "RN50"]) == 0
    assert fake_run["kwargs"]["beta_scale"] == 2.5
    assert fake_run["kwargs"]["arch"] == "RN50"
    capsys.readouterr()
    assert cli.main(["run", cli_method, "--variant", "z"]) == 2
    assert "invalid choice: 'z'" in capsys.readouterr().err
    assert cli.main(["run", cli_method, "--views", "many"]) == 2


def test_unknown_method_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "zero-shoot"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'zero-shoot'" in err and "linear-probe" in err


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("zero-shoot", "zero-shot"), ("tip-adaptor", "tip-adapter"), ("linear_probe", "linear-probe")],
)
def test_a_method_typo_gets_did_you_mean(
    capsys: pytest.CaptureFixture[str], typo: str, meant: str
) -> None:
    assert cli.main(["run", typo, "--shots", "4"]) == 2
    err = capsys.readouterr().err
    assert f"invalid choice: {typo!r}. Did you mean {meant!r}?" in err
    assert err.count("Did you mean") == 1 and "Traceback" not in err
    assert cli.main(["run", "qqqq"]) == 2  # nothing close: no suggestion, the list
    err = capsys.readouterr().err
    assert "Did you mean" not in err and "'zero-shot'" in err


def test_builtin_method_names_match_the_registry() -> None:
    """`fewclip --help` lists the methods without importing them: the list must not drift."""
    from fewclip_tutorial.methods.registry import get_method, list_methods

    registered = {name: get_method(name).help for name in list_methods()}
    registered = {k: v for k, v in registered.items() if not k.startswith("_")}  # test methods
    assert cli.BUILTIN_METHODS == registered, (
        "update fewclip_tutorial.cli.BUILTIN_METHODS to the methods' names and help"
    )


_IMPORTS_OF = r"""
import json, runpy, sys
sys.argv = ["fewclip", *sys.argv[1:]]
try:
    runpy.run_module("fewclip_tutorial", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code
heavy = [m for m in ("torch", "open_clip", "torchvision") if m in sys.modules]
print("\n" + json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["run", "--help"], ["sweep", "--help"], ["--version"], ["run", "zero-shoot"]],
)
def test_help_imports_neither_torch_nor_open_clip(argv: list[str]) -> None:
    """`python -m fewclip_tutorial --help` answers in a fraction of a second (no torch)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS_OF, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"`fewclip {' '.join(argv)}` imported {report['heavy']}"
    assert report["code"] == (2 if argv == ["run", "zero-shoot"] else 0), proc.stderr
    if argv == ["run", "--help"]:
        for name in cli.BUILTIN_METHODS:  # the methods are listed with their help
            assert name in proc.stdout
        assert "Training-free Tip-Adapter" in proc.stdout


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (UnknownBackboneError("Unknown backbone 'ViT-Q'. Known names: ..."), "Unknown backbone"),
        (NotEnoughExamplesError("class 3 ('star') has only 2 images"), "only 2 images"),
        (KeyError("Unknown dataset 'imgnet'"), "Unknown dataset 'imgnet'"),
    ],
)
def test_bad_input_prints_message_and_exits_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    text: str,
) -> None:
    def raise_(*a: object, **k: object) -> dict:
        raise error

    monkeypatch.setattr(cli, "load_dataset", lambda *a: types.SimpleNamespace(name="x"))
    monkeypatch.setattr(cli, "run_method", raise_)
    assert cli.main(["run", "zero-shot", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fewclip: error: ")
    assert text in captured.err and "Traceback" not in captured.err
    assert not captured.out.strip()


def test_bugs_are_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def raise_(*a: object, **k: object) -> dict:
        raise RuntimeError("a real bug")

    monkeypatch.setattr(cli, "load_dataset", lambda *a: types.SimpleNamespace(name="x"))
    monkeypatch.setattr(cli, "run_method", raise_)
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["run", "zero-shot"])


def test_debug_env_reraises(monkeypatch: pytest.MonkeyPatch) -> None:
    def raise_(*a: object, **k: object) -> dict:
        raise ValueError("bad")

    monkeypatch.setattr(cli, "load_dataset", lambda *a: types.SimpleNamespace(name="x"))
    monkeypatch.setattr(cli, "run_method", raise_)
    monkeypatch.setenv("FEWCLIP_DEBUG", "1")
    with pytest.raises(ValueError, match="bad"):
        cli.main(["run", "zero-shot"])


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    import open_clip
    import torch

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch            {torch.__version__}" in out
    assert "shapeworld-tiny" in out and "open_clip architectures" in out
    assert "shapeworld" in out.split("datasets")[1].splitlines()[0]
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n_archs = len([m for m in open_clip.list_models() if m != "shapeworld-tiny"])
    assert info["backbones"]["open_clip_architectures"] == n_archs
    assert "zero-shot" in info["methods"] and "shapeworld" in info["datasets"]
    assert info["feature_cache"]


def test_info_lists_the_shapeworld_suite(capsys: pytest.CaptureFixture[str]) -> None:
    from fewclip_tutorial.data.shapeworld import TASKS

    assert cli.main(["info", "--json"]) == 0
    tasks = json.loads(capsys.readouterr().out)["shapeworld_tasks"]
    assert list(tasks) == list(TASKS) and len(tasks) >= 5
    assert tasks["shapeworld"]["classes"][1] == "ellipse" and tasks["shapeworld"]["regime"]
    assert tasks["shapeworld-blueprint"]["domain"] == "blueprint"
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in TASKS:  # every task and its regime line is printed
        assert f"  {name} " in out


def test_pretrain_is_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list = []
    fake = types.ModuleType("fewclip_tutorial.pretrain")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fewclip_tutorial.pretrain", fake)
    assert cli.main(["pretrain", "--steps", "3", "--help"]) == 0
    assert seen == [["--steps", "3", "--help"]]


def test_help_and_missing_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "run" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["run", "zero-shot", "--help"]) == 0
    assert "--by-prompt" in capsys.readouterr().out


# --------------------------------------------------------------------------- dataset options


def _never_run(*args: object, **kwargs: object) -> dict:
    raise AssertionError("the backbone must not be loaded when the dataset is bad")


def test_unknown_dataset_fails_before_the_backbone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "run_method", _never_run)
    assert cli.main(["run", "zero-shot", "--dataset", "eurosatt", "--backbone", "ViT-L-14"]) == 2
    err = capsys.readouterr().err
    assert "Unknown dataset 'eurosatt'" in err and "Did you mean 'eurosat'" in err


def test_missing_dataset_fails_before_the_backbone_and_names_the_way_out(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(cli, "run_method", _never_run)
    code = cli.main(["run", "zero-shot", "--dataset", "eurosat", "--data-root", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "eurosat" / "2750") in err
    assert err.count("\n") == 1  # one line
    # the advice is worded for the command line, not for Python
    assert "--download" in err and "--data-root" in err and "--dataset shapeworld" in err
    assert "download=True" not in err and "root=" not in err and "load_dataset" not in err


def test_data_root_reaches_the_torchvision_loader(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fixtures_data import write_fake_eurosat

    write_fake_eurosat(tmp_path, per_class=5)
    seen: dict = {}

    def run(method: str, **kwargs: object) -> dict:
        seen.update(kwargs)
        return {"val_accuracy": 1.0, "test_accuracy": 2.0}

    monkeypatch.setattr(cli, "run_method", run)
    for flag in ("--data-root", "--root"):  # --root is kept as an alias
        assert cli.main(["run", "zero-shot", "--dataset", "EuroSAT", flag, str(tmp_path)]) == 0
        spec = seen["dataset"]
        assert spec.name == "eurosat" and spec.info["root"] == str(tmp_path)
        assert len(spec.train) + len(spec.val) + len(spec.test) == 50


def test_download_flag_is_passed_to_torchvision_loaders_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fewclip_tutorial.data import torchvision_datasets as tvd

    asked: list[dict] = []

    def fake_loader(**kwargs: object) -> types.SimpleNamespace:
        asked.append(kwargs)
        return types.SimpleNamespace(name="dtd")

    monkeypatch.setitem(tvd.TORCHVISION_LOADERS, "dtd", fake_loader)
    monkeypatch.setattr(cli, "run_method", lambda m, **k: {"val_accuracy": 0, "test_accuracy": 0})
    argv = ["run", "zero-shot", "--dataset", "dtd", "--data-root", str(tmp_path)]
    assert cli.main([*argv, "--download"]) == 0
    assert cli.main(argv) == 0
    assert asked == [{"root": str(tmp_path), "download": True}, {"root": str(tmp_path)}]
    capsys.readouterr()
    monkeypatch.setattr(cli, "run_method", _never_run)
    assert cli.main(["run", "zero-shot", "--dataset", "shapeworld", "--download"]) == 2
    err = capsys.readouterr().err
    assert "nothing to download" in err and "drop --download" in err
    assert "download=True" not in err


def test_run_json_prints_the_configuration_that_ran(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fewclip run METHOD --json`` prints every option value, given or default."""
    from fixtures_data import make_spec

    from fewclip_tutorial.backbones import load_backbone
    from fewclip_tutorial.episode import build_context
    from fewclip_tutorial.methods.registry import run_method as registry_run

    bb = load_backbone("shapeworld-tiny", pretrained=None, device="cpu")
    ctx = build_context(make_spec([4, 4]), bb, shots=1, seed=1, cache_dir=None, progress=False)

    def run(method: str, **kwargs: object) -> dict:
        options = {k: v for k, v in kwargs.items() if k in METHODS[method].options}
        return registry_run(method, context=ctx, progress=False, **options)

    monkeypatch.setattr(cli, "load_dataset", lambda *a: types.SimpleNamespace(name="toy"))
    monkeypatch.setattr(cli, "run_method", run)
    assert cli.main(["run", "linear-probe", "--json", "--steps", "2", "--no-progress"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["config"] == {"protocol": "lpclip", "max_iter": 1000, "steps": 2}
