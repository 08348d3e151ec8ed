"""A Sphinx extension for the book: the bibliography style ``fewclip``.

It is pybtex's ``alpha`` style plus one field, ``code``: the URL of the authors' code,
rendered as a link ("Code: <url>") next to the paper's URL.  sphinxcontrib-bibtex uses
it through ``bibtex_default_style: fewclip`` (``_config.yml``).
"""

from __future__ import annotations

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


def setup(app):  # noqa: ANN001, ANN201 - Sphinx's signature
    register_plugin("pybtex.style.formatting", "fewclip", FewclipStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
