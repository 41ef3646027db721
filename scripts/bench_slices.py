"""Quality off the demo's own held-out slice: a finished run scored on other slices of the same held-out text.

    python scripts/bench_slices.py runs/smollm2-zh                       # 4 slices of 8,000 bytes per domain
    python scripts/bench_slices.py runs/smollm2-zh other:/tmp/other-run --slices 6 --bytes 15000

eval-speed scores the first ``eval.max_bytes`` of each domain's held-out documents; a user's text is elsewhere.
This takes ``--slices`` slices spread through each domain's held-out documents (each starting at another
document), scores the original model and each run's final model (model-trained, else model-init) on exactly
the same bytes (retok's own sliding-window BPB), and says where the new tokens fire there and what they cost
against the original's pieces. Prints a table per domain (BPB as a multiple of the original's: the median and
the worst slice; new-token uses per KB; the bits the new tokens take against the original's pieces, as a share
of the domain's bits) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def slices(docs: list[str], n: int, budget: int) -> list[list[str]]:
    """``n`` runs of whole documents (the last one cut), each of about ``budget`` bytes, starting at documents
    spread evenly through ``docs``; the first starts at the first document (eval-speed's own slice)."""
    from retok.core.data import truncate_utf8

    out = []
    for k in range(n):
        i = (k * len(docs)) // n
        got, used = [], 0
        while i < len(docs) and used < budget:
            d = truncate_utf8(docs[i], budget - used)
            got.append(d)
            used += len(d.encode("utf-8"))
            i += 1
        out.append(got)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="output_dir of finished runs, as PATH or NAME:PATH")
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--bytes", type=int, default=8000, help="bytes per slice (eval-speed's eval.max_bytes)")
    args = ap.parse_args()

    import torch

    from retok.core.config import load_config
    from retok.core.data import domains, iter_domain
    from retok.core.metrics import bits_per_byte, score_starts
    from retok.core.sources import load_model, load_tokenizer, resolve_model
    from retok.core.stages import CONFIG_FILE
    from retok.teacher.alignment import new_token_costs

    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = [(r.split(":", 1) if ":" in r else (Path(r).name, r)) for r in args.runs]
    results: dict[str, dict] = {}
    t0 = time.time()
    original_cache: dict[tuple, dict] = {}
    for name, path in runs:
        run = Path(path)
        folder = next((run / k for k in ("model-trained", "model-init") if (run / k).is_dir()), None)
        if folder is None:
            sys.exit(f"{run}: no model-trained or model-init folder")
        cfg = load_config(folder / CONFIG_FILE, [f"output_dir={run}"])
        kw = {"window": cfg.eval.window, "stride": cfg.eval.stride}
        old_dir = resolve_model(cfg.model, cfg.cache)
        old_tok, new_tok = load_tokenizer(old_dir), load_tokenizer(folder)
        old_vocab = old_tok.get_vocab()
        new_ids = {i for t, i in new_tok.get_vocab().items() if t not in old_vocab}
        old_m = load_model(old_dir, dtype="float32", device="cpu")
        new_m = load_model(folder, dtype="float32", device="cpu")
        per_domain = {}
        for dom in domains(cfg.data.eval):
            docs = list(iter_domain(cfg.data.eval, dom, "data.eval"))
            rows = []
            for k, texts in enumerate(slices(docs, args.slices, args.bytes)):
                starts = score_starts([old_tok, new_tok], texts)
                key = (str(old_dir), dom, k, args.bytes)
                if key not in original_cache:
                    original_cache[key] = bits_per_byte(
                        old_m, old_tok, texts, starts=starts, keep_tokens=True, **kw
                    )
                o = original_cache[key]
                n = bits_per_byte(new_m, new_tok, texts, starts=starts, keep_tokens=True, **kw)
                c = new_token_costs(old_tok, new_tok, texts, o["token_nll"], n["token_nll"], new_ids)
                rows.append(
                    {
                        "slice": k,
                        "bytes": n["bytes"],
                        "bpb_original": o["bpb"],
                        "bpb_new": n["bpb"],
                        "ratio": n["bpb"] / o["bpb"],
                        "uses_per_kb": c["uses"] / (n["bytes"] / 1000),
                        "change_share": c["bits_change"] / (o["nats"] / math.log(2)),
                    }
                )
                print(
                    f"{name} {dom} slice {k}: BPB {o['bpb']:.4f} -> {n['bpb']:.4f} ({rows[-1]['ratio']:.4f}x), "
                    f"new tokens {rows[-1]['uses_per_kb']:.2f}/KB, their cost {100 * rows[-1]['change_share']:+.2f}% "
                    "of the domain's bits",
                    file=sys.stderr,
                    flush=True,
                )
            ratios = [r["ratio"] for r in rows]
            per_domain[dom] = {
                "median_ratio": statistics.median(ratios),
                "worst_ratio": max(ratios),
                "uses_per_kb": statistics.mean(r["uses_per_kb"] for r in rows),
                "change_share": statistics.mean(r["change_share"] for r in rows),
                "slices": rows,
            }
        results[name] = per_domain
        del old_m, new_m

    print(f"\n{args.slices} slices of {args.bytes:,} bytes per domain; BPB as a multiple of the original's")
    print(
        "| run | domain | median | worst slice | new-token uses per KB | their bits vs the original's pieces |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, per_domain in results.items():
        for dom, r in per_domain.items():
            print(
                f"| {name} | {dom} | {r['median_ratio']:.4f}x | {r['worst_ratio']:.4f}x | {r['uses_per_kb']:.2f} | "
                f"{100 * r['change_share']:+.2f}% |"
            )
    summary = {
        "bench": "slices",
        "slices": args.slices,
        "bytes": args.bytes,
        "minutes": round((time.time() - t0) / 60, 1),
        "runs": {
            n: {d: {k: v for k, v in r.items() if k != "slices"} for d, r in pd.items()}
            for n, pd in results.items()
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
