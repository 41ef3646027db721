"""train: a new BPE tokenizer trained from scratch with the OLD tokenizer's pipeline.

The normaliser, pre-tokenizer, decoder, post-processor, added/special tokens and (in build.py) the chat
template are carried over; only the BPE vocabulary and merges are new. Ids change, so the post-processor's
special-token ids are rewritten by content, and init-embeddings maps rows by token bytes, never by id.

Layout of the new vocabulary, mirroring the old one: the added tokens that were also model tokens first
(SmolLM2's specials at 0-16, Llama-2's ``<unk> <s> </s>``), then for SentencePiece-style BPE with byte
fallback the 256 ``<0xNN>`` tokens, then the learned alphabet and merges; added tokens that lived outside
the old model vocabulary come last.

What the trainer sees is the old pipeline plus two splits that the runtime pipeline respects anyway:
SentencePiece-style text is cut before each run of "▁" (pieces are learned within words, as SentencePiece
does; HF's Llama-2 conversion has no pre-tokenizer), and when the old tokenizer writes numbers as single
digits, digits are isolated (``Digits(individual_digits=True)``), which the new pipeline then keeps too.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Regex, Tokenizer, pre_tokenizers, trainers

from retok.core.errors import RetokError
from retok.core.tokens import SPIECE_SPACE, detect_family
from retok.tokenizer.extend import (
    TrainingText,
    pre_tokenizer_types,
    repeat_counts,
    splits_digits_individually,
    tokenizer_json,
    weight_ratios,
)

SPIECE_WORDS = f"{SPIECE_SPACE}+[^{SPIECE_SPACE}]*|[^{SPIECE_SPACE}]+"


@dataclass
class Trained:
    """What :func:`train_tokenizer` made."""

    tokenizer: Tokenizer
    vocab_size: int  # model vocabulary + added tokens
    learned: int  # tokens the trainer made (alphabet and merge products)
    digits_individual: bool
    digit_pretokenizer_added: bool
    warnings: list[str] = field(default_factory=list)


def _remap_post_processor(node: dict[str, Any] | None, id_of: dict[str, int]) -> dict[str, Any] | None:
    """The post-processor with every special-token id looked up again by its content."""
    if node is None:
        return None
    node = json.loads(json.dumps(node))
    kind = node.get("type")
    if kind == "Sequence":
        node["processors"] = [_remap_post_processor(p, id_of) for p in node.get("processors", [])]
    if kind == "TemplateProcessing":
        for entry in node.get("special_tokens", {}).values():
            entry["ids"] = [id_of[t] for t in entry["tokens"]]
    for key in ("cls", "sep"):
        if key in node and isinstance(node[key], list):
            node[key] = [node[key][0], id_of[node[key][0]]]
    return node


def _training_pre_tokenizer(data: dict[str, Any], family: str, add_digits: bool) -> tuple[Any, Any]:
    """(runtime pre-tokenizer, pre-tokenizer used while training) as tokenizers objects."""
    runtime = data.get("pre_tokenizer")
    if add_digits:
        digits = {"type": "Digits", "individual_digits": True}
        runtime = {"type": "Sequence", "pretokenizers": [digits] + ([runtime] if runtime else [])}
    train = runtime
    if family == "sentencepiece":
        split = json.loads(pre_tokenizers.Split(Regex(SPIECE_WORDS), behavior="isolated").__getstate__())
        train = {"type": "Sequence", "pretokenizers": ([runtime] if runtime else []) + [split]}
    return runtime, train


def _trainer(
    old: Tokenizer,
    data: dict,
    train_pre: Any,
    family: str,
    sources: list[TrainingText],
    size: int,
    min_frequency: int,
    max_token_length: int | None,
    progress: bool,
) -> tuple[Tokenizer, Any]:
    """An empty BPE with the old normaliser and the training pre-tokenizer, and a BpeTrainer of ``size``."""
    tdata = json.loads(json.dumps({k: v for k, v in data.items() if k != "model"}))
    tdata["added_tokens"] = []
    tdata["post_processor"] = None
    tdata["pre_tokenizer"] = train_pre
    tdata["model"] = dict(data["model"], vocab={}, merges=[])
    options: dict[str, Any] = {}
    if family == "byte_level":
        options["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    else:
        # Characters seen fewer than min_frequency times stay out of the alphabet (byte fallback spells them),
        # as SentencePiece's character coverage does.
        chars: Counter[str] = Counter()
        for src, ratio in zip(sources, weight_ratios(sources), strict=True):
            c: Counter[str] = Counter()
            for doc in src.docs:
                c.update(old.normalizer.normalize_str(doc) if old.normalizer is not None else doc)
            for ch, n in c.items():
                chars[ch] += round(n * ratio)
        options["limit_alphabet"] = max(1, sum(1 for n in chars.values() if n >= min_frequency))
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        min_frequency=min_frequency,
        show_progress=progress and sys.stderr.isatty(),  # Rust bars print blank lines off a terminal
        special_tokens=[],
        max_token_length=max_token_length,
        **options,
    )
    return Tokenizer.from_str(json.dumps(tdata)), trainer


def _weighted_docs(sources: list[TrainingText]) -> Iterator[str]:
    """Every document, repeated by its source's weight."""
    for src, ratio in zip(sources, weight_ratios(sources), strict=True):
        for doc, copies in zip(src.docs, repeat_counts(len(src.docs), ratio), strict=True):
            for _ in range(copies):
                yield doc


