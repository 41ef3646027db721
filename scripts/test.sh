#!/usr/bin/env bash
# Set up, fetch the real assets and build llama.cpp (the real-model tests need them), lint, and run the whole
# test suite.
#   bash scripts/test.sh            # everything, real-model tests included
#   bash scripts/test.sh -m "not real"   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${RETOK_VENV:-.venv}"
"$VENV/bin/python" scripts/fetch_assets.py -q --vocabs --gemma3
# A real llama.cpp for the GGUF tests (built once into the cache, ~10 minutes on 2 cores the first time).
"$VENV/bin/python" scripts/build_llamacpp.py -q
"$VENV/bin/ruff" check retok scripts tests
"$VENV/bin/ruff" format --check retok scripts tests
exec "$VENV/bin/python" -m pytest "$@"
