"""The method registry: every method's name, options and runner, and :func:`run_method`.

A method is a runner ``fn(ctx, config, progress=...) -> dict`` registered with
``register_method(name, config=XConfig)``, where ``XConfig`` is the method's frozen
dataclass (``methods/<method>/config.py``).  Its command-line options are derived from
the dataclass fields, declared once: a field's default is the option's default, its type
hint the option's type (``X | None`` allows ``None``), and its metadata the help text and
the allowed values (:func:`option`).  A field whose default is itself a config dataclass
contributes that dataclass's fields in its place (CLAP's trainer settings).

The CLI, the notebooks and the tests run a method through :func:`run_method`::

    from fewclip_tutorial.episode import build_context
    from fewclip_tutorial.methods.registry import run_method

    ctx = build_context("shapeworld", "shapeworld-tiny", shots=4, seed=1)
    run_method("tip-adapter", context=ctx, views=4)

This module imports no method: importing it (as any ``fewclip_tutorial.methods.*``
module) first imports the :mod:`fewclip_tutorial.methods` package, which registers them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fewclip_tutorial.backbones import EMBEDDED_BACKBONE
from fewclip_tutorial.device import seed_everything
from fewclip_tutorial.episode import Context, build_context

__all__ = [
    "METHODS",
    "MethodSpec",
    "Option",
    "UnknownMethodError",
    "config_options",
    "get_method",
    "list_methods",
    "make_config",
    "option",
    "register_method",
    "resolve_options",
    "run_method",
]


class UnknownMethodError(KeyError):
    """No method is registered under this name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class Option:
    """A method option, exposed as ``--<name>`` by ``fewclip run METHOD``.

    Attributes:
        type: ``int``, ``float``, ``str`` or ``bool``.
        default: the value when the option is not given.
        help: one line for ``--help``.
        choices: allowed values (``None``: any).
    """

    type: type
    default: Any
    help: str
    choices: list | None = None

    def coerce(self, name: str, value: Any) -> Any:
        """Convert ``value`` to :attr:`type` and check :attr:`choices`.

        Raises:
            ValueError: the value cannot be converted or is not an allowed choice.
        """
        if value is None:
            converted = None
        elif self.type is bool:
            converted = _parse_bool(name, value)
        else:
            try:
                converted = self.type(value)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"Option {name!r} expects {self.type.__name__}, got {value!r}."
                ) from err
            if self.type is int and isinstance(value, float) and value != converted:
                raise ValueError(f"Option {name!r} expects an integer, got {value!r}.")
        if self.choices is not None and converted not in self.choices:
            raise ValueError(f"Option {name!r} must be one of {self.choices}, got {value!r}.")
        return converted


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"Option {name!r} expects true/false, got {value!r}.")


# --------------------------------------------------------------------------- configs


def option(default: Any, help: str, choices: list | None = None) -> Any:
    """A config dataclass field that is a command-line option: its default, help and choices."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _option_type(hint: Any) -> type:
    """``int``, ``float``, ``str`` or ``bool`` from a field's type hint (``X | None`` -> ``X``)."""
    if isinstance(hint, (types.UnionType,)) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            hint = args[0]
    if hint not in (int, float, str, bool):
        raise TypeError(
            f"an option field must be int, float, str or bool (or X | None), not {hint}"
        )
    return hint


def _fields(config: type) -> list[tuple[dataclasses.Field, Any]]:
    """The option fields of a config dataclass in order, nested configs flattened in place."""
    hints = typing.get_type_hints(config)
    out: list[tuple[dataclasses.Field, Any]] = []
    for f in dataclasses.fields(config):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _fields(hint)
        else:
            out.append((f, hint))
    return out


def config_options(config: type) -> dict[str, Option]:
    """The :class:`Option` of every field of a config dataclass (see :func:`option`)."""
    return {
        f.name: Option(_option_type(hint), f.default, f.metadata["help"], f.metadata.get("choices"))
        for f, hint in _fields(config)
    }


