"""train-io's report: ``train_report.json`` (machine-readable), ``train_report.md`` and ``train_curve.png``.

The JSON contract other stages and scripts read::

    {"bpb": {"<domain>": {"original": f, "init": f, "final": f}}, "tokens_per_second": f, "steps": n, ...}

``original`` is the original model with its ORIGINAL tokenizer on the same held-out text, ``init`` the
re-initialised model before training, ``final`` the trained one. BPB (bits per byte) is the only loss that
can be compared across the two tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retok.core.config import RetokConfig
from retok.train.state import TrainState

CURVE = "train_curve.png"


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(loss records, eval records) of a metrics.jsonl."""
    losses, evals = [], []
    for ln in path.read_text().splitlines():
        if not ln.strip():
            continue
        rec = json.loads(ln)
        (evals if "bpb" in rec else losses).append(rec)
    return losses, evals


def _mean_loss(rows: list[dict[str, Any]]) -> float:
    return sum(r["loss"] for r in rows) / len(rows)


def estimate_to_original(
    evals: list[dict], domain: str, original: float, tokens_per_second: float
) -> dict[str, Any] | None:
    """Tokens still needed for ``domain`` to reach the original model's BPB at the rate of the last half of
    training. Curves flatten, so this is a lower bound; None when it cannot be estimated."""
    pts = [(e["tokens"], e["bpb"][domain]) for e in evals if domain in e["bpb"]]
    if len(pts) < 2:
        return None
    t_end, b_end = pts[-1]
    if b_end <= original:
        return {"reached": True, "more_tokens": 0, "more_minutes": 0.0}
    half = [p for p in pts if p[0] <= t_end / 2] or pts[:1]
    t0, b0 = half[-1]
    if t_end <= t0 or b0 <= b_end:
        return {
            "reached": False,
            "more_tokens": None,
            "more_minutes": None,
            "note": "BPB did not improve lately",
        }
    rate = (b0 - b_end) / (t_end - t0)  # bits/byte gained per token over the recent half
    more = (b_end - original) / rate
    return {
        "reached": False,
        "more_tokens": int(more),
        "more_minutes": more / tokens_per_second / 60 if tokens_per_second > 0 else None,
        "rate_bpb_per_mtok": rate * 1e6,
    }


