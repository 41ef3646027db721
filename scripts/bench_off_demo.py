"""The default recipe off the demo, in one table: finished runs side by side (each scored on its own held-out
text), per domain the compression, BPB after init-embeddings and after training as multiples of the original's,
the target task's gold-answer BPB ratio where the run scored one, and the run's minutes.

    python scripts/bench_off_demo.py demo:runs/smollm2-zh ja:runs/smollm2-ja gemma3:runs/gemma3-zh \\
        zh-left-out:runs/leave-out/zh-debian-reference-zh-cn/run

The runs, made with the defaults the demo config sets (each a few tens of minutes on 2 cores):

    retok run configs/smollm2-zh.yaml                                      # the demo
    python scripts/fetch_assets.py --only ja && retok run configs/smollm2-ja.yaml    # Japanese
    python scripts/fetch_assets.py --gemma3 && retok run configs/smollm2-zh.yaml \\
        --set model.path='${RETOK_CACHE}/assets/models/gemma-3-270m-q4_k_m.gguf' --set output_dir=runs/gemma3-zh
    python scripts/bench_leave_out.py zh:debian-reference-zh-cn            # a zh source never learned from

Reads only the runs' reports (nothing is run). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def run_rows(run: Path) -> dict:
    """Per-domain figures of one finished run, and its minutes (the stages' own wall times summed)."""
    ev = _load(run / "eval" / "report.json")
    if not ev:
        sys.exit(f"bench_off_demo: {run}/eval/report.json is missing; run the pipeline first")
    init = _load(run / "model-init" / "init_report.json").get("bpb", {})
    seconds = sum(
        _load(run / stage / "retok_stage.json").get("seconds") or 0.0
        for stage in ("tokenizer", "model-init", "model-trained", "eval", "export")
    )
    rows = {}
    for name, d in ev["domains"].items():
        original = d["old"]["bpb"]
        i = init.get(name, {})
        # the init report rounds to 5 decimals; the same original BPB means the same slice of text
        same_slice = i.get("original") is not None and abs(i["original"] - original) < 1e-4
        rows[name] = {
            "compression": d["compression_ratio"],
            "bpb_original": original,
            "init_ratio": i["init"] / original if same_slice and i.get("init") else None,
            "after_ratio": d["bpb_ratio"],
        }
    tasks = {k: t.get("gold_bpb_ratio") for k, t in (ev.get("tasks") or {}).items()}
    return {"minutes": round(seconds / 60, 1), "domains": rows, "tasks": tasks}


def _x(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else f"{v:{spec}}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME:RUN_DIR of finished runs")
    args = ap.parse_args()
    out = {}
    for spec in args.runs:
        name, _, folder = spec.partition(":")
        if not folder:
            sys.exit(f"bench_off_demo: {spec!r} is not NAME:RUN_DIR")
        out[name] = run_rows(Path(folder))
    print("| run | minutes | domain | compression | BPB init | BPB after | task gold BPB |")
    print("|---|---:|---|---:|---:|---:|---|")
    for name, r in out.items():
        tasks = ", ".join(f"{k} {_x(v, '.3f')}" for k, v in r["tasks"].items()) or "-"
        for k, (dom, d) in enumerate(r["domains"].items()):
            print(
                f"| {name if k == 0 else ''} | {r['minutes'] if k == 0 else ''} | {dom} | "
                f"{d['compression']:.2f}x | {_x(d['init_ratio'])} | {_x(d['after_ratio'])} | "
                f"{tasks if k == 0 else ''} |"
            )
    print(json.dumps({"bench": "off_demo", "runs": out}))


if __name__ == "__main__":
    main()
