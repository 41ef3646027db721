"""Benchmark `retok train-io` against what a user would otherwise write: a transformers Trainer with the body's
requires_grad set to False. Same model, same packed blocks (retok.train.packing, same seed), same batch, sequence
length, optimizer settings; each run in its own subprocess so its peak RSS is its own.

    python scripts/bench_train_io.py                       # SmolLM2-135M (converted GGUF), seq 256, batch 4
    python scripts/bench_train_io.py --steps 8 --warmup 2 --rounds 2 --model /path/to/hf-folder

Reports the median step time after warm-up (wall and process CPU time: on a shared machine the CPU-time
figure is the steadier one; the load average around each run is printed), tokens/s and peak RSS of each,
their ratios, and ends with ONE JSON line. The retok side runs the real stage (retok.train.train_io) on a throwaway output_dir whose tokenizer/ and
model-init/ are the model itself (links, no copy), with no eval data so that only training is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("RETOK_CACHE") or Path.home() / ".cache" / "retok") / "assets"
GGUF = ASSETS / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def config(work: Path, model: Path, a: argparse.Namespace):
    from retok.core.config import validate_dict

    return validate_dict(
        {
            "output_dir": str(work / "out"),
            "model": {"path": str(model)},
            "seed": 0,
            "data": {
                "train": [
                    {"name": d, "path": str(ASSETS / "corpora" / d / "train.jsonl"), "max_bytes": 2_000_000}
                    for d in ("zh", "en", "code")
                ]
            },
            "train": {
                "max_steps": a.warmup + a.steps,
                "seq_len": a.seq,
                "batch_size": a.batch,
                "lr": 1e-3,
                "warmup_steps": 1,
                "eval_every": 10_000,
                "save_every": 10_000,
                "shuffle_buffer": 64,
            },
        }
    )


def prepare(work: Path, model: Path, a: argparse.Namespace) -> None:
    """output_dir/tokenizer and output_dir/model-init as links to the model folder's files."""
    from retok.core.stages import mark_stage, stage_dir

    cfg = config(work, model, a)
    for stage in ("tokenizer", "model-init"):
        d = stage_dir(cfg, stage)
        d.mkdir(parents=True, exist_ok=True)
        for f in model.iterdir():
            if f.is_file() and not f.name.startswith("retok_"):
                (d / f.name).symlink_to(f.resolve())
        mark_stage(d, cfg, stage)


def child_retok(work: Path, model: Path, a: argparse.Namespace) -> dict:
    import retok.train.loop
    from retok.pipeline import run_stage

    cfg = config(work, model, a)
    marks = [time.process_time()]
    retok.train.loop._on_step = lambda step: marks.append(
        time.process_time()
    )  # CPU time at the end of each step
    out = run_stage(cfg, "model-trained", overwrite=True)
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    secs = [r["step_seconds"] for r in steps if "loss" in r][a.warmup :]
    cpu = [b - a_ for a_, b in zip(marks, marks[1:], strict=False)][a.warmup :]
    return {"step_seconds": secs, "step_cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb()}


def child_trainer(work: Path, model_dir: Path, a: argparse.Namespace) -> dict:
    """The baseline: Trainer, body frozen with requires_grad=False, the model's own (full-logits) loss."""
    import itertools

    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from retok.core.sources import load_tokenizer
    from retok.train.packing import train_batches

    cfg = config(work, model_dir, a)
    tok = load_tokenizer(model_dir)
    t = cfg.train
    n = (a.warmup + a.steps) * a.batch
    batches = train_batches(
        cfg.data.train,
        tok,
        seq_len=t.seq_len,
        batch_size=1,
        seed=cfg.seed,
        shuffle_buffer=t.shuffle_buffer,
        max_bytes=None,
    )
    blocks = [b[0] for b in itertools.islice(batches, n)]
    data = [{"input_ids": b, "labels": b} for b in blocks]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    model.get_output_embeddings().weight.requires_grad_(True)

    times: list[float] = []
    cpu: list[float] = []

    class Timer(TrainerCallback):
        # From one step's end to the next, as retok's step_seconds: fetching the batch is part of a step
        # (Trainer's on_step_begin comes after the batch is fetched, so begin->end would leave it out).
        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            t, c = time.perf_counter(), time.process_time()
            times.append(t - self.t0)
            cpu.append(c - self.c0)
            self.t0, self.c0 = t, c

    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=a.batch,
        max_steps=a.warmup + a.steps,
        learning_rate=1e-3,
        warmup_steps=1,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        weight_decay=0.0,
        adam_beta2=0.95,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Timer()]).train()
    return {
        "step_seconds": times[a.warmup :],
        "step_cpu_seconds": cpu[a.warmup :],
        "peak_rss_mb": peak_rss_mb(),
    }


