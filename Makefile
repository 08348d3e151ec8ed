# fewclip-tutorial: every target sets up its own .venv first (see scripts/setup.sh).
# The two commands a new user needs:  make book   and   make test
PY := .venv/bin/python
ACTIONLINT ?= .venv/bin/actionlint
export PYTHONHASHSEED := 0

.PHONY: help setup test test-portable test-fast nbval book book-from-tests lint format bench pretrain notebooks clean assignments

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup:  ## create .venv and install the package with its [book,dev] extras (idempotent)
	@bash scripts/setup.sh

test: setup  ## the whole suite: lint, pytest, nbval over every notebook, then a book build from the checked notebooks
	@bash scripts/test.sh

test-portable: setup  ## the suite under the three configurations CI runs: default, ATEN_CPU_CAPABILITY=avx2, 2 threads
	FEWCLIP_TEST_CONFIG=default bash scripts/test.sh
	FEWCLIP_TEST_CONFIG=avx2 bash scripts/test.sh
	FEWCLIP_TEST_CONFIG=threads2 bash scripts/test.sh

test-fast: setup  ## the fast unit tests only (no slow tests, no notebooks): under 3 minutes on 2 cores
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

nbval: setup  ## nbval over every notebook in book/
	$(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with book/nbval_sanitize.cfg book/

book: setup  ## build the book into _build/html: changed chapters run (2 at a time, cached), a failed cell fails it
	$(PY) scripts/build_book.py --jobs 2

book-from-tests: setup  ## build the book from the committed (nbval-checked) outputs, no execution
	@bash scripts/build_book_noexec.sh

notebooks: setup  ## re-execute every notebook in place (after changing the package), then commit the outputs
	$(PY) scripts/execute_notebooks.py book/*.ipynb

lint: setup  ## ruff lint and format check (notebooks too: tidy_notebooks.py --check); actionlint on .github/workflows (the [lint] extra)
	.venv/bin/ruff check fewclip_tutorial tests benchmarks scripts book
	.venv/bin/ruff format --check fewclip_tutorial tests benchmarks scripts
	$(PY) scripts/tidy_notebooks.py --check book/*.ipynb
	@test -x $(ACTIONLINT) || $(PY) -m pip install -q -e ".[lint]"
	$(ACTIONLINT) .github/workflows/*.yml

format: setup  ## ruff auto-fix and format; tidy the notebooks (checks hidden, 88 columns: scripts/tidy_notebooks.py)
	.venv/bin/ruff check --fix fewclip_tutorial tests benchmarks scripts book
	.venv/bin/ruff format fewclip_tutorial tests benchmarks scripts
	$(PY) scripts/tidy_notebooks.py book/*.ipynb

bench: setup  ## speed benchmarks: one JSON line each, a ratio against the reference-style baseline measured in the same run
	$(PY) benchmarks/bench.py

pretrain: setup  ## re-train shapeworld-tiny from scratch (about 15 minutes on 2 cores) and export it
	$(PY) -m fewclip_tutorial.pretrain --out runs/pretrain
	$(PY) -m fewclip_tutorial.pretrain --export runs/pretrain/last.pt

assignments: setup  ## student edition (solutions removed) and instructor edition of every chapter in _build/assignments/
	$(PY) scripts/make_assignments.py --out _build/assignments

clean:  ## remove build outputs (keeps .venv)
	rm -rf _build .pytest_cache
