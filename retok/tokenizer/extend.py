"""extend: learn new BPE merges on top of the OLD tokenizer's own segmentation and append them (ReTok).

Why this way: appending the merges of a BPE trained separately on the new text leaves many of its tokens
unreachable (the old merges fire first and split their text differently). Here the training text is cut
into words by the old normalizer and pre-tokenizer and each word is segmented by the OLD BPE model; new
merges are then learned on adjacent old tokens, weighted by word counts. Every new merge ranks after every
old one, so the extended tokenizer segments any word as "old segmentation, then the new merges by rank",
which is exactly the process the merges were learned on: the new tokens are reachable (checked anyway,
token by token, and any that is not is dropped and replaced).

Speed: the pair counting and merging run in the Rust ``BpeTrainer`` of ``tokenizers``. Every old token that
occurs gets one stand-in character ("unit"; the frequent ones get the shortest in UTF-8), each word becomes
the string of its units, words are separated by spaces, and a BPE over those characters (WhitespaceSplit, no
normalizer) learns merges of old tokens; they are translated back into old-token strings afterwards. Tokens that must never be merged
(special and added tokens, byte-fallback bytes, digits when numbers are split into single digits) become
word breaks instead of units.

SentencePiece-style BPE with byte fallback (Llama-2, Mistral, Gemma): a character missing from the old
vocabulary is spelled with ``<0xNN>`` byte tokens, which cannot take part in merges. Frequent missing
characters are therefore added as single-character tokens first (they count towards ``new_tokens``, at most
half of them, most frequent first); rarer ones stay byte-fallback and break words.

Token length (``max_token_length``) counts characters of the token string as the vocabulary stores it
(for byte-level BPE that is one character per byte), the same measure as ``BpeTrainer.max_token_length``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from retok.core.errors import RetokError
from retok.core.tokens import SPIECE_SPACE, Family, bytes_to_symbols, detect_family, token_to_bytes

SPACE = 32  # the word break in the unit text
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_DIGIT = re.compile(r"\d")


@dataclass
class TrainingText:
    """Documents of one training source and its weight (relative to the other sources)."""

    name: str
    docs: list[str]
    weight: float = 1.0

    @property
    def n_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.docs)


@dataclass
class Extension:
    """What :func:`extend_tokenizer` made."""

    tokenizer: Tokenizer  # the extended backend: old pipeline and ids, new vocab entries and merges
    new_ids: list[int]  # ids of the appended tokens, ascending and contiguous from first_new_id
    first_new_id: int
    char_tokens: int  # single characters added because the old vocabulary spelled them with byte fallback
    merges_added: int  # merges appended after the old ones (some produce old tokens, see merges_to_existing)
    merges_to_existing: int
    digits_individual: bool  # numbers are split into single digits by the old tokenizer, and stay so
    dropped_unreachable: int  # learned tokens that were not reachable and were replaced
    # learned tokens that fired in the protected domains' text and were replaced (their strings)
    dropped_protected: list[str] = field(default_factory=list)
    unprotected: Tokenizer | None = None  # the first pick before those were dropped (for the report's cost)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# The old tokenizer, as JSON
# ----------------------------------------------------------------------------------------------------


def tokenizer_json(tok: Tokenizer, text: str | None = None) -> dict[str, Any]:
    """The whole tokenizer as its tokenizer.json dict (``text``: its ``to_str()``, if already made), BPE
    model checked for options retok cannot extend."""
    data = json.loads(text if text is not None else tok.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        detect_family(tok)  # raises the one clear message for Unigram / WordPiece / WordLevel
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise RetokError(
                f"the tokenizer's BPE model uses {key}={model[key]!r}, which retok cannot extend; "
                "retok supports byte-level and SentencePiece-style BPE without subword markers"
            )
    return data


def merge_pair(m: Any) -> tuple[str, str]:
    """A merge from tokenizer.json: either ["a", "b"] or the older "a b" string."""
    if isinstance(m, str):
        a, b = m.split(" ", 1)
        return a, b
    return m[0], m[1]


def pre_tokenizer_types(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The leaves of the pre-tokenizer (a Sequence is flattened)."""

    def flat(node: dict[str, Any] | None) -> list[dict[str, Any]]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [leaf for child in node.get("pretokenizers", []) for leaf in flat(child)]
        return [node]

    return flat(data.get("pre_tokenizer"))


