"""The end-of-run summary: one table per run from the stage reports, printed and saved as summary.md/json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retok.core.config import RetokConfig
from retok.core.errors import RetokError
from retok.core.fileio import disk_error, write_text_atomic
from retok.core.freshness import judge
from retok.core.stages import ORDER, stage, stage_dir


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _f(x: Any, fmt: str = ".3f") -> str:
    return format(x, fmt) if isinstance(x, int | float) else "-"


def collect(cfg: RetokConfig) -> dict[str, Any]:
    """Per-domain figures gathered from the report of every stage whose folder is up to date (a stale one's
    figures belong to another model or config: they are left out and the stage is named under ``stale``)."""
    stale = {}
    for key in ORDER:
        if stage_dir(cfg, key).exists():
            v = judge(cfg, key)
            if v.action != "skip":
                stale[key] = "; ".join(v.reasons)
    comp = _report(cfg, "tokenizer", stale).get("domains", {})
    init = _report(cfg, "model-init", stale).get("bpb", {})
    train = _report(cfg, "model-trained", stale).get("bpb", {})
    report = _report(cfg, "eval", stale)
    ev = report.get("domains", {})
    # BPB columns on one slice of text: eval-speed scores eval.max_bytes per domain, init-embeddings
    # init.eval_max_bytes and train-io train.eval_max_bytes. With eval-speed's figures, the init report's count
    # only when it scored as many bytes (the same slice); otherwise the init column stays empty rather than
    # compare figures of different text.
    cand = Path(str((report.get("candidate") or {}).get("folder", "")))
    eval_is_trained = bool(ev) and cand.name == "model-trained"
    init_same_slice = not ev or cfg.init.eval_max_bytes == cfg.eval.max_bytes
    names = list(dict.fromkeys([*comp, *init, *train, *ev]))
    rows = {}
    for d in names:
        c, t, e = comp.get(d, {}), train.get(d, {}), ev.get(d, {})
        i = init.get(d, {}) if init_same_slice else {}
        trained = e.get("new", {}).get("bpb") if eval_is_trained else None
        rows[d] = {
            "old_bytes_per_token": c.get("old_bytes_per_token", e.get("old", {}).get("bytes_per_token")),
            "new_bytes_per_token": c.get("new_bytes_per_token", e.get("new", {}).get("bytes_per_token")),
            "compression_ratio": c.get("ratio"),
            "bpb_original": i.get("original", e.get("old", {}).get("bpb", t.get("original"))),
            "bpb_init": i.get("init", None if ev else t.get("init")),
            "bpb_trained": trained if trained is not None else t.get("final"),
            "bpb_eval_new": e.get("new", {}).get("bpb"),
            "old_bytes_per_s": e.get("old", {}).get("bytes_per_s"),
            "new_bytes_per_s": e.get("new", {}).get("bytes_per_s"),
            "speedup_bytes_per_s": e.get("speedup_bytes_per_s"),
        }
    return {
        "domains": rows,
        "outputs": {k: str(stage_dir(cfg, k)) for k in ORDER if stage_dir(cfg, k).is_dir()},
        "stale": stale,
    }


def _report(cfg: RetokConfig, key: str, stale: dict[str, str]) -> dict[str, Any]:
    if key in stale:
        return {}
    return _load(stage_dir(cfg, key) / (stage(key).report or ""))


def markdown_table(summary: dict[str, Any]) -> str:
    head = (
        "| domain | bytes/token old | bytes/token new | ratio | BPB original | BPB init | BPB trained "
        "| decode bytes/s old | decode bytes/s new | speed-up |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for d, r in summary["domains"].items():
        lines.append(
            f"| {d} | {_f(r['old_bytes_per_token'], '.2f')} | {_f(r['new_bytes_per_token'], '.2f')} "
            f"| {_f(r['compression_ratio'], '.2f')}x | {_f(r['bpb_original'])} | {_f(r['bpb_init'])} "
            f"| {_f(r['bpb_trained'])} | {_f(r['old_bytes_per_s'], '.1f')} | {_f(r['new_bytes_per_s'], '.1f')} "
            f"| {_f(r['speedup_bytes_per_s'], '.2f')}x |"
        )
    return head + "\n".join(lines) + "\n"


def print_summary(cfg: RetokConfig) -> dict[str, Any]:
    """Print the table and where every output is; save summary.md and summary.json in output_dir."""
    from rich.console import Console
    from rich.table import Table

    summary = collect(cfg)
    table = Table(title=f"retok summary: {cfg.out}")
    for col in (
        "domain",
        "B/tok old",
        "B/tok new",
        "ratio",
        "BPB orig",
        "BPB init",
        "BPB trained",
        "B/s old",
        "B/s new",
        "speed-up",
    ):
        table.add_column(col, justify="right" if col != "domain" else "left")
    for d, r in summary["domains"].items():
        table.add_row(
            d,
            _f(r["old_bytes_per_token"], ".2f"),
            _f(r["new_bytes_per_token"], ".2f"),
            _f(r["compression_ratio"], ".2f") + "x",
            _f(r["bpb_original"]),
            _f(r["bpb_init"]),
            _f(r["bpb_trained"]),
            _f(r["old_bytes_per_s"], ".1f"),
            _f(r["new_bytes_per_s"], ".1f"),
            _f(r["speedup_bytes_per_s"], ".2f") + "x",
        )
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: rich would wrap the table at 80 columns
        console = Console(width=120)
    console.print(table)
    for key, path in summary["outputs"].items():
        note = (
            f"  (not up to date, figures left out: {summary['stale'][key]})"
            if key in summary["stale"]
            else ""
        )
        console.print(f"  {key:>14}: {path}{note}")
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_text_atomic(cfg.out / "summary.md", f"# retok summary\n\n{markdown_table(summary)}")
    except OSError as e:
        raise RetokError(
            f"cannot write the summary into {cfg.out} ({disk_error(e) or e.strerror}); every stage folder is "
            "complete and kept, only summary.md/json are missing"
        ) from None
    console.print(f"  {'summary':>14}: {cfg.out / 'summary.md'}")
    return summary
