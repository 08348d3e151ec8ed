"""The ``fewclip`` command line.

::

    fewclip info
    fewclip run zero-shot --dataset shapeworld --shots 16 --seed 1
    fewclip run tip-adapter --shots 4 --seed 2 --views 10 --json
    fewclip pretrain --help

``fewclip run`` has one sub-command per registered method, with one
``--option`` per :class:`~fewclip_tutorial.experiment.Option` of the method.
Bad input (unknown method, dataset or backbone, too many shots, an invalid
option value) prints a one-line error and exits with status 2.  Set
``FEWCLIP_DEBUG=1`` to get the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["build_parser", "format_result", "main"]

PROG = "fewclip"
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fewclip_tutorial.backbones import BackboneError

    return (*_USER_ERRORS, BackboneError)


def _version() -> str:
    try:
        from fewclip_tutorial import __version__  # type: ignore[attr-defined]

        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        return version("fewclip-tutorial")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


# --------------------------------------------------------------------------- parser


def _add_common_run_args(p: argparse.ArgumentParser) -> None:
    from fewclip_tutorial.backbones import EMBEDDED_BACKBONE

    g = p.add_argument_group("episode")
    g.add_argument("--dataset", default="shapeworld", help="dataset name (default: shapeworld)")
    g.add_argument(
        "--backbone",
        default=EMBEDDED_BACKBONE,
        help=f"backbone name or checkpoint file (default: {EMBEDDED_BACKBONE})",
    )
    g.add_argument(
        "--pretrained",
        default="default",
        help="weights: 'default', an open_clip tag, a file, or 'none' for random init",
    )
    g.add_argument(
        "--arch", default=None, help="open_clip architecture of a --backbone checkpoint file"
    )
    g.add_argument("--shots", type=int, default=16, help="K images per class (default: 16)")
    g.add_argument("--seed", type=int, default=1, help="episode seed (default: 1)")
    g.add_argument("--root", default=None, help="data folder of downloadable datasets")
    g.add_argument("--device", default=None, help="cpu, cuda, mps (default: automatic)")
    g.add_argument(
        "--cache-dir",
        default="default",
        help="feature cache folder ('none' disables the disk cache)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_method_options(p: argparse.ArgumentParser, spec: Any) -> None:
    if not spec.options:
        return
    g = p.add_argument_group(f"{spec.name} options")
    for name, opt in spec.options.items():
        flags = [f"--{name.replace('_', '-')}"]
        if "_" in name:
            flags.append(f"--{name}")
        help_text = f"{opt.help} (default: {opt.default})"
        if opt.type is bool:
            g.add_argument(
                *flags,
                dest=f"opt_{name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            g.add_argument(
                *flags,
                dest=f"opt_{name}",
                type=opt.type,
                default=None,
                choices=opt.choices,
                help=help_text,
                metavar=None if opt.choices else opt.type.__name__.upper(),
            )


def build_parser() -> argparse.ArgumentParser:
    """The full ``fewclip`` parser (imports every method to list its options)."""
    from fewclip_tutorial.experiment import get_method, list_methods

    parser = argparse.ArgumentParser(
        prog=PROG, description="Few-shot adaptation of CLIP-style models: the tutorial's tools."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser("info", help="versions, device, backbones, datasets, cache location")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    run = sub.add_parser("run", help="run a method on one few-shot episode")
    methods = run.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name in list_methods():
        spec = get_method(name)
        mp = methods.add_parser(name, help=spec.help, description=spec.help)
        _add_common_run_args(mp)
        _add_method_options(mp, spec)

    sub.add_parser(
        "pretrain",
        help="pretrain the embedded shapeworld-tiny backbone (see `fewclip pretrain --help`)",
        add_help=False,
    )
    return parser


# --------------------------------------------------------------------------- output


def _fmt_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if len(value) > 6:
            return f"[{len(value)} values]"
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    return str(value)


def format_result(result: Mapping[str, Any]) -> str:
    """A readable two-column table of a (rounded, see ``round_metrics``) result."""
    rows: list[tuple[str, str]] = []
    for key, value in result.items():
        if isinstance(value, Mapping):
            rows.append((key, ""))
            for k, v in value.items():
                rows.append((f"  {k}", _fmt_value(v) if not isinstance(v, Mapping) else "{...}"))
        else:
            rows.append((key, _fmt_value(value)))
    width = max(len(k) for k, _ in rows) if rows else 0
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in rows)


def _json_default(obj: Any) -> Any:
    return str(obj)


# --------------------------------------------------------------------------- commands


def run_method(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Indirection so tests can replace the experiment runner."""
    from fewclip_tutorial.experiment import run_method as _run

    return _run(*args, **kwargs)


