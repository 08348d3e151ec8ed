"""The ``fewclip`` command line.

::

    fewclip info
    fewclip run zero-shot --dataset shapeworld --shots 16 --seed 1
    fewclip run tip-adapter --shots 4 --seed 2 --views 10 --json
    fewclip pretrain --help

``fewclip run`` has one sub-command per registered method, with one
``--option`` per :class:`~fewclip_tutorial.methods.registry.Option` of the method.
Bad input (unknown method, dataset or backbone, too many shots, an invalid
option value, a dataset that is missing or fails to download) prints a one-line error
and exits with status 2.  Set ``FEWCLIP_DEBUG=1`` to get the full traceback instead.

The parser imports nothing heavy: ``fewclip --help``, ``fewclip run --help`` and
``fewclip sweep --help`` answer without importing torch or open_clip; the method named by
``fewclip run METHOD`` is imported (with torch) to read its options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from fewclip_tutorial.suggest import did_you_mean

__all__ = ["BUILTIN_METHODS", "build_parser", "format_result", "main"]

PROG = "fewclip"
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError)

#: The methods of :mod:`fewclip_tutorial.methods` and their one-line help, known without
#: importing them (and torch, open_clip): ``fewclip --help`` and ``fewclip run --help`` list
#: them in a fraction of a second.  ``tests/test_cli.py`` checks it against the registry.
BUILTIN_METHODS: dict[str, str] = {
    "clap": "CLAP: a residual network on CLIP features trained with augmented prompts.",
    "cross-modal": "Cross-modal adaptation (Lin et al., CVPR 2023): class-name text embeddings "
    "as extra training samples of a linear head initialised from the zero-shot classifier.",
    "fd-align": "FD-Align (Song et al., NeurIPS 2023): fine-tune the image encoder while keeping "
    "its distribution over spurious (style) prototypes close to the frozen model's.",
    "linear-probe": "Logistic regression on frozen image features; C chosen on the few-shot "
    "val split.",
    "tip-adapter": "Training-free Tip-Adapter: cache model, alpha/beta searched on the few-shot "
    "val split.",
    "tip-adapter-f": "Tip-Adapter-F: fine-tune the cache keys; kept step and alpha/beta chosen "
    "on val.",
    "zero-shot": "Zero-shot CLIP with the dataset's prompt ensemble (no training images).",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    # A BackboneError can only be in flight once fewclip_tutorial.backbones was imported:
    # looking it up in sys.modules keeps an error path from importing torch.
    backbones = sys.modules.get("fewclip_tutorial.backbones")
    return (*_USER_ERRORS, backbones.BackboneError) if backbones else _USER_ERRORS


def _error_message(err: BaseException) -> str:
    """The one line printed for a user error: the error's ``cli_message`` where it has one
    (its advice worded for the command line, e.g. ``--download`` for ``download=True``)."""
    cli_message = getattr(err, "cli_message", None)
    if isinstance(cli_message, str) and cli_message:
        return cli_message
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


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
    g.add_argument(
        "--data-root",
        "--root",
        dest="root",
        default=None,
        help="folder of the torchvision datasets (default: $FEWCLIP_DATA or "
        "~/.cache/fewclip_tutorial/data)",
    )
    g.add_argument(
        "--download",
        action="store_true",
        help="download a torchvision dataset (eurosat, dtd, ...) into --data-root if missing",
    )
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


def _method_help() -> dict[str, str]:
    """Method name -> help: the built-in methods and any registered in this process so far
    (read from the registry only when something already imported it)."""
    helps = dict(BUILTIN_METHODS)
    registry = sys.modules.get("fewclip_tutorial.methods.registry")
    if registry is not None:
        helps.update({name: spec.help for name, spec in registry.METHODS.items()})
    return dict(sorted(helps.items()))


def _registered_methods() -> dict[str, str]:
    """Method name -> help from the registry (imports every method, hence torch)."""
    from fewclip_tutorial.methods.registry import get_method, list_methods

    helps = {**_method_help(), **{name: get_method(name).help for name in list_methods()}}
    return dict(sorted(helps.items()))


def build_parser(with_options: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``fewclip`` parser.

    Args:
        with_options: the methods whose ``fewclip run METHOD`` arguments (the episode
            arguments and the method's options) are added; ``None``: every method.  Adding
            them imports the methods and torch; ``main`` adds only the method on its command
            line, so that ``fewclip --help`` and ``fewclip run --help`` import neither.
    """
    return _build_parsers(with_options)[0]


