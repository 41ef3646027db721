"""Metrics that survive a tokenizer change: bytes per token and bits per byte (BPB).

Token-level loss cannot be compared across tokenizers; BPB can: the sum of next-token negative
log-likelihoods (nats) divided by ln(2) times the UTF-8 bytes of exactly the text whose tokens were scored.

How a document is scored, as the model was trained:

- A tokenizer that adds BOS (Llama-2, Gemma, Mistral) gets its BOS in front of EVERY window; BOS is context,
  never scored, and the first text token is scored (predicted from BOS), so the whole document counts.
- Without BOS (GPT-2, Llama-3 text, Qwen, SmolLM2) the first token has no context and is not scored: the
  scored text starts at the end of the first token.
- To compare two models, both score exactly the same bytes: :func:`score_starts` gives, per document, the
  first character offset from which both tokenizations can be scored (a boundary of both), and each model
  scores the tokens that start there or later, the earlier ones serving as context.
- Long documents are scored with a sliding window (:func:`score_windows`): every scored token exactly once,
  with as much left context as the window allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


def encode_docs(tokenizer: Any, docs: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each document, without special tokens."""
    if not docs:
        return []
    enc = tokenizer(list(docs), add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))


def bytes_per_token(tokenizer: Any, docs: Sequence[str]) -> dict[str, float]:
    """UTF-8 bytes, characters and tokens of ``docs`` (no special tokens), and the two ratios."""
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_chars = sum(len(d) for d in docs)
    enc = tokenizer(list(docs), add_special_tokens=False)["input_ids"] if docs else []
    n_tok = sum(len(ids) for ids in enc)
    return {
        "bytes": n_bytes,
        "chars": n_chars,
        "tokens": n_tok,
        "bytes_per_token": n_bytes / n_tok if n_tok else 0.0,
        "chars_per_token": n_chars / n_tok if n_tok else 0.0,
    }


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts it in front of text by itself (``add_special_tokens=True``), else
    None. That is how the model saw every document in training, so that is how it is scored."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids[:1] == [bos] else None


# ----------------------------------------------------------------------------------- what is scored


def clean_boundaries(offsets: Sequence[tuple[int, int]], length: int) -> set[int]:
    """Character offsets where one token ends and the next starts (0 and the end included). Byte-level tokens
    that split a character share its span, so no boundary falls inside a character; a gap between two spans
    (offsets trimmed of leading spaces) belongs to the next token, so the boundary is where the first ends."""
    out = {0, length}
    for (_, end), (start, _) in zip(offsets, offsets[1:], strict=False):
        if end <= start:
            out.add(end)
    return out


def score_starts(tokenizers: Sequence[Any], docs: Sequence[str]) -> list[int]:
    """Per document, the character offset from which every tokenizer in ``tokenizers`` can score: 0 when all
    of them add BOS, else the first offset after the start of the text that is a clean boundary of every
    tokenization past its first token (so each model has context for the first token it scores)."""
    if all(bos_id(t) is not None for t in tokenizers):
        return [0] * len(docs)
    encoded = [encode_docs(t, docs) for t in tokenizers]
    starts = []
    for i, doc in enumerate(docs):
        common: set[int] | None = None
        for t, enc in zip(tokenizers, encoded, strict=True):
            ids, offsets = enc[i]
            if not ids:
                common = set()
                break
            # without BOS the first token is context only: scoring starts at or after its end
            first_end = 0 if bos_id(t) is not None else offsets[0][1]
            ok = {b for b in clean_boundaries(offsets, len(doc)) if b >= max(1, first_end)}
            common = ok if common is None else common & ok
        starts.append(min(common) if common else len(doc))
    return starts


