"""Run chapters as a Colab user runs them, on this machine.

A fresh virtual environment holding only what Colab preinstalls (torch, torchvision,
matplotlib, pandas, seaborn, ipywidgets, scikit-learn, tqdm and the Jupyter kernel; not
this package), a stand-in ``google.colab`` module imported when the kernel starts, each
chapter copied to a folder outside the repository (Colab's ``/content``), then every cell
executed: the chapter's own first cell installs the package.  It installs ``FEWCLIP_PKG``
when set (``make test`` sets it to this checkout, since CI reaches no GitHub), else the
chapter's own line (``fewclip-tutorial @ git+...@main``), as on Colab.

The committed values of a chapter cannot be expected to hold on Colab; its checks print
their differences in one line there (``fewclip_tutorial.course.nbcheck``), so a chapter
fails here only when a cell raises.

    python scripts/colab_run.py book/01_zero_shot_and_linear_probe.ipynb [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what Colab has before the install cell runs (the package's own dependencies excepted)
COLAB_PACKAGES = [
    "torch", "torchvision", "ipykernel", "nbclient", "nbformat", "matplotlib", "pandas",
    "seaborn", "ipywidgets", "scikit-learn", "tqdm",
]  # fmt: skip

DRIVER = """
import sys, time
import nbformat
from nbclient import NotebookClient

path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
start = time.time()
NotebookClient(nb, timeout=3600, kernel_name="python3").execute()
nbformat.write(nb, path)
print(f"ok {path} ({time.time() - start:.0f} s)", flush=True)
"""


def make_environment(where: Path) -> Path:
    """A fresh venv with Colab's preinstalled packages and a kernel of its own."""
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *COLAB_PACKAGES], check=True)
    subprocess.run(
        [str(python), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    fake = where / "fake" / "google" / "colab"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text('"""Stand-in: the chapters only test its presence."""\n')
    startup = where / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab  # noqa: F401\n")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="+", type=Path)
    parser.add_argument("--keep", type=Path, help="build the environment here and keep it")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.chapters if not p.is_file()]
    if missing:
        parser.error(f"no such chapter: {', '.join(missing)}")
    where = args.keep or Path(tempfile.mkdtemp(prefix="fewclip-colab-"))
    where.mkdir(parents=True, exist_ok=True)
    start = time.time()
    python = make_environment(where)
    print(f"[colab] environment ready in {time.time() - start:.0f} s: {where}", flush=True)
    content = where / "content"
    content.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEWCLIP_", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{python.parent}:{env.get('PATH', '')}",
        PYTHONPATH=str(where / "fake"),
        IPYTHONDIR=str(where / "ipython"),
        JUPYTER_DATA_DIR=str(where / "jupyter"),  # no user-level kernel: the venv's own
        TQDM_DISABLE="1",
    )
    if os.environ.get("FEWCLIP_PKG"):
        env["FEWCLIP_PKG"] = os.environ["FEWCLIP_PKG"]
    failed = []
    for chapter in args.chapters:
        target = content / chapter.name
        shutil.copy(chapter, target)
        proc = subprocess.run(
            [str(python), "-c", DRIVER, target.name], cwd=content, env=env, check=False
        )
        if proc.returncode != 0:
            failed.append(chapter.name)
    if not args.keep:
        shutil.rmtree(where, ignore_errors=True)
    if failed:
        print(f"[colab] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
