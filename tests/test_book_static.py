"""Static checks of the committed notebooks: what must hold without executing them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fewclip_tutorial import plots

BOOK = Path(__file__).resolve().parents[1] / "book"
NOTEBOOKS = sorted(BOOK.glob("*.ipynb"))


def _code(nb_path: Path) -> list[str]:
    nb = json.loads(nb_path.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_chapter_reads_or_writes_paths_relative_to_the_working_directory(path):
    # on Colab the working directory is /content: data and figures come through the package
    pattern = re.compile(r"""(Path\(|open\(|savefig\(|read_csv\(|imread\()\s*["'](?!/)""")
    for src in _code(path):
        assert not pattern.search(src), f"{path.name}: a relative path in\n{src}"


def test_readme_figure_is_written_only_inside_a_checkout_when_asked(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert plots.repository_root() == BOOK.parent
    fig = plt.figure()
    monkeypatch.setattr(plots, "repository_root", lambda: None)
    assert plots.save_readme_figure(fig, name="never.png") is None
    assert not (BOOK / "figures" / "never.png").exists()
    (tmp_path / "book").mkdir()
    monkeypatch.setattr(plots, "repository_root", lambda: tmp_path)
    monkeypatch.delenv(plots.WRITE_README_FIGURE_ENV, raising=False)
    assert plots.save_readme_figure(fig, name="x.png") is None  # a checkout, but not asked
    assert not (tmp_path / "book" / "figures").exists()
    monkeypatch.setenv(plots.WRITE_README_FIGURE_ENV, "1")
    written = plots.save_readme_figure(fig, name="x.png")
    assert written == tmp_path / "book" / "figures" / "x.png" and written.stat().st_size > 0
    plt.close(fig)


#: A few widget-view outputs (a reference of about 300 bytes each) are fine; a notebook that
#: stores progress bars or widget models in its outputs is not.
WIDGET_OUTPUT_BYTES = 4096


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_widget_state(path):
    # saved widget state is stale on the static page: the page shows a frozen control that
    # does nothing, and progress bars alone made a chapter's page 177 KB
    nb = json.loads(path.read_text())
    assert "widgets" not in nb["metadata"], (
        f"{path.name} stores widget state in metadata.widgets; re-execute it with "
        "scripts/execute_notebooks.py (which drops it) or delete the key"
    )
    widget_bytes = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            mimes = [m for m in out.get("data", {}) if "jupyter.widget" in m]
            assert "application/vnd.jupyter.widget-state+json" not in mimes, path.name
            if mimes:
                widget_bytes += len(json.dumps(out))
    assert widget_bytes <= WIDGET_OUTPUT_BYTES, (
        f"{path.name}: {widget_bytes} bytes of widget outputs (limit {WIDGET_OUTPUT_BYTES})"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_chapter_cites_author_year_and_ends_with_its_own_bibliography(path):
    nb = json.loads(path.read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert re.search(r"\{cite:[pt]\}`", text), f"{path.name} cites no paper with {{cite:p}}"
    last = "".join(nb["cells"][-1]["source"])
    assert last.startswith("## References") and ":filter: docname in docnames" in last


def test_the_citation_style_reaches_sphinx():
    # jupyter-book 1.x passes only bibtex_bibfiles through from the top level of
    # _config.yml: the reference style must sit under sphinx.config to take effect
    import yaml

    config = yaml.safe_load((BOOK.parent / "_config.yml").read_text())
    assert "bibtex_reference_style" not in config
    sphinx = config["sphinx"]["config"]
    assert sphinx["bibtex_reference_style"] == "author_year_round"
    assert sphinx["bibtex_default_style"] == "fewclip"
    assert config["sphinx"]["local_extensions"] == {"bibstyle": "book/_ext"}
    bib = (BOOK.parent / "references.bib").read_text()
    assert "Code:" not in bib and "code " in bib  # code URLs in their own field: links


# ---------------------------------------------------------------- the chapter template

#: the method chapters that follow the template (issue 22: every method chapter)
TEMPLATE_CHAPTERS = [
    "02_tip_adapter.ipynb",
    "03_cross_modal.ipynb",
    "04_fd_align.ipynb",
    "05_clap.ipynb",
]
TEMPLATE = [
    "```{admonition} In this chapter you will",
    "## Claims of the paper, here",
    "```{admonition} Key takeaways",
    "## Exercises",
    "## References",
]
GLUE = re.compile(r"\{glue:text\}`[^`]+`|\{cite:[pt]\}`[^`]+`|`[^`]*`")


def _markdown(path: Path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def claims_table_problems(text: str) -> list[str]:
    """Cells of the *Claims* table (past its first two columns: claim and task) that hold
    a digit not inside a ``{glue:text}`` role: a number typed into the prose."""
    section = text.split("## Claims of the paper, here", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    if len(rows) < 3:
        return ["no claims table"]
    bad = []
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for cell in cells[2:]:
            if re.search(r"\d", GLUE.sub("", cell)):
                bad.append(f"{cells[0][:40]}: {cell}")
    return bad


@pytest.mark.parametrize("name", TEMPLATE_CHAPTERS)
def test_method_chapter_has_every_template_heading_in_order(name):
    text = _markdown(BOOK / name)
    at = [text.find(h) for h in TEMPLATE]
    missing = [h for h, i in zip(TEMPLATE, at, strict=True) if i < 0]
    assert not missing, f"{name} lacks {missing}"
    assert at == sorted(at), f"{name}: template headings out of order"


@pytest.mark.parametrize("name", TEMPLATE_CHAPTERS)
def test_claims_table_numbers_come_from_glue(name):
    assert claims_table_problems(_markdown(BOOK / name)) == []


def test_the_claims_check_catches_a_typed_number():
    table = (
        "## Claims of the paper, here\n\n| claim | task | ours | verdict |\n|---|---|---|---|\n"
        "| a | t | {glue:text}`x` | {glue:text}`v` |\n| b (16-shot) | t | 61.9 | partly |\n"
    )
    assert claims_table_problems(table) == ["b (16-shot): 61.9"]
