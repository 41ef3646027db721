#!/usr/bin/env bash
# One GPU, a few minutes: the demo's recipe on SmolLM2-135M in bf16 on CUDA, shrunk to fit, with what only a
# GPU can tell: train-io tokens/s and peak GPU memory (beside what `retok plan` predicted), and eval-speed's
# decoding speed-up on the GPU.
#
#   bash scripts/gpu_check.sh                 # needs .venv (scripts/setup_env.sh) and the fetched assets
#   OUT=/tmp/gpu bash scripts/gpu_check.sh    # where the run folder and gpu_check.json go (default runs/gpu-check)
#
# It never runs in CI. Ends with one JSON line (also written to $OUT/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${RETOK_VENV:-.venv}/bin/python"
OUT="${OUT:-runs/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

"$PY" - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False)")
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {p.name}, {p.total_memory / 1e9:.0f} GB, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
EOF

# The GPU config, shrunk: 1 MB of each domain for the tokenizer, a 600 KB head fit, 60 distillation steps of
# 8 x 512 tokens, 40 KB per domain for held-out BPB and speed.
SETS=(
  --set "output_dir=$OUT/run"
  --set tokenizer.max_bytes=1000000
  --set fit.bytes=600000
  --set fit.epochs=2
  --set train.max_steps=60
  --set train.warmup_steps=6
  --set train.eval_every=60
  --set train.save_every=60
  --set eval.max_bytes=40000
  --set eval.repeats=3
)
CFG=configs/smollm2-zh-gpu.yaml

"$PY" -m retok.cli run "$CFG" "${SETS[@]}" --stages tokenizer,model-init
"$PY" -m retok.cli plan "$CFG" "${SETS[@]}" --json > "$OUT/plan.json"
"$PY" -m retok.cli plan "$CFG" "${SETS[@]}" || true
"$PY" -m retok.cli train-io "$CFG" "${SETS[@]}"
"$PY" -m retok.cli eval-speed "$CFG" "${SETS[@]}"

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
run = out / "run"
train = json.loads((run / "model-trained" / "train_report.json").read_text())
plan = json.loads((out / "plan.json").read_text())
speed = json.loads((run / "eval" / "report.json").read_text())
io = next(p for p in plan["phases"] if p["phase"] == "io")
result = {
    "benchmark": "gpu_check",
    "train_tokens_per_second": train["tokens_per_second"],
    "peak_gpu_mb": train.get("peak_gpu_mb"),
    "plan_io_gb": io["total"] / 1e9,
    "plan_peak_gb": plan["peak"] / 1e9,
    "measured_over_plan_io": (train.get("peak_gpu_mb") or 0) * 2**20 / io["total"],
    "bpb": train["bpb"],
    "decode_speedup_bytes_per_s": {d: v["speedup_bytes_per_s"] for d, v in speed["domains"].items()},
    "bpb_ratio": {d: v["bpb_ratio"] for d, v in speed["domains"].items()},
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result))
EOF
