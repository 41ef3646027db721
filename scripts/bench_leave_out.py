"""The default recipe on text it was not tuned on: leave one source of a domain out of everything the run
learns from, and score the run on that source alone.

    python scripts/bench_leave_out.py zh:debian-reference-zh-cn          # ~12 min on 2 cores
    python scripts/bench_leave_out.py en:python3.11-doc --config configs/smollm2-zh.yaml --work runs/leave-out

The fetched corpora (scripts/fetch_assets.py) record each document's source (a Debian or npm package, a file of
the standard library). For DOMAIN:SOURCE this writes a copy of the domain's training text without that source,
and a held-out file of that source only (its training and held-out documents: none of it was learned from), then
runs `retok run` with the config (the demo's by default; every other key as it is) on those files, and prints
eval-speed's figures for every domain: BPB as a multiple of the original's, compression, where the new tokens
fire. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def split_source(corpora: Path, domain: str, source: str, out: Path) -> tuple[Path, Path, int, int]:
    """(training text without ``source``, held-out text of ``source`` only, their sizes in bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / f"{domain}-train.jsonl", out / f"{domain}-{source}.jsonl"
    n_train = n_held = 0
    with train.open("w", encoding="utf-8") as ft, held.open("w", encoding="utf-8") as fh:
        for split in ("train", "eval"):
            for line in (corpora / domain / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
                doc = json.loads(line)
                mine = str(doc.get("source", "")).split("/")[0] == source
                if mine:
                    fh.write(line + "\n")
                    n_held += len(doc["text"].encode("utf-8"))
                elif split == "train":
                    ft.write(line + "\n")
                    n_train += len(doc["text"].encode("utf-8"))
    if not n_held:
        sys.exit(
            f"no document of {domain} comes from {source!r}; see the 'source' field of {corpora / domain}"
        )
    return train, held, n_train, n_held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("left_out", help="DOMAIN:SOURCE, e.g. zh:debian-reference-zh-cn or en:python3.11-doc")
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-zh.yaml"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "leave-out"))
    ap.add_argument("--set", action="append", default=[], help="more --set overrides for the run")
    args = ap.parse_args()

    from retok.core.config import default_cache, load_config

    domain, _, source = args.left_out.partition(":")
    cfg = load_config(args.config)
    work = Path(args.work) / f"{domain}-{source}"
    train, held, n_train, n_held = split_source(
        default_cache() / "assets" / "corpora", domain, source, work / "data"
    )
    sets = [f"output_dir={work / 'run'}"]
    for section in ("train", "eval"):
        for i, src in enumerate(getattr(cfg.data, section)):
            if src.name == domain:
                sets.append(f"data.{section}.{i}.path={train if section == 'train' else held}")
    sets += args.set
    print(
        f"bench: {domain} without {source}: {n_train:,} bytes to learn from, {n_held:,} held-out bytes of {source}",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.time()
    cmd = [sys.executable, "-m", "retok.cli", "run", args.config] + [x for s in sets for x in ("--set", s)]
    res = subprocess.run(cmd, cwd=ROOT)
    if res.returncode:
        sys.exit(res.returncode)
    report = json.loads((work / "run" / "eval" / "report.json").read_text())
    comp = json.loads((work / "run" / "tokenizer" / "compression.json").read_text())
    print(f"\n{domain} without {source} (scored on {source} only); BPB as a multiple of the original's")
    print("| domain | compression | BPB original | BPB after | ratio | new-token uses per KB | their bits |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for name, d in report["domains"].items():
        nt = d.get("new_tokens") or {}
        rows[name] = {
            "compression": d["compression_ratio"],
            "bpb_original": d["old"]["bpb"],
            "bpb_after": d["new"]["bpb"],
            "ratio": d["bpb_ratio"],
            "uses_per_kb": nt.get("uses_per_kb"),
            "change_share": nt.get("change_share"),
        }
        r = rows[name]
        share = "-" if r["change_share"] is None else f"{100 * r['change_share']:+.2f}%"
        uses = "-" if r["uses_per_kb"] is None else f"{r['uses_per_kb']:.2f}"
        print(
            f"| {name} | {r['compression']:.3f}x | {r['bpb_original']:.4f} | {r['bpb_after']:.4f} | "
            f"{r['ratio']:.4f}x | {uses} | {share} |"
        )
    summary = {
        "bench": "leave_out",
        "domain": domain,
        "source": source,
        "train_bytes": n_train,
        "held_bytes": n_held,
        "minutes": round((time.time() - t0) / 60, 1),
        "protected_dropped": (comp.get("protection") or {}).get("dropped"),
        "domains": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