def splits_digits_individually(data: dict[str, Any], family: Family) -> bool:
    """Whether the old tokenizer writes every number as single digits: a Digits(individual_digits=True)
    pre-tokenizer (SmolLM2, StarCoder), or a vocabulary without any token holding two digits in a row
    (Llama-2 and Gemma split digits inside SentencePiece, which leaves no trace in tokenizer.json)."""
    if any(n.get("type") == "Digits" and n.get("individual_digits") for n in pre_tokenizer_types(data)):
        return True
    two_digits = re.compile(r"\d\d")
    for token in data["model"]["vocab"]:
        text = token_to_bytes(family, token).decode("utf-8", errors="replace")
        if two_digits.search(text):
            return False
    return True


def symbol_string(family: Family, text: str) -> str:
    """``text`` as the BPE model sees it (byte-level alphabet, or "▁" for space)."""
    return "".join(bytes_to_symbols(family, text.encode("utf-8")))


# ----------------------------------------------------------------------------------------------------
# Units: one private character per old token
# ----------------------------------------------------------------------------------------------------

# Characters Rust's `char::is_whitespace` treats as whitespace (WhitespaceSplit splits on them).
_RUST_WHITESPACE = [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B)]
_RUST_WHITESPACE += [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]


def unit_codepoints(n: int) -> np.ndarray:
    """``n`` distinct code points that are neither whitespace nor surrogates, shortest UTF-8 first.

    The unit text has no normaliser, so any such character is just a symbol to the trainer. The trainer's
    counting costs time per UTF-8 byte, so the most frequent units (callers rank them) get the one-byte
    characters, the next ~1,900 the two-byte ones, and so on.
    """
    ranges = [(0x01, 0x80), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x110000)]
    out: list[np.ndarray] = []
    have = 0
    for lo, hi in ranges:
        cps = np.arange(lo, hi, dtype=np.uint32)
        cps = cps[~np.isin(cps, _RUST_WHITESPACE)]
        out.append(cps[: n - have])
        have += len(out[-1])
        if have >= n:
            break
    if have < n:
        raise RetokError(f"{n} distinct tokens occur in the training text, more than retok can map (~1.1M)")
    return np.concatenate(out)


def repeat_counts(n_docs: int, ratio: float) -> list[int]:
    """How many times each document of a source is fed so that its words count ``ratio`` times: the whole
    part for every document, one more copy for an evenly spread fraction of them."""
    whole = math.floor(ratio)
    frac = ratio - whole
    golden = 0.6180339887498949
    return [whole + (1 if (i * golden) % 1.0 < frac else 0) for i in range(n_docs)]


def weight_ratios(sources: list[TrainingText]) -> list[float]:
    """Weights relative to the smallest, so that the least-weighted source counts each word once and
    ``min_frequency`` keeps its meaning."""
    lowest = min(s.weight for s in sources)
    return [s.weight / lowest for s in sources]


def _batches(
    docs: list[str], copies: list[int], max_chars: int = 1 << 20
) -> Iterator[tuple[list[str], list[int]]]:
    """Documents (with their copy counts) in batches of about ``max_chars`` characters."""
    start, size = 0, 0
    for i, d in enumerate(docs):
        size += len(d)
        if size >= max_chars:
            yield docs[start : i + 1], copies[start : i + 1]
            start, size = i + 1, 0
    if start < len(docs):
        yield docs[start:], copies[start:]


