#!/usr/bin/env bash
# Create .venv and install fewclip-tutorial with its [book,dev] extras.
# Idempotent: skipped when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STAMP=.venv/.fewclip-installed
WANT="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision first and unpinned: Colab and conda bring their own; on machines with a
# pip constraint file (as in our CI) the capped versions come from local disk.
.venv/bin/python -m pip install -q torch torchvision
.venv/bin/python -m pip install -q -e ".[book,dev]"
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$WANT" > "$STAMP"
echo "[setup] done: $(.venv/bin/python -c 'import torch, open_clip; print("torch", torch.__version__, "open_clip", open_clip.__version__)')"