def run_child(kind: str, work: Path, model: Path, a: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--work",
        str(work),
        "--model",
        str(model),
        "--seq",
        str(a.seq),
        "--batch",
        str(a.batch),
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
    ]
    load0 = os.getloadavg()[0]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        sys.exit(f"bench_train_io: the {kind} run failed:\n{res.stderr[-3000:]}")
    # The 1-minute load average around the run: above the core count, other work shared the cores.
    return dict(json.loads(lines[-1]), load_avg=[load0, os.getloadavg()[0]])


def pool(runs: list[dict]) -> dict:
    """Timed steps of every round together; peak RSS as the median of the rounds' peaks."""
    return {
        "step_seconds": [x for r in runs for x in r["step_seconds"]],
        "step_cpu_seconds": [x for r in runs for x in r["step_cpu_seconds"]],
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "peak_rss_mb_rounds": [r["peak_rss_mb"] for r in runs],
        "load_avg": [min(r["load_avg"][0] for r in runs), max(r["load_avg"][1] for r in runs)],
    }


def summarise(r: dict, tokens_per_step: int) -> dict:
    med = statistics.median(r["step_seconds"])
    cpu = statistics.median(r["step_cpu_seconds"])
    return {
        "step_seconds_median": med,
        "tokens_per_second": tokens_per_step / med,
        "step_cpu_seconds_median": cpu,
        "tokens_per_cpu_second": tokens_per_step / cpu,
        "peak_rss_mb": r["peak_rss_mb"],
        "peak_rss_mb_rounds": r["peak_rss_mb_rounds"],
        "steps_timed": len(r["step_seconds"]),
        "load_avg": r["load_avg"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", type=Path, default=None, help="HF model folder (default: converted SmolLM2-135M)"
    )
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternate retok/Trainer runs this many times each (median)"
    )
    ap.add_argument("--child", choices=["retok", "trainer"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))

    if a.child:
        fn = child_retok if a.child == "retok" else child_trainer
        print(json.dumps(fn(a.work, a.model, a)))
        return

    if a.model is None:
        if not GGUF.is_file():
            sys.exit(f"bench_train_io: {GGUF} missing; run scripts/fetch_assets.py or pass --model")
        from retok.core.sources import resolve_model

        a.model = resolve_model(str(GGUF))
    with tempfile.TemporaryDirectory(prefix="bench-train-io-") as tmp:
        work = Path(tmp)
        prepare(work, a.model, a)
        tokens = a.seq * a.batch
        runs: dict[str, list[dict]] = {"retok": [], "trainer": []}
        # Alternate the two (never at the same time): a shared machine's load then falls on both alike.
        for rnd in range(a.rounds):
            for kind in runs:
                print(
                    f"bench_train_io: round {rnd + 1}/{a.rounds}: {kind} ({a.warmup} warm-up + {a.steps} timed steps)",
                    flush=True,
                )
                runs[kind].append(run_child(kind, work, a.model, a))
        results = {kind: summarise(pool(rs), tokens) for kind, rs in runs.items()}
    r, b = results["retok"], results["trainer"]
    print(
        f"{'':8} {'step s':>8} {'tokens/s':>9} {'CPU s':>8} {'tok/CPU s':>10} {'peak RSS MB':>12} {'load avg':>10}"
    )
    for kind, x in results.items():
        print(
            f"{kind:8} {x['step_seconds_median']:8.2f} {x['tokens_per_second']:9.1f} {x['step_cpu_seconds_median']:8.2f} "
            f"{x['tokens_per_cpu_second']:10.1f} {x['peak_rss_mb']:12.0f} {x['load_avg'][0]:5.1f}-{x['load_avg'][1]:.1f}"
        )
    speed = r["tokens_per_second"] / b["tokens_per_second"]
    cpu_speed = r["tokens_per_cpu_second"] / b["tokens_per_cpu_second"]
    mem = r["peak_rss_mb"] / b["peak_rss_mb"]
    print(
        f"retok / Trainer: {speed:.2f}x tokens/s (wall), {cpu_speed:.2f}x tokens per CPU-second, {mem:.2f}x peak RSS"
    )
    print(
        json.dumps(
            {
                "bench": "train_io",
                "model": str(a.model),
                "seq_len": a.seq,
                "batch_size": a.batch,
                "warmup_steps": a.warmup,
                "timed_steps": a.steps,
                "rounds": a.rounds,
                "cpus": os.cpu_count(),
                "retok": r,
                "trainer": b,
                "speed_ratio": speed,
                "cpu_speed_ratio": cpu_speed,
                "peak_rss_ratio": mem,
            }
        )
    )


if __name__ == "__main__":
    main()
