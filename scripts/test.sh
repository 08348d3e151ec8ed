#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, unit tests, nbval over every notebook,
# then a book build from the notebooks nbval has just checked (no second execution).
#
# FEWCLIP_TEST_CONFIG picks the machine configuration the suite must pass under (the
# committed notebook outputs and every tolerance must hold on each; `make test-portable`
# runs all three):
#   default   one thread, the CPU's best kernels (AVX-512 where it has them)   [make test]
#   avx2      one thread, ATEN_CPU_CAPABILITY=avx2 (the kernels of most other CPUs)
#   threads2  two threads (OMP_NUM_THREADS=2): other summation orders in parallel kernels
# Only `default` also lints and builds the book; the others run pytest and nbval.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${FEWCLIP_TEST_CONFIG:-default}"
export PYTHONHASHSEED=0 TQDM_DISABLE=1
# one thread unless the configuration says otherwise: training on a CPU is only
# bit-reproducible at a fixed thread count, and the committed notebook outputs were produced
# with one (scripts/execute_notebooks.py does the same)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
unset ATEN_CPU_CAPABILITY
case "$CONFIG" in
  default) ;;
  avx2) export ATEN_CPU_CAPABILITY=avx2 ;;
  threads2) export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 ;;
  *) echo "FEWCLIP_TEST_CONFIG=$CONFIG is unknown; use default, avx2 or threads2" >&2; exit 2 ;;
esac
export FEWCLIP_CACHE="${FEWCLIP_CACHE:-$PWD/_build/feature-cache}"
# finished sweep cells shared by the chapters (fewclip_tutorial.sweep.results_cache_path:
# keyed by the package's files and this configuration, so nothing stale is ever read)
export FEWCLIP_RESULTS_CACHE="${FEWCLIP_RESULTS_CACHE:-$PWD/_build/results-cache}"
echo "== configuration: $CONFIG (OMP_NUM_THREADS=$OMP_NUM_THREADS, ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-default}; $(.venv/bin/python -c 'import torch; print("kernels", torch.backends.cpu.get_cpu_capability())'))"
if [[ "$CONFIG" == default ]]; then
  echo "== ruff"
  .venv/bin/ruff check fewclip_tutorial tests benchmarks scripts book
fi
NBVAL=(--nbval --nbval-current-env --nbval-sanitize-with book/nbval_sanitize.cfg)
# Two phases on two workers (pytest-xdist; one file per worker at a time, so a notebook's
# cells stay in one kernel). Phase 1: the two longest chapters first, one per worker, then
# the other chapters and the unit tests. Phase 2: the comparison chapter, which reads the
# runs chapters 4 and 5 made from FEWCLIP_RESULTS_CACHE and runs the rest in two processes.
comparison=book/06_comparison.ipynb
first=(book/04_fd_align.ipynb book/05_clap.ipynb)
rest=()
for nb in book/*.ipynb; do
  [[ "$nb" == "$comparison" || " ${first[*]} " == *" $nb "* ]] || rest+=("$nb")
done
echo "== pytest + nbval, phase 1: unit tests and every chapter but the comparison"
.venv/bin/python -m pytest -q -n 2 --dist loadfile "${first[@]}" "${rest[@]}" tests \
  "${NBVAL[@]}" --durations=15
echo "== nbval, phase 2: $comparison"
.venv/bin/python -m pytest -q "$comparison" "${NBVAL[@]}" --durations=5
if [[ "$CONFIG" == default ]]; then
  # as the weekly Colab workflow runs every chapter: a fresh environment outside the
  # repository, the chapter's own install cell (here from this checkout: no GitHub in CI)
  echo "== chapter 1 as Colab runs it (scripts/colab_run.py)"
  FEWCLIP_PKG="$PWD" .venv/bin/python scripts/colab_run.py book/01_zero_shot_and_linear_probe.ipynb
  echo "== book (from the checked notebooks)"
  bash scripts/build_book_noexec.sh
fi