def _build_parsers(
    with_options: Collection[str] | None,
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """:func:`build_parser` and its ``run`` sub-parser."""
    if with_options is None:
        helps = _registered_methods()
        with_options = list(helps)
    else:
        helps = _registered_methods() if with_options else _method_help()

    parser = argparse.ArgumentParser(
        prog=PROG, description="Few-shot adaptation of CLIP-style models: the tutorial's tools."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser("info", help="versions, device, backbones, datasets, cache location")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    run = sub.add_parser("run", help="run a method on one few-shot episode")
    methods = run.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name, help_text in helps.items():
        mp = methods.add_parser(name, help=help_text, description=help_text)
        if name in with_options:
            from fewclip_tutorial.methods.registry import get_method

            _add_common_run_args(mp)
            _add_method_options(mp, get_method(name))

    sub.add_parser(
        "pretrain",
        help="pretrain the embedded shapeworld-tiny backbone (see `fewclip pretrain --help`)",
        add_help=False,
    )
    sub.add_parser(
        "sweep",
        help="run a grid of methods x episodes as shards, or merge results (`fewclip sweep -h`)",
        add_help=False,
    )
    sub.add_parser(
        "grade",
        help="grade a folder of submitted notebooks into a CSV (`fewclip grade -h`)",
        add_help=False,
    )
    return parser, run


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
    """Indirection so tests can replace the method runner."""
    from fewclip_tutorial.methods.registry import run_method as _run

    return _run(*args, **kwargs)


def load_dataset(name: str, root: str | None, download: bool) -> Any:
    """The dataset of ``fewclip run``, loaded *before* the backbone (so that a typo or a missing
    download fails in a second, not after fetching gigabytes of weights).  An indirection so
    tests can replace it."""
    from fewclip_tutorial.data.registry import check_dataset_name, is_downloadable, list_datasets
    from fewclip_tutorial.data.registry import load_dataset as _load

    check_dataset_name(name)
    if download and not is_downloadable(name):
        downloadable = [d for d in list_datasets() if not d.endswith(">") and is_downloadable(d)]
        raise ValueError(
            f"--download applies to the torchvision datasets ({', '.join(downloadable)}); "
            f"{name!r} has nothing to download (ShapeWorld is generated in-process, an image "
            "folder is read in place): drop --download."
        )
    return _load(name, root=root, download=True) if download else _load(name, root=root)


def _cmd_run(args: argparse.Namespace) -> int:
    from fewclip_tutorial.distributed import init_distributed
    from fewclip_tutorial.metrics import round_metrics

    # under `torchrun --nproc_per_node N -m fewclip_tutorial run ...` every process runs the
    # episode, trainers that support it split each batch over the processes, rank 0 reports
    dist = init_distributed()

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
        dataset = load_dataset(args.dataset, args.root, args.download)
        result = run_method(
            args.method,
            dataset=dataset,
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
    if not dist.is_main:
        return 0
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
    from fewclip_tutorial.methods.registry import list_methods

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


# --------------------------------------------------------------------------- sweep


def _sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} sweep",
        description=(
            "Run methods over datasets x shots x seeds, one shard of the grid per job, "
            "appending one JSON line per finished cell to --results (a rerun skips finished "
            "cells); or --merge results files into the comparison table."
        ),
        epilog=(
            "example: fewclip sweep --method zero-shot --method 'lp=linear-probe' "
            "--shots 1 16 --seeds 1 2 3 --shard 0/4 --results runs/sweep.0.jsonl; then "
            "fewclip sweep --merge runs/sweep.*.jsonl --out table.csv"
        ),
    )
    g = p.add_argument_group("grid")
    g.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="SPEC",
        help="METHOD, LABEL=METHOD or LABEL=METHOD:option=value,... (repeat for each column)",
    )
    g.add_argument(
        "--setup",
        default="embedded",
        help="preset of fewclip_tutorial.settings giving the defaults below (default: embedded)",
    )
    g.add_argument("--dataset", action="append", default=None, help="dataset (repeatable)")
    g.add_argument("--suite", action="store_true", help="every dataset of the setup's suite")
    g.add_argument("--shots", type=int, nargs="+", default=None, help="K values")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="episode seeds")
    g.add_argument("--backbone", default=None, help="backbone (default: the setup's)")
    g.add_argument("--pretrained", default=None, help="weights tag (default: the setup's)")
    r = p.add_argument_group("running")
    r.add_argument("--shard", default="0/1", help="I/N: run shard I (0-based) of N (default 0/1)")
    r.add_argument("--results", default=None, help="JSON-lines results file to append to")
    r.add_argument("--dry-run", action="store_true", help="list the shard's cells, run nothing")
    r.add_argument("--no-progress", action="store_true", help="hide progress bars")
    m = p.add_argument_group("merging")
    m.add_argument("--merge", nargs="+", default=None, metavar="RESULTS", help="results files")
    m.add_argument("--out", default=None, help="write the table as CSV")
    m.add_argument("--rows", default=None, help="also write one row per cell as CSV")
    m.add_argument("--metric", default="test_accuracy", help="e.g. ood_mean (default: test)")
    m.add_argument(
        "--table",
        choices=["tasks", "shots"],
        default="tasks",
        help="tasks: method x dataset means (+ average row); shots: mean ± std per K",
    )
    m.add_argument("--grid", default=None, help="grid id, when the files hold several grids")
    m.add_argument("--partial", action="store_true", help="merge an incomplete grid")
    return p


