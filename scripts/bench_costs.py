#!/usr/bin/env python3
"""Cost curves: how the time and peak memory of retok's stages grow with their inputs.

    .venv/bin/python scripts/bench_costs.py                           # every curve (~35 min on 2 cores)
    .venv/bin/python scripts/bench_costs.py --curve tokenizer-corpus  # one curve (the others stay in the JSON)
    .venv/bin/python scripts/bench_costs.py --quick --out /tmp/curves # fewer, smaller points, one run (~8 min)

Four curves; every point runs in a fresh subprocess that calls retok's real stage function, so that its peak
resident memory (the child's ``ru_maxrss``; the inputs are prepared in another subprocess, because a child's
``ru_maxrss`` starts from its parent's peak) is its own:

- ``tokenizer-corpus``: build-tokenizer (``retok.tokenizer.stage.build_tokenizer`` with the demo's settings:
  extend, 16,000 new tokens, min_frequency 2, the demo's held-out text measured) on 1 to 64 MB of training
  text: the real zh, en and code corpora interleaved in proportion to their sizes (every prefix has the same
  mix), repeated from the start past their ~30 MB;
- ``tokenizer-vocab``: the same stage on a fixed 28 MB of that text (the least that yields 64k new tokens at
  min_frequency 2), 4k to 64k new tokens asked for (the number learned is reported beside it);
- ``init-vocab``: init-embeddings (``retok.embeddings.stage.init_embeddings``, through
  ``scripts/bench_init_embeddings.py``'s worker) on its synthetic Llama-shaped bf16 checkpoints (hidden 4,096,
  two body layers, untied), new vocabulary 32k to 256k with the old one half of it, so that both matrices double
  per step (~12 GB of checkpoints under --workdir, built once);
- ``train-seqlen``: train-io (the real stage, through ``scripts/bench_train_io.py``'s helpers) on SmolLM2-135M
  with its own tokenizer, objective lm, every embedding/head row trainable, body frozen, seq_len 128 to 2,048 at
  a fixed 2,048 tokens per step (batch = 2048 / seq_len), the first step left out of the timing.

Each point runs ``--repeats`` times (rounds interleaved over the points; a point whose first run took longer
than ``--cheap-seconds`` runs once) and the median is reported. Before each run the script waits (up to
``--max-wait`` seconds) for other processes to leave the CPUs idle, and it records how many cores they used
during the run ("others"): wall times from a shared machine are only as good as that column.

The growth exponent of a curve is the least-squares slope of log(time) and of log(peak RSS) against
log(input) over its points; 1 is linear. For train-seqlen the time is that of one block of seq_len tokens
(step time / batch), whose FLOPs grow faster than seq_len through attention's T^2 term: its limit is raised by
the exponent those FLOPs have over the same range. Written: one PNG per curve (``<out>/<curve>.png``, log-log,
time and peak memory) and ``<out>/cost-curves.json`` (every point; a run of some curves keeps the others). The
table of medians is printed, and the last line on stdout is ONE JSON object (per curve: points, exponents,
verdict). Exit status 1 if a curve's time grows clearly worse than linear: exponent above ``--max-exponent``
(1.15) on wall AND on CPU time over the measured range.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
for p in (ROOT, SCRIPTS):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_init_embeddings as bench_init  # noqa: E402  (scripts/ is not a package)
import bench_train_io as bench_train  # noqa: E402

ASSETS = bench_train.ASSETS
GGUF = bench_train.GGUF
DOMAINS = ("zh", "en", "code")
MB = 1_000_000


@dataclass(frozen=True)
class Curve:
    name: str
    what: str  # the input, in words (for the verdict)
    x_label: str
    points: tuple[int, ...]
    quick_points: tuple[int, ...]


CURVES = {
    c.name: c
    for c in (
        Curve(
            "tokenizer-corpus", "corpus bytes", "training text (MB)", (1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8)
        ),
        Curve(
            "tokenizer-vocab",
            "new tokens",
            "new tokens asked for",
            (4000, 8000, 16000, 32000, 64000),
            (2000, 4000, 8000, 16000),
        ),
        Curve(
            "init-vocab",
            "vocabulary size",
            "new vocabulary (rows; old = half)",
            (32_768, 65_536, 131_072, 262_144),
            (16_384, 32_768, 65_536),
        ),
        Curve(
            "train-seqlen", "seq_len", "seq_len (tokens per block)", (128, 256, 512, 1024, 2048), (128, 512)
        ),
    )
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------------------ inputs


def mixed_corpus(path: Path, total_bytes: int) -> Path:
    """The zh, en and code training documents interleaved so that every prefix holds each domain in proportion
    to its size, written as a .jsonl of ``total_bytes`` bytes of text (repeated from the start if needed)."""
    ready = path.with_suffix(".ready")
    if path.is_file() and ready.is_file() and ready.read_text(encoding="utf-8") == str(total_bytes):
        return path
    docs = {}
    for d in DOMAINS:
        with open(ASSETS / "corpora" / d / "train.jsonl", encoding="utf-8") as f:
            docs[d] = [t for t in (json.loads(line)["text"] for line in f) if t]
    size = {d: sum(len(t.encode("utf-8")) for t in ds) for d, ds in docs.items()}
    used = dict.fromkeys(DOMAINS, 0)
    nxt = dict.fromkeys(DOMAINS, 0)
    order: list[str] = []
    while any(nxt[d] < len(docs[d]) for d in DOMAINS):
        # The domain furthest behind its share goes next.
        d = min((d for d in DOMAINS if nxt[d] < len(docs[d])), key=lambda d: used[d] / size[d])
        order.append(docs[d][nxt[d]])
        used[d] += len(order[-1].encode("utf-8"))
        nxt[d] += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < total_bytes:
            for text in order:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                written += len(text.encode("utf-8"))
                if written >= total_bytes:
                    break
    ready.write_text(str(total_bytes), encoding="utf-8")
    print(
        f"bench_costs: wrote {written / MB:.1f} MB of interleaved zh/en/code text to {path} "
        f"({sum(size.values()) / MB:.1f} MB distinct)",
        flush=True,
    )
    return path


def init_inputs(work: Path, new_vocab: int) -> dict[str, Path]:
    """bench_init_embeddings' synthetic checkpoint (old vocabulary half the new one) and its tokenizers."""
    return bench_init.prepare(work / "init", 2, new_vocab // 2, new_vocab, bench_init.HIDDEN)


def smollm2() -> Path:
    from retok.core.sources import resolve_model

    if not GGUF.is_file():
        sys.exit(f"bench_costs: {GGUF} missing; run scripts/fetch_assets.py")
    return resolve_model(str(GGUF))


# ------------------------------------------------------------------------------------------------ workers


def tokenizer_config(work: Path, corpus: Path, corpus_bytes: int, new_tokens: int):
    """The demo's build-tokenizer settings (configs/smollm2-zh.yaml) on the interleaved corpus."""
    from retok.core.config import validate_dict

    return validate_dict(
        {
            "output_dir": str(work / "out-tokenizer"),
            "model": {"path": str(GGUF)},
            "data": {
                "train": [{"name": "mix", "path": str(corpus), "max_bytes": corpus_bytes}],
                "eval": [{"name": d, "path": str(ASSETS / "corpora" / d / "eval.jsonl")} for d in DOMAINS],
            },
            "tokenizer": {"mode": "extend", "new_tokens": new_tokens, "min_frequency": 2},
        }
    )


def work_tokenizer(work: Path, corpus: Path, corpus_bytes: int, new_tokens: int) -> dict:
    import transformers  # noqa: F401  (imported before the baseline, as the stage imports it)

    from retok.tokenizer.stage import build_tokenizer

    cfg = tokenizer_config(work, corpus, corpus_bytes, new_tokens)
    out = work / "out-tokenizer" / "tokenizer"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.mkdir(parents=True)
    base, cpu = peak_rss_mb(), cpu_seconds()
    t = time.perf_counter()
    report = build_tokenizer(cfg, out, progress=False)
    seconds = time.perf_counter() - t
    shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - cpu,
        "peak_rss_mb": peak_rss_mb(),
        "base_rss_mb": base,
        "phases": {k: round(v, 3) for k, v in report["timings"].items()},
        "training_bytes": report["training"]["bytes"],
        "new_tokens_learned": report["counts"]["new_tokens"],
    }


