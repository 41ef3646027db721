#!/usr/bin/env bash
# Run every benchmark script and collect the JSON line each ends with into one table (benchmarks.json too).
#   bash scripts/bench_all.sh            # uses .venv (scripts/setup_env.sh) and the fetched assets
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RETOK_VENV:-.venv}"
PY="$VENV/bin/python"
out="${BENCH_OUT:-runs/benchmarks}"
mkdir -p "$out"
: > "$out/benchmarks.jsonl"
for script in scripts/bench_*.py; do
  name="$(basename "$script" .py)"
  echo "== $name" >&2
  # A benchmark exits 1 when it misses its target; its JSON line still holds the figures, so keep it.
  rc=0
  "$PY" "$script" > "$out/$name.log" 2> "$out/$name.err" || rc=$?
  if ! tail -n 1 "$out/$name.log" | "$PY" -c "import json,sys; d=json.loads(sys.stdin.read()); d.setdefault('benchmark','$name'); d['exit_code']=$rc; print(json.dumps(d))" >> "$out/benchmarks.jsonl" 2> /dev/null; then
    echo "{\"benchmark\": \"$name\", \"error\": \"failed (exit $rc); see $out/$name.err\"}" >> "$out/benchmarks.jsonl"
  fi
done
"$PY" - "$out/benchmarks.jsonl" <<'PYEOF'
import json, sys

def flat(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from flat(v, key + ".")
        else:
            yield key, v

# the side-by-side figures: ratios against the baseline, verdicts, and the exit code
WANT = ("ratio", "_vs_", "speedup", "not_slower", "targets_met", "exit_code", "error")
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| benchmark | figure | value |\n|---|---|---|")
for r in rows:
    name = r.pop("benchmark")
    for k, v in flat(r):
        if isinstance(v, (int, float, str, bool)) and any(w in k for w in WANT):
            print(f"| {name} | {k} | {v:.3g} |" if isinstance(v, float) else f"| {name} | {k} | {v} |")
PYEOF