def _plot(path: Path, losses: list[dict], evals: list[dict], bpb: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in losses]
    ax1.plot(steps, [r["loss"] for r in losses], lw=0.8, label="train loss (nats/token)")
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = [
            sum(r["loss"] for r in losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax1.plot(steps, smooth, lw=1.6, label=f"mean of {k}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss (new tokenizer)")
    ax1.legend()
    for i, (domain, figs) in enumerate(bpb.items()):
        pts = [(e["step"], e["bpb"][domain]) for e in evals if domain in e["bpb"]]
        color = f"C{i}"
        if pts:
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=f"{domain}")
        if figs.get("original") is not None:
            ax2.axhline(figs["original"], color=color, ls="--", lw=0.8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("bits per byte (held out)")
    ax2.set_title("BPB; dashed = original model, original tokenizer")
    if bpb:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path,
    cfg: RetokConfig,
    state: TrainState,
    final: dict[str, float],
    world: int,
    device: str,
    precision: str,
    head_fit: dict | None = None,
    piece_map: dict | None = None,
) -> dict:
    """Write train_report.json/.md and train_curve.png into ``out``; returns the JSON report. ``head_fit``: the
    report of fit.after_train (None when it did not run); ``piece_map``: rows, pieces and lr of train.piece_map
    (None when off)."""
    losses, evals = read_metrics(out / "metrics.jsonl")
    original, init = state.original or {}, state.init or {}
    tps = state.tokens_seen / state.train_seconds if state.train_seconds else 0.0
    bpb = {
        d: {"original": original.get(d), "init": init.get(d), "final": final.get(d)} for d in init or final
    }
    estimate = {
        d: estimate_to_original([e for e in evals if e.get("phase") != "head-fit"], d, f["original"], tps)
        for d, f in bpb.items()
        if f["original"] is not None
    }
    t = cfg.train
    window = max(1, min(50, len(losses) // 10))
    report = {
        "bpb": bpb,
        "tokens_per_second": tps,
        "steps": state.step,
        "steps_io": min(state.step, t.max_steps),
        "steps_all": max(0, state.step - t.max_steps),
        "tokens_seen": state.tokens_seen,
        "minutes": state.wall_seconds / 60,
        "train_minutes": state.train_seconds / 60,
        "trainable_params": state.trainable_params,
        "learning_values": state.learning_values,
        "trainable": t.trainable,
        # one step's loss is one batch of one domain: average a tenth of the run (at least 1, at most 50 steps)
        "loss_first": _mean_loss(losses[:window]) if losses else None,
        "loss_last": _mean_loss(losses[-window:]) if losses else None,
        "loss_window_steps": window,
        "estimate_to_original": estimate,
        "processes": world,
        "device": device,
        "mixed_precision": precision,
        "seq_len": t.seq_len,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "objective": t.objective,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(),
        "strategy": state.strategy,
        "curve": CURVE,
        "head_fit": head_fit,
        "piece_map": piece_map,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(out / CURVE, losses, evals, bpb)
    (out / "train_report.md").write_text(_markdown(report, cfg), encoding="utf-8")
    return report


def peak_gpu_mb() -> float | None:
    """The most GPU memory torch's allocator held at once in this process, in MB (None without CUDA)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_reserved() / (1 << 20)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux/macOS), in MiB (the report calls it MB).

    On Linux this is VmHWM, the high-water mark of this program's own memory: ru_maxrss would also count the
    parent it was started from (the kernel carries the peak across exec, so a run launched from a large
    process, a test runner or a notebook, would report that process's peak)."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # VmHWM is in kB (KiB): this is MiB
    except (OSError, ValueError, IndexError):
        pass

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _f(x: float | None, nd: int = 4) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _markdown(r: dict, cfg: RetokConfig) -> str:
    lines = [
        "# train-io report",
        "",
        f"Trained `{cfg.out / 'model-init'}` with the body frozen ({r['trainable']}: {r['trainable_params']:,} "
        f"trainable parameters, {r['learning_values']:,} values allowed to move) for {r['steps']} steps "
        f"({r['steps_io']} io + {r['steps_all']} all), {r['tokens_seen']:,} tokens, {r['minutes']:.1f} min "
        f"({r['train_minutes']:.1f} min in training steps, {r['tokens_per_second']:.0f} tokens/s) on "
        f"{r['processes']} process(es), {r['device']}, mixed precision {r['mixed_precision']}; objective "
        f"{r['objective']}"
        + (
            f", the new input rows through the piece map ({r['piece_map']['rows']:,} rows over "
            f"{r['piece_map']['pieces']:,} pieces, lr {r['piece_map']['lr']:g})"
            if r.get("piece_map")
            else ""
        )
        + f"; peak resident memory {r['peak_rss_mb']:.0f} MB.",
        "",
        "## Bits per byte on held-out text (lower is better)",
        "",
        "`original` = the original model with its original tokenizer on the same text.",
        "",
        "| domain | original | init | final | final - init | gap to original closed |",
        "|---|---|---|---|---|---|",
    ]
    for d, f in r["bpb"].items():
        o, i, fi = f["original"], f["init"], f["final"]
        delta = _f(fi - i, 4) if fi is not None and i is not None else "-"
        closed = "-"
        if None not in (o, i, fi) and i - o > 0.002 * o:  # a gap worth closing (init may equal original)
            closed = f"{100 * (i - fi) / (i - o):.0f}%"
        lines.append(f"| {d} | {_f(o)} | {_f(i)} | {_f(fi)} | {delta} | {closed} |")
    if not r["bpb"]:
        lines.append("| (no data.eval) | | | | | |")
    hf = r.get("head_fit")
    if hf and "skipped" not in hf:
        lines += [
            "",
            f"After the steps the head rows of {hf['rows_fitted']:,} new tokens were fitted on the states of the "
            f"trained input rows (fit.after_train, {hf['stage_seconds'] / 60:.1f} min): held-out CE "
            f"{hf['held_out_ce']['start']:.3f} -> {hf['held_out_ce']['fitted']:.3f} nats/token; `final` includes it.",
        ]
    elif hf:
        lines += ["", f"fit.after_train skipped: {hf['skipped']}."]
    lines += ["", "## How far from the original BPB", ""]
    for d, e in r["estimate_to_original"].items():
        if e is None:
            lines.append(f"- {d}: not enough evaluations to estimate (lower train.eval_every).")
        elif e["reached"]:
            lines.append(f"- {d}: reached the original model's BPB.")
        elif e["more_tokens"] is None:
            lines.append(f"- {d}: {e.get('note', 'no estimate')}.")
        else:
            mins = (
                f", ~{e['more_minutes']:.0f} more minutes at this speed"
                if e["more_minutes"] is not None
                else ""
            )
            lines.append(
                f"- {d}: ~{e['more_tokens']:,} more tokens{mins} at the rate of the last half of training "
                f"({e['rate_bpb_per_mtok']:.3f} bits/byte per million tokens); curves flatten, so this is a lower bound."
            )
    lines += [
        "",
        f"![loss and BPB]({CURVE})",
        "",
        f"Loss (nats/token, new tokenizer, mean of {r['loss_window_steps']} steps): {_f(r['loss_first'])} at the "
        f"start -> {_f(r['loss_last'])} at the end. "
        "Per-step figures: `metrics.jsonl`.",
        "",
        "Resumable state (not needed to use this model): `train-state/` next to this folder.",
        "",
    ]
    return "\n".join(lines)
