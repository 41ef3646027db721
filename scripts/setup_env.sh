#!/usr/bin/env bash
# Create the virtual environment (.venv, or $RETOK_VENV) with the pinned dependencies and retok installed.
# Idempotent: a second run with unchanged pyproject.toml/constraints.txt does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RETOK_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.retok-setup"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/retok" ]; then
  exit 0
fi
echo "retok setup: creating $VENV with pinned dependencies (a few minutes the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: on a CPU-only machine this is the CPU wheel; an unpinned torch would pull a CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
echo "$want" > "$stamp"
