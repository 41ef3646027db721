#!/usr/bin/env bash
# The main job: set up, fetch the real model and corpora, and run the whole pipeline on SmolLM2-135M (Chinese).
#   bash scripts/demo.sh                      # about 20 minutes on a 2-core CPU
#   bash scripts/demo.sh --set train.max_steps=20   # extra arguments go to `retok run`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV="${RETOK_VENV:-.venv}"
"$VENV/bin/python" scripts/fetch_assets.py
exec "$VENV/bin/retok" run configs/smollm2-zh.yaml "$@"
