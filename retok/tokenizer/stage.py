"""build-tokenizer: make the new tokenizer for model.path's model from data.train and measure it on data.eval.

    retok build-tokenizer --config configs/smollm2-zh.yaml

Output folder (``output_dir/tokenizer/``): a complete Hugging Face tokenizer (tokenizer.json,
tokenizer_config.json with the chat template, special tokens; written by transformers' ``save_pretrained``
and checked by loading it back with ``AutoTokenizer``), ``retok_tokenizer.json`` (what init-embeddings and
train-io read: old model, family, mode, old vocabulary size, the new ids), and the report
(compression.json / .md / .png, see report.py).

Modes: ``extend`` (default; extend.py) keeps every old token at its id and appends ``new_tokens`` learned on
top of the old segmentation; ``train`` (train.py) trains a new BPE from scratch with the old pipeline.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retok.core.config import RetokConfig
from retok.core.data import iter_source, load_domains
from retok.core.errors import RetokError
from retok.core.sources import load_tokenizer, resolve_model
from retok.core.stages import write_tokenizer_meta
from retok.core.tokens import detect_family, token_to_bytes
from retok.tokenizer.extend import TrainingText, extend_tokenizer
from retok.tokenizer.report import (
    check_roundtrip,
    digit_check,
    domain_compression,
    reachable_share,
    write_reports,
)
from retok.tokenizer.train import train_tokenizer

# -------------------------------------------------------------------------------------------- input text


def training_text(cfg: RetokConfig) -> list[TrainingText]:
    """The data.train sources the tokenizer learns from (tokenizer.domains, or all), within their budgets.

    ``tokenizer.max_bytes`` is split evenly over the sources; what a source does not use goes to the
    sources after it. Each source's own ``max_bytes`` applies too, and its ``weight`` scales its word counts.
    """
    t = cfg.tokenizer
    if not cfg.data.train:
        raise RetokError("data.train is empty; build-tokenizer learns the new tokens from it: add a source")
    chosen = [(i, s) for i, s in enumerate(cfg.data.train) if t.domains is None or s.name in t.domains]
    left = t.max_bytes
    out: list[TrainingText] = []
    for k, (i, src) in enumerate(chosen):
        budget = None if left is None else max(1, left // (len(chosen) - k))
        docs = list(iter_source(src, f"data.train.{i}", budget))
        text = TrainingText(src.name, docs, src.weight)
        out.append(text)
        if left is not None:
            left = max(0, left - text.n_bytes)
    if not any(d.strip() for s in out for d in s.docs):
        raise RetokError("data.train holds only whitespace; point it at real text")
    return out


def protected_text(cfg: RetokConfig) -> list[TrainingText]:
    """The text of the protected domains (cfg.protected_domains()): tokenizer.protect_max_bytes split evenly over
    their data.train sources, read past a source's own max_bytes (that budget is for training)."""
    names = cfg.protected_domains()
    chosen = [(i, s) for i, s in enumerate(cfg.data.train) if s.name in names]
    out: list[TrainingText] = []
    left = cfg.tokenizer.protect_max_bytes
    for k, (i, src) in enumerate(chosen):
        budget = max(1, left // (len(chosen) - k))
        docs = list(iter_source(src.model_copy(update={"max_bytes": None}), f"data.train.{i}", budget))
        text = TrainingText(src.name, docs, src.weight)
        out.append(text)
        left = max(0, left - text.n_bytes)
    return out


# ---------------------------------------------------------------------------------------- HF wrapping


def wrap(old_hf: Any, backend: Any) -> Any:
    """A transformers tokenizer of the old one's class and settings around the new backend (as
    ``train_new_from_iterator`` does), with the chat template and limits carried over."""
    from transformers import PreTrainedTokenizerFast

    skip = {
        "added_tokens_decoder",
        "name_or_path",
        "vocab_file",
        "merges_file",
        "tokenizer_file",
        "is_local",
        "local_files_only",
        "tokenizer_object",
    }
    kwargs = {k: v for k, v in old_hf.init_kwargs.items() if k not in skip}
    try:
        new = old_hf.__class__(tokenizer_object=backend, **kwargs)
    except TypeError:
        new = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if new.backend_tokenizer.get_vocab(with_added_tokens=True) != backend.get_vocab(with_added_tokens=True):
        # The class rebuilt its own backend (some slow-converted classes do): use the generic one.
        new = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    new.chat_template = old_hf.chat_template
    new.model_max_length = old_hf.model_max_length
    return new


def special_checks(old_hf: Any, new_hf: Any, mode: str) -> tuple[dict[str, Any], list[str]]:
    """Specials, roles, BOS/EOS behaviour, chat template and (extend) old ids, compared with the old tokenizer.
    Returns (checks, problems); any problem is an error."""
    problems: list[str] = []
    old_b, new_b = old_hf.backend_tokenizer, new_hf.backend_tokenizer
    specials = {t.content: i for i, t in old_b.get_added_tokens_decoder().items() if t.special}
    for content, old_id in specials.items():
        if old_b.encode(content, add_special_tokens=False).ids != [old_id]:
            continue  # not a single id with the old tokenizer either (e.g. single_word/lstrip rules)
        ids = new_b.encode(content, add_special_tokens=False).ids
        if len(ids) != 1 or (mode == "extend" and ids[0] != old_id):
            problems.append(f"special token {content!r} encodes to {ids} (old: [{old_id}])")
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(old_hf, role) != getattr(new_hf, role):
            problems.append(f"{role} is {getattr(new_hf, role)!r}, old {getattr(old_hf, role)!r}")
    probe = "Hello 世界 123"
    o = old_hf(probe)["input_ids"]
    n = new_hf(probe)["input_ids"]
    o_tok = old_hf.convert_ids_to_tokens(o)
    n_tok = new_hf.convert_ids_to_tokens(n)
    for pos in (0, -1):
        was, now = o_tok[pos] in specials, n_tok[pos] in specials
        if (was or now) and o_tok[pos] != n_tok[pos]:
            problems.append(
                f"encode() adds {n_tok[pos]!r} at position {pos}, the old tokenizer {o_tok[pos]!r}"
            )
    if old_hf.chat_template != new_hf.chat_template:
        problems.append("the chat template was not carried over")
    if old_hf.model_max_length != new_hf.model_max_length:
        problems.append(f"model_max_length is {new_hf.model_max_length}, old {old_hf.model_max_length}")

    chat = "no template"
    if old_hf.chat_template:
        msgs = [{"role": "user", "content": "你好, 2+2?"}, {"role": "assistant", "content": "4"}]
        try:
            text = old_hf.apply_chat_template(msgs, tokenize=False)
        except Exception as e:  # a template needing other roles or variables: report, do not fail
            chat = f"not rendered ({e.__class__.__name__})"
        else:
            if new_hf.apply_chat_template(msgs, tokenize=False) != text:
                problems.append("the chat template renders differently")
            ids = new_b.encode(text, add_special_tokens=False).ids
            old_ids = old_b.encode(text, add_special_tokens=False).ids
            for content, old_id in specials.items():
                want = old_ids.count(old_id)
                want_id = old_id if mode == "extend" else new_b.token_to_id(content)
                if want and ids.count(want_id) != want:
                    problems.append(
                        f"the chat template's {content!r} is not a single id in the new tokenizer"
                    )
            chat = "yes" if not problems else "NO"

    old_ids_kept = None
    if mode == "extend":
        old_vocab = old_b.get_vocab(with_added_tokens=True)
        new_vocab = new_b.get_vocab(with_added_tokens=True)
        moved = [t for t, i in old_vocab.items() if new_vocab.get(t) != i]
        old_ids_kept = not moved
        if moved:
            problems.append(f"{len(moved)} old tokens changed id (first: {moved[0]!r})")
    return {
        "specials_single_ids": not any(p.startswith("special token") for p in problems),
        "special_tokens": len(specials),
        "chat_template": chat,
        "old_ids_kept": old_ids_kept,
    }, problems


def _warn(msg: str) -> None:
    print(f"retok: warning: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the stage


@dataclass
class Learned:
    """The new backend tokenizer and what learning it found."""

    backend: Any
    new_ids: list[int]
    digits_individual: bool
    counts: dict[str, Any]
    warnings: list[str]
    unprotected: Any = (
        None  # extend with protect_domains: the backend before the tokens that leaked were dropped
    )


def learn(cfg: RetokConfig, old_hf: Any, sources: list[TrainingText], progress: bool) -> Learned:
    """tokenizer.mode extend (extend.py) or train (train.py)."""
    t = cfg.tokenizer
    old = old_hf.backend_tokenizer
    counts: dict[str, Any] = {"old_vocab_size": len(old_hf)}
    if t.mode == "extend":
        protect = protected_text(cfg)
        if protect and progress:
            print(
                f"retok: protecting the segmentation of {', '.join(s.name for s in protect)} "
                f"({sum(s.n_bytes for s in protect):,} bytes read)",
                flush=True,
            )
        ext = extend_tokenizer(
            old,
            sources,
            new_tokens=t.new_tokens,
            min_frequency=t.min_frequency,
            max_token_length=t.max_token_length,
            keep_digit_split=t.keep_digit_split,
            progress=progress,
            protect=protect,
            protect_share=t.protect_share,
        )
        counts.update(
            new_tokens=len(ext.new_ids),
            first_new_id=ext.first_new_id,
            char_tokens=ext.char_tokens,
            merges_added=ext.merges_added,
            merges_to_existing=ext.merges_to_existing,
            dropped_unreachable=ext.dropped_unreachable,
            dropped_protected=len(ext.dropped_protected),
            dropped_protected_examples=ext.dropped_protected[:20],
            protected_domains=[s.name for s in protect],
        )
        return Learned(
            ext.tokenizer, ext.new_ids, ext.digits_individual, counts, list(ext.warnings), ext.unprotected
        )

    tr = train_tokenizer(
        old,
        sources,
        vocab_size=t.vocab_size or len(old_hf) + t.new_tokens,
        min_frequency=t.min_frequency,
        max_token_length=t.max_token_length,
        keep_digit_split=t.keep_digit_split,
        progress=progress,
    )
    old_vocab = old.get_vocab(with_added_tokens=True)
    new_ids = sorted(
        i for s, i in tr.tokenizer.get_vocab(with_added_tokens=True).items() if s not in old_vocab
    )
    shared = tr.tokenizer.get_vocab_size(with_added_tokens=True) - len(new_ids)
    counts.update(new_tokens=len(new_ids), first_new_id=None, shared_tokens=shared)
    return Learned(tr.tokenizer, new_ids, tr.digits_individual, counts, list(tr.warnings))


def save_and_check(old_hf: Any, backend: Any, out: Path, mode: str) -> tuple[Any, dict[str, Any]]:
    """Save through transformers, load it back the way users will, and check specials, roles, template."""

    wrap(old_hf, backend).save_pretrained(str(out))
    saved = load_tokenizer(out, trust_remote_code=False)
    checks, problems = special_checks(old_hf, saved, mode)
    if problems:
        raise RetokError(
            f"the new tokenizer failed a check: {problems[0]} ({len(problems)} problem(s)); this is a bug in retok"
        )
    return saved, checks


def measure(
    old: Any, new: Any, new_ids: list[int], eval_docs: dict[str, list[str]], mode: str
) -> tuple[dict[str, Any], dict[str, Any], float, list[str]]:
    """Held-out compression per domain, reachability of the new tokens, digits. Returns (domains, digits,
    reachable share, warnings)."""
    warnings: list[str] = []
    share, bad = reachable_share(new, new_ids)
    if mode == "extend" and share < 1.0:
        raise RetokError(f"{len(bad)} new tokens are unreachable (first: {bad[0]!r}); this is a bug in retok")
    domains = {name: domain_compression(old, new, docs) for name, docs in eval_docs.items()}
    warnings += check_roundtrip(domains, eval_docs)
    digits = digit_check(old, new, eval_docs)
    if not digits["same"]:
        ex = digits["examples"][0]
        warnings.append(
            f"the new tokenizer splits numbers differently from the old one ({digits['differences']} of "
            f"{digits['probes']} probes, e.g. {ex['text']!r}: {ex['old']} -> {ex['new']}); arithmetic may suffer"
        )
    if not eval_docs:
        warnings.append("data.eval is empty: no held-out compression was measured")
    return domains, digits, share, warnings


def protection_report(
    learned: Learned, old: Any, family: str, domains: dict[str, Any], eval_docs: dict[str, list[str]]
) -> dict[str, Any] | None:
    """What keeping the protected domains' segmentation cost: the tokens dropped, and each held-out domain's
    compression with and without them (None when nothing was dropped)."""
    if learned.unprotected is None:
        return None
    return {
        "domains": learned.counts["protected_domains"],
        "dropped": learned.counts["dropped_protected"],
        "examples": [
            token_to_bytes(family, x).decode("utf-8", errors="replace")
            for x in learned.counts["dropped_protected_examples"]
        ],
        "ratio_with": {d: v["ratio"] for d, v in domains.items()},
        "ratio_without": {
            d: domain_compression(old, learned.unprotected, docs)["ratio"] for d, docs in eval_docs.items()
        },
    }


def build_tokenizer(cfg: RetokConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Build the new tokenizer into ``out`` (an empty folder) and write its reports; returns compression.json."""

    start = time.time()
    t = cfg.tokenizer
    out = Path(out)

    # ---- Input first: bad text fails before any model is touched.
    sources = training_text(cfg)
    eval_docs = load_domains(cfg.data.eval, "data.eval", t.report_max_bytes)
    model_dir = resolve_model(cfg.model, cfg.cache)
    old_hf = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    family = detect_family(old_hf.backend_tokenizer)
    n_train = sum(s.n_bytes for s in sources)
    names = ", ".join(dict.fromkeys(s.name for s in sources))
    print(f"retok: build-tokenizer ({t.mode}, {family}) on {n_train:,} bytes of {names}", flush=True)
    timings = {"read": time.time() - start}

    learned = learn(cfg, old_hf, sources, progress)
    timings["learn"] = time.time() - start - sum(timings.values())
    saved, checks = save_and_check(old_hf, learned.backend, out, t.mode)
    learned.counts["new_vocab_size"] = len(saved)
    learned.counts["reachable_checked"] = len(learned.new_ids)
    timings["save_and_check"] = time.time() - start - sum(timings.values())
    domains, digits, share, more = measure(
        old_hf.backend_tokenizer, saved.backend_tokenizer, learned.new_ids, eval_docs, t.mode
    )
    warnings = learned.warnings + more
    protection = protection_report(learned, old_hf.backend_tokenizer, family, domains, eval_docs)

    report = {
        "mode": t.mode,
        "family": family,
        "old_model": cfg.model.path,
        "domains": domains,
        "reachable_share": share,
        "counts": learned.counts,
        "digits": {**digits, "individual_digits": learned.digits_individual},
        "checks": checks,
        "training": {
            "bytes": n_train,
            "sources": [s.name for s in sources],
            "docs": sum(len(s.docs) for s in sources),
        },
        "protection": protection,
        "warnings": warnings,
        "seconds": time.time() - start,
        "timings": {**timings, "measure": time.time() - start - sum(timings.values())},
    }
    write_tokenizer_meta(
        out,
        new_ids=learned.new_ids,
        old_vocab_size=len(old_hf),
        new_vocab_size=len(saved),
        family=family,
        mode=t.mode,
        old_model=cfg.model.path,
        old_model_dir=str(model_dir),
    )
    write_reports(out, report)
    for w in warnings:
        _warn(w)
    for name, d in domains.items():
        print(
            f"retok: {name}: {d['old_bytes_per_token']:.3f} -> {d['new_bytes_per_token']:.3f} bytes/token "
            f"({d['ratio']:.3f}x), round trip ok",
            flush=True,
        )
    return report
