"""One repository URL: ``[project.urls] Repository`` in pyproject.toml, and nothing else.

``scripts/sync_urls.py`` derives ``_config.yml``'s repository, the README badges and every
notebook's Colab badge and install cell from it.  These tests fail when a file in the
repository names another URL for this project, or installs the package with the ``[book]``
extra (which drags jupyter-book and Sphinx into Colab).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_sync_urls():
    spec = importlib.util.spec_from_file_location("sync_urls", REPO / "scripts" / "sync_urls.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sync_urls = _load_sync_urls()
URLS = sync_urls.repository_url(REPO)

#: Links that name a GitHub repository of this project (a name with "fewclip" in it), a Colab
#: notebook of any repository, a GitHub Pages site of this project, or a git install line.
PROJECT_LINKS = [
    re.compile(r"github\.com/([\w.-]*fewclip[\w.-]*)/([\w.-]+)", re.I),
    re.compile(r"github\.com/([\w.-]+)/([\w.-]*fewclip[\w.-]*)", re.I),
    re.compile(r"colab\.research\.google\.com/github/([\w.-]+)/([\w.-]+)/blob/"),
    re.compile(r"([\w-]+)\.github\.io/([\w.-]*fewclip[\w.-]*)", re.I),
]
BOOK_INSTALL = re.compile(r"fewclip-tutorial\[[^\]]*\]\s*@\s*git\+")


def _project_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the project's files")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    return [REPO / name for name in listed if name and (REPO / name).is_file()]


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files (images, checkpoints)


# --------------------------------------------------------------------------- the setting


def test_the_setting_is_a_github_repository() -> None:
    assert URLS.repository.startswith("https://github.com/")
    assert URLS.repository == f"https://github.com/{URLS.owner}/{URLS.name}"
    assert URLS.install_spec == f"fewclip-tutorial @ git+{URLS.repository}@main"
    assert "[" not in URLS.install_spec


def test_repository_url_errors(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(ValueError, match=r"\[project.urls\] Repository"):
        sync_urls.repository_url(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[project.urls]\nRepository = "https://gitlab.com/a/b"\n'
    )
    with pytest.raises(ValueError, match="https://github.com/OWNER/NAME"):
        sync_urls.repository_url(tmp_path)


# --------------------------------------------------------------------------- every file


def test_every_project_url_is_the_setting() -> None:
    wrong: list[str] = []
    for path in _project_files():
        if path == Path(__file__).resolve():  # this file's fixtures name other repositories
            continue
        text = _text(path)
        if text is None:
            continue
        for pattern in PROJECT_LINKS:
            for match in pattern.finditer(text):
                owner, name = match.group(1), match.group(2)
                if (owner.lower(), name) != (URLS.owner.lower(), URLS.name):
                    rel = path.relative_to(REPO).as_posix()
                    wrong.append(f"{rel}: {match.group(0)}")
    assert not wrong, (
        f"URLs that are not {URLS.repository} (set it in pyproject's [project.urls] and run "
        "python scripts/sync_urls.py):\n" + "\n".join(wrong[:20])
    )


def test_no_install_line_with_the_book_extra_outside_notebooks() -> None:
    found = [
        path.relative_to(REPO).as_posix()
        for path in _project_files()
        if path.suffix != ".ipynb" and BOOK_INSTALL.search(_text(path) or "")
    ]
    assert not found, f"git install lines with an extra in: {found}"


def test_config_and_readme_are_generated_from_the_setting() -> None:
    for path, (before, after) in sync_urls.planned(REPO, URLS, ("config", "readme")).items():
        assert before == after, f"{path.name} is out of date: run python scripts/sync_urls.py"
    config = (REPO / "_config.yml").read_text()
    assert f"url: {URLS.repository}\n" in config
    readme = (REPO / "README.md").read_text()
    assert URLS.pages in readme and URLS.colab(sync_urls.FIRST_CHAPTER) in readme


def test_notebook_colab_cells_are_generated_from_the_setting() -> None:
    """Every chapter's Colab badge opens that chapter in this repository, and its install cell
    installs ``fewclip-tutorial @ git+<URL>@main`` without the ``[book]`` extra.

    Fails until ``python scripts/sync_urls.py --only notebooks`` has been run on the
    notebooks (issue 12: they were being edited when the script was written)."""
    notebooks = sync_urls.notebooks(REPO)
    assert len(notebooks) >= 7
    stale, with_book, without_install = [], [], []
    for path in notebooks:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO).as_posix()
        if sync_urls.sync_notebook(text, URLS, rel) != text:
            stale.append(rel)
        if BOOK_INSTALL.search(text):
            with_book.append(rel)
        if URLS.install_spec not in text or URLS.colab(rel) not in text:
            without_install.append(rel)
    assert not with_book, f"install lines with [book]: {with_book}"
    assert not stale, f"out of date (run python scripts/sync_urls.py --only notebooks): {stale}"
    assert not without_install, f"no Colab badge or install cell: {without_install}"


# --------------------------------------------------------------------------- the rewriters


def test_sync_notebook_rewrites_foreign_urls_and_drops_the_extra() -> None:
    urls = sync_urls.Urls("https://github.com/me/proj", "me", "proj")
    before = (
        '"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
        '(https://colab.research.google.com/github/old/repo/blob/dev/book/02_x.ipynb)",\n'
        '"        \\"pip\\", \'install -q \\"fewclip-tutorial[book,dev] @ '
        'git+https://github.com/old/repo@main\\"\'\\n",\n'
    )
    after = sync_urls.sync_notebook(before, urls, "book/02_x.ipynb")
    assert after == (
        '"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
        '(https://colab.research.google.com/github/me/proj/blob/main/book/02_x.ipynb)",\n'
        '"        \\"pip\\", \'install -q \\"fewclip-tutorial @ '
        'git+https://github.com/me/proj@main\\"\'\\n",\n'
    )
    assert sync_urls.sync_notebook(after, urls, "book/02_x.ipynb") == after


def test_sync_config_and_readme() -> None:
    urls = sync_urls.Urls("https://github.com/me/proj", "me", "proj")
    config = "title: x\nrepository:\n  url: https://github.com/old/repo\n  branch: main\n"
    assert sync_urls.sync_config(config, urls) == config.replace("old/repo", "me/proj")
    with pytest.raises(ValueError, match="repository"):
        sync_urls.sync_config("title: x\n", urls)
    readme = "# proj\n\nText.\n"
    once = sync_urls.sync_readme(readme, urls)
    assert once.startswith("# proj\n\n" + sync_urls.README_START)
    assert once.endswith(sync_urls.README_END + "\n\nText.\n")
    assert "https://me.github.io/proj/" in once
    assert sync_urls.sync_readme(once, urls) == once
    moved = sync_urls.Urls("https://github.com/you/proj", "you", "proj")
    assert "github.com/me/" not in sync_urls.sync_readme(once, moved)