def unit_texts(
    seg_tok: Tokenizer,
    sources: list[TrainingText],
    breaks: np.ndarray,
    *,
    sp_start: np.ndarray | None,
    sp_end: np.ndarray | None,
    progress: bool,
) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """Every training document as unit text (``(text, copies)``), and unit character -> old token id.

    Words start where the pre-tokenizer starts one, at and after every token in ``breaks`` (never merged,
    left out), and for SentencePiece-style tokenizers also at a "▁"-initial token that follows one not
    ending in "▁" (SentencePiece learns pieces within whitespace-delimited words; HF's Llama-2 conversion has
    no pre-tokenizer, so its BPE sees whole lines). Words of a single token have no pair and are left out.
    """
    segmented: list[tuple[np.ndarray, np.ndarray, int]] = []  # (ids, word starts, copies) per document
    freq = np.zeros(len(breaks), dtype=np.int64)
    total = sum(s.n_bytes for s in sources)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc="segment with the old tokenizer", disable=not progress
    )
    jobs = [
        (batch, copies)
        for src, ratio in zip(sources, weight_ratios(sources), strict=True)
        for batch, copies in _batches(src.docs, repeat_counts(len(src.docs), ratio))
    ]
    # encode_batch runs in Rust without the GIL: encode the next batch while this one is post-processed.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(seg_tok.encode_batch, jobs[0][0], add_special_tokens=False) if jobs else None
        for k, (batch, copies) in enumerate(jobs):
            assert pending is not None
            encodings = pending.result()
            if k + 1 < len(jobs):
                pending = pool.submit(seg_tok.encode_batch, jobs[k + 1][0], add_special_tokens=False)
            for enc, n_copies in zip(encodings, copies, strict=True):
                ids = np.asarray(enc.ids, dtype=np.int32)
                if len(ids) < 2 or n_copies == 0:
                    continue
                mergeable = ~breaks[ids]
                # word_ids is None for a token outside any word (an added token): NaN, never equal, a start.
                word_ids = enc.word_ids
                words = np.asarray(word_ids, dtype=np.float64 if None in word_ids else np.int64)
                start = np.ones(len(ids), dtype=bool)
                start[1:] = (words[1:] != words[:-1]) | ~mergeable[1:] | ~mergeable[:-1]
                if sp_start is not None and sp_end is not None:
                    start[1:] |= sp_start[ids[1:]] & ~sp_end[ids[:-1]]
                word = np.cumsum(start) - 1
                keep = mergeable & (np.bincount(word)[word] >= 2)
                if keep.any():
                    ids, start = ids[keep], start[keep]
                    freq += np.bincount(ids, minlength=len(freq)) * n_copies
                    segmented.append((ids, start, n_copies))
            bar.update(sum(len(d.encode("utf-8")) for d in batch))
    bar.close()

    # Frequent units get the shortest characters (see unit_codepoints).
    used = np.flatnonzero(freq)
    ranked = used[np.argsort(-freq[used], kind="stable")]
    code = np.zeros(len(breaks), dtype=np.uint32)
    code[ranked] = unit_codepoints(len(ranked))
    out = []
    for ids, start, n_copies in segmented:
        units = np.insert(code[ids], np.flatnonzero(start[1:]) + 1, SPACE)
        out.append((units.astype("<u4").tobytes().decode("utf-32-le"), n_copies))
    return out, {chr(int(code[i])): int(i) for i in ranked}


def learn_unit_merges(
    texts: list[tuple[str, int]],
    n_alphabet: int,
    n_merges: int,
    min_frequency: int,
    max_units: int | None,
    progress: bool,
) -> list[tuple[str, str]]:
    """Merges (in unit characters, in learned order) of a BPE trained on the unit texts by the Rust trainer.

    ``max_units`` caps a product at that many old tokens: every old token has at least one character, so a
    product over the character limit in units is over it in characters too (the exact check comes later).
    """
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=n_alphabet + n_merges,
        min_frequency=min_frequency,
        show_progress=progress and sys.stderr.isatty(),  # Rust bars print blank lines off a terminal
        special_tokens=[],
        max_token_length=max_units,
    )

    def feed() -> Iterator[str]:
        for text, copies in texts:
            for _ in range(copies):
                yield text

    trainer_tok.train_from_iterator(feed(), trainer, length=sum(c for _, c in texts))
    merges = json.loads(trainer_tok.to_str())["model"]["merges"]
    return [merge_pair(m) for m in merges]


# ----------------------------------------------------------------------------------------------------
# SentencePiece-style: characters the old vocabulary spells with byte fallback
# ----------------------------------------------------------------------------------------------------


def missing_characters(
    old: Tokenizer, data: dict[str, Any], family: Family, sources: list[TrainingText], min_frequency: int
) -> list[tuple[str, int]]:
    """Characters of the training text that have no token of their own, most frequent first, with their
    (weighted) counts; only those seen at least ``min_frequency`` times."""
    if family != "sentencepiece":
        return []
    vocab = data["model"]["vocab"]
    counts: Counter[str] = Counter()
    for src, ratio in zip(sources, weight_ratios(sources), strict=True):
        c: Counter[str] = Counter()
        for doc in src.docs:
            c.update(old.normalizer.normalize_str(doc) if old.normalizer is not None else doc)
        for ch, n in c.items():
            counts[ch] += round(n * ratio)
    out = []
    for ch, n in counts.most_common():
        if n < min_frequency:
            break
        if ch.replace(" ", SPIECE_SPACE) not in vocab:
            out.append((ch.replace(" ", SPIECE_SPACE), n))
    return out


