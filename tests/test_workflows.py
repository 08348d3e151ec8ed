"""The hosted workflows in .github/workflows: they exist, do what issue 12 asks, and lint clean.

actionlint runs when it is installed (``pip install -e ".[lint]"``, or ``$ACTIONLINT``);
``make lint`` runs it too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"


def _load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    if True in data:  # YAML 1.1 reads the key `on` as the boolean true
        data["on"] = data.pop(True)
    return data


def _steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def _runs(workflow: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in _steps(workflow))


def _uses(workflow: dict[str, Any]) -> list[str]:
    return [step["uses"].split("@")[0] for step in _steps(workflow) if "uses" in step]


def test_the_three_workflows_exist() -> None:
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) >= ["book.yml", "colab.yml", "test.yml"]


def test_test_workflow_runs_make_test_on_pushes_and_pull_requests() -> None:
    wf = _load("test.yml")
    assert {"push", "pull_request"} <= set(wf["on"])
    runs = [line.strip() for line in _runs(wf).splitlines()]
    assert "make test" in runs and "make lint" in runs
    job = wf["jobs"]["test"]
    # the whole suite, not only the notebooks, under each machine configuration
    assert job["strategy"]["matrix"]["config"] == ["default", "avx2", "threads2"]
    assert job["env"]["FEWCLIP_TEST_CONFIG"] == "${{ matrix.config }}"


def test_each_test_configuration_sets_what_it_names() -> None:
    script = (REPO / "scripts" / "test.sh").read_text()
    assert "avx2) export ATEN_CPU_CAPABILITY=avx2" in script
    assert "threads2) export OMP_NUM_THREADS=2" in script
    make = (REPO / "Makefile").read_text()
    for config in ("default", "avx2", "threads2"):
        assert f"FEWCLIP_TEST_CONFIG={config} bash scripts/test.sh" in make
    bad = subprocess.run(
        ["bash", str(REPO / "scripts" / "test.sh")],
        env={**os.environ, "FEWCLIP_TEST_CONFIG": "avx512"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown; use default, avx2 or threads2" in bad.stderr


def test_book_workflow_builds_checked_notebooks_and_deploys_to_pages() -> None:
    wf = _load("book.yml")
    test_name = _load("test.yml")["name"]
    trigger = wf["on"]["workflow_run"]
    assert trigger["workflows"] == [test_name] and trigger["branches"] == ["main"]
    build = wf["jobs"]["build"]
    # only a successful push to this repository, never a fork's branch called main
    condition = " ".join(build["if"].split())
    assert "workflow_run.conclusion == 'success'" in condition
    assert "head_repository.full_name == github.repository" in condition
    assert "make book-from-tests" in _runs(wf)
    uses = _uses(wf)
    assert "actions/upload-pages-artifact" in uses and "actions/deploy-pages" in uses
    deploy = wf["jobs"]["deploy"]
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert wf["permissions"] == {"contents": "read"}  # pages rights only where they are used


def test_colab_workflow_runs_the_chapters_as_colab_does() -> None:
    wf = _load("colab.yml")
    assert wf["on"]["schedule"][0]["cron"]
    runs = _runs(wf)
    assert "python -m venv" in runs  # a fresh environment
    assert "pip install -q -e" not in runs and "fewclip-tutorial" not in runs, (
        "the package must come from the chapters' own install cell, as on Colab"
    )
    assert "google/colab" in runs and 'cd "$CONTENT"' in runs  # Colab present, outside the repo
    assert "NotebookClient" in runs


def test_make_lint_runs_actionlint() -> None:
    makefile = (REPO / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "$(ACTIONLINT) .github/workflows/*.yml" in lint


def _actionlint() -> str | None:
    for candidate in (os.environ.get("ACTIONLINT"), str(REPO / ".venv" / "bin" / "actionlint")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("actionlint")


def test_workflows_lint_clean() -> None:
    exe = _actionlint()
    if exe is None:
        pytest.skip('actionlint is not installed (pip install -e ".[lint]")')
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    proc = subprocess.run([exe, *files], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