def score_windows(n: int, window: int, stride: int, first: int, bos: bool) -> list[tuple[int, int, int]]:
    """(start, end, n_scored) windows over ``n`` tokens that score tokens ``first`` .. n-1 once each.

    A window feeds ids[start:end] (after BOS when ``bos``: BOS takes one place of the window) and scores
    the predictions of its last ``n_scored`` tokens. A scored token has its predecessor inside the window,
    except the document's first token, which is scored when there is BOS (predicted from BOS).
    """
    span = window - 1 if bos else window
    need = 0 if bos else 1  # tokens of the FIRST window that must come before a scored token
    if span < 2:
        raise ValueError(f"a window of {window} tokens leaves no room to score")
    # In every later window a scored token needs its real predecessor inside the window (BOS stands in for
    # it only at the start of the document).
    stride = max(1, min(stride, span - 1))
    c = max(first, need)
    if c >= n:
        return []
    end = min(n, span) if c < span else min(n, c + stride)
    out = [(max(0, end - span), end, end - c)]
    while end < n:
        new_end = min(n, end + stride)
        out.append((max(0, new_end - span), new_end, new_end - end))
        end = new_end
    return out


# ------------------------------------------------------------------------------------------------ BPB


@torch.inference_mode()
def bits_per_byte(
    model: Any,
    tokenizer: Any,
    docs: Sequence[str],
    *,
    window: int = 1024,
    stride: int = 512,
    device: Any = None,
    desc: str | None = None,
    starts: Sequence[int] | None = None,
    keep_tokens: bool = False,
) -> dict[str, Any]:
    """Sliding-window BPB of ``model`` with ``tokenizer`` over ``docs``.

    ``starts``: per document, the character offset where scoring starts (:func:`score_starts` of the two
    tokenizers being compared); it must be a token boundary of this tokenizer. Default: this tokenizer alone.
    Returns ``{"bpb", "nats", "bytes", "tokens", "bos"}``; ``bytes`` counts exactly the scored text.
    ``keep_tokens``: also ``"token_nll"``, per document ``[first scored token index, [nats of each scored
    token in order]]`` (the scored tokens of a document are contiguous), for costs per position.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    bos = bos_id(tokenizer)
    encoded = encode_docs(tokenizer, docs)
    starts = list(starts) if starts is not None else score_starts([tokenizer], docs)
    if len(starts) != len(docs):
        raise ValueError("starts must give one offset per document")
    plans = []
    for doc, (ids, offsets), start in zip(docs, encoded, starts, strict=True):
        first = next((k for k, (s, _) in enumerate(offsets) if s >= start), len(ids))
        if first < len(ids) and start not in clean_boundaries(offsets, len(doc)):
            raise ValueError(f"scoring start {start} is not a token boundary of this tokenizer")
        plans.append((ids, first, len(doc[start:].encode("utf-8")) if first < len(ids) else 0))
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    bar = tqdm(
        total=sum(len(ids) - first for ids, first, _ in plans),
        desc=desc or "bpb",
        unit="tok",
        leave=False,
        disable=desc is None,
    )
    prefix = torch.tensor([bos] if bos is not None else [], dtype=torch.long, device=device)
    per_doc: list[list[Any]] = []
    for ids, first, n_bytes in plans:
        windows = score_windows(len(ids), window, stride, first, bos is not None)
        per_doc.append([windows[0][1] - windows[0][2] if windows else len(ids), []])
        if not windows:
            continue
        total_bytes += n_bytes
        x = torch.tensor(ids, dtype=torch.long, device=device)
        for start, end, n_scored in windows:
            inp = torch.cat([prefix, x[start:end]])[None]
            # logits at position p predict token p+1: keep the last n_scored+1 positions, drop the final one.
            logits = model(input_ids=inp, logits_to_keep=n_scored + 1).logits[0, :-1].float()
            target = x[end - n_scored : end]
            nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            total_nats += float(nll)
            total_tokens += n_scored
            if keep_tokens:
                each = torch.nn.functional.cross_entropy(logits, target, reduction="none")
                per_doc[-1][1].extend(round(float(v), 5) for v in each)
            bar.update(n_scored)
    bar.close()
    if was_training:
        model.train()
    bpb = total_nats / (math.log(2) * total_bytes) if total_bytes else float("nan")
    out: dict[str, Any] = {
        "bpb": bpb,
        "nats": total_nats,
        "bytes": total_bytes,
        "tokens": total_tokens,
        "bos": bos is not None,
    }
    if keep_tokens:
        out["token_nll"] = per_doc
    return out
