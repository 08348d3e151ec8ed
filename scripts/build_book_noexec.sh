#!/usr/bin/env bash
# Build the book from the committed notebook outputs (checked by nbval) without executing,
# and fail on Sphinx warnings that matter (broken references, bad toc, missing files).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p _build
# paths in the config are relative to its folder: the local extension is one level up
sed -e 's/^\(\s*execute_notebooks:\).*/\1 "off"/' \
  -e 's|^\(\s*bibstyle:\) book/_ext|\1 ../book/_ext|' _config.yml > _build/_config.noexec.yml
.venv/bin/jupyter-book build . --all --config _build/_config.noexec.yml 2>&1 | tee _build/book.log
if grep -E "WARNING|ERROR" _build/book.log | grep -v -E "$(cat book/allowed_warnings.txt | grep -v '^#' | paste -sd'|' -)" ; then
  echo "book build printed warnings (above); fix them or list a justified pattern in book/allowed_warnings.txt" >&2
  exit 1
fi
test -f _build/html/index.html
echo "book built: _build/html/index.html"
