#!/usr/bin/env bash
# GPU smoke test for maintainers: every method once on CUDA (random-init ViT-B-32, a fake
# EuroSAT in torchvision's layout, nothing downloaded) and feature-extraction throughput in
# images/s. About 5 minutes on one GPU. Also runs on a CPU: add --tiny (or set
# FEWCLIP_SMOKE_TINY=1) for a small model and data set (about a minute).
#   bash scripts/gpu_smoke.sh [--tiny] [--out report.json] [--workdir DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  py="$repo/.venv/bin/python"
else
  py="python3"
fi
exec "$py" "$here/gpu_smoke.py" "$@"
