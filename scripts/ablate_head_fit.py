"""Ablate train-io's head fit (fit.after_train) on a finished run: the fit's states are collected ONCE from the run's
trained model (cached in the run folder), then each variant is fitted with retok's own ``fit_rows`` from the run's
initial head rows and scored on the same held-out bytes as eval-speed. What a change to the fit's settings is worth,
in minutes instead of a whole demo each.

    python scripts/ablate_head_fit.py runs/smollm2-zh                                   # the run's own fit
    python scripts/ablate_head_fit.py runs/smollm2-zh demo: b2048:batch=2048,lr=3.5e-4,map_lr=7e-4 r576:rank=576

A variant is ``name:key=value,...`` with keys ``batch`` (states per Adam step), ``lr`` (rows), ``map_lr``,
``epochs`` and ``rank`` (the shared map's features cut to their top principal directions; 0 = all); what it does
not set is the config's (``--config``; by default the run's own, ``model-trained/retok_config.yaml``). The states
are the run's trained input rows' states over the config's fit text, the teacher as the config says (cached in
``RUN/ablate_head_fit.states-<key>.pt``). Prints a Markdown table (BPB after the fit as a multiple of the original's,
per domain, and the fit's seconds) and ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = {"batch": int, "lr": float, "map_lr": float, "epochs": float, "rank": int}


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    out = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in KEYS:
            raise SystemExit(f"variant {spec!r}: unknown key {key!r}; use {', '.join(KEYS)}")
        out[key] = KEYS[key](float(value)) if KEYS[key] is int else float(value)
    return name or "run", out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "run", type=Path, help="a finished run's output_dir (tokenizer, model-init, model-trained)"
    )
    ap.add_argument(
        "variants", nargs="*", default=["run:"], help="name:key=value,... (default: the run's own fit)"
    )
    ap.add_argument("--config", type=Path, help="default: RUN/model-trained/retok_config.yaml")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--states-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="the dtype of the forward passes that collect the states (default: what the config's "
        "fit.forward_dtype gives on this machine; the fit and the scoring stay float32)",
    )
    args = ap.parse_intermixed_args()
    variants = [parse_variant(v) for v in args.variants]

    import torch

    from retok.core.config import load_config
    from retok.core.data import load_domains
    from retok.core.metrics import bits_per_byte, score_starts
    from retok.core.sources import load_model, load_tokenizer, resolve_model, set_threads
    from retok.core.stages import read_tokenizer_meta
    from retok.core.tokenmap import AVERAGED, COPY, FALLBACK, SPECIAL
    from retok.headfit.fit import FIT_BATCH, first_pieces, fit_rows, piece_features
    from retok.headfit.run import TOP_K, fit_text, forward_copy, forward_dtype, original_rows_and_map
    from retok.headfit.states import collect_states
    from retok.teacher.body import Teacher

    run = args.run
    cfg_path = args.config or run / "model-trained" / "retok_config.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"{cfg_path} not found: give a finished run's output_dir, or --config")
    cfg = load_config(cfg_path)
    set_threads(args.threads or cfg.compute.threads)
    fit, ev_cfg = cfg.fit, cfg.eval
    tok_dir = run / "tokenizer"
    new_tok = load_tokenizer(tok_dir)
    old_tok = load_tokenizer(resolve_model(cfg.model, cfg.cache))
    old_embed, old_head, tmap = original_rows_and_map(
        cfg, old_tok, new_tok, tok_dir, read_tokenizer_meta(tok_dir)
    )
    model = load_model(run / "model-trained", dtype="float32", device="cpu")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    new_input = model.get_input_embeddings().weight.detach().clone()
    # the fit starts from the init's head rows (the distillation does not move them)
    head0 = load_model(run / "model-init", dtype="float32", device="cpu").get_output_embeddings().weight
    head0 = head0.detach().float().clone()
    learn = torch.zeros(tmap.n_rows, dtype=torch.bool)
    learn[torch.as_tensor(tmap.ids(AVERAGED), dtype=torch.long)] = True
    learn[torch.as_tensor(tmap.ids(FALLBACK), dtype=torch.long)] = True

    fwd = (
        getattr(torch, args.states_dtype)
        if args.states_dtype
        else forward_dtype(fit.forward_dtype, torch.float32, torch.device("cpu"))
    )
    # the cache is named by everything the states depend on besides the run's model and text
    key = [fwd, fit.bytes, fit.window, fit.teacher_weight > 0, fit.tree_depth]
    key += [fit.teacher_fraction]
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    cache = run / f"ablate_head_fit.states-{digest}.pt"
    if cache.is_file():
        states = torch.load(cache, weights_only=False)
    else:
        body = model if fwd == torch.float32 else forward_copy(model, fwd)
        teacher = Teacher(body, old_embed, old_head) if fit.teacher_weight > 0 else None
        states = collect_states(
            body,
            new_tok,
            fit_text(cfg),
            window=fit.window,
            teacher=teacher,
            old_tok=old_tok,
            top_k=TOP_K,
            tree_depth=fit.tree_depth if teacher is not None else 0,
            teacher_fraction=fit.teacher_fraction,
            embed_weight=new_input.to(next(body.parameters()).dtype),
            desc="states",
        )
        del body, teacher
        torch.save(states, cache)
    print(f"{len(states.target):,} states ({fwd}); forward seconds {states.seconds}", flush=True)
    copies = {int(i): int(tmap.source[i]) for kind in (COPY, SPECIAL) for i in tmap.ids(kind)}
    first = first_pieces(tmap.n_rows, tmap.pieces, copies)
    ids = torch.nonzero(learn).squeeze(1)
    feats_all = piece_features(
        old_head, tmap.pieces, ids, input_rows=new_input if fit.input_feature else None
    )

    docs = load_domains(cfg.data.eval, "data.eval", ev_cfg.max_bytes)
    starts = {n: score_starts([old_tok, new_tok], d) for n, d in docs.items()}
    original = load_model(resolve_model(cfg.model, cfg.cache), dtype="float32", device="cpu")
    orig = {
        n: bits_per_byte(original, old_tok, d, window=ev_cfg.window, stride=ev_cfg.stride, starts=starts[n])[
            "bpb"
        ]
        for n, d in docs.items()
    }
    del original
    head = model.get_output_embeddings().weight
    rows = []
    for name, over in variants:
        o = {
            "batch": FIT_BATCH,
            "lr": fit.lr,
            "map_lr": fit.map_lr,
            "epochs": fit.epochs,
            "rank": 0,
            **over,
        }
        feats = feats_all if fit.shared_map else None
        if feats is not None and o["rank"]:
            _, _, vh = torch.linalg.svd(feats, full_matrices=False)
            feats = feats @ vh[: o["rank"]].T
        t0 = time.perf_counter()
        res = fit_rows(
            states,
            head0,
            learn,
            first_piece=first,
            pieces=tmap.pieces,
            kl_weight=fit.teacher_weight,
            features=feats,
            map_lr=o["map_lr"],
            lr=o["lr"],
            max_epochs=o["epochs"],
            batch=o["batch"],
            seed=cfg.seed,
        )
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            head.copy_(res.head)
        bpb = {
            n: bits_per_byte(model, new_tok, d, window=ev_cfg.window, stride=ev_cfg.stride, starts=starts[n])[
                "bpb"
            ]
            for n, d in docs.items()
        }
        rows.append(
            {
                "variant": name,
                **o,
                "fit_seconds": round(seconds, 1),
                "steps": res.steps,
                "held_out_ce": round(res.held_out_ce, 4),
                "ratio": {n: round(bpb[n] / orig[n], 4) for n in bpb},
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    names = list(docs)
    print("\n| variant | batch | lr | map lr | epochs | rank | " + " | ".join(names) + " | fit s |")
    print("|---" * (7 + len(names)) + "|")
    for r in rows:
        cells = [r["variant"], r["batch"], r["lr"], r["map_lr"], r["epochs"], r["rank"] or "all"]
        cells += [f"{r['ratio'][n]:.4f}x" for n in names] + [r["fit_seconds"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(
        json.dumps(
            {"run": str(run), "original_bpb": {n: round(v, 4) for n, v in orig.items()}, "variants": rows}
        )
    )


if __name__ == "__main__":
    main()
