#!/usr/bin/env bash
# Install privtune into .venv (pinned versions) and run the main job:
# the quick preset of both papers, `snakemake --cores all`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, from TORCH_INDEX_URL when set (a CPU or CUDA build: see the README), so that nothing
# installed after it pulls another build
.venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/snakemake --cores all "$@"
