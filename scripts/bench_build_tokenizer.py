#!/usr/bin/env python3
"""Benchmark build-tokenizer's engines against transformers' ``train_new_from_iterator`` on the same text.

    python scripts/bench_build_tokenizer.py                      # SmolLM2 + the zh corpus, 16k and 32k
    python scripts/bench_build_tokenizer.py --new-tokens 2000 --max-bytes 500000 --repeats 2   # quick

For each number of new tokens N it times, on the same in-memory training text:

- ``extend``: retok's continued BPE on the old segmentation (N tokens appended, old ids kept; the config
  defaults min_frequency 2, max_token_length 16),
- ``train``:  retok's from-scratch BPE with the old pipeline, total vocabulary old + N (HF's defaults: no
  frequency floor, no length cap, so that it learns as many tokens as ``hf``),
- ``hf``:     ``old_tokenizer.train_new_from_iterator(text, vocab_size=old + N)`` (transformers),

each run in a fresh subprocess (so peak memory is its own), the three interleaved run by run so that a busy
machine slows them alike. Reported: median wall seconds and corpus MB/s, median CPU seconds (all threads;
steadier than wall time when other jobs share the machine), the peak resident memory a run added on top of
the loaded text and tokenizer, and the speed ratios against ``hf`` (> 1: faster). The last line on stdout is
one JSON object; the exit status is 1 if a retok engine is slower than ``hf`` at any N, judged on wall time,
or on CPU time when the machine is overloaded (load average above the CPU count). "Slower" means beyond
run-to-run noise: the median is slower AND even the engine's fastest run is slower than ``hf``'s slowest run.
``train`` drives the same tokenizers trainer as ``hf``, so it is expected at parity (~1.0x), not faster.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = "~/.cache/retok/assets/models/SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = "~/.cache/retok/assets/corpora/zh/train.jsonl"
METHODS = ("extend", "train", "hf")


def _load(model: str, corpus: str, max_bytes: int | None):
    from retok.core.config import ModelConfig
    from retok.core.sources import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(ModelConfig(path=model)))
    docs, used = [], 0
    with open(os.path.expanduser(corpus), encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if max_bytes is not None and used + len(text.encode()) > max_bytes:
                break
            docs.append(text)
            used += len(text.encode())
    return tok, docs, used


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_s() -> float:
    """CPU seconds of this process, every thread (less sensitive than wall time to a busy machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args: argparse.Namespace) -> None:
    """One timed run in this process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    tok, docs, n_bytes = _load(args.model, args.corpus, args.max_bytes)
    from retok.tokenizer.extend import TrainingText, extend_tokenizer
    from retok.tokenizer.train import train_tokenizer

    n = args.new_tokens[0]
    old = tok.backend_tokenizer
    base = _rss_mb()
    cpu = _cpu_s()
    start = time.perf_counter()
    if args.worker == "extend":
        res = extend_tokenizer(
            old, [TrainingText("zh", docs)], new_tokens=n, max_token_length=16, progress=False
        )
        size = res.tokenizer.get_vocab_size(with_added_tokens=True)
    elif args.worker == "train":
        # HF's defaults (no frequency floor, no length cap), so that both learn the same number of tokens.
        res = train_tokenizer(
            old,
            [TrainingText("zh", docs)],
            vocab_size=len(tok) + n,
            min_frequency=1,
            max_token_length=None,
            progress=False,
        )
        size = res.tokenizer.get_vocab_size(with_added_tokens=True)
    else:
        new = tok.train_new_from_iterator(
            [docs[i : i + 64] for i in range(0, len(docs), 64)], vocab_size=len(tok) + n
        )
        size = len(new)
    seconds = time.perf_counter() - start
    cpu = _cpu_s() - cpu
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "bytes": n_bytes,
                "extra_mb": _rss_mb() - base,
                "peak_mb": _rss_mb(),
                "vocab": size,
            }
        )
    )


def run_one(method: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--new-tokens",
        str(n),
        "--model",
        args.model,
        "--corpus",
        args.corpus,
    ]
    if args.max_bytes:
        cmd += ["--max-bytes", str(args.max_bytes)]
    p = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    )
    if p.returncode != 0:
        sys.exit(f"bench: the {method} run failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=GGUF, help="model.path of the old tokenizer (folder, hub id or .gguf)")
    ap.add_argument("--corpus", default=CORPUS, help="training text: a .jsonl file with a 'text' field")
    ap.add_argument("--max-bytes", type=int, default=None, help="use only this many bytes of the corpus")
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[16000, 32000])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method and size (median reported)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    # Convert the GGUF (cached) before timing anything.
    _, _, n_bytes = _load(args.model, args.corpus, args.max_bytes)
    print(
        f"bench_build_tokenizer: {n_bytes / 1e6:.2f} MB of {args.corpus}, {args.repeats} runs each, CPUs: {os.cpu_count()}",
        flush=True,
    )
    results: dict[str, dict] = {}
    for n in args.new_tokens:
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for r in range(args.repeats):
            for m in METHODS:
                out = run_one(m, n, args)
                runs[m].append(out)
                print(
                    f"  N={n:>6} run {r + 1}/{args.repeats} {m:>6}: {out['seconds']:6.2f} s wall, "
                    f"{out['cpu_seconds']:6.2f} s CPU, +{out['extra_mb']:4.0f} MB",
                    flush=True,
                )
        row = {}
        for m in METHODS:
            secs = statistics.median(x["seconds"] for x in runs[m])
            row[m] = {
                "seconds": round(secs, 3),
                **{
                    f"{f}_range": [round(min(x[f] for x in runs[m]), 3), round(max(x[f] for x in runs[m]), 3)]
                    for f in ("seconds", "cpu_seconds")
                },
                "mb_per_s": round(n_bytes / 1e6 / secs, 3),
                "cpu_seconds": round(statistics.median(x["cpu_seconds"] for x in runs[m]), 3),
                "extra_mb": round(statistics.median(x["extra_mb"] for x in runs[m]), 1),
                "peak_mb": round(statistics.median(x["peak_mb"] for x in runs[m]), 1),
                "vocab": runs[m][0]["vocab"],
            }
        for m in ("extend", "train"):
            row[m]["speed_vs_hf"] = round(row["hf"]["seconds"] / row[m]["seconds"], 3)
            row[m]["cpu_vs_hf"] = round(row["hf"]["cpu_seconds"] / row[m]["cpu_seconds"], 3)
        results[str(n)] = row

    print()
    head = (
        f"{'new tokens':>10} | {'method':>6} | {'median s':>8} | {'MB/s':>6} | {'CPU s':>6} | {'+MB peak':>8}"
    )
    print(head + f" | {'vocab':>6} | speed vs hf | CPU vs hf")
    for n, row in results.items():
        for m in METHODS:
            x = row[m]
            wall, cpu = (
                (f"{x['speed_vs_hf']:.2f}x", f"{x['cpu_vs_hf']:.2f}x") if m != "hf" else ("1.00x", "1.00x")
            )
            print(
                f"{n:>10} | {m:>6} | {x['seconds']:8.2f} | {x['mb_per_s']:6.3f} | {x['cpu_seconds']:6.2f} | "
                f"{x['extra_mb']:8.0f} | {x['vocab']:>6} | {wall:>11} | {cpu:>9}"
            )
    # On an overloaded machine (load above the CPU count) wall time measures the scheduler more than the code;
    # the verdict then uses CPU seconds, which every run pays in full whatever else is running.
    load = os.getloadavg()[0]
    basis = "cpu" if load > (os.cpu_count() or 1) else "wall"
    key = "cpu_vs_hf" if basis == "cpu" else "speed_vs_hf"
    span = "cpu_seconds_range" if basis == "cpu" else "seconds_range"
    slower = {}
    for n, row in results.items():
        for m in ("extend", "train"):
            x, own, hf = row[m][key], row[m][span], row["hf"][span]
            slower[f"{m}@{n}"] = x < 1.0 and own[0] > hf[1]
            if x < 1.0:
                note = "slower beyond noise" if slower[f"{m}@{n}"] else "within run-to-run noise"
                print(
                    f"  {m}@{n}: {x:.2f}x, runs {own[0]:.2f}-{own[1]:.2f} s vs hf {hf[0]:.2f}-{hf[1]:.2f} s: {note}"
                )
    ok = not any(slower.values())
    print(
        f"verdict on {basis} time (load average {load:.1f} on {os.cpu_count()} CPUs): "
        f"{'not slower than' if ok else 'SLOWER than'} train_new_from_iterator"
    )
    summary = {
        "bench": "build_tokenizer",
        "corpus_mb": round(n_bytes / 1e6, 3),
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_avg": round(load, 2),
        "verdict_basis": basis,
        "results": results,
        "slower_beyond_noise": slower,
        "not_slower_than_hf": ok,
    }
    print(json.dumps(summary))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