def _build(config: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(config)
    kwargs = {
        f.name: _build(hints[f.name], values) if dataclasses.is_dataclass(hints[f.name])
        else values[f.name]
        for f in dataclasses.fields(config)
    }  # fmt: skip
    return config(**kwargs)


def make_config(
    config: type, given: Any = None, options: Mapping[str, Any] | None = None, method: str = ""
) -> Any:
    """An instance of the config dataclass ``config`` for a runner called directly.

    ``given`` (an instance) is returned as it is when no ``options`` are passed; otherwise
    the options (names of :func:`config_options`, missing ones at their defaults) are
    converted and checked as :func:`run_method` does, and override ``given``'s values.

    Raises:
        ValueError: an unknown option, or a value of the wrong type or not allowed.
    """
    options = dict(options or {})
    if given is not None and not options:
        return given
    spec = MethodSpec(method or config.__name__, lambda *a, **k: {}, config_options(config))
    if given is not None:
        options = {**flat_values(given), **options}
    return _build(config, resolve_options(spec, options))


def flat_values(config: Any) -> dict[str, Any]:
    """``{option name: value}`` of a config instance (nested configs flattened)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_values(value))
        else:
            out[f.name] = value
    return out


# --------------------------------------------------------------------------- registry


@dataclass
class MethodSpec:
    """A registered method: its function, options, help line and config dataclass.

    With a ``config``, ``fn`` is called as ``fn(ctx, config_instance, progress=...)``;
    without one (a method registered with an ``options`` dict), as ``fn(ctx, **options)``.
    """

    name: str
    fn: Callable[..., dict]
    options: dict[str, Option] = field(default_factory=dict)
    help: str = ""
    config: type | None = None


#: Every registered method by name (filled by importing :mod:`fewclip_tutorial.methods`).
METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    options: dict[str, Option] | None = None,
    help: str = "",
    *,
    config: type | None = None,
) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Decorator registering a runner as method ``name``.

    Every method of the package passes ``config=XConfig``: a frozen dataclass whose fields
    are the options (:func:`config_options`) and whose docstring's first paragraph is the
    help line.  Its runner is written ``fn(ctx, config: XConfig, progress=...) -> dict``;
    the decorator returns it wrapped so that it can also be called with option names
    (``run_clap(ctx, steps=80)``), checked and converted as :func:`run_method` does
    (:func:`make_config`).  A method declared with an ``options`` dict of :class:`Option`
    instead is called ``fn(ctx, **options)``.

    The function returns at least ``val_accuracy`` and ``test_accuracy`` (percent),
    ``ood_accuracy`` when the dataset has OOD splits (``ctx.report`` gives all three),
    plus method-specific keys.  Re-registering the same function (a reloaded module)
    replaces the entry; a different function under a taken name is an error.
    """
    if config is not None and options is not None:
        raise ValueError(f"Method {name!r}: pass options or config, not both.")
    opts = config_options(config) if config is not None else dict(options or {})
    for opt_name, opt in opts.items():
        if not opt_name.isidentifier():
            raise ValueError(f"Option name {opt_name!r} of method {name!r} must be an identifier.")
        if not isinstance(opt, Option):
            raise TypeError(f"Option {opt_name!r} of method {name!r} must be an Option.")
    if config is not None and not help:
        help = " ".join((inspect.getdoc(config) or "").split("\n\n")[0].split())

    def decorator(fn: Callable[..., dict]) -> Callable[..., dict]:
        old = METHODS.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ValueError(
                f"Method {name!r} is already registered by "
                f"{old.fn.__module__}.{old.fn.__qualname__}; choose another name."
            )
        runner = fn if config is None else _with_options(fn, config, name)
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        METHODS[name] = MethodSpec(
            name=name, fn=runner, options=opts, help=help or doc, config=config
        )
        return runner

    return decorator


def _with_options(fn: Callable[..., dict], config: type, name: str) -> Callable[..., dict]:
    """``fn(ctx, config, **params)`` callable as ``fn(ctx, config=None, **params, **options)``."""
    params = set(list(inspect.signature(fn).parameters)[2:])

    @functools.wraps(fn)
    def runner(ctx: Any, config_: Any = None, /, **kwargs: Any) -> dict:
        given = kwargs.pop("config", config_)
        options = {k: v for k, v in kwargs.items() if k not in params}
        extra = {k: v for k, v in kwargs.items() if k in params}
        return fn(ctx, make_config(config, given, options, name), **extra)

    return runner


def list_methods() -> list[str]:
    """Names of every registered method."""
    return sorted(METHODS)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name``.

    Raises:
        UnknownMethodError: with close matches and the list of methods.
    """
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownMethodError(
            f"Unknown method {name!r}.{hint} Available methods: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


def resolve_options(spec: MethodSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults, convert types and reject unknown option names."""
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(sorted(spec.options)) or "(none)"
        raise ValueError(
            f"Method {spec.name!r} has no option(s) {unknown}; its options are: {valid}."
        )
    out = {}
    for opt_name, opt in spec.options.items():
        value = options.get(opt_name, opt.default)
        out[opt_name] = opt.coerce(opt_name, value)
    return out


def run_method(
    method: str,
    dataset: str = "shapeworld",
    backbone: str = EMBEDDED_BACKBONE,
    shots: int = 16,
    seed: int = 1,
    context: Context | None = None,
    *,
    pretrained: str | None = "default",
    arch: str | None = None,
    root: str | os.PathLike | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = "default",
    device: str | torch.device | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run a registered method on one few-shot episode.

    Args:
        method: a name from :func:`list_methods` (``"zero-shot"``, ``"tip-adapter"``, ...).
        dataset, backbone, shots, seed: the episode (ignored when ``context`` is given).
        context: a ready :class:`~fewclip_tutorial.episode.Context` (notebooks build one
            and reuse it).
        pretrained, arch, root, cache_dir, progress, device: see
            :func:`~fewclip_tutorial.episode.build_context`.
        **options: the method's options (see ``METHODS[method].options``).

    Returns:
        ``{"method", "dataset", "backbone", "shots", "seed", "config", "val_accuracy",
        "test_accuracy", ["ood_accuracy"], ...method-specific keys}``, where ``config`` is
        ``{option: value}`` of every option of the run, defaults included.

    Raises:
        UnknownMethodError: unknown method name.
        ValueError: unknown/invalid option, or invalid episode.
    """
    spec = get_method(method)
    opts = resolve_options(spec, options)
    if context is None:
        context = build_context(
            dataset,
            backbone,
            shots,
            seed,
            pretrained=pretrained,
            arch=arch,
            root=root,
            device=device,
            cache_dir=cache_dir,
            progress=progress,
        )
    params = inspect.signature(spec.fn).parameters
    extra = {}
    if "progress" in params and "progress" not in opts:
        extra["progress"] = progress and context.progress
    seed_everything(context.seed)
    if spec.config is not None:
        config = _build(spec.config, opts)
        result = spec.fn(context, config, **extra)
        ran = flat_values(config)
    else:
        result = spec.fn(context, **opts, **extra)
        ran = dict(opts)
    if not isinstance(result, Mapping):
        raise TypeError(f"Method {method!r} returned {type(result).__name__}, expected a dict.")
    missing = [k for k in ("val_accuracy", "test_accuracy") if k not in result]
    if missing:
        raise ValueError(
            f"Method {method!r} returned no {missing}; build its result with ctx.report(predict)."
        )
    header = {
        "method": method,
        "dataset": context.dataset.name,
        "backbone": context.backbone.name,
        "shots": context.shots,
        "seed": context.seed,
        "config": ran,  # every option value that ran, defaults included
    }
    return {**header, **{k: v for k, v in result.items() if k not in header}}
