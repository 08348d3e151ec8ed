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


def test_readme_figure_is_written_only_inside_a_checkout(tmp_path, monkeypatch):
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
    written = plots.save_readme_figure(fig, name="x.png")
    assert written == tmp_path / "book" / "figures" / "x.png" and written.stat().st_size > 0
    plt.close(fig)