# ----------------------------------------------------------------------------------------------------
# Assemble and check
# ----------------------------------------------------------------------------------------------------


def with_tokens(
    data: dict[str, Any],
    new_vocab: list[tuple[str, int]],
    new_merges: list[tuple[str, str]],
    text: str | None = None,
) -> Tokenizer:
    """The old tokenizer.json with vocabulary entries and merges appended (old entries untouched).

    ``text`` (the old ``to_str()``) lets the new entries be spliced into the JSON text instead of serialising
    the whole vocabulary again (a second or so on a 150k vocabulary); checked, with the dict way as fallback.
    """
    legacy = bool(data["model"]["merges"]) and isinstance(data["model"]["merges"][0], str)
    if text is not None:
        head, sep, tail = text.rpartition('},"merges":[')
        if sep and tail.endswith("]}}") and not head.endswith("{"):
            vocab_add = "".join(f",{json.dumps(t, ensure_ascii=False)}:{i}" for t, i in new_vocab)
            items = [f"{a} {b}" if legacy else [a, b] for a, b in new_merges]
            merges_add = "".join("," + json.dumps(m, ensure_ascii=False) for m in items)
            if tail == "]}}":
                merges_add = merges_add[1:]
            try:
                tok = Tokenizer.from_str(head + vocab_add + sep + tail[:-3] + merges_add + "]}}")
            except Exception:  # noqa: BLE001 - a layout we did not expect: take the dict way
                tok = None
            want = len(data["model"]["vocab"]) + len(new_vocab)
            if tok is not None and tok.get_vocab_size(with_added_tokens=False) == want:
                return tok
    data = dict(data)
    model = dict(data["model"])
    model["vocab"] = {**model["vocab"], **dict(new_vocab)}
    model["merges"] = [*model["merges"], *((f"{a} {b}" if legacy else [a, b]) for a, b in new_merges)]
    data["model"] = model
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def unreachable(tok: Tokenizer, tokens: Iterable[tuple[str, int]]) -> list[str]:
    """Tokens whose own string, given alone to the BPE model, does not come out as exactly that token."""
    bad = []
    for s, i in tokens:
        if [t.id for t in tok.model.tokenize(s)] != [i]:
            bad.append(s)
    return bad


@dataclass
class _Pick:
    vocab: list[tuple[str, int]]  # new token string -> id, in id order
    merges: list[tuple[str, str]]
    to_existing: int


def _pick(
    candidates: list[tuple[str, str]],
    *,
    old_vocab: dict[str, int],
    old_merges: set[tuple[str, str]],
    first_id: int,
    chars: list[str],
    needed: int,
    dropped: set[str],
    banned: set[str],
    max_len: int | None,
) -> _Pick:
    """Walk the learned merges in order and keep the first ones that make ``needed`` new tokens.

    A merge is kept when both its parts exist (old tokens, added characters, or products of kept merges) and
    its product is allowed (not too long, not a special token's string, not dropped as unreachable). A
    product that is already an old token keeps the old id (the merge is kept; it adds no token).
    """
    vocab: dict[str, int] = {}
    next_id = first_id
    for ch in chars[:needed]:
        vocab[ch] = next_id
        next_id += 1
    merges: list[tuple[str, str]] = []
    seen_pairs: set[tuple[str, str]] = set()
    to_existing = 0
    for a, b in candidates:
        if len(vocab) >= needed:
            break
        if (a not in old_vocab and a not in vocab) or (b not in old_vocab and b not in vocab):
            continue
        product = a + b
        if product in banned or product in dropped or (max_len is not None and len(product) > max_len):
            continue
        if (a, b) in seen_pairs or (a, b) in old_merges:
            continue
        seen_pairs.add((a, b))
        merges.append((a, b))
        if product in old_vocab:
            to_existing += 1
        elif product not in vocab:
            vocab[product] = next_id
            next_id += 1
    return _Pick(sorted(vocab.items(), key=lambda kv: kv[1]), merges, to_existing)


