"""The head fit run on a model: the text it reads, the checks before it, the states and the fit itself
(the math is retok.headfit). Shared by the two places that fit new tokens' LM-head rows:

- init-embeddings (``init.fit_head``): on the states of the INITIAL input rows (retok.embeddings.fit);
- train-io (``train.fit_head``, the default recipe): after the steps, on the states of the TRAINED input rows
  (:func:`refit_head`), which the head then really sees. On the demo that order took zh from 1.156x to 1.140x
  of the original model's BPB (the same distilled input rows, the same fit).
"""

from __future__ import annotations

from typing import Any

import torch

from retok.config import RetokConfig
from retok.errors import RetokError
from retok.tokenmap import AVERAGED, COPY, FALLBACK, SPECIAL


def fit_budgets(names: list[str], targets: list[str] | None, total: int) -> dict[str, int]:
    """Bytes per domain: half for the domains the new tokens are for (tokenizer.domains), half for the others
    (where the new rows must learn NOT to fire), evenly within each half; all even when there is one group."""
    inside = [n for n in names if targets and n in targets]
    outside = [n for n in names if n not in inside]
    if not inside or not outside:
        return {n: max(1000, total // len(names)) for n in names}
    return {n: max(1000, total // 2 // len(group)) for group in (inside, outside) for n in group}


def fit_text(cfg: RetokConfig) -> dict[str, list[str]]:
    from retok.data import domains as domain_names
    from retok.data import load_domains

    names = domain_names(cfg.data.train)
    budgets = fit_budgets(names, cfg.tokenizer.domains, cfg.init.fit_bytes)
    return {n: load_domains(cfg.data.train, "data.train", b, only=[n])[n] for n, b in budgets.items()}


TOP_K = 64  # teacher probabilities kept per state


def native_bf16(device: torch.device) -> bool:
    """Does ``device`` multiply in bfloat16 natively: a CUDA GPU that supports it, or a CPU whose flags show
    AVX512-BF16 or AMX (Linux; elsewhere assumed not: emulated bfloat16 is slower than float32)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def forward_dtype(setting: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the head fit's forward passes (init.fit_forward_dtype) for a model held in ``model_dtype``."""
    if setting == "model" or model_dtype != torch.float32:
        return model_dtype
    if setting == "bfloat16" or native_bf16(device):
        return torch.bfloat16
    return model_dtype


def forward_copy(model: Any, dtype: torch.dtype) -> Any:
    """``model`` with its parameters in ``dtype`` for inference, ``model`` itself untouched (tied parameters stay
    tied; buffers are shared as they are, so rotary frequencies keep their precision). Never holds a second
    full-precision copy: the parameters are cast one by one into deepcopy's memo before the module is copied."""
    import copy

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


def fit_cache_bytes(cfg: RetokConfig, n_states: int, hidden: int, n_learn: int) -> int:
    """What the head fit holds besides the model: ``n_states`` cached states (float16) with their targets and,
    with the teacher, its top-k next-piece probabilities at every tree depth, twice (the float32 copy in the fit);
    with the shared map, its features (float32, 2 or 3 x hidden per learning row) and the map with its gradient
    and Adam moments."""
    # top-k probabilities (4 bytes) and ids (8) at the aligned position; per tree depth 4 + 4 + 4 (group) + 8
    teacher = cfg.init.fit_teacher_weight > 0
    depth = cfg.init.fit_tree_depth
    per_state = hidden * 2 + 8 + (TOP_K * 12 + depth * (TOP_K * 12 + 8) if teacher else 0)
    need = n_states * per_state * 2
    if cfg.init.fit_shared_map:
        blocks = 3 if cfg.init.fit_input_feature else 2
        need += n_learn * blocks * hidden * 4 * 2 + blocks * hidden * hidden * 4 * 4
    return need


def check_fit_inputs(
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
    need_mb = fit_cache_bytes(cfg, n, old_embed.shape[1], n_learn) / 1e6
    if need_mb > cfg.init.fit_max_memory_mb:
        raise RetokError(
            f"init.fit_bytes: the head fit would cache {n:,} states and its map ({need_mb:,.0f} MB), over "
            f"init.fit_max_memory_mb={cfg.init.fit_max_memory_mb}; lower init.fit_bytes or raise the cap"
        )


def original_rows_and_map(
    cfg: RetokConfig, old_hf: Any, new_hf: Any, tok_dir: Any, meta: dict[str, Any] | None
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The original checkpoint's embedding and head (memory-mapped) and the token map of the new tokenizer."""
    from retok.model_io import read_io_matrices
    from retok.sources import resolve_model
    from retok.tokenmap import build_token_map

    old_embed, old_head = read_io_matrices(
        resolve_model(cfg.model, cfg.cache), trust_remote_code=cfg.model.trust_remote_code
    )
    tmap = build_token_map(
        old_hf,
        new_hf,
        old_rows=old_embed.shape[0],
        pad_to_multiple_of=cfg.init.pad_to_multiple_of,
        where=str(tok_dir),
        meta=meta,
    )
    return old_embed, old_head, tmap


def check_refit(
    cfg: RetokConfig, old_hf: Any, new_hf: Any, tok_dir: Any, meta: dict[str, Any] | None
) -> None:
    """train-io, before any step: refuse a train.fit_head that would fail after the training (the fit text, the
    memory cap of its cached states), so that nothing is trained in vain."""
    if not cfg.data.train:
        raise RetokError(
            "train.fit_head needs data.train text to fit the head on; add sources or set it to false"
        )
    old_embed, _, tmap = original_rows_and_map(cfg, old_hf, new_hf, tok_dir, meta)
    n_learn = len(tmap.ids(AVERAGED)) + len(tmap.ids(FALLBACK))
    check_fit_inputs(cfg, fit_text(cfg), old_hf, new_hf, old_embed, n_learn=n_learn)


def refit_head(
    cfg: RetokConfig, model: Any, old_hf: Any, new_hf: Any, tok_dir: Any, meta: dict[str, Any] | None
) -> dict[str, Any]:
    """train-io (train.fit_head): fit the head rows of new tokens of ``model`` (the trained model, body
    frozen) on the states its OWN input rows produce, in place; returns the report. Which rows are new and
    their pieces come from the token map, the teacher's rows from the original checkpoint."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None or head.weight is emb.weight:
        raise RetokError(
            "train.fit_head: the model's LM head is tied to its input embedding, so its rows cannot be fitted "
            "apart; set init.untie_head: true (or train.fit_head: false)"
        )
    old_embed, old_head, tmap = original_rows_and_map(cfg, old_hf, new_hf, tok_dir, meta)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    fitted, report = fit_new_rows(
        cfg,
        model,
        old_hf,
        new_hf,
        tmap,
        emb.weight.detach(),
        head.weight.detach().to("cpu", torch.float32),
        old_embed,
        old_head,
    )
    with torch.no_grad():
        head.weight.copy_(fitted.to(head.weight.device, head.weight.dtype))
    return report


def fit_new_rows(
    cfg: RetokConfig,
    model: Any,
    old_hf: Any,
    new_hf: Any,
    tmap: Any,
    new_input: torch.Tensor,
    head0: torch.Tensor,
    old_embed: torch.Tensor,
    old_head: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The head fit on ``model``'s body (frozen, eval mode) with ``new_input`` as its input rows: the new
    tokens' head rows start from ``head0``'s and are fitted (retok.headfit) with the original model (the same
    body with ``old_embed``/``old_head``) as teacher. Returns (the whole fitted head, float32 on the CPU, a
    report of the fit)."""
    from retok.headfit import collect_states, first_pieces, fit_rows, piece_features
    from retok.teacher import Teacher

    init = cfg.init
    if not cfg.data.train:
        raise RetokError(
            "init.fit_head needs data.train text to fit the head on; add sources or set it to false"
        )
    docs = fit_text(cfg)
    learn = torch.zeros(tmap.n_rows, dtype=torch.bool)
    learn[torch.as_tensor(tmap.ids(AVERAGED))] = True
    learn[torch.as_tensor(tmap.ids(FALLBACK), dtype=torch.long)] = True
    check_fit_inputs(cfg, docs, old_hf, new_hf, old_embed, n_learn=int(learn.sum()))
    if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
        raise RetokError(
            "init.fit_head: this model soft-caps its logits (final_logit_softcapping), which the head fit does not "
            "model yet; set init.fit_head: false"
        )
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    fwd = forward_dtype(init.fit_forward_dtype, dtype, device)
    body = model if fwd == dtype else forward_copy(model, fwd)
    teacher = Teacher(body, old_embed, old_head) if init.fit_teacher_weight > 0 else None
    tree_depth = init.fit_tree_depth if teacher is not None else 0
    states = collect_states(
        body,
        new_hf,
        docs,
        window=init.fit_window,
        teacher=teacher,
        old_tok=old_hf,
        top_k=TOP_K,
        tree_depth=tree_depth,
        teacher_fraction=init.fit_teacher_fraction,
        embed_weight=new_input.to(device=device, dtype=fwd),
        desc="fit head: forward",
    )
    del model, body, teacher
    copies = {int(i): int(tmap.source[i]) for kind in (COPY, SPECIAL) for i in tmap.ids(kind)}
    first = first_pieces(tmap.n_rows, tmap.pieces, copies)
    features = (
        piece_features(
            old_head,
            tmap.pieces,
            torch.nonzero(learn).squeeze(1),
            input_rows=new_input if init.fit_input_feature else None,
        )
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
        "teacher_fraction": init.fit_teacher_fraction,
        "forward_dtype": str(fwd).removeprefix("torch."),
        "shared_map": init.fit_shared_map,
        "input_feature": init.fit_shared_map and init.fit_input_feature,
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
    return result.head.float(), report
