"""Few-shot methods.  Importing this package registers every method with
:data:`fewclip_tutorial.methods.registry.METHODS`.

Each method is a folder of the same files: ``config.py`` (its frozen options
dataclass), ``core.py`` (the paper's math: tensors in, logits and losses out),
``train.py`` or ``search.py`` (its step for the one loop,
:func:`fewclip_tutorial.training.fit`) and ``runner.py`` (the registered entry point).
The two baselines are one small module, :mod:`fewclip_tutorial.methods.baselines`.

Method packages are listed in :data:`METHOD_MODULES`; one that does not exist
(yet) is skipped, any other import error is raised.  The chapter exercises live
in :mod:`fewclip_tutorial.course`, which refers to the methods, never the reverse.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fewclip_tutorial.methods import baselines

__all__ = ["METHOD_MODULES", "baselines", "loaded_modules"]

#: Method packages imported (in this order) when the package is imported.
METHOD_MODULES: tuple[str, ...] = ("tip_adapter", "cross_modal", "fd_align", "clap")

_LOADED: dict[str, ModuleType] = {"baselines": baselines}


def _import_methods() -> dict[str, ModuleType]:
    """Import every package of :data:`METHOD_MODULES` that exists.

    Only a ``ModuleNotFoundError`` for that very module is skipped; an error
    inside an existing module (including a missing dependency it imports) is raised.
    """
    for short in METHOD_MODULES:
        full = f"{__name__}.{short}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as err:
            if err.name == full:
                continue
            raise
        _LOADED[short] = module
    return _LOADED


def loaded_modules() -> list[str]:
    """Names of the method modules that were imported."""
    return list(_LOADED)


_import_methods()
