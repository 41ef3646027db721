"""Benchmark init-embeddings at Llama-3-8B scale: retok's tensor-by-tensor surgery vs the naive way.

    .venv/bin/python scripts/bench_init_embeddings.py            # ~10 min on 2 cores, ~8 GB of disk
    .venv/bin/python scripts/bench_init_embeddings.py --repeats 1 --layers 1

A synthetic checkpoint with Llama-3-8B's embedding and head shapes (128,256 x 4,096, bf16, untied) and a few
body layers, written shard by shard (the full model is never built in RAM), a synthetic byte-level BPE with
128,256 tokens, and an extended tokenizer of 150,000 tokens (21,744 new ones, built by continued merges as
build-tokenizer does). Each variant runs in its own subprocess, which reports its own peak RSS
(``ru_maxrss``); medians of ``--repeats`` runs:

- retok: ``retok.embeddings.stage.init_embeddings`` (reads/writes safetensors shards tensor by tensor).
- naive: ``from_pretrained`` the whole model, ``resize_token_embeddings``, assign the new rows (same TokenMap,
  so both compute the same rows), ``save_pretrained``.

Ends with ONE JSON line (wall seconds, peak RSS GB, ratios naive/retok, and the targets: < 60 s, < 3 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HIDDEN, OLD_VOCAB, NEW_VOCAB = 4096, 128_256, 150_000
N_SPECIAL = 256  # Llama-3 keeps 256 special tokens at the end of its vocabulary


# ------------------------------------------------------------------------------------------ synthetic inputs


def _alphabet() -> list[str]:
    from retok.core.tokens import BYTE_TO_UNICODE

    return [BYTE_TO_UNICODE[b] for b in range(256)]


def synthetic_tokenizers(folder: Path, old_vocab: int, new_vocab: int, seed: int = 0) -> tuple[Path, Path]:
    """A byte-level BPE with ``old_vocab`` tokens (random merges of earlier tokens, specials at the end, as
    Llama-3) and its extension to ``new_vocab`` tokens (continued merges appended, every old id kept)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    tokens = _alphabet()
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []

    def grow(target: int, max_len: int) -> None:
        while len(vocab) < target:
            # Second half from the most recent tokens, so token lengths grow as in a real BPE.
            a, b = rng.choice(tokens), tokens[rng.randrange(max(0, len(tokens) - 20000), len(tokens))]
            t = a + b
            if len(t) > max_len or t in vocab:
                continue
            vocab[t] = len(vocab)
            tokens.append(t)
            merges.append((a, b))

    grow(old_vocab - N_SPECIAL, 12)
    specials = [f"<|reserved_special_token_{k}|>" for k in range(N_SPECIAL)]
    specials[:3] = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]

    def save(path: Path) -> Path:
        body = {t: i for t, i in vocab.items()}
        for k, s in enumerate(specials):
            body[s] = old_vocab - N_SPECIAL + k
        tj = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {
                    "id": body[s],
                    "content": s,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
                for s in specials
            ],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": True,
                "use_regex": True,
            },
            "post_processor": {
                "type": "ByteLevel",
                "add_prefix_space": True,
                "trim_offsets": False,
                "use_regex": True,
            },
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": True,
                "trim_offsets": True,
                "use_regex": True,
            },
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": body,
                "merges": [list(m) for m in merges],
            },
        }
        path.mkdir(parents=True, exist_ok=True)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(json.dumps(tj)),
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            clean_up_tokenization_spaces=False,
        )
        tok.save_pretrained(path)
        return path

    old_dir = save(folder / "old-tokenizer")
    # Extension: new ids after the specials, merges after the old ones (continued BPE).
    shift = N_SPECIAL
    vocab = {t: (i if i < old_vocab - N_SPECIAL else i + shift) for t, i in vocab.items()}
    n_old_text = len(vocab)
    target = new_vocab - N_SPECIAL
    while len(vocab) < target:
        a, b = rng.choice(tokens), rng.choice(tokens)
        t = a + b
        if len(t) > 24 or t in vocab:
            continue
        vocab[t] = len(vocab) + N_SPECIAL
        tokens.append(t)
        merges.append((a, b))
    del n_old_text
    new_dir = save(folder / "new-tokenizer")
    return old_dir, new_dir


