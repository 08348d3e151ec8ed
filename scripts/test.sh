#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, unit tests, nbval over every notebook,
# then a book build from the notebooks nbval has just checked (no second execution).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0 TQDM_DISABLE=1
# one thread: training on a CPU is only bit-reproducible at a fixed thread count, and the
# committed notebook outputs were produced with one (scripts/execute_notebooks.py does the same)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export FEWCLIP_CACHE="${FEWCLIP_CACHE:-$PWD/_build/feature-cache}"
echo "== ruff"
.venv/bin/ruff check fewclip_tutorial tests benchmarks scripts
echo "== pytest + nbval"
.venv/bin/python -m pytest -q tests book \
  --nbval --nbval-current-env --nbval-sanitize-with book/nbval_sanitize.cfg \
  --durations=15
echo "== book (from the checked notebooks)"
bash scripts/build_book_noexec.sh