def _cmd_run(args: argparse.Namespace) -> int:
    from fewclip_tutorial.metrics import round_metrics

    options = {
        key[len("opt_") :]: value
        for key, value in vars(args).items()
        if key.startswith("opt_") and value is not None
    }
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    cache_dir = None if str(args.cache_dir).lower() == "none" else args.cache_dir
    # With --json, stdout carries exactly one JSON object: anything a method prints goes to stderr.
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        result = run_method(
            args.method,
            dataset=args.dataset,
            backbone=args.backbone,
            shots=args.shots,
            seed=args.seed,
            pretrained=pretrained,
            arch=args.arch,
            root=args.root,
            progress=not args.no_progress,
            cache_dir=cache_dir,
            device=args.device,
            **options,
        )
    rounded = round_metrics(result, 1)
    if args.json:
        print(json.dumps(rounded, default=_json_default))
    else:
        print(format_result(rounded))
    return 0


def _info() -> dict[str, Any]:
    import open_clip
    import torch

    from fewclip_tutorial.backbones import EMBEDDED_BACKBONE, embedded_checkpoint_path
    from fewclip_tutorial.device import get_device
    from fewclip_tutorial.experiment import list_methods

    try:
        from fewclip_tutorial.data.registry import list_datasets

        datasets = list_datasets()
    except ImportError:  # pragma: no cover - registry written in parallel
        datasets = []
    try:
        from fewclip_tutorial.features import default_cache_dir

        cache = str(default_cache_dir())
    except ImportError:  # pragma: no cover
        cache = "unknown"
    device = get_device()
    device_name = str(device)
    if device.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(device)})"
    archs = [m for m in open_clip.list_models() if m != EMBEDDED_BACKBONE]
    return {
        "fewclip_tutorial": _version(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "device": device_name,
        "backbones": {
            "embedded": EMBEDDED_BACKBONE,
            "embedded_checkpoint": (
                str(embedded_checkpoint_path())
                if embedded_checkpoint_path().is_file()
                else "missing (run `fewclip pretrain`)"
            ),
            "open_clip_architectures": len(archs),
        },
        "datasets": datasets,
        "shapeworld_tasks": _shapeworld_tasks(),
        "methods": list_methods(),
        "feature_cache": cache,
    }


def _shapeworld_tasks() -> dict[str, dict[str, Any]]:
    from fewclip_tutorial.data.shapeworld import TASKS

    return {
        name: {
            "classes": list(t.classnames),
            "domain": ", ".join(t.train_domains),
            "ood": list(t.ood_domains),
            "regime": t.regime,
        }
        for name, t in TASKS.items()
    }


def _cmd_info(args: argparse.Namespace) -> int:
    info = _info()
    if args.json:
        print(json.dumps(info))
        return 0
    bb = info["backbones"]
    lines = [
        f"fewclip-tutorial {info['fewclip_tutorial']}",
        f"torch            {info['torch']}",
        f"open_clip        {info['open_clip']}",
        f"device           {info['device']}",
        f"backbones        {bb['embedded']} (checkpoint: {bb['embedded_checkpoint']}) + "
        f"{bb['open_clip_architectures']} open_clip architectures",
        f"datasets         {', '.join(info['datasets'])}",
        f"methods          {', '.join(info['methods'])}",
        f"feature cache    {info['feature_cache']}",
        "ShapeWorld benchmarks (the embedded suite):",
    ]
    for name, t in info["shapeworld_tasks"].items():
        ood = ", ".join(t["ood"]) or "none"
        lines.append(f"  {name:<21} {len(t['classes'])} classes on {t['domain']}; OOD: {ood}")
        lines.append(f"  {'':<21} {t['regime']}")
    print("\n".join(lines))
    return 0


def _cmd_pretrain(argv: list[str]) -> int:
    import importlib

    pretrain = importlib.import_module("fewclip_tutorial.pretrain")
    code = pretrain.main(argv)
    return int(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fewclip`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FEWCLIP_DEBUG", "") not in ("", "0")
    try:
        if argv and argv[0] == "pretrain":
            return _cmd_pretrain(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
            return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
        if args.command == "info":
            return _cmd_info(args)
        return _cmd_run(args)
    except _user_errors() as err:
        if debug:
            raise
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