def synthetic_checkpoint(folder: Path, old_vocab: int, hidden: int, layers: int, seed: int = 0) -> Path:
    """Llama-shaped bf16 checkpoint written one shard at a time: embed | layer 0 | ... | norm + lm_head."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    inter, heads, kv = 14336 * hidden // 4096, 32, 8
    cfg = LlamaConfig(
        vocab_size=old_vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=False,
        bos_token_id=old_vocab - N_SPECIAL,
        eos_token_id=old_vocab - N_SPECIAL + 1,
        dtype="bfloat16",
    )
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    hd = hidden // heads
    shards: list[dict[str, torch.Tensor]] = [lambda: {"model.embed_tokens.weight": rnd(old_vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."

        def layer(p: str = p) -> dict:
            return {
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "self_attn.q_proj.weight": rnd(heads * hd, hidden),
                p + "self_attn.k_proj.weight": rnd(kv * hd, hidden),
                p + "self_attn.v_proj.weight": rnd(kv * hd, hidden),
                p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
                p + "mlp.gate_proj.weight": rnd(inter, hidden),
                p + "mlp.up_proj.weight": rnd(inter, hidden),
                p + "mlp.down_proj.weight": rnd(hidden, inter),
            }

        shards.append(layer)
    shards.append(
        lambda: {
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            "lm_head.weight": rnd(old_vocab, hidden),
        }
    )
    weight_map, total = {}, 0
    n = len(shards)
    for k, make in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = make()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return folder


def prepare(work: Path, layers: int, old_vocab: int, new_vocab: int, hidden: int) -> dict[str, Path]:
    """Build (once; cached in ``work``) the model folder and the run folder with output_dir/tokenizer."""
    key = f"v{old_vocab}-n{new_vocab}-h{hidden}-l{layers}"
    base = work / key
    model, run = base / "model", base / "run"
    if not (base / "ready").is_file():
        shutil.rmtree(base, ignore_errors=True)
        t = time.time()
        old_dir, new_dir = synthetic_tokenizers(base / "tok", old_vocab, new_vocab)
        synthetic_checkpoint(model, old_vocab, hidden, layers)
        for f in old_dir.iterdir():
            shutil.copy2(f, model / f.name)
        tok_stage = run / "tokenizer"
        shutil.copytree(new_dir, tok_stage)
        from retok.core.stages import write_tokenizer_meta

        write_tokenizer_meta(
            tok_stage,
            new_ids=list(range(old_vocab, new_vocab)),
            old_vocab_size=old_vocab,
            new_vocab_size=new_vocab,
            family="byte_level",
        )
        (base / "ready").write_text("ok")
        print(
            f"bench: prepared synthetic inputs in {time.time() - t:.0f}s under {base}",
            file=sys.stderr,
            flush=True,
        )
    return {"model": model, "run": run}


# ------------------------------------------------------------------------------------------ the two variants


def worker(variant: str, model: Path, run: Path, out: Path) -> dict:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from retok.core.config import RetokConfig
    from retok.core.stages import mark_stage

    cfg = RetokConfig(output_dir=str(run), model={"path": str(model)}, init={"eval_bpb": False})
    mark_stage(
        run / "tokenizer", cfg, "tokenizer"
    )  # the synthetic tokenizer folder stands for build-tokenizer's
    t = time.perf_counter()
    if variant == "retok":
        from retok.embeddings.stage import init_embeddings

        out.mkdir(parents=True)
        report = init_embeddings(cfg, out)
        counts = {k: report[k] for k in ("copied", "special", "averaged", "fallback", "padding")}
    else:
        from transformers import AutoModelForCausalLM

        from retok.core.sources import load_tokenizer
        from retok.core.tokenmap import build_token_map
        from retok.embeddings.rows import Plan, build_matrix

        old_tok, new_tok = load_tokenizer(model), load_tokenizer(run / "tokenizer")
        m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.bfloat16)
        old_emb = m.get_input_embeddings().weight.detach().clone()
        old_head = m.get_output_embeddings().weight.detach().clone()
        tmap = build_token_map(old_tok, new_tok, old_rows=old_emb.shape[0], pad_to_multiple_of=64)
        from retok.core.tokenmap import pick_pad_donor

        pick_pad_donor(tmap, old_head)
        m.resize_token_embeddings(tmap.n_rows, mean_resizing=False)
        plan = Plan(tmap, "mean", "mean", 0.5, 0)
        with torch.no_grad():
            m.get_input_embeddings().weight.copy_(build_matrix(old_emb, plan, "input"))
            m.get_output_embeddings().weight.copy_(build_matrix(old_head, plan, "head"))
        del old_emb, old_head
        m.save_pretrained(str(out))
        new_tok.save_pretrained(str(out))
        counts = tmap.counts()
    work_s = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = usage.ru_maxrss
    return {
        "variant": variant,
        "work_s": round(work_s, 2),
        # CPU seconds of the whole process (imports included): unlike wall time, not inflated when other
        # jobs share the cores.
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_gb": round(peak_kb / 1024**2, 3),
        "counts": counts,
    }


def run_variant(variant: str, paths: dict[str, Path], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--model",
            str(paths["model"]),
            "--run",
            str(paths["run"]),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"bench: {variant} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = round(wall, 2)
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/retok-bench-init"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--old-vocab", type=int, default=OLD_VOCAB)
    ap.add_argument("--new-vocab", type=int, default=NEW_VOCAB)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--worker", choices=["retok", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.run, args.out)), flush=True)
        return

    paths = prepare(args.workdir, args.layers, args.old_vocab, args.new_vocab, args.hidden)
    variants = ["retok"] + ([] if args.skip_naive else ["naive"])
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            res = run_variant(v, paths, args.workdir / f"out-{v}")
            results[v].append(res)
            print(
                f"bench: run {r + 1}/{args.repeats} {v}: wall {res['wall_s']}s (work {res['work_s']}s, "
                f"cpu {res['cpu_s']}s), "
                f"peak RSS {res['peak_rss_gb']} GB",
                file=sys.stderr,
                flush=True,
            )
    summary: dict = {
        "bench": "init_embeddings",
        "shape": {
            "old_rows": args.old_vocab,
            "hidden": args.hidden,
            "dtype": "bf16",
            "tied": False,
            "body_layers": args.layers,
            "new_vocab": args.new_vocab,
        },
        "repeats": args.repeats,
        "counts": results["retok"][0]["counts"],
    }
    for v in variants:
        summary[v] = {
            k: statistics.median(r[k] for r in results[v])
            for k in ("wall_s", "work_s", "cpu_s", "peak_rss_gb")
        }
    if "naive" in summary:
        summary["ratio_naive_over_retok"] = {
            "wall": round(summary["naive"]["wall_s"] / summary["retok"]["wall_s"], 2),
            "cpu": round(summary["naive"]["cpu_s"] / summary["retok"]["cpu_s"], 2),
            "peak_rss": round(summary["naive"]["peak_rss_gb"] / summary["retok"]["peak_rss_gb"], 2),
        }
    summary["load_average_1m"] = round(os.getloadavg()[0], 2)  # > cores: wall times are inflated by others
    summary["targets_met"] = {
        "wall_under_60s": summary["retok"]["wall_s"] < 60,
        "rss_under_3gb": summary["retok"]["peak_rss_gb"] < 3,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
