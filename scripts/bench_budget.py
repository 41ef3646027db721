"""What more compute buys on the target domain: the recipe's train-io at several budgets from ONE tokenizer and
ONE model-init, and the budget the curve says a target needs.

    python scripts/bench_budget.py runs/smollm2-zh --scales 0.5,2          # after `retok run configs/smollm2-zh.yaml`
    python scripts/bench_budget.py runs/smollm2-zh --scales 0.5,1,2,4 --target 1.05

For each scale s, a copy of the run's tokenizer and model-init folders goes to ``--out``/x{s}, and `retok
train-io` runs there with the run's own config (its resolved retok_config.yaml) and ``train.max_steps`` and
``fit.bytes`` both times s (the distillation's tokens and the head fit's text grow together; every other key as
the run had it), scoring ``--eval-bytes`` held-out bytes per domain (the demo's eval-speed slice: 8,000), the
original model on the same bytes. Scale 1 is the run itself, read from its eval report where it scored the same
bytes (nothing is run again). Minutes are train-io's own wall time (its retok_stage.json).

Prints per scale the minutes and each domain's BPB as a multiple of the original's, fits the target domain's gap
(ratio - 1) against train-io minutes as a power law through the points, and says how many minutes that law gives
for ``--target``. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _config(run: Path) -> dict:
    import yaml

    cfg = yaml.safe_load((run / "model-trained" / "retok_config.yaml").read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        sys.exit(f"bench_budget: {run}/model-trained/retok_config.yaml is not a config")
    return cfg


def from_run(run: Path, eval_bytes: int) -> dict | None:
    """Scale 1: the run's own figures, where its eval report scored ``eval_bytes`` per domain."""
    ev = _load(run / "eval" / "report.json")
    cfg = _config(run)
    if not ev or (cfg.get("eval") or {}).get("max_bytes") != eval_bytes:
        return None
    stage = _load(run / "model-trained" / "retok_stage.json")
    return {
        "steps": cfg["train"]["max_steps"],
        "fit_bytes": cfg["fit"]["bytes"],
        "minutes": round((stage.get("seconds") or 0.0) / 60, 2),
        "ratios": {d: v["bpb_ratio"] for d, v in ev["domains"].items()},
        "source": f"{run}/eval/report.json",
    }


def at_scale(run: Path, out: Path, scale: float, eval_bytes: int, threads: int | None) -> dict:
    cfg = _config(run)
    steps = max(1, round(cfg["train"]["max_steps"] * scale))
    fit_bytes = max(1000, round(cfg["fit"]["bytes"] * scale))
    folder = out / f"x{scale:g}"
    trained = folder / "model-trained"
    if not (trained / "train_report.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for stage in ("tokenizer", "model-init"):
            shutil.copytree(run / stage, folder / stage)
        sets = {
            "output_dir": str(folder),
            "train.max_steps": steps,
            "train.eval_every": steps,
            "train.save_every": steps,
            "train.eval_max_bytes": eval_bytes,
            "fit.bytes": fit_bytes,
        }
        if threads:
            sets["compute.threads"] = threads
        cmd = [
            sys.executable,
            "-m",
            "retok.cli",
            "train-io",
            str(run / "model-trained" / "retok_config.yaml"),
        ]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        print("bench_budget: " + " ".join(cmd), flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        subprocess.run(cmd, check=True, env=env)
    rep = _load(trained / "train_report.json")
    stage = _load(trained / "retok_stage.json")
    return {
        "steps": steps,
        "fit_bytes": fit_bytes,
        "minutes": round((stage.get("seconds") or 0.0) / 60, 2),
        "ratios": {d: f["final"] / f["original"] for d, f in rep["bpb"].items() if f.get("original")},
        "source": str(trained / "train_report.json"),
    }


def power_law(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(a, b) of gap = a * x^-b, least squares in log-log; None with fewer than 2 usable points."""
    pts = [(math.log(m), math.log(g)) for m, g in points if m > 0 and g > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return math.exp(my - slope * mx), -slope


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run (its tokenizer, model-init, model-trained, eval)")
    ap.add_argument("--scales", default="0.5,2", help="comma-separated multiples of the run's budget")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default RUN/../budget)")
    ap.add_argument(
        "--domain", default=None, help="the target domain (default: the run's tokenizer.domains[0])"
    )
    ap.add_argument("--target", type=float, default=1.05, help="the BPB ratio to reach on the target domain")
    ap.add_argument("--eval-bytes", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=None, help="compute.threads for the runs")
    ap.add_argument(
        "--base-minutes",
        type=float,
        default=None,
        help="train-io minutes of the run's budget on a quiet machine (default: the run's own)",
    )
    args = ap.parse_args()

    run = args.run.resolve()
    out = (args.out or run.parent / "budget").resolve()
    domain = args.domain or (_config(run).get("tokenizer", {}).get("domains") or ["zh"])[0]
    rows: dict[str, dict] = {}
    for s in sorted(float(x) for x in args.scales.split(",")):
        got = from_run(run, args.eval_bytes) if s == 1 else None
        rows[f"{s:g}"] = got or at_scale(run, out, s, args.eval_bytes, args.threads)
    if "1" not in rows and (got := from_run(run, args.eval_bytes)):
        rows["1"] = got
    rows = dict(sorted(rows.items(), key=lambda kv: float(kv[0])))

    domains = list(next(iter(rows.values()))["ratios"])
    print("| budget | distillation steps | head-fit text | train-io minutes | " + " | ".join(domains) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(domains))
    for s, r in rows.items():
        cells = " | ".join(f"{r['ratios'].get(d, float('nan')):.4f}x" for d in domains)
        print(f"| x{s} | {r['steps']} | {r['fit_bytes'] / 1000:.0f} KB | {r['minutes']:.1f} | {cells} |")
    law = power_law([(float(s), r["ratios"][domain] - 1.0) for s, r in rows.items() if domain in r["ratios"]])
    need = minutes = None
    if law is not None:
        a, b = law
        gap = args.target - 1.0
        need = (a / gap) ** (1 / b) if b > 0 and gap > 0 else None
        base = from_run(run, args.eval_bytes)
        per_budget = args.base_minutes or (base["minutes"] if base else None)
        minutes = need * per_budget if need and per_budget else None
        at = f" (~{minutes:.0f} train-io minutes at {per_budget:g} a budget)" if minutes else ""
        print(
            f"{domain}: gap = {a:.4f} x budget^-{b:.3f}; "
            + (
                f"{args.target:.3f}x at about {need:.1f}x the run's budget{at}"
                if need
                else "the gap does not shrink with the budget here"
            )
        )
    print(
        json.dumps(
            {
                "bench": "budget",
                "run": str(run),
                "domain": domain,
                "target": args.target,
                "rows": rows,
                "power_law": {"a": law[0], "b": law[1]} if law else None,
                "budget_for_target": need,
                "minutes_for_target": minutes,
            }
        )
    )


if __name__ == "__main__":
    main()