# ----------------------------------------------------------------------------------------------------
# The stage's engine
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Base:
    """The old tokenizer as extend_tokenizer reads it."""

    family: str
    text: str  # tokenizer.json of the old tokenizer
    data: dict  # ... parsed
    old_vocab: dict[str, int]
    old_merges: set[tuple[str, str]]
    added: list[dict]
    first_id: int  # the first new id: after every existing id
    # Added tokens that live outside the model vocabulary (Qwen2, Llama-3, Gemma's turn tokens) get their id
    # from `tokenizers` on load as "model vocabulary size + rank", not from tokenizer.json: once new tokens
    # grow the model vocabulary they would move. Entering them in the model vocabulary under their own
    # content pins them (tokenizers then takes the model's id), as SmolLM2 and Llama-2 already do for their
    # specials. The model never produces them: added tokens are cut out of the text before it runs.
    pinned: dict[str, int]

    @classmethod
    def read(cls, old: Tokenizer) -> _Base:
        text = old.to_str()
        data = tokenizer_json(old, text)
        vocab: dict[str, int] = data["model"]["vocab"]
        added = data.get("added_tokens") or []
        return cls(
            family=detect_family(old),
            text=text,
            data=data,
            old_vocab=vocab,
            old_merges={merge_pair(m) for m in data["model"]["merges"]},
            added=added,
            first_id=1 + max([*vocab.values(), *(t["id"] for t in added)]),
            pinned={t["content"]: t["id"] for t in added if t["content"] not in vocab},
        )