def _compose(
    data: dict, learned: dict, front: list[str], byte_tokens: list[str], added: list[dict], runtime_pre: Any
) -> Tokenizer:
    """The new tokenizer: reserved ids first (model specials, bytes), the learned vocabulary, then the added
    tokens that live outside the model; the old pipeline with ids remapped."""
    model = data["model"]
    vocab: dict[str, int] = {}
    for s in [*front, *byte_tokens]:
        vocab.setdefault(s, len(vocab))
    for s, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(s, len(vocab))
    new_added = []
    for t in added:
        t = dict(t)
        t["id"] = vocab[t["content"]] if t["content"] in front else len(vocab) + len(new_added)
        new_added.append(t)
    id_of = {t["content"]: t["id"] for t in new_added} | vocab
    unk = model.get("unk_token")
    if unk is not None and unk not in vocab:
        raise RetokError(
            f"the old tokenizer's unk_token {unk!r} is not one of its added tokens; retok cannot keep it"
        )
    out = json.loads(json.dumps({k: v for k, v in data.items() if k != "model"}))
    out["added_tokens"] = sorted(new_added, key=lambda t: t["id"])
    out["pre_tokenizer"] = runtime_pre
    out["post_processor"] = _remap_post_processor(data.get("post_processor"), id_of)
    out["model"] = dict(model, vocab=vocab, merges=learned["merges"])
    return Tokenizer.from_str(json.dumps(out, ensure_ascii=False))


def train_tokenizer(
    old: Tokenizer,
    sources: list[TrainingText],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    max_token_length: int | None = None,
    keep_digit_split: bool = True,
    progress: bool = True,
) -> Trained:
    """A BPE of ``vocab_size`` tokens (added tokens included) trained on ``sources`` with ``old``'s pipeline."""
    family = detect_family(old)
    data = tokenizer_json(old)
    model = data["model"]
    old_vocab: dict[str, int] = model["vocab"]
    added = sorted(data.get("added_tokens") or [], key=lambda t: t["id"])
    if not any(s.docs for s in sources):
        raise RetokError("the training text is empty; point data.train at non-empty files")

    digits_individual = keep_digit_split and splits_digits_individually(data, family)
    has_digits = any(
        n.get("type") == "Digits" and n.get("individual_digits") for n in pre_tokenizer_types(data)
    )
    add_digits = digits_individual and not has_digits
    runtime_pre, train_pre = _training_pre_tokenizer(data, family, add_digits)

    # ---- Reserved ids: added tokens that are model tokens, then byte-fallback bytes.
    front = [t["content"] for t in added if old_vocab.get(t["content"]) == t["id"]]
    outside = [t for t in added if old_vocab.get(t["content"]) != t["id"]]
    byte_fallback = family == "sentencepiece" and model.get("byte_fallback")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []
    reserved = len(front) + len(byte_tokens) + len(outside)
    if vocab_size <= reserved + 256:
        raise RetokError(
            f"tokenizer.vocab_size {vocab_size} leaves no room to learn: {reserved} ids are special/byte tokens; "
            "use a larger vocab_size (or new_tokens)"
        )

    trainer_tok, trainer = _trainer(
        old,
        data,
        train_pre,
        family,
        sources,
        vocab_size - reserved,
        min_frequency,
        max_token_length,
        progress,
    )
    if progress:
        print(f"retok: training a BPE of {vocab_size:,} tokens with the old pipeline", flush=True)
    trainer_tok.train_from_iterator(
        _weighted_docs(sources), trainer, length=sum(len(s.docs) for s in sources)
    )
    learned = json.loads(trainer_tok.to_str())["model"]
    tok = _compose(data, learned, front, byte_tokens, added, runtime_pre)

    warnings = []
    size = tok.get_vocab_size(with_added_tokens=True)
    if size < vocab_size:
        warnings.append(
            f"the new vocabulary has {size} tokens, fewer than the {vocab_size} asked for: the training text has no "
            f"more pairs seen at least tokenizer.min_frequency={min_frequency} times; add text or ask for fewer"
        )
    if add_digits:
        warnings.append(
            "the old tokenizer writes numbers as single digits through its vocabulary only; the new one gets a "
            "Digits(individual_digits=True) pre-tokenizer to keep that (tokenizer.keep_digit_split)"
        )
    return Trained(
        tokenizer=tok,
        vocab_size=size,
        learned=len(learned["vocab"]),
        digits_individual=digits_individual,
        digit_pretokenizer_added=add_digits,
        warnings=warnings,
    )
