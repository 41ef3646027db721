"""The exported model in a real llama.cpp: old GGUF vs new GGUF on the config's held-out text (issue 14).

    python scripts/build_llamacpp.py                       # once: builds llama.cpp into the cache
    python scripts/bench_llamacpp.py                       # the demo (configs/smollm2-zh.yaml) after `retok run`
    python scripts/bench_llamacpp.py --config my.yaml --types q8_0 --repeats 3 --no-verify

Both GGUFs are written by retok's own writer from the original model folder and from the export folder, at each
type (f16 and q8_0 by default), into ``<output_dir>/bench-llamacpp/``. Per domain of ``data.eval``:

- bytes/token: llama.cpp's own tokenizer (llama-tokenize) on ``eval.max_bytes`` of held-out text;
- decode bytes/s: ``--pieces`` places of the held-out text, each a prompt of ``eval.prompt_bytes`` and a
  continuation of ``eval.continuation_bytes`` (the SAME bytes for both models) fed token by token after the
  prompt, one llama_decode call per token, argmax computed each step (scripts/llamacpp/retok_llama.cpp);
  old and new interleaved, ``--repeats`` times, the median of the total time over the pieces;
- targets: the new domain (the tokenizer's domains) decodes >= 0.9x faster than the timed text compresses
  (old tokens / new tokens on the very bytes that were timed: a few places of held-out text compress less or
  more than the whole slice, so the slice's bytes/token ratio is shown beside it); other domains >= the bound
  set by the extra head rows (bytes of weights read per token, old / new) minus 2%.

With verification (default; ``--no-verify`` skips it): llama.cpp's tokens equal transformers' on the held-out
text, greedy ids of 32 tokens from 3 prompts equal transformers' at f32 (and at f16), and llama-perplexity's
bits per byte is within 1% of transformers' on the same chunks.

Prints Markdown tables, writes them and the JSON to the bench folder, and ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import llamacpp_tools as lt  # noqa: E402


def _weights_read_per_token(gguf: Path) -> int:
    """Bytes of weights one decoding step reads: every tensor, except that an untied model reads one row of
    its input embedding (counted as nothing) and all of its output head."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors}
    total = sum(tensors.values())
    return total - tensors["token_embd.weight"] if "output.weight" in tensors else total


def _write(folder: Path, path: Path, ftype: str, tok: Any, pre: str | None, source: Path | None) -> Path:
    from retok.export.gguf_out import write_gguf

    if not path.is_file():
        conf = json.loads((folder / "config.json").read_text())
        write_gguf(folder, path, ftype=ftype, tok=tok, conf=conf, pre=pre, name=path.stem, source_gguf=source)
    return path


def _pieces(text: str, n: int, prompt_bytes: int, cont_bytes: int) -> list[tuple[str, str]]:
    data = text.encode("utf-8")
    span = prompt_bytes + cont_bytes
    room = max(0, len(data) - span)
    out = []
    for k in range(n):
        s = round(k * room / (n - 1)) if n > 1 else 0
        chunk = data[s : s + span]
        prompt = chunk[:prompt_bytes].decode("utf-8", "ignore")
        out.append((prompt, chunk[len(prompt.encode()) :].decode("utf-8", "ignore")))
    return out


def _speed(old: Path, new: Path, pieces: list[tuple[str, str]], repeats: int, threads: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"old": [], "new": []}
    tokens = {"old": 0, "new": 0}
    for r in range(repeats + 1):  # the first round warms the page cache and is not counted
        for key, gguf in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
            total = 0.0
            for prompt, cont in pieces:
                res = lt.decode(gguf, prompt, reference=cont, threads=threads)
                total += res["decode_s"]
                if r == 0:
                    tokens[key] += res["decode_calls"]
            if r > 0:
                times[key].append(total)
    n_bytes = sum(len(c.encode()) for _, c in pieces)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bytes": n_bytes,
        "tokens": tokens,
        "seconds_median": med,
        "seconds_all": times,
        "bytes_per_s": {k: n_bytes / med[k] for k in med},
        "speedup": med["old"] / med["new"],
    }