def _segmenter(
    old: Tokenizer, base: _Base, sources: list[TrainingText], new_tokens: int, min_frequency: int
) -> tuple[Tokenizer, list[str], list[str]]:
    """The tokenizer that segments the training text into units, the characters that become tokens first
    (SentencePiece-style: frequent characters without a token of their own), and the string of every id."""
    missing = missing_characters(old, base.data, base.family, sources, min_frequency)
    chars = [ch for ch, _ in missing[: max(1, new_tokens // 2)]] if missing else []
    # The segmentation tokenizer knows those characters, so they come out as one unit instead of bytes.
    seg_data = dict(base.data)
    vocab = {**base.old_vocab, **base.pinned, **{ch: base.first_id + k for k, ch in enumerate(chars)}}
    seg_data["model"] = dict(base.data["model"], vocab=vocab)
    seg_tok = Tokenizer.from_str(json.dumps(seg_data, ensure_ascii=False)) if chars else old
    string_of = [""] * (base.first_id + len(chars))
    for s, i in vocab.items():
        string_of[i] = s
    return seg_tok, chars, string_of


def _merge_breaks(base: _Base, string_of: list[str], keep_digit_split: bool) -> tuple[np.ndarray, bool]:
    """Which ids may never take part in a merge; and whether numbers are split into single digits."""
    family, data = base.family, base.data
    digits_individual = keep_digit_split and splits_digits_individually(data, family)
    # A Digits(individual_digits=True) pre-tokenizer already makes every digit a word of its own (and words of
    # one token are left out); otherwise tokens holding a digit must not be merged.
    digit_breaks = digits_individual and not any(
        n.get("type") == "Digits" and n.get("individual_digits") for n in pre_tokenizer_types(data)
    )
    breaks = np.zeros(len(string_of), dtype=bool)
    for t in base.added:
        breaks[t["id"]] = True  # special and added tokens are matched before the model: never merged
    for i, s in enumerate(string_of):
        if not s:
            breaks[i] = True  # an id with no model token (added tokens outside the model vocabulary)
        elif family == "sentencepiece" and _BYTE_TOKEN.match(s):
            breaks[i] = True  # byte-fallback bytes cannot be merged by HF's BPE
        elif digit_breaks and _DIGIT.search(token_to_bytes(family, s).decode("utf-8", errors="replace")):
            breaks[i] = True  # keep numbers as single digits
    unk = data["model"].get("unk_token")
    if unk in base.old_vocab:
        breaks[base.old_vocab[unk]] = True
    return breaks, digits_individual


@dataclass
class _Learned:
    pick: _Pick
    tokenizer: Tokenizer
    merges_learned: int
    rounds: int
    dropped: set[str]
    exhausted: bool
    leaked: set[str] = field(default_factory=set)  # tokens dropped because they fire in protected text
    unprotected: Tokenizer | None = None  # the first pick, before tokens that leak were dropped


def _leaks(
    tok: Tokenizer,
    vocab: list[tuple[str, int]],
    target: list[TrainingText],
    protect: list[TrainingText],
    share: float,
) -> set[str]:
    """New tokens that fire in the protected domains' text: per byte at least ``share`` times as often as in
    the target text (a token the target text never produces counts however rarely it fires there)."""
    ids = {i: t for t, i in vocab}

    def uses(texts: list[TrainingText]) -> tuple[Counter, int]:
        count: Counter = Counter()
        n = 0
        for src in texts:
            for enc in tok.encode_batch(src.docs, add_special_tokens=False):
                count.update(i for i in enc.ids if i in ids)
            n += src.n_bytes
        return count, max(1, n)

    in_target, t_bytes = uses(target)
    in_protect, p_bytes = uses(protect)
    return {ids[i] for i, c in in_protect.items() if c / p_bytes >= share * in_target.get(i, 0) / t_bytes}


def _learn_and_pick(
    base: _Base,
    texts: Any,
    real_of_unit: dict[int, str],
    chars: list[str],
    needed: int,
    min_frequency: int,
    max_token_length: int | None,
    progress: bool,
    sources: list[TrainingText] | None = None,
    protect: list[TrainingText] | None = None,
    protect_share: float = 0.0,
) -> _Learned:
    """Learn merges over the units, keep those that make new, allowed, reachable tokens that do not fire in the
    ``protect`` domains' text (relative to ``sources``, the target text: see :func:`_leaks`); learn more when
    too few survive."""
    # Strings a new token must never have: those of special/added tokens (they map by role, never by text).
    banned = {symbol_string(base.family, t["content"]) for t in base.added} | {
        t["content"] for t in base.added
    }
    merges_wanted = needed - len(chars)
    # Some learned merges are dropped (too long in characters, duplicate strings, unreachable): learn a
    # margin more (measured on SmolLM2 + Chinese with a 16-character cap: ~4% are too long).
    margin = 1.1 if max_token_length else 1.03
    candidates: list[tuple[str, str]] = []
    learned = rounds = 0
    dropped: set[str] = set()
    leaked: set[str] = set()
    unprotected: Tokenizer | None = None
    exhausted = False
    while True:
        want = int(merges_wanted * margin) + 64
        if want > learned and not exhausted:
            if progress:
                print(
                    f"retok: learning {want:,} merges over {len(real_of_unit):,} distinct old tokens",
                    flush=True,
                )
            unit_merges = learn_unit_merges(
                texts, len(real_of_unit), want, min_frequency, max_token_length, progress
            )
            exhausted = len(unit_merges) < want  # the text ran out of pairs seen min_frequency times
            learned = want
            cache = dict(real_of_unit)
            candidates = []
            for a, b in unit_merges:
                ra, rb = cache[a], cache[b]
                cache[a + b] = ra + rb
                candidates.append((ra, rb))
        pick = _pick(
            candidates,
            old_vocab=base.old_vocab,
            old_merges=base.old_merges,
            first_id=base.first_id,
            chars=chars,
            needed=needed,
            dropped=dropped,
            banned=banned,
            max_len=max_token_length,
        )
        extended = with_tokens(base.data, [*base.pinned.items(), *pick.vocab], pick.merges, base.text)
        bad = unreachable(extended, pick.vocab)
        rounds += 1
        if bad:
            # Cannot happen for plain continued BPE; a merge that yields an existing token can let an old merge
            # fire after it and change a segmentation. Drop such tokens and pick again (others move up).
            if rounds > 50:
                raise RetokError(
                    f"{len(bad)} new tokens stay unreachable (e.g. {bad[0]!r}); this is a bug in retok"
                )
            dropped.update(bad)
            continue
        leaks = (
            _leaks(extended, pick.vocab, sources or [], protect, protect_share)
            if protect and rounds <= 12
            else None
        )
        if leaks:
            # Keep the other domains' segmentation: those tokens are not learned, others move up.
            unprotected = unprotected or extended
            if progress:
                print(
                    f"retok: {len(leaks):,} new tokens fire in the protected domains' text; dropped",
                    flush=True,
                )
            dropped.update(leaks)
            leaked.update(leaks)
            continue
        if len(pick.vocab) >= needed or exhausted or rounds > 12:
            return _Learned(pick, extended, learned, rounds, dropped, exhausted, leaked, unprotected)
        margin *= 1.5  # not enough survived the filters: learn more merges and pick again


def _check_learned(got: _Learned, new_tokens: int, min_frequency: int) -> list[str]:
    """Refuse an extension that learned nothing (every later stage would run for nothing); warn when it learned
    fewer tokens than asked."""
    if not got.pick.vocab and got.leaked:
        raise RetokError(
            f"build-tokenizer: every token it could learn ({len(got.leaked)}) also fires in the protected domains' "
            "text; set tokenizer.protect_domains: [] (or raise tokenizer.protect_share), or add text of the "
            "domains the new tokens are for"
        )
    if not got.pick.vocab:
        raise RetokError(
            f"build-tokenizer learned 0 new tokens: no pair of tokens occurs at least tokenizer.min_frequency="
            f"{min_frequency} times in the training text; add text to data.train or lower tokenizer.min_frequency"
        )
    if len(got.pick.vocab) < new_tokens:
        return [
            f"only {len(got.pick.vocab)} new tokens could be learned (asked for {new_tokens}): the training text has "
            f"no more pairs seen at least tokenizer.min_frequency={min_frequency} times; add text or lower new_tokens"
        ]
    return []


def extend_tokenizer(
    old: Tokenizer,
    sources: list[TrainingText],
    *,
    new_tokens: int,
    min_frequency: int = 2,
    max_token_length: int | None = None,
    keep_digit_split: bool = True,
    progress: bool = True,
    protect: list[TrainingText] | None = None,
    protect_share: float = 0.01,
) -> Extension:
    """Append ``new_tokens`` tokens learned on ``sources`` to ``old`` (a ``tokenizers.Tokenizer``).

    Every old token keeps its string and id (added and special tokens included); new ids start after the
    highest existing id; new merges come after the old ones in learned order; every new token is reachable.
    ``protect``: text of other domains whose segmentation should stay: a new token that fires there (per byte,
    at least ``protect_share`` times as often as in ``sources``) is not learned, and the next merges move up.
    """
    if new_tokens <= 0:
        raise RetokError(f"tokenizer.new_tokens must be positive, got {new_tokens}")
    if not any(s.docs for s in sources):
        raise RetokError("the training text is empty; point data.train at non-empty files")
    base = _Base.read(old)
    seg_tok, chars, string_of = _segmenter(old, base, sources, new_tokens, min_frequency)
    breaks, digits_individual = _merge_breaks(base, string_of, keep_digit_split)
    sp_start = sp_end = None
    if base.family == "sentencepiece":
        sp_start = np.array([s.startswith(SPIECE_SPACE) for s in string_of])
        sp_end = np.array([s.endswith(SPIECE_SPACE) for s in string_of])
    texts, id_of_unit = unit_texts(
        seg_tok, sources, breaks, sp_start=sp_start, sp_end=sp_end, progress=progress
    )
    real_of_unit = {u: string_of[i] for u, i in id_of_unit.items()}
    got = _learn_and_pick(
        base,
        texts,
        real_of_unit,
        chars,
        new_tokens,
        min_frequency,
        max_token_length,
        progress,
        sources=sources,
        protect=protect,
        protect_share=protect_share,
    )

    warnings = _check_learned(got, new_tokens, min_frequency)
    kept = {t for t, _ in got.pick.vocab}
    return Extension(
        tokenizer=got.tokenizer,
        new_ids=[i for _, i in got.pick.vocab],
        first_new_id=base.first_id,
        char_tokens=sum(1 for c in chars if c in kept),
        merges_added=len(got.pick.merges),
        merges_to_existing=got.pick.to_existing,
        digits_individual=digits_individual,
        dropped_unreachable=len(got.dropped - got.leaked),
        dropped_protected=sorted(got.leaked),
        unprotected=got.unprotected,
        warnings=warnings,
        stats={
            "family": base.family,
            "training_bytes": sum(s.n_bytes for s in sources),
            "units": len(real_of_unit),
            "merges_learned": got.merges_learned,
            "rounds": got.rounds,
        },
    )
