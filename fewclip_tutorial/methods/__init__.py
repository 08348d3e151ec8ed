"""Few-shot methods.  Importing this package registers every method with
:data:`fewclip_tutorial.experiment.METHODS` and every chapter exercise with
:mod:`fewclip_tutorial.exercises`.

Method modules are listed in :data:`METHOD_MODULES`; one that does not exist
(yet) is skipped, any other import error is raised.  A module's
``register_exercises()`` function, when it has one, is called after its import.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from fewclip_tutorial.methods import baselines

logger = logging.getLogger(__name__)

__all__ = ["METHOD_MODULES", "baselines", "loaded_modules"]

#: Method modules imported (in this order) when the package is imported.
METHOD_MODULES: tuple[str, ...] = ("tip_adapter", "cross_modal", "fd_align", "clap")

_LOADED: dict[str, ModuleType] = {"baselines": baselines}


def _import_methods() -> dict[str, ModuleType]:
    """Import every module of :data:`METHOD_MODULES` that exists.

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
        register = getattr(module, "register_exercises", None)
        if callable(register):
            try:
                register()
            except NotImplementedError:  # a module whose exercises are not written yet
                logger.debug("%s.register_exercises is not implemented yet", full)
    return _LOADED


def loaded_modules() -> list[str]:
    """Names of the method modules that were imported."""
    return list(_LOADED)


_import_methods()
