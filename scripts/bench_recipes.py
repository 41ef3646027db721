"""Benchmark the ways to recover quality on the new domain, side by side, from ONE tokenizer and at about the
same CPU wall-clock budget (issue 13): what a user gets from each recipe per minute of compute.

    python scripts/bench_recipes.py                          # the demo (configs/smollm2-zh.yaml), every recipe
    python scripts/bench_recipes.py --recipes lm,both --tokenizer runs/smollm2-zh/tokenizer

Recipes (each overrides only init.* and train.* of the config; budgets sized for ~10-11 minutes of
init-embeddings + train-io on 2 CPU cores, the demo's own budget):

- ``lm``: the recipe before learning from the original model: an untied head whose new rows lean on their
  first piece and start lower (init.head_shift), then next-token loss on every embedding and head row
  (lr 5e-5, 200 steps x 2 x 256 tokens).
- ``headfit``: the head rows of new tokens fitted on the new model's own states with the original model's
  next-token distribution as target (no backprop through the body), on more text (380 KB) and no training.
- ``distill``: mean-initialised rows, then hidden-state distillation of the new input rows only (layer 8,
  lr 1e-2), 500 steps.
- ``both``: the config as it is (the demo: head fit on 240 KB, then 200 distillation steps).

Every recipe starts from a copy of the same tokenizer folder (``--tokenizer``, or built once into
``--out/tokenizer``), runs ``retok run --stages model-init`` then ``model-trained`` in its own output folder (each
a subprocess, so its peak RSS is its own; minutes are the stage's own wall time from its ``retok_stage.json``;
``--reuse RUN`` lets recipe ``both`` take the demo's folders instead of running them again), and is scored on the same held-out bytes (the config's
``init.eval_max_bytes`` per domain, the same byte spans for the original and the new model). Prints a Markdown
table, writes it with the JSON to ``--out``, and ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES: dict[str, dict] = {
    "lm": {
        "what": "LM loss train-io (the recipe before issue 13): shifted head init, then every io row at lr 5e-5",
        "set": {
            "fit.at_init": False,
            "init.head_method": "weighted",
            "init.head_shift": 1.0,
            "init.head_shift_outside": 2.0,
            "train.objective": "lm",
            "train.trainable": "io",
            "train.lr": 5e-5,
            "train.max_steps": 200,
        },
    },
    "headfit": {
        "what": "head fit only (380 KB, teacher KL), no training",
        "set": {"fit.bytes": 380_000, "fit.epochs": 3},
        "train": False,
    },
    "distill": {
        "what": "distillation only: mean rows, then 500 steps of layer-8 distillation of the new input rows",
        "set": {"fit.at_init": False, "train.objective": "distill", "train.max_steps": 500},
    },
    "both": {"what": "head fit, then distillation: the config as it is", "set": {}},
}


def _sets(pairs: dict) -> list[str]:
    out = []
    for k, v in pairs.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def _run(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB of the child, exit status), the child's output to ``log``."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(p.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def _score(cfg, folder: Path) -> dict[str, float]:
    """Held-out BPB of ``folder`` on init.eval_max_bytes per domain, on the same byte spans as the original."""
    from retok.core.data import load_domains
    from retok.core.metrics import bits_per_byte, score_starts
    from retok.core.sources import load_model, load_tokenizer, resolve_model

    docs = load_domains(cfg.data.eval, "data.eval", cfg.init.eval_max_bytes)
    old = load_tokenizer(resolve_model(cfg.model, cfg.cache))
    new = load_tokenizer(folder)
    model = load_model(folder, dtype=cfg.compute.dtype, device=cfg.compute.device)
    kw = {"window": cfg.eval.window, "stride": cfg.eval.stride}
    return {
        d: round(bits_per_byte(model, new, t, starts=score_starts([old, new], t), desc=d, **kw)["bpb"], 5)
        for d, t in docs.items()
    }


def _recipe(name: str, a: argparse.Namespace, tok_dir: Path) -> dict:
    from retok.core.config import load_config

    spec = RECIPES[name]
    out = a.out / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(tok_dir, out / "tokenizer")
    sets = ["--set", f"output_dir={out}"] + _sets(spec["set"])
    row: dict = {"recipe": name, "what": spec["what"], "set": spec["set"]}
    stages = ["model-init"] + (["model-trained"] if spec.get("train", True) else [])
    for stage in stages:
        if a.reuse is not None and name in a.reuse_recipes and (a.reuse / stage).is_dir():
            shutil.copytree(a.reuse / stage, out / stage)  # `retok run` below skips it if this config made it
        cmd = [sys.executable, "-m", "retok.cli", "run", str(a.config), "--stages", stage, *sets]
        _, rss, rc = _run(cmd, out / f"{stage}.log")
        if rc != 0:
            raise SystemExit(f"{name}: {' '.join(cmd)} failed (exit {rc}); see {out / f'{stage}.log'}")
        meta = json.loads((out / stage / "retok_stage.json").read_text())
        reused = "up to date" in (out / f"{stage}.log").read_text()
        if (
            reused
        ):  # made earlier by the same config: its own recorded time; RSS from its report if it has one
            report = out / stage / "train_report.json"
            rss = json.loads(report.read_text()).get("peak_rss_mb") if report.is_file() else None
        row[stage] = {
            "minutes": round(meta["seconds"] / 60, 2),
            "peak_rss_mb": round(rss) if rss else None,
            "reused": reused,
        }
        print(f"{name}: {stage} {meta['seconds'] / 60:.1f} min{' (reused)' if reused else ''}", flush=True)
    cfg = load_config(
        a.config, [f"output_dir={out}"] + [f"{k}={json.dumps(v)}" for k, v in spec["set"].items()]
    )
    init = json.loads((out / "model-init" / "init_report.json").read_text())["bpb"]
    row["bpb"] = {d: {"original": v["original"], "init": v["init"]} for d, v in init.items()}
    after = _score(cfg, out / stages[-1]) if len(stages) > 1 else {d: v["init"] for d, v in init.items()}
    for d, v in after.items():
        row["bpb"][d]["after"] = v
    row["minutes"] = round(sum(row[s]["minutes"] for s in stages), 2)
    return row


def render(rows: list[dict]) -> str:
    domains = list(rows[0]["bpb"])
    head = "| recipe | minutes (init + train) | peak RSS MB | " + " | ".join(
        f"{d} original / init / after (x original)" for d in domains
    )
    lines = [head + " |", "|" + "---|" * (3 + len(domains))]
    for r in rows:
        cells = []
        for d in domains:
            b = r["bpb"][d]
            cells.append(
                f"{b['original']:.3f} / {b['init']:.3f} / **{b['after']:.3f}** ({b['after'] / b['original']:.3f}x)"
            )
        mins = " + ".join(f"{r[s]['minutes']:.1f}" for s in ("model-init", "model-trained") if s in r)
        rss = [r[s]["peak_rss_mb"] for s in ("model-init", "model-trained") if s in r and r[s]["peak_rss_mb"]]
        peak = f"{max(rss):,}" if rss else "-"
        lines.append(
            f"| {r['recipe']}: {r['what']} | {mins} = {r['minutes']:.1f} | {peak} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "smollm2-zh.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-recipes")
    ap.add_argument(
        "--tokenizer", type=Path, help="a tokenizer stage folder made by this config (else built)"
    )
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument(
        "--reuse",
        type=Path,
        help="a run of this config (the demo's output_dir): recipe 'both' takes its model-init and model-trained "
        "when that config made them (their recorded minutes) instead of running them again",
    )
    a = ap.parse_args()
    a.reuse_recipes = {"both"}
    names = [n for n in a.recipes.split(",") if n]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        ap.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    a.out.mkdir(parents=True, exist_ok=True)
    tok_dir = a.tokenizer
    if tok_dir is None:
        tok_dir = a.out / "tokenizer-run" / "tokenizer"
        if not tok_dir.is_dir():
            cmd = [sys.executable, "-m", "retok.cli", "run", str(a.config), "--stages", "tokenizer"]
            cmd += ["--set", f"output_dir={tok_dir.parent}"]
            _, _, rc = _run(cmd, a.out / "tokenizer.log")
            if rc != 0:
                raise SystemExit(f"building the tokenizer failed; see {a.out / 'tokenizer.log'}")
    rows = [_recipe(n, a, tok_dir) for n in names]
    table = render(rows)
    print(table)
    (a.out / "recipes.md").write_text(table + "\n")
    (a.out / "recipes.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps({"recipes": rows}))


if __name__ == "__main__":
    main()
