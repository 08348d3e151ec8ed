"""Close-match hints for mistyped names ("Did you mean ...?"), shared by every registry.

Kept free of heavy imports (no torch) so that the command line can use it before it
imports anything else.

>>> did_you_mean("eurosatt", ["eurosat", "dtd"])
" Did you mean 'eurosat'?"
>>> did_you_mean("xyz", ["eurosat", "dtd"])
''
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(word: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """``" Did you mean 'x'?"`` (with a leading space) for the closest of ``choices``, or ``""``.

    Args:
        word: what the user typed.
        choices: the valid names.
        n: how many close matches to name at most (comma-separated).
        cutoff: :func:`difflib.get_close_matches` similarity threshold in ``[0, 1]``.
    """
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""
