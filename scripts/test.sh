#!/usr/bin/env bash
# Lint, format check and the full test suite (tiny models + the real default model), on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
