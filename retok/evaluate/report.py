"""eval-speed's report: the old/new comparison per domain, report.md, table.md (embedded by export in the
model card) and the charts."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any


def _ratio(new: Any, old: Any) -> float | None:
    if not isinstance(new, int | float) or not isinstance(old, int | float) or not old:
        return None
    return new / old


def compare(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    comp = _ratio(new["bytes_per_token"], old["bytes_per_token"])
    speed = _ratio(new.get("bytes_per_s"), old.get("bytes_per_s"))
    row: dict[str, Any] = {
        "old": old,
        "new": new,
        "compression_ratio": comp,
        "bpb_delta": new["bpb"] - old["bpb"],
        "bpb_ratio": _ratio(new["bpb"], old["bpb"]),
        "speedup_bytes_per_s": speed,
        "speedup_tokens_per_s": _ratio(new.get("tokens_per_s"), old.get("tokens_per_s")),
        "ms_per_token_ratio": _ratio(new.get("ms_per_token"), old.get("ms_per_token")),
    }
    if "speed" in old and "speed" in new:
        # Compression on exactly the text that was timed, next to the domain's; the speed-up is judged against
        # the timed text: speed-up / this = old ms/token / new ms/token (1.0 = decoding kept all the gain).
        o, n = old["speed"], new["speed"]
        timed = _ratio(
            _ratio(n["continuation_bytes"], n["continuation_tokens"]),
            _ratio(o["continuation_bytes"], o["continuation_tokens"]),
        )
        row["continuation_compression_ratio"] = timed
        row["speedup_vs_compression"] = _ratio(speed, timed)
    if "greedy" in old and "greedy" in new:
        row["greedy_speedup_bytes_per_s"] = _ratio(new["greedy"]["bytes_per_s"], old["greedy"]["bytes_per_s"])
    return row


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def clean(obj: Any) -> Any:
    """JSON without NaN/inf (they are not JSON): None instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def fmt(x: Any, spec: str = ".3f") -> str:
    return (
        "–"
        if not isinstance(x, int | float) or (isinstance(x, float) and not math.isfinite(x))
        else format(x, spec)
    )


def markdown_table(report: dict[str, Any]) -> str:
    """The per-domain comparison table (also embedded in the exported model card)."""
    lines = [
        "| domain | bytes/token old | new | ratio | BPB old | new | bytes/s old | new | timed ratio | speed-up "
        "| speed-up / timed ratio "
        "| ms/token old | new | prefill ms old | new |",
        "|---|" + "---:|" * 14,
    ]
    for name, d in report["domains"].items():
        o, n = d["old"], d["new"]
        lines.append(
            f"| {name} | {fmt(o['bytes_per_token'], '.2f')} | {fmt(n['bytes_per_token'], '.2f')} | "
            f"{fmt(d['compression_ratio'], '.2f')}x | {fmt(o['bpb'])} | {fmt(n['bpb'])} | "
            f"{fmt(o.get('bytes_per_s'), '.1f')} | {fmt(n.get('bytes_per_s'), '.1f')} | "
            f"{fmt(d.get('continuation_compression_ratio'), '.2f')}x | "
            f"{fmt(d.get('speedup_bytes_per_s'), '.2f')}x | {fmt(d.get('speedup_vs_compression'), '.2f')} | "
            f"{fmt(o.get('ms_per_token'), '.1f')} | {fmt(n.get('ms_per_token'), '.1f')} | "
            f"{fmt(o.get('prefill_ms'), '.0f')} | {fmt(n.get('prefill_ms'), '.0f')} |"
        )
    return "\n".join(lines)


def _greedy_table(report: dict[str, Any]) -> str | None:
    rows = [(k, d) for k, d in report["domains"].items() if "greedy" in d["old"] and "greedy" in d["new"]]
    if not rows:
        return None
    lines = [
        "| domain | tokens old | new | bytes old | new | bytes/s old | new | speed-up | ms/token old | new |",
        "|---|" + "---:|" * 9,
    ]
    for name, d in rows:
        o, n = d["old"]["greedy"], d["new"]["greedy"]
        lines.append(
            f"| {name} | {o['generated_tokens']} | {n['generated_tokens']} | {o['generated_bytes']} | "
            f"{n['generated_bytes']} | {fmt(o['bytes_per_s'], '.1f')} | {fmt(n['bytes_per_s'], '.1f')} | "
            f"{fmt(d.get('greedy_speedup_bytes_per_s'), '.2f')}x | {fmt(o['ms_per_token'], '.1f')} | "
            f"{fmt(n['ms_per_token'], '.1f')} |"
        )
    return "\n".join(lines)


