"""init.fit_head: the LM-head rows of new tokens fitted on the new model's own states (retok.headfit).

The new model is the ORIGINAL body with the new input rows (built in memory from the plan, not yet written):
it runs over ``init.fit_bytes`` of every data.train domain; the original model (the same body with the old
embedding and head) gives the soft target at the aligned positions. Only the rows of new tokens are fitted;
the fitted head goes into the folder init-embeddings writes.
"""

from __future__ import annotations

from typing import Any

import torch

from retok.config import RetokConfig
from retok.embeddings.mapping import AVERAGED, COPY, FALLBACK, SPECIAL
from retok.embeddings.rows import Plan, build_matrix
from retok.errors import RetokError


def fit_budgets(names: list[str], targets: list[str] | None, total: int) -> dict[str, int]:
    """Bytes per domain: half for the domains the new tokens are for (tokenizer.domains), half for the others
    (where the new rows must learn NOT to fire), evenly within each half; all even when there is one group."""
    inside = [n for n in names if targets and n in targets]
    outside = [n for n in names if n not in inside]
    if not inside or not outside:
        return {n: max(1000, total // len(names)) for n in names}
    return {n: max(1000, total // 2 // len(group)) for group in (inside, outside) for n in group}


def _fit_text(cfg: RetokConfig) -> dict[str, list[str]]:
    from retok.data import domains as domain_names
    from retok.data import load_domains

    names = domain_names(cfg.data.train)
    budgets = fit_budgets(names, cfg.tokenizer.domains, cfg.init.fit_bytes)
    return {n: load_domains(cfg.data.train, "data.train", b, only=[n])[n] for n, b in budgets.items()}


TOP_K = 64  # teacher probabilities kept per state


def _check_fit_inputs(
    cfg: RetokConfig,
    docs: dict[str, list[str]],
    old_hf: Any,
    new_hf: Any,
    old_embed: torch.Tensor,
    n_learn: int,
) -> None:
    """Refuse, before any forward pass: an original tokenizer with ids past the original rows (the teacher
    would index past its embedding), and cached states that would not fit init.fit_max_memory_mb."""
    top = max(old_hf.get_vocab().values())
    if top >= old_embed.shape[0]:
        raise RetokError(
            f"init.fit_head: model.path's tokenizer has id {top} but its embedding has {old_embed.shape[0]} rows: "
            "the tokenizer does not belong to this checkpoint; give the model's own tokenizer"
        )
    n = sum(
        len(ids) for texts in docs.values() for ids in new_hf(texts, add_special_tokens=False)["input_ids"]
    )
    teacher = cfg.init.fit_teacher_weight > 0
    # top-k probabilities (4 bytes) and ids (8) at the aligned position; per tree depth 4 + 4 + 4 (group) + 8
    per_state = (
        old_embed.shape[1] * 2
        + 8
        + (TOP_K * 12 + cfg.init.fit_tree_depth * (TOP_K * 12 + 8) if teacher else 0)
    )
    need_mb = (
        n * per_state * 2 / 1e6
    )  # float16 states, targets, teacher top-k; x2 for the float32 copy in the fit
    if cfg.init.fit_shared_map:
        # its features (float32, 2H per learning row) and the map with its grad and Adam moments
        H = old_embed.shape[1]
        need_mb += (n_learn * 2 * H * 4 * 2 + 2 * H * H * 4 * 4) / 1e6
    if need_mb > cfg.init.fit_max_memory_mb:
        raise RetokError(
            f"init.fit_bytes: the head fit would cache {n:,} states and its map ({need_mb:,.0f} MB), over "
            f"init.fit_max_memory_mb={cfg.init.fit_max_memory_mb}; lower init.fit_bytes or raise the cap"
        )


def fit_head(
    cfg: RetokConfig,
    model_dir: Any,
    old_hf: Any,
    new_hf: Any,
    plan: Plan,
    old_embed: torch.Tensor,
    old_head: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(the fitted head matrix, a report of the fit)."""
    from retok.headfit import collect_states, first_pieces, fit_rows, piece_features
    from retok.sources import load_model
    from retok.teacher import Teacher

    init = cfg.init
    if not cfg.data.train:
        raise RetokError(
            "init.fit_head needs data.train text to fit the head on; add sources or set it to false"
        )
    tmap = plan.tmap
    docs = _fit_text(cfg)
    learn = torch.zeros(tmap.n_rows, dtype=torch.bool)
    learn[torch.as_tensor(tmap.ids(AVERAGED))] = True
    learn[torch.as_tensor(tmap.ids(FALLBACK), dtype=torch.long)] = True
    _check_fit_inputs(cfg, docs, old_hf, new_hf, old_embed, n_learn=int(learn.sum()))
    new_input = build_matrix(old_embed, plan, "input")
    head0 = build_matrix(old_head, plan, "head")
    model = load_model(
        model_dir,
        dtype=cfg.compute.dtype,
        device=cfg.compute.device,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
    )
    if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
        raise RetokError(
            "init.fit_head: this model soft-caps its logits (final_logit_softcapping), which the head fit does not "
            "model yet; set init.fit_head: false"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    teacher = Teacher(model, old_embed, old_head) if init.fit_teacher_weight > 0 else None
    tree_depth = init.fit_tree_depth if teacher is not None else 0
    states = collect_states(
        model,
        new_hf,
        docs,
        window=init.fit_window,
        teacher=teacher,
        old_tok=old_hf,
        top_k=TOP_K,
        tree_depth=tree_depth,
        embed_weight=new_input.to(device=device, dtype=dtype),
        desc="fit head: forward",
    )
    del model, teacher
    copies = {int(i): int(tmap.source[i]) for kind in (COPY, SPECIAL) for i in tmap.ids(kind)}
    first = first_pieces(tmap.n_rows, tmap.pieces, copies)
    features = (
        piece_features(old_head, tmap.pieces, torch.nonzero(learn).squeeze(1))
        if init.fit_shared_map
        else None
    )
    result = fit_rows(
        states,
        head0,
        learn,
        first_piece=first,
        pieces=tmap.pieces,
        kl_weight=init.fit_teacher_weight,
        features=features,
        map_lr=init.fit_map_lr,
        lr=init.fit_lr,
        max_epochs=init.fit_epochs,
        seed=cfg.seed,
        device=device,
        log=lambda m: print(f"retok: {m}", flush=True),
    )
    per_domain = {n: int((states.domain == k).sum()) for k, n in enumerate(states.domains)}
    report = {
        "states": per_domain,
        "held_out_states": int(states.held_out.sum()),
        "rows_fitted": int(learn.sum()),
        "teacher_weight": init.fit_teacher_weight,
        "tree_depth": tree_depth,
        "shared_map": init.fit_shared_map,
        "held_out_ce": {"start": round(result.held_out_ce_start, 4), "fitted": round(result.held_out_ce, 4)},
        "best_epoch": round(result.epochs, 2),
        "steps": result.steps,
        "tokens": states.tokens,
        "seconds": {
            "forward_student": round(states.seconds["student"], 1),
            "forward_teacher": round(states.seconds["teacher"], 1),
            "fit": round(result.seconds, 1),
        },
    }
    print(
        f"retok: head fit on {sum(per_domain.values()):,} states ({', '.join(f'{k} {v:,}' for k, v in per_domain.items())}): "
        f"held-out CE {result.held_out_ce_start:.3f} -> {result.held_out_ce:.3f} nats/token at epoch {result.epochs:.1f}",
        flush=True,
    )
    return result.head.to(old_head.dtype), report