def work_init(work: Path, new_vocab: int) -> dict:
    import torch  # noqa: F401  (imported before the baseline, as the stage imports it)

    import retok.embeddings.stage  # noqa: F401

    paths = init_inputs(work, new_vocab)
    out = work / "out-init"
    shutil.rmtree(out, ignore_errors=True)
    base, cpu = peak_rss_mb(), cpu_seconds()
    res = bench_init.worker("retok", paths["model"], paths["run"], out)
    cpu = cpu_seconds() - cpu
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": res["work_s"],
        "cpu_seconds": cpu,
        "peak_rss_mb": res["peak_rss_gb"] * 1024,
        "base_rss_mb": base,
        "rows": res["counts"],
    }


def _train_config(work: Path, model: Path, a: argparse.Namespace):
    """bench_train_io's config with the paper's recipe: objective lm, every embedding/head row trainable."""
    from retok.core.config import validate_dict

    data = _BENCH_TRAIN_CONFIG(work, model, a).model_dump()
    data["train"].update(objective="lm", trainable="io", lr=1e-3)
    return validate_dict(data)


_BENCH_TRAIN_CONFIG = bench_train.config


def flops_per_block(model: Path, seq_len: int) -> float:
    """FLOPs of one training block of ``seq_len`` tokens with the body frozen, from the model's config.json:
    forward 2 x weights per token plus causal attention (2 x T^2 x hidden per layer); backward through the
    frozen body computes input gradients only (x1 of the forward for the linear layers, x2 for attention), the
    trainable head its weight gradient too (x2). Only its growth with seq_len is used."""
    c = json.loads((model / "config.json").read_text(encoding="utf-8"))
    h, inter, layers, vocab = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_hidden_layers"],
        c["vocab_size"],
    )
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * c.get(
        "head_dim", h // c["num_attention_heads"]
    )
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    per_token = 2 * body * 2 + 2 * h * vocab * 3
    attention = 2 * seq_len * seq_len * h * layers * 3
    return float(per_token * seq_len + attention)