def _sweep_grid(args: argparse.Namespace) -> list:
    from fewclip_tutorial.settings import get_setup
    from fewclip_tutorial.sweep import parse_method_spec, sweep_cells

    if not args.method:
        raise ValueError(
            "fewclip sweep needs at least one --method, e.g. --method zero-shot "
            "--method 'linear probe=linear-probe' (methods: see `fewclip run --help`)."
        )
    setup = get_setup(args.setup)
    methods: dict[str, tuple[str, dict[str, str]]] = {}
    for spec in args.method:
        label, name, options = parse_method_spec(spec)
        if label in methods:
            raise ValueError(f"Two --method specs use the label {label!r}; give each a LABEL=.")
        methods[label] = (name, options)
    datasets = list(args.dataset or [])
    if args.suite:
        datasets += [d for d in (setup.suite or (setup.dataset,)) if d not in datasets]
    pretrained = setup.pretrained if args.pretrained is None else args.pretrained
    return sweep_cells(
        methods,
        datasets=datasets or [setup.dataset],
        shots=args.shots or setup.shots,
        seeds=args.seeds or setup.seeds,
        backbone=args.backbone or setup.backbone,
        pretrained=None if str(pretrained).lower() == "none" else pretrained,
        dataset_kwargs=setup.dataset_kwargs,
    )


def _sweep_table(frame: Any, args: argparse.Namespace) -> Any:
    import pandas as pd

    from fewclip_tutorial.sweep import summarise, task_table

    if args.metric not in frame.columns:
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        raise ValueError(f"No column {args.metric!r} in the results; use one of {numeric}.")
    if args.table == "tasks":
        return task_table(frame, args.metric)
    datasets = list(dict.fromkeys(frame["dataset"]))
    parts = {d: summarise(frame[frame["dataset"] == d], args.metric) for d in datasets}
    return pd.concat(parts, names=["dataset", "label"])


def _cmd_sweep(argv: list[str]) -> int:
    parser = _sweep_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2

    from fewclip_tutorial.sweep import (
        merge_results,
        parse_shard,
        run_cells,
        shard_cells,
        write_csv,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.merge:
        if args.method or args.results:
            raise ValueError("--merge reads results files; it takes no --method or --results.")
        frame = merge_results(args.merge, grid=args.grid, partial=args.partial, log=log)
        table = _sweep_table(frame, args)
        if args.rows:
            write_csv(frame, args.rows, index=False)
        if args.out:
            write_csv(table, args.out)
            log(f"wrote {args.out}")
        print(table.to_string())
        return 0
    index, count = parse_shard(args.shard)
    grid = _sweep_grid(args)
    cells = shard_cells(grid, index, count)
    if args.dry_run:
        for cell in cells:
            print(f"{cell.index}\t{cell.describe()}")
        log(f"shard {index}/{count}: {len(cells)} of {len(grid)} cells")
        return 0
    if not args.results:
        raise ValueError(
            "fewclip sweep needs --results PATH (one JSON line per finished cell; give each "
            "shard its own file, e.g. runs/sweep.$SLURM_ARRAY_TASK_ID.jsonl)."
        )
    # Methods that print would mix with the log: their output goes to stderr too.
    with contextlib.redirect_stdout(sys.stderr):
        run_cells(
            cells,
            grid=grid,
            results=args.results,
            shard=f"{index}/{count}",
            progress=not args.no_progress,
            log=log,
        )
    log(f"shard {index}/{count} finished: {len(cells)} cells in {args.results}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fewclip`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FEWCLIP_DEBUG", "") not in ("", "0")
    try:
        if argv and argv[0] == "pretrain":
            return _cmd_pretrain(argv[1:])
        if argv and argv[0] == "sweep":
            return _cmd_sweep(argv[1:])
        if argv and argv[0] == "grade":
            from fewclip_tutorial.course.grading import main as grade_main

            return grade_main(argv[1:])
        method = argv[1] if argv[:1] == ["run"] and len(argv) > 1 else None
        if method is not None and method.startswith("-"):
            method = None  # `fewclip run --help`
        known = method is not None and method in _method_help()  # a typo fails fast
        parser, run_parser = _build_parsers([method] if known else [])
        try:
            if method is not None and not known:
                _unknown_method(run_parser, method)
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
            return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
        if args.command == "info":
            return _cmd_info(args)
        return _cmd_run(args)
    except _user_errors() as err:
        if debug:
            raise
        print(f"{PROG}: error: {_error_message(err)}", file=sys.stderr)
        return 2


def _unknown_method(run_parser: argparse.ArgumentParser, method: str) -> None:
    """Exit as argparse does for an invalid METHOD choice, plus the closest method name."""
    names = list(_method_help())
    run_parser.error(
        f"argument METHOD: invalid choice: {method!r}.{did_you_mean(method, names)} "
        f"(choose from {', '.join(map(repr, names))})"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