def _verify(cfg: Any, export: Path, new_tok: Any, texts: dict[str, str], work: Path, pre: str | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from retok.core.tokens import token_bytes_table

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    f32 = _write(export, work / "new-f32.gguf", "f32", new_tok, pre, None)
    f16 = _write(export, work / "new-f16.gguf", "f16", new_tok, pre, None)
    out: dict[str, Any] = {"tokenization": {}, "greedy": {}, "bpb": {}}
    for domain, text in texts.items():
        out["tokenization"][domain] = (
            lt.tokenize(f32, text) == new_tok(text, add_special_tokens=False).input_ids
        )
        prompt = text.encode()[:300].decode("utf-8", "ignore")
        ids = new_tok(prompt, add_special_tokens=False).input_ids
        want = lt.transformers_greedy(model, ids, 32)
        out["greedy"][domain] = {
            "f32": lt.decode(f32, prompt, n=32)["ids"] == want,
            "f16": lt.decode(f16, prompt, n=32)["ids"] == want,
        }
    table = token_bytes_table(new_tok.backend_tokenizer)
    n_ctx = 256
    for domain, text in texts.items():
        ids = lt.tokenize(f32, text)
        if len(ids) < 2 * n_ctx:
            continue
        llama = lt.bpb_from_ppl(lt.perplexity(f32, text, n_ctx), ids, n_ctx, table)
        hf = lt.transformers_bpb(model, ids, n_ctx, table, bos=None)
        out["bpb"][domain] = {"llama.cpp": llama, "transformers": hf, "ratio": llama / hf}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-zh.yaml"))
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pieces", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()

    from retok.core.config import load_config
    from retok.core.data import load_domains
    from retok.core.sources import load_tokenizer, resolve_model
    from retok.core.stages import stage_dir
    from retok.export.llamacpp import KNOWN_HASHES, chkhsh
    from retok.export.stage import _old_pre_name, _source_gguf

    if lt.find_bin() is None:
        raise SystemExit(
            "bench_llamacpp: llama.cpp is not built; run `python scripts/build_llamacpp.py` first"
        )
    cfg = load_config(args.config)
    export = stage_dir(cfg, "export")
    if not (export / "config.json").is_file():
        raise SystemExit(
            f"bench_llamacpp: {export} has no exported model; run `retok run {args.config}` first"
        )
    old_folder = resolve_model(cfg.model, cfg.cache)
    old_tok, new_tok = load_tokenizer(old_folder), load_tokenizer(export)
    source = _source_gguf(cfg)  # the original GGUF, whose metadata the old GGUF keeps, or None
    pre = _old_pre_name(cfg) or KNOWN_HASHES.get(chkhsh(old_tok))  # the name export would write
    work = stage_dir(cfg, "export").parent / "bench-llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    docs = load_domains(cfg.data.eval, "data.eval", cfg.eval.max_bytes)
    texts = {d: "\n\n".join(v) for d, v in docs.items()}
    new_domains = set(cfg.tokenizer.domains or texts)

    rows: list[dict[str, Any]] = []
    for ftype in args.types.split(","):
        old = _write(old_folder, work / f"old-{ftype}.gguf", ftype, old_tok, pre, source)
        new = _write(export, work / f"new-{ftype}.gguf", ftype, new_tok, pre, None)
        bound = _weights_read_per_token(old) / _weights_read_per_token(new)
        for domain, text in texts.items():
            bpt_old = len(text.encode()) / len(lt.tokenize(old, text))
            bpt_new = len(text.encode()) / len(lt.tokenize(new, text))
            pieces = _pieces(text, args.pieces, cfg.eval.prompt_bytes, cfg.eval.continuation_bytes)
            speed = _speed(old, new, pieces, args.repeats, args.threads)
            ratio = bpt_new / bpt_old
            timed_ratio = speed["tokens"]["old"] / speed["tokens"]["new"]
            target = 0.9 * timed_ratio if domain in new_domains else bound - 0.02
            rows.append(
                {
                    "type": ftype,
                    "domain": domain,
                    "bytes_per_token": {"old": bpt_old, "new": bpt_new, "ratio": ratio},
                    "timed_ratio": timed_ratio,
                    "decode": speed,
                    "bound": bound,
                    "target": target,
                    "pass": speed["speedup"] >= target,
                }
            )
            print(
                f"[bench_llamacpp] {ftype} {domain}: bytes/token x{ratio:.3f}, decode x{speed['speedup']:.3f} "
                f"(target >= {target:.3f})",
                flush=True,
            )

    lines = [
        "| type | domain | bytes/token old | new | ratio (timed text) | decode B/s old | new | speed-up | target | pass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, d = r["bytes_per_token"], r["decode"]
        lines.append(
            f"| {r['type']} | {r['domain']} | {b['old']:.3f} | {b['new']:.3f} | {b['ratio']:.3f}x "
            f"({r['timed_ratio']:.3f}x) "
            f"| {d['bytes_per_s']['old']:.0f} | {d['bytes_per_s']['new']:.0f} | **{d['speedup']:.3f}x** "
            f"| >= {r['target']:.3f} | {'yes' if r['pass'] else 'NO'} |"
        )
    table = "\n".join(lines)
    print(table)
    result: dict[str, Any] = {
        "bench": "llamacpp",
        "config": args.config,
        "repeats": args.repeats,
        "pieces": args.pieces,
        "threads": args.threads,
        "rows": rows,
    }
    if not args.no_verify:
        result["verify"] = _verify(cfg, export, new_tok, texts, work, pre)
        print(json.dumps(result["verify"], indent=1))
    (work / "table.md").write_text(table + "\n")
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = {
        "bench": "llamacpp",
        "speedup": {f"{r['type']}/{r['domain']}": round(r["decode"]["speedup"], 3) for r in rows},
        "bytes_per_token_ratio": {r["domain"]: round(r["bytes_per_token"]["ratio"], 3) for r in rows},
        "all_pass": all(r["pass"] for r in rows),
    }
    if "verify" in result:
        v = result["verify"]
        summary["verified"] = {
            "tokenization": all(v["tokenization"].values()),
            "greedy_f32": all(g["f32"] for g in v["greedy"].values()),
            "greedy_f16": sum(g["f16"] for g in v["greedy"].values()),
            "bpb_ratio": {d: round(b["ratio"], 4) for d, b in v["bpb"].items()},
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
