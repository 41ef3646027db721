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
  if "$PY" "$script" > "$out/$name.log" 2> "$out/$name.err"; then
    tail -n 1 "$out/$name.log" | "$PY" -c "import json,sys; d=json.loads(sys.stdin.read()); d.setdefault('benchmark','$name'); print(json.dumps(d))" >> "$out/benchmarks.jsonl"
  else
    echo "{\"benchmark\": \"$name\", \"error\": \"failed; see $out/$name.err\"}" >> "$out/benchmarks.jsonl"
  fi
done
"$PY" - "$out/benchmarks.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| benchmark | figure | value |\n|---|---|---|")
for r in rows:
    name = r.pop("benchmark")
    for k, v in r.items():
        if isinstance(v, (int, float, str, bool)) and ("ratio" in k or "speedup" in k or k == "error" or k.endswith("_s") or "rss" in k or "mb_s" in k):
            print(f"| {name} | {k} | {v:.3g} |" if isinstance(v, float) else f"| {name} | {k} | {v} |")
PYEOF
