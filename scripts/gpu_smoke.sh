#!/usr/bin/env bash
# GPU smoke test for maintainers: every method once on CUDA (random-init ViT-B-32, a fake
# EuroSAT in torchvision's layout, nothing downloaded) and feature-extraction throughput in
# images/s. Sized to finish well within 10 minutes on one GPU (not yet timed on one:
# no GPU was at hand when it was written). Also runs on a CPU: add --tiny (or set
# FEWCLIP_SMOKE_TINY=1) for a small model and data set (about 30 s on 2 cores).
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
