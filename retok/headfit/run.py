"""The head fit run on a model: the text it reads, the checks before it, the states and the fit itself
(the math is retok.headfit). Shared by the two places that fit new tokens' LM-head rows:

- init-embeddings (``fit.at_init``): on the states of the INITIAL input rows (:func:`fit_at_init`);
- train-io (``fit.after_train``, the default recipe): after the steps, on the states of the TRAINED input rows
  (:func:`refit_head`), which the head then really sees. On the demo that order took zh from 1.156x to 1.140x
  of the original model's BPB (the same distilled input rows, the same fit).
"""

from __future__ import annotations

from typing import Any

import torch

from retok.core.config import RetokConfig
from retok.core.data import domains as domain_names
from retok.core.data import load_domains
from retok.core.errors import RetokError
from retok.core.model_io import read_io_matrices
from retok.core.sources import load_model, resolve_model
from retok.core.tokenmap import AVERAGED, COPY, FALLBACK, SPECIAL, build_token_map
from retok.headfit.fit import FitResult, first_pieces, fit_rows, piece_features
from retok.headfit.states import States, collect_states
from retok.teacher.body import Teacher


def fit_budgets(names: list[str], targets: list[str] | None, total: int) -> dict[str, int]:
    """Bytes per domain: half for the domains the new tokens are for (tokenizer.domains), half for the others
    (where the new rows must learn NOT to fire), evenly within each half; all even when there is one group."""
    inside = [n for n in names if targets and n in targets]
    outside = [n for n in names if n not in inside]
    if not inside or not outside:
        return {n: max(1000, total // len(names)) for n in names}
    return {n: max(1000, total // 2 // len(group)) for group in (inside, outside) for n in group}


def fit_text(cfg: RetokConfig) -> dict[str, list[str]]:

    names = domain_names(cfg.data.train)
    budgets = fit_budgets(names, cfg.tokenizer.domains, cfg.fit.bytes)
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
    """The dtype of the head fit's forward passes (fit.forward_dtype) for a model held in ``model_dtype``."""
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
    teacher = cfg.fit.teacher_weight > 0
    depth = cfg.fit.tree_depth
    per_state = hidden * 2 + 8 + (TOP_K * 12 + depth * (TOP_K * 12 + 8) if teacher else 0)
    need = n_states * per_state * 2
    if cfg.fit.shared_map:
        blocks = 3 if cfg.fit.input_feature else 2
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
    would index past its embedding), and cached states that would not fit fit.max_memory_mb."""
    top = max(old_hf.get_vocab().values())
    if top >= old_embed.shape[0]:
        raise RetokError(
            f"fit.at_init: model.path's tokenizer has id {top} but its embedding has {old_embed.shape[0]} rows: "
            "the tokenizer does not belong to this checkpoint; give the model's own tokenizer"
        )
    n = sum(
        len(ids) for texts in docs.values() for ids in new_hf(texts, add_special_tokens=False)["input_ids"]
    )
    need_mb = fit_cache_bytes(cfg, n, old_embed.shape[1], n_learn) / 1e6
    if need_mb > cfg.fit.max_memory_mb:
        raise RetokError(
            f"fit.bytes: the head fit would cache {n:,} states and its map ({need_mb:,.0f} MB), over "
            f"fit.max_memory_mb={cfg.fit.max_memory_mb}; lower fit.bytes or raise the cap"
        )


def original_rows_and_map(
    cfg: RetokConfig, old_hf: Any, new_hf: Any, tok_dir: Any, meta: dict[str, Any] | None
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The original checkpoint's embedding and head (memory-mapped) and the token map of the new tokenizer."""

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
    """train-io, before any step: refuse a fit.after_train that would fail after the training (the fit text, the
    memory cap of its cached states), so that nothing is trained in vain."""
    if not cfg.data.train:
        raise RetokError(
            "fit.after_train needs data.train text to fit the head on; add sources or set it to false"
        )
    old_embed, _, tmap = original_rows_and_map(cfg, old_hf, new_hf, tok_dir, meta)
    n_learn = len(tmap.ids(AVERAGED)) + len(tmap.ids(FALLBACK))
    check_fit_inputs(cfg, fit_text(cfg), old_hf, new_hf, old_embed, n_learn=n_learn)


def fit_at_init(
    cfg: RetokConfig,
    model_dir: Any,
    old_hf: Any,
    new_hf: Any,
    tmap: Any,
    new_input: torch.Tensor,
    head0: torch.Tensor,
    old_embed: torch.Tensor,
    old_head: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """init-embeddings (fit.at_init): (the fitted head matrix in the original head's dtype, a report), on the
    states of the INITIAL input rows ``new_input`` on the original body (loaded from ``model_dir``; the new
    folder is not written yet). ``head0``: the initialised head the new rows start from."""

    model = load_model(
        model_dir,
        dtype=cfg.compute.dtype,
        device=cfg.compute.device,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
    )
    head, report = fit_new_rows(cfg, model, old_hf, new_hf, tmap, new_input, head0, old_embed, old_head)
    return head.to(old_head.dtype), report


def refit_head(
    cfg: RetokConfig, model: Any, old_hf: Any, new_hf: Any, tok_dir: Any, meta: dict[str, Any] | None
) -> dict[str, Any]:
    """train-io (fit.after_train): fit the head rows of new tokens of ``model`` (the trained model, body
    frozen) on the states its OWN input rows produce, in place; returns the report. Which rows are new and
    their pieces come from the token map, the teacher's rows from the original checkpoint."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None or head.weight is emb.weight:
        raise RetokError(
            "fit.after_train: the model's LM head is tied to its input embedding, so its rows cannot be fitted "
            "apart; set init.untie_head: true (or fit.after_train: false)"
        )
    old_embed, old_head, tmap = original_rows_and_map(cfg, old_hf, new_hf, tok_dir, meta)
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
    """The head fit on ``model``'s body (frozen here, and put in eval mode) with ``new_input`` as its input rows:
    the new tokens' head rows start from ``head0``'s and are fitted (retok.headfit) with the original model (the
    same body with ``old_embed``/``old_head``) as teacher. Returns (the whole fitted head, float32 on the CPU,
    a report of the fit)."""
    if not cfg.data.train:
        raise RetokError("the head fit needs data.train text to fit the head on; add sources or turn it off")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    docs = fit_text(cfg)
    learn = learning_rows(tmap)
    check_fit_inputs(cfg, docs, old_hf, new_hf, old_embed, n_learn=int(learn.sum()))
    if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
        raise RetokError(
            "the head fit: this model soft-caps its logits (final_logit_softcapping), which the fit does not model "
            "yet; set fit.at_init and fit.after_train to false"
        )
    device = next(model.parameters()).device
    states, fwd = _states(cfg, model, old_hf, new_hf, docs, new_input, old_embed, old_head)
    del model
    fit = cfg.fit
    copies = {int(i): int(tmap.source[i]) for kind in (COPY, SPECIAL) for i in tmap.ids(kind)}
    features = None
    if fit.shared_map:
        rows = torch.nonzero(learn).squeeze(1)
        features = piece_features(
            old_head, tmap.pieces, rows, input_rows=new_input if fit.input_feature else None
        )
    result = fit_rows(
        states,
        head0,
        learn,
        first_piece=first_pieces(tmap.n_rows, tmap.pieces, copies),
        pieces=tmap.pieces,
        kl_weight=fit.teacher_weight,
        features=features,
        map_lr=fit.map_lr,
        lr=fit.lr,
        max_epochs=fit.epochs,
        seed=cfg.seed,
        device=device,
        log=lambda m: print(f"retok: {m}", flush=True),
    )
    return result.head.float(), _report(cfg, states, learn, fwd, result)


def learning_rows(tmap: Any) -> torch.Tensor:
    """The rows the fit moves: those of new tokens (averaged from their pieces, or a fallback row)."""
    learn = torch.zeros(tmap.n_rows, dtype=torch.bool)
    learn[torch.as_tensor(tmap.ids(AVERAGED), dtype=torch.long)] = True
    learn[torch.as_tensor(tmap.ids(FALLBACK), dtype=torch.long)] = True
    return learn


def _states(
    cfg: RetokConfig,
    model: Any,
    old_hf: Any,
    new_hf: Any,
    docs: dict[str, list[str]],
    new_input: torch.Tensor,
    old_embed: torch.Tensor,
    old_head: torch.Tensor,
) -> tuple[States, torch.dtype]:
    """The fit's states and teacher targets, the forward passes in fit.forward_dtype: (states, that dtype)."""
    fit = cfg.fit
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    fwd = forward_dtype(fit.forward_dtype, dtype, device)
    body = model if fwd == dtype else forward_copy(model, fwd)
    teacher = Teacher(body, old_embed, old_head) if fit.teacher_weight > 0 else None
    states = collect_states(
        body,
        new_hf,
        docs,
        window=fit.window,
        teacher=teacher,
        old_tok=old_hf,
        top_k=TOP_K,
        tree_depth=fit.tree_depth if teacher is not None else 0,
        teacher_fraction=fit.teacher_fraction,
        embed_weight=new_input.to(device=device, dtype=fwd),
        desc="fit head: forward",
    )
    return states, fwd


def _report(
    cfg: RetokConfig, states: States, learn: torch.Tensor, fwd: torch.dtype, result: FitResult
) -> dict:
    """What the fit did, for the stage reports; also printed in one line."""
    fit = cfg.fit
    per_domain = {n: int((states.domain == k).sum()) for k, n in enumerate(states.domains)}
    print(
        f"retok: head fit on {sum(per_domain.values()):,} states ({', '.join(f'{k} {v:,}' for k, v in per_domain.items())}): "
        f"held-out CE {result.held_out_ce_start:.3f} -> {result.held_out_ce:.3f} nats/token at epoch {result.epochs:.1f}",
        flush=True,
    )
    return {
        "states": per_domain,
        "held_out_states": int(states.held_out.sum()),
        "rows_fitted": int(learn.sum()),
        "teacher_weight": fit.teacher_weight,
        "tree_depth": fit.tree_depth if fit.teacher_weight > 0 else 0,
        "teacher_fraction": fit.teacher_fraction,
        "forward_dtype": str(fwd).removeprefix("torch."),
        "shared_map": fit.shared_map,
        "input_feature": fit.shared_map and fit.input_feature,
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
