"""What training the new input rows as a parameter of their own (retok.train.rows) saves per train-io step,
against training them through the whole embedding matrix (old rows masked): the same run's io-phase steps
both ways, side by side.

    python scripts/bench_compact_rows.py runs/gemma3-zh                  # a run with tokenizer/ and model-init/
    python scripts/bench_compact_rows.py runs/smollm2-zh --steps 6 --rounds 2

Each side is the real stage (retok.train.stage.train_io) in its own subprocess (so its peak RSS is its own) on a
throwaway output folder holding links to the run's tokenizer and model-init, with the run's own config
(its objective, piece map, sequence length, threads), 300 held-out bytes per domain and no head fit, so the
steps are most of it (each is timed on its own); the whole-matrix side is the same code with the compact rows switched off. The two sides alternate
round by round. Prints the median step seconds after warm-up, tokens/s and peak RSS of each, their ratios,
and ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(run: Path, work: Path, mode: str, a: argparse.Namespace) -> dict:
    import yaml

    from retok.core.config import validate_dict
    from retok.train.rows import CompactRows
    from retok.train.stage import train_io

    if mode == "whole":
        CompactRows.attach = staticmethod(lambda model, learn_rows: None)  # type: ignore[method-assign]
    cfg = yaml.safe_load((run / "model-init" / "retok_config.yaml").read_text(encoding="utf-8"))
    cfg["output_dir"] = str(work)
    cfg[
        "train"
    ].update(  # held-out scoring cut to a few hundred bytes (data.eval is in the stages' fingerprints)
        max_steps=a.warmup + a.steps,
        eval_every=10_000,
        eval_max_bytes=300,
        save_every=10_000,
        warmup_steps=1,
        full={"steps": 0},
    )
    cfg.setdefault("fit", {})["after_train"] = False
    cfg = validate_dict(cfg)
    for stage in ("tokenizer", "model-init"):
        (work / stage).mkdir(parents=True)
        for f in (run / stage).iterdir():
            if f.is_file():
                (work / stage / f.name).symlink_to(f.resolve())
    out = work / "model-trained"
    train_io(cfg, out)
    rows = [json.loads(ln) for ln in (work / "train-state" / "metrics.jsonl").read_text().splitlines()]
    secs = [r["step_seconds"] for r in rows if "loss" in r][a.warmup :]
    return {
        "step_seconds": secs,
        "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a run folder with tokenizer/ and model-init/")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="runs of each side, alternating")
    ap.add_argument("--child", choices=["whole", "compact"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    run = a.run.resolve()
    if a.child:
        print("BENCH " + json.dumps(child(run, a.work, a.child, a)), flush=True)
        return

    got: dict[str, dict] = {"whole": {"secs": [], "rss": []}, "compact": {"secs": [], "rss": []}}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    tokens = None
    for r in range(a.rounds):
        for mode in ("whole", "compact"):
            work = Path(tempfile.mkdtemp(prefix=f"bench-rows-{mode}-"))
            try:
                cmd = [sys.executable, __file__, str(run), "--child", mode, "--work", str(work / "out")]
                cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup)]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")), None)
                if res.returncode or line is None:
                    sys.exit(f"bench_compact_rows: the {mode} side failed:\n{res.stderr[-3000:]}")
                data = json.loads(line[6:])
            finally:
                shutil.rmtree(work, ignore_errors=True)
            got[mode]["secs"] += data["step_seconds"]
            got[mode]["rss"].append(data["peak_rss_mb"])
            tokens = data["tokens_per_step"]
            print(
                f"round {r + 1} {mode}: steps {', '.join(f'{s:.2f}' for s in data['step_seconds'])} s",
                flush=True,
            )
    med = {m: statistics.median(g["secs"]) for m, g in got.items()}
    rss = {m: max(g["rss"]) for m, g in got.items()}
    print("| io-phase step | median seconds | tokens/s | peak RSS |")
    print("|---|---:|---:|---:|")
    for m in ("whole", "compact"):
        label = "whole embedding (old rows masked)" if m == "whole" else "compact new rows"
        print(f"| {label} | {med[m]:.2f} | {tokens / med[m]:.0f} | {rss[m] / 1024:.2f} GB |")
    speedup = med["whole"] / med["compact"]
    print(f"compact rows: {speedup:.2f}x faster steps, peak RSS {rss['compact'] / rss['whole']:.2f}x")
    print(
        json.dumps(
            {
                "bench": "compact_rows",
                "run": str(run),
                "median_step_seconds": med,
                "speedup": speedup,
                "peak_rss_mb": rss,
                "steps_each": {m: len(g["secs"]) for m, g in got.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