def new_tokens_markdown(report: dict[str, Any]) -> str | None:
    """Where the new tokens fire and what they cost or gain against the original's pieces, per domain."""
    rows = [(k, d["new_tokens"]) for k, d in report["domains"].items() if "new_tokens" in d]
    if not rows:
        return None
    lines = [
        "| domain | new-token uses | per KB | bits, new model | bits, original on the same bytes | change | "
        "share of the domain's bits |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in rows:
        share = c.get("change_share")
        lines.append(
            f"| {name} | {c['uses']} | {fmt(c['uses_per_kb'], '.2f')} | {fmt(c['bits_new'], '.1f')} | "
            f"{fmt(c['bits_original'], '.1f')} | {c['bits_change']:+.1f} | "
            f"{'-' if share is None else format(100 * share, '+.2f') + '%'} |"
        )
    return "\n".join(lines)


def _pm(diff: Any, se: Any, spec: str, scale: float = 1.0) -> str:
    if not isinstance(diff, int | float):
        return "–"
    text = format(diff * scale, "+" + spec)
    return text + (
        f" ± {format(se * scale, spec)}" if isinstance(se, int | float) and math.isfinite(se) else ""
    )


def tasks_markdown(report: dict[str, Any]) -> str | None:
    """Old vs new on every task: accuracies and the gold answer's bits per byte, with paired differences."""
    tasks = report.get("tasks") or {}
    if not tasks:
        return None
    lines = [
        "| task | questions | chance | accuracy old | new | new - old | accuracy (per byte) old | new | new - old "
        "| gold BPB old | new | new - old | ratio |",
        "|---|" + "---:|" * 12,
    ]
    for name, t in tasks.items():
        o, n = t["old"], t["new"]
        lines.append(
            f"| {name} | {t['questions']} | {fmt(100 * t['chance'], '.0f')}% | {fmt(100 * o['accuracy'], '.1f')}% | "
            f"{fmt(100 * n['accuracy'], '.1f')}% | {_pm(t['accuracy_diff'], t['accuracy_diff_se'], '.1f', 100)} | "
            f"{fmt(100 * o['accuracy_norm'], '.1f')}% | {fmt(100 * n['accuracy_norm'], '.1f')}% | "
            f"{_pm(t['accuracy_norm_diff'], t['accuracy_norm_diff_se'], '.1f', 100)} | {fmt(o['gold_bpb'])} | "
            f"{fmt(n['gold_bpb'])} | {_pm(t['gold_bpb_diff'], t['gold_bpb_diff_se'], '.3f')} | "
            f"{fmt(t.get('gold_bpb_ratio'), '.3f')}x |"
        )
    return "\n".join(lines)


def _quote(text: str, limit: int = 400) -> str:
    flat = text.replace("`", "'").replace("\r", "").replace("\n", " ⏎ ").strip()
    return flat if len(flat) <= limit else flat[:limit] + " …"


def samples_markdown(report: dict[str, Any]) -> str | None:
    """Each prompt with both models' greedy samples and the tokens/bytes/seconds each took."""
    samples = report.get("samples") or []
    if not samples:
        return None
    parts: list[str] = []
    for i, smp in enumerate(samples, 1):
        where = f"{smp['domain']} held-out text" if smp["kind"] == "text" else "chat prompt"
        parts += ["", f"**{i}. {where}:** `{_quote(smp['prompt'], 300)}`", ""]
        for side in ("old", "new"):
            g = smp[side]
            end = "stopped" if g["stopped"] else "cut at the byte budget"
            parts.append(
                f"- {side} ({g['tokens']} tokens, {g['bytes']} bytes, {fmt(g['seconds'], '.1f')} s, {end}): "
                f"`{_quote(g['text'])}`"
            )
    return "\n".join(parts).lstrip("\n")


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    env = report["environment"]
    parts = [
        "# retok eval-speed",
        "",
        f"- old (baseline): `{report['baseline']['path']}` ({report['baseline']['tokenizer_len']} tokens, "
        f"{report['baseline']['embedding_rows']} embedding rows)",
        f"- new (candidate): `{report['candidate']['path']}` ({report['candidate']['tokenizer_len']} tokens, "
        f"{report['candidate']['embedding_rows']} embedding rows)",
        f"- device {env['device']} ({env['device_name']}), dtype {env['dtype']}, {env['threads']} threads, "
        f"torch {env['torch']}, transformers {env['transformers']}",
        f"- BPB: up to {s['max_bytes']} bytes per domain, window {s['window']}, stride {s['stride']}; both models "
        "score exactly the same bytes (BOS in front of every window when the tokenizer adds one)",
        f"- speed: {s['speed_pieces']} places spread through each domain's held-out text, each a prompt of "
        f"~{s['prompt_bytes']} bytes and ~{-(-s['continuation_bytes'] // s['speed_pieces'])} bytes of reference "
        f"continuation fed token by token through the KV cache; {s['warmup']} warm-up + {s['repeats']} timed runs, "
        "medians of the summed times",
        "",
        markdown_table(report),
        "",
        "*ratio* = new/old bytes per token (higher compresses better); *speed-up* = new/old bytes per second on "
        "the same reference continuations; *timed ratio* = the compression of exactly the text that was timed; "
        "*speed-up / timed ratio* = how much of that compression gain decoding turned "
        "into speed (the LM head of a bigger vocabulary costs a little per token).",
    ]
    fired = new_tokens_markdown(report)
    if fired:
        parts += [
            "",
            "## Where the new tokens fire",
            "",
            fired,
            "",
            "At every scored position whose token is new: the bits the new model spends on it against the bits the "
            "original spends on the old pieces of the same bytes. Negative: the new tokens help. In a domain the new "
            "tokens were not learned for, a cost means they fire where their rows never learned.",
        ]
    tasks = tasks_markdown(report)
    if tasks:
        parts += [
            "",
            "## Tasks (multiple choice by log-likelihood, the same questions for both models)",
            "",
            tasks,
            "",
            "*accuracy*: the choice with the highest log-likelihood is right; *(per byte)*: the same with the "
            "log-likelihood per byte; *gold BPB*: the right answer's bits per byte (lower is better, the same "
            "bytes for both models). *new - old*: paired over the same questions, ± one standard error. Near "
            "chance the accuracy says little; the gold BPB still shows a change.",
        ]
    samples = samples_markdown(report)
    if samples:
        parts += [
            "",
            f"## Samples (greedy, at most {s['sample_bytes']} bytes, the same prompts for both models)",
            "",
            samples,
        ]
    greedy = _greedy_table(report)
    if greedy:
        parts += [
            "",
            f"## Free greedy generation (~{s['generate_bytes']} bytes from the same prompt)",
            "",
            greedy,
            "",
            "First 64 generated tokens (greedy decoding of an untrained or weak model can loop):",
            "",
        ]
        for name, d in report["domains"].items():
            for side in ("old", "new"):
                g = d[side].get("greedy")
                if g:
                    sample = g["sample"].replace("`", "'").replace("\n", "⏎")[:160]
                    parts.append(f"- {name} {side}: `{sample}`")
    parts += ["", "Charts: `bytes_per_token.png`, `bytes_per_s.png`.", ""]
    return "\n".join(parts)


def charts(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["domains"])
    written = []
    for key, title, fname in (
        ("bytes_per_token", "Bytes per token (higher = better compression)", "bytes_per_token.png"),
        ("bytes_per_s", "Decoding speed on the same continuation (bytes/s)", "bytes_per_s.png"),
    ):
        old = [report["domains"][n]["old"].get(key) or 0.0 for n in names]
        new = [report["domains"][n]["new"].get(key) or 0.0 for n in names]
        if not any(old) and not any(new):
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 3.6))
        xs = range(len(names))
        w = 0.38
        b1 = ax.bar([x - w / 2 for x in xs], old, w, label="old", color="#8c8c8c")
        b2 = ax.bar([x + w / 2 for x in xs], new, w, label="new", color="#2b7bba")
        ax.bar_label(b1, fmt="%.2f" if key == "bytes_per_token" else "%.0f", fontsize=8)
        ax.bar_label(b2, fmt="%.2f" if key == "bytes_per_token" else "%.0f", fontsize=8)
        ax.set_xticks(list(xs), names)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(fname)
    return written