def work_train(work: Path, seq_len: int, tokens_per_step: int, steps: int) -> dict:
    model = smollm2()
    a = argparse.Namespace(seq=seq_len, batch=max(1, tokens_per_step // seq_len), steps=steps, warmup=1)
    # bench_train_io's prepare() and child_retok() read their config through bench_train_io.config.
    bench_train.config = _train_config
    run_dir = work / f"train-{seq_len}"
    shutil.rmtree(run_dir, ignore_errors=True)
    bench_train.prepare(run_dir, model, a)
    base, cpu = peak_rss_mb(), cpu_seconds()
    res = bench_train.child_retok(run_dir, model, a)
    cpu = cpu_seconds() - cpu
    shutil.rmtree(run_dir, ignore_errors=True)
    step = statistics.median(res["step_seconds"])
    return {
        # The cost of one block of seq_len tokens: comparable across seq_len whatever the batch.
        "seconds": step / a.batch,
        "cpu_seconds": statistics.median(res["step_cpu_seconds"]) / a.batch,
        "step_seconds": step,
        "stage_cpu_seconds": cpu,
        "tokens_per_second": a.seq * a.batch / step,
        "batch_size": a.batch,
        "timed_steps": len(res["step_seconds"]),
        "flops_per_block": flops_per_block(model, seq_len),
        "peak_rss_mb": res["peak_rss_mb"],
        "base_rss_mb": base,
    }


def prepare(name: str, xs: list[int], a: argparse.Namespace) -> None:
    """The inputs of one curve: the interleaved corpus, the synthetic checkpoints, the converted SmolLM2."""
    if name.startswith("tokenizer"):
        smollm2()
        need = max(xs) if name == "tokenizer-corpus" else a.vocab_corpus_mb
        have = a.workdir / "corpus.jsonl"
        ready = have.with_suffix(".ready")
        want = max(need, int(ready.read_text()) // MB if have.is_file() and ready.is_file() else 0)
        mixed_corpus(have, want * MB)
    elif name == "init-vocab":
        for x in xs:
            init_inputs(a.workdir, x)
    else:
        smollm2()


def worker(a: argparse.Namespace) -> dict:
    work = a.workdir
    if a.worker == "tokenizer-corpus":
        return work_tokenizer(work, work / "corpus.jsonl", a.x * MB, a.new_tokens)
    if a.worker == "tokenizer-vocab":
        return work_tokenizer(work, work / "corpus.jsonl", a.vocab_corpus_mb * MB, a.x)
    if a.worker == "init-vocab":
        return work_init(work, a.x)
    return work_train(work, a.x, a.tokens_per_step, a.train_steps)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, every core (/proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (
                int(v) for v in f.readline().split()[1:9]
            )
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes use less than ``threshold`` cores, sampled
    over 2 s while this benchmark runs nothing; returns the cores they used in the last sample."""
    waited = 0.0
    while True:
        b = machine_busy_seconds()
        time.sleep(2.0)
        busy = (machine_busy_seconds() - b) / 2.0
        if busy < threshold or waited >= max_wait:
            return busy
        time.sleep(8.0)
        waited += 10.0


def run_point(curve: str, x: int, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", curve, "--x", str(x), "--workdir", str(a.workdir)]
    cmd += ["--new-tokens", str(a.new_tokens), "--vocab-corpus-mb", str(a.vocab_corpus_mb)]
    cmd += ["--tokens-per-step", str(a.tokens_per_step), "--train-steps", str(a.train_steps)]
    wait_quiet(a.max_wait)
    busy, child = machine_busy_seconds(), children_cpu_seconds()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    # What the rest of the machine used meanwhile, in cores: above ~0.3 the timings are inflated.
    others = max(0.0, (machine_busy_seconds() - busy) - (children_cpu_seconds() - child)) / wall
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        sys.exit(f"bench_costs: {curve} at {x} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return dict(json.loads(lines[-1]), process_seconds=wall, others_cores=round(others, 2))


# ------------------------------------------------------------------------------------------------ analysis


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def median_point(x: int, runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    point = {"x": x, "runs": len(runs)}
    for k in keys:
        point[k] = round(statistics.median(r[k] for r in runs), 4)
    point["seconds_range"] = [
        round(min(r["seconds"] for r in runs), 3),
        round(max(r["seconds"] for r in runs), 3),
    ]
    point["added_rss_mb"] = round(point["peak_rss_mb"] - point["base_rss_mb"], 1)
    for k, v in runs[0].items():
        if isinstance(v, dict):
            point[k] = v if k != "phases" else {p: statistics.median(r[k][p] for r in runs) for p in v}
    return point


def flat_from(xs: list[float], ys: list[float], tol: float = 0.1) -> float | None:
    """The smallest x from which y stays within ``tol`` of its last value (None: not flat at the end)."""
    first = None
    for x, y in zip(reversed(xs), reversed(ys), strict=True):
        if abs(y / ys[-1] - 1) > tol:
            break
        first = x
    return first if first is not None and first != xs[-1] else None


def _fmt(x: float, curve: str) -> str:
    if curve == "tokenizer-corpus":
        return f"{x:g} MB"
    return f"{x / 1000:g}k" if x >= 1000 else f"{x:g}"


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _x(v: float) -> str:
    """An exponent as "x^1.02" (never "x^-0.00")."""
    return "x^" + f"{round(v, 2) + 0.0:.2f}"


def analyse(curve: Curve, points: list[dict], max_exponent: float) -> dict:
    """Growth exponents, the verdict in words, and whether time grows clearly worse than linear.

    "Linear" is exponent 1, except for train-seqlen, where the model's own FLOPs per block grow faster than
    seq_len (attention's T^2 term): there the limit is raised by what those FLOPs add. The limit must be
    passed on wall AND CPU time, so that a machine made busy by other jobs cannot fail a curve alone.
    """
    xs = [p["x"] for p in points]
    t_exp = slope(xs, [p["seconds"] for p in points])
    c_exp = slope(xs, [p["cpu_seconds"] for p in points])
    m_exp = slope(xs, [p["peak_rss_mb"] for p in points])
    expected = slope(xs, [p["flops_per_block"] for p in points]) if "flops_per_block" in points[0] else 1.0
    fit = {
        "time_exponent": _r(t_exp),
        "cpu_time_exponent": _r(c_exp),
        "time_exponent_top": _r(slope(xs[-2:], [p["seconds"] for p in points[-2:]])),
        "memory_exponent": _r(m_exp),
        "added_memory_exponent": _r(slope(xs, [max(p["added_rss_mb"], 1.0) for p in points])),
        "expected_time_exponent": _r(expected),
    }
    if "phases" in points[0]:
        fit["learn_time_exponent"] = _r(slope(xs, [p["phases"]["learn"] for p in points]))
    if t_exp is None or c_exp is None or m_exp is None or expected is None:
        return {**fit, "verdict": "one point: no growth measured", "worse_than_linear": False}
    limit = max_exponent + expected - 1.0
    worse = t_exp > limit and c_exp > limit

    exps = f"{_x(t_exp)} wall, {_x(c_exp)} CPU"
    if curve.name == "train-seqlen":
        tps = [p["tokens_per_second"] for p in points]
        words = [
            f"time per block {exps}, the model's FLOPs per block {_x(expected)} (attention's T^2 term): "
            + ("worse than the FLOPs" if worse else "as the FLOPs")
            + f"; {tps[0]:.0f} -> {tps[-1]:.0f} tokens/s"
        ]
    elif worse:
        words = [f"time worse than linear in {curve.what} ({exps})"]
    elif t_exp >= 0.85 or c_exp >= 0.85:
        words = [f"time linear in {curve.what} ({exps})"]
    elif t_exp < 0.15 and c_exp < 0.15:
        words = [f"time nearly independent of {curve.what} ({exps})"]
    else:
        words = [f"time sublinear in {curve.what} ({exps}: fixed costs weigh at the small end)"]
    if fit.get("learn_time_exponent") is not None:
        words.append(f"the learning phase alone {_x(fit['learn_time_exponent'])}")
    if "new_tokens_learned" in points[0]:
        # tokenizer-vocab: fewer than asked; tokenizer-corpus: fewer than the larger corpora learn.
        most = max(p["new_tokens_learned"] for p in points)
        short = [
            p
            for p in points
            if p["new_tokens_learned"] < (p["x"] if curve.name == "tokenizer-vocab" else most)
        ]
        if short:
            words.append(
                "fewer new tokens learned at "
                + ", ".join(f"{_fmt(p['x'], curve.name)} ({p['new_tokens_learned']:,})" for p in short)
            )
    peaks = [p["peak_rss_mb"] for p in points]
    flat = flat_from(xs, peaks)
    if max(peaks) <= 1.15 * min(peaks):
        words.append(f"peak memory flat ({min(peaks):.0f}-{max(peaks):.0f} MB)")
    elif flat is not None:
        words.append(f"peak memory {_x(m_exp)}, flat beyond {_fmt(flat, curve.name)} ({peaks[-1]:.0f} MB)")
    else:
        per = (peaks[-1] - peaks[0]) / (xs[-1] - xs[0])
        unit = "MB of text" if curve.name == "tokenizer-corpus" else "step of x"
        if curve.name in ("init-vocab", "tokenizer-vocab"):
            per, unit = per * 1000, "1,000 " + ("rows" if curve.name == "init-vocab" else "tokens")
        words.append(
            f"peak memory {_x(m_exp)} ({peaks[0]:.0f} -> {peaks[-1]:.0f} MB, +{per:.1f} MB per {unit})"
        )
    return {**fit, "time_limit": _r(limit), "verdict": "; ".join(words), "worse_than_linear": worse}


# ------------------------------------------------------------------------------------------------ output


def plot(curve: Curve, entry: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    pts = entry["points"]
    xs = [p["x"] for p in pts]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    secs = [p["seconds"] for p in pts]
    lo = [max(0.0, p["seconds"] - p["seconds_range"][0]) for p in pts]
    hi = [max(0.0, p["seconds_range"][1] - p["seconds"]) for p in pts]
    ax_t.errorbar(xs, secs, yerr=[lo, hi], marker="o", capsize=3, label="wall, median (min-max)")
    ax_t.plot(xs, [p["cpu_seconds"] for p in pts], marker=".", ls="--", label="CPU (all threads)")
    if "phases" in pts[0]:
        ax_t.plot(xs, [p["phases"]["learn"] for p in pts], marker=".", ls="-.", label="wall, learning phase")
    # Guides through the first point: a linear cost stays parallel to the slope-1 line.
    ax_t.plot(xs, [secs[0] * x / xs[0] for x in xs], color="grey", ls=":", label="linear (slope 1)")
    if "flops_per_block" in pts[0]:
        f0 = pts[0]["flops_per_block"]
        ax_t.plot(
            xs, [secs[0] * p["flops_per_block"] / f0 for p in pts], color="black", ls=":", label="model FLOPs"
        )
    ylabel = "seconds per block" if curve.name == "train-seqlen" else "wall seconds"
    ax_t.set(xscale="log", yscale="log", xlabel=curve.x_label, ylabel=ylabel)
    ax_t.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_t.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_t.yaxis.set_minor_locator(ticker.NullLocator())
    ax_t.set_title(
        f"time: {_x(entry['time_exponent'])} (CPU {_x(entry['cpu_time_exponent'])})"
        if entry.get("time_exponent") is not None
        else "time"
    )
    if curve.name == "train-seqlen":
        for p in pts:
            ax_t.annotate(
                f"{p['tokens_per_second']:.0f} tok/s",
                (p["x"], p["seconds"]),
                fontsize=8,
                textcoords="offset points",
                xytext=(4, -10),
            )
    ax_m.plot(xs, [p["peak_rss_mb"] for p in pts], marker="o", label="peak RSS (process)")
    ax_m.plot(xs, [max(p["added_rss_mb"], 1.0) for p in pts], marker=".", ls="--", label="above the baseline")
    # Memory on a linear axis from 0: a flat line there is flat, and growth shows at its true size.
    ax_m.set(
        xscale="log", xlabel=curve.x_label, ylabel="MB", ylim=(0, 1.1 * max(p["peak_rss_mb"] for p in pts))
    )
    mexp = entry.get("memory_exponent")
    ax_m.set_title(f"peak memory: {_x(mexp)}" if mexp is not None else "peak memory")
    for ax in (ax_t, ax_m):
        ax.set_xticks(xs, [_fmt(x, curve.name) for x in xs])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"retok {curve.name}: {entry['verdict']}", fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(name: str, entry: dict) -> None:
    """The medians of one curve, one row per point."""
    extra = {"train-seqlen": "tokens/s", "init-vocab": "new rows"}.get(name, "learned")
    print(f"\n{name}: {entry['verdict']}")
    print(
        f"{'x':>10} | {'runs':>4} | {'wall s':>8} | {'min-max s':>13} | {'CPU s':>7} | {'peak MB':>8} | "
        f"{'+MB':>6} | {extra:>8} | {'others':>6}"
    )
    for p in entry["points"]:
        val = {
            "train-seqlen": lambda p: f"{p['tokens_per_second']:.0f}",
            "init-vocab": lambda p: f"{p['rows']['averaged'] + p['rows']['fallback']:,}",
        }.get(name, lambda p: f"{p['new_tokens_learned']:,}")(p)
        rng = f"{p['seconds_range'][0]:.2f}-{p['seconds_range'][1]:.2f}"
        print(
            f"{_fmt(p['x'], name):>10} | {p['runs']:>4} | {p['seconds']:8.2f} | {rng:>13} | "
            f"{p['cpu_seconds']:7.1f} | {p['peak_rss_mb']:8.0f} | {p['added_rss_mb']:6.0f} | {val:>8} | "
            f"{p['others_cores']:6.2f}"
        )


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curve", choices=[*CURVES, "all"], nargs="+", default=["all"], help="curves to run")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller points, one run each")
    ap.add_argument("--repeats", type=int, default=None, help="runs per point (median); default 3, --quick 1")
    ap.add_argument(
        "--cheap-seconds",
        type=float,
        default=45.0,
        help="a point whose first run (the whole subprocess) took longer than this runs once",
    )
    ap.add_argument(
        "--replot", action="store_true", help="no runs: verdicts, PNGs and tables again from the saved JSON"
    )
    ap.add_argument("--points", type=int, nargs="+", default=None, help="the inputs of a single --curve")
    ap.add_argument("--new-tokens", type=int, default=16000, help="tokenizer-corpus: new tokens (fixed)")
    ap.add_argument(
        "--vocab-corpus-mb",
        type=int,
        default=None,
        help="tokenizer-vocab: training text (default 28, quick 8)",
    )
    ap.add_argument(
        "--tokens-per-step",
        type=int,
        default=None,
        help="train-seqlen: batch = this / seq_len (default 2048, quick 512)",
    )
    ap.add_argument("--train-steps", type=int, default=2, help="train-seqlen: timed steps after the first")
    ap.add_argument(
        "--max-wait",
        type=float,
        default=60.0,
        help="before each run, wait up to this many seconds for other processes to leave the CPUs idle",
    )
    ap.add_argument("--max-exponent", type=float, default=1.15, help="time exponent above which exit is 1")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "cost-curves")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/retok-bench-costs"))
    ap.add_argument("--worker", choices=list(CURVES), help=argparse.SUPPRESS)
    ap.add_argument("--x", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", choices=list(CURVES), help=argparse.SUPPRESS)
    ap.add_argument("--x-list", type=int, nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.prepare:
        a.workdir.mkdir(parents=True, exist_ok=True)
        prepare(a.prepare, a.x_list, a)
        return
    if a.worker:
        print(json.dumps(worker(a)), flush=True)
        return

    a.vocab_corpus_mb = a.vocab_corpus_mb or (8 if a.quick else 28)
    a.tokens_per_step = a.tokens_per_step or (512 if a.quick else 2048)
    names = list(CURVES) if "all" in a.curve else list(dict.fromkeys(a.curve))
    if a.points and len(names) != 1:
        ap.error("--points needs exactly one --curve")
    repeats = a.repeats or (1 if a.quick else 3)
    a.workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(
        f"bench_costs: curves {', '.join(names)}; {repeats} run(s) per point (one when a run takes over "
        f"{a.cheap_seconds:g} s); {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    results: dict[str, dict] = {}
    store = a.out / "cost-curves.json"
    if a.replot:
        saved = json.loads(store.read_text(encoding="utf-8"))["curves"]
        for name in names:
            if name in saved:
                points = saved[name]["points"]
                results[name] = {**saved[name], **analyse(CURVES[name], points, a.max_exponent)}
    for name in [] if a.replot else names:
        curve = CURVES[name]
        xs = list(a.points or (curve.quick_points if a.quick else curve.points))
        t0 = time.time()
        # Inputs first (not timed), in a subprocess of their own: a child's ru_maxrss starts from its parent's
        # peak RSS (Linux carries the high-water mark across fork + exec), so this process must stay small.
        prep = subprocess.run(
            [sys.executable, __file__, "--prepare", name, "--workdir", str(a.workdir), "--x-list"]
            + [str(x) for x in xs]
            + ["--vocab-corpus-mb", str(a.vocab_corpus_mb)],
            cwd=ROOT,
        )
        if prep.returncode != 0:
            sys.exit(f"bench_costs: preparing the inputs of {name} failed")
        runs: dict[int, list[dict]] = {x: [] for x in xs}
        for r in range(repeats):
            for x in xs:
                if r and runs[x][0]["process_seconds"] > a.cheap_seconds:
                    continue
                res = run_point(name, x, a)
                runs[x].append(res)
                print(
                    f"  {name} {_fmt(x, name):>8} run {r + 1}/{repeats}: {res['seconds']:8.2f} s, "
                    f"peak RSS {res['peak_rss_mb']:6.0f} MB (process {res['process_seconds']:.0f} s; other "
                    f"processes {res['others_cores']:.2f} cores)",
                    flush=True,
                )
        points = [median_point(x, runs[x]) for x in xs]
        measured = {
            "date": datetime.date.today().isoformat(),
            "cpus": os.cpu_count(),
            "command": "python scripts/bench_costs.py " + " ".join(sys.argv[1:]),
            "minutes": round((time.time() - t0) / 60, 1),
            "settings": {
                "new_tokens": a.new_tokens,
                "vocab_corpus_mb": a.vocab_corpus_mb,
                "tokens_per_step": a.tokens_per_step,
                "train_timed_steps": a.train_steps,
                "repeats": repeats,
                "cheap_seconds": a.cheap_seconds,
            },
        }
        results[name] = {
            "x_label": curve.x_label,
            "points": points,
            "measured": measured,
            **analyse(curve, points, a.max_exponent),
        }
        # Saved curve by curve: a run stopped later keeps what it measured.
        a.out.mkdir(parents=True, exist_ok=True)
        saved = json.loads(store.read_text(encoding="utf-8")) if store.is_file() else {}
        saved.setdefault("curves", {})[name] = results[name]
        saved["curves"] = {k: saved["curves"][k] for k in CURVES if k in saved["curves"]}
        store.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
        plot(curve, results[name], a.out / f"{name}.png")

    if a.replot:
        saved = json.loads(store.read_text(encoding="utf-8"))
        saved["curves"].update(results)
        store.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
        for name, entry in results.items():
            plot(CURVES[name], entry, a.out / f"{name}.png")
    for name, entry in results.items():
        table(name, entry)
    print(
        f"\nbench_costs: {len(results)} curve(s) in {(time.time() - start) / 60:.1f} min; "
        f"{', '.join(str(a.out / (n + '.png')) for n in results)} and {store}"
    )
    bad = [n for n, e in results.items() if e["worse_than_linear"]]
    keep = ("x", "seconds", "cpu_seconds", "peak_rss_mb", "added_rss_mb", "runs", "others_cores")
    summary = {
        "bench": "costs",
        "cpus": os.cpu_count(),
        "load_avg": round(os.getloadavg()[0], 2),
        "curves": {
            n: {
                "points": [{k: p[k] for k in keep if k in p} for p in e["points"]],
                **{k: v for k, v in e.items() if k not in ("points", "measured", "x_label")},
            }
            for n, e in results.items()
        },
        "worse_than_linear": bad,
    }
    print(json.dumps(summary))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
