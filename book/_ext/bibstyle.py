"""A Sphinx extension for the book: the bibliography style ``fewclip`` and the citation
style ``author_year_round``.

``fewclip`` is pybtex's ``alpha`` style plus one field, ``code``: the URL of the authors'
code, rendered as a link ("Code: <url>") next to the paper's URL (``bibtex_default_style:
fewclip`` in ``_config.yml``).  ``author_year_round`` is sphinxcontrib-bibtex's author-year
citations in round brackets, "(Zhang et al., 2022)" and "Zhang et al. (2022)"
(``bibtex_reference_style``).
"""

from __future__ import annotations

import dataclasses

from pybtex.plugin import register_plugin
from pybtex.style.formatting.alpha import Style as AlphaStyle
from pybtex.style.template import field, href, join, optional, sentence


class FewclipStyle(AlphaStyle):
    """``alpha`` with the authors' code as a link."""

    def format_web_refs(self, e):  # noqa: ANN001, ANN201 - pybtex's signature
        return sentence[
            optional[
                join["Code: ", href[field("code", raw=True), field("code", raw=True)]]
            ],
            super().format_web_refs(e),
        ]


def _round_brackets():
    from sphinxcontrib.bibtex.style.referencing import BracketStyle
    from sphinxcontrib.bibtex.style.referencing.author_year import (
        AuthorYearReferenceStyle,
    )

    @dataclasses.dataclass
    class AuthorYearRound(AuthorYearReferenceStyle):
        """Author-year citations in round brackets."""

        bracket_parenthetical: BracketStyle = dataclasses.field(
            default_factory=lambda: BracketStyle(left="(", right=")")
        )
        bracket_textual: BracketStyle = dataclasses.field(
            default_factory=lambda: BracketStyle(left="(", right=")")
        )

    return AuthorYearRound


def setup(app):  # noqa: ANN001, ANN201 - Sphinx's signature
    register_plugin("pybtex.style.formatting", "fewclip", FewclipStyle)
    from sphinxcontrib.bibtex.plugin import register_plugin as register_referencing

    register_referencing(
        "sphinxcontrib.bibtex.style.referencing", "author_year_round", _round_brackets()
    )
    return {"parallel_read_safe": True, "parallel_write_safe": True}
