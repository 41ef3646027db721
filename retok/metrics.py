"""Metrics that survive a tokenizer change: bytes per token and bits per byte (BPB).

Token-level loss cannot be compared across tokenizers; BPB can: the sum of next-token negative
log-likelihoods (nats) divided by ln(2) times the UTF-8 bytes of exactly the text whose tokens were scored.
Long documents are scored with a sliding window: every token once, with as much left context as the window
allows. The first token of a document has no context and is not scored, so its bytes are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


def encode_docs(tokenizer: Any, docs: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets of each document, without special tokens."""
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


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, n_scored) for a sliding window over ``n`` tokens.

    Each window feeds ids[start:end] and scores the predictions of its last ``n_scored`` tokens, so every
    token from index 1 on is scored exactly once, with up to ``window - 1`` tokens of left context.
    """
    # A scored token needs its predecessor inside the window, so a window advances by at most window - 1.
    stride = max(1, min(stride, window - 1))
    out: list[tuple[int, int, int]] = []
    end = min(n, window)
    if end >= 2:
        out.append((0, end, end - 1))
    while end < n:
        new_end = min(n, end + stride)
        out.append((max(0, new_end - window), new_end, new_end - end))
        end = new_end
    return out


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
) -> dict[str, float]:
    """Sliding-window BPB of ``model`` with ``tokenizer`` over ``docs``.

    Returns ``{"bpb", "nats", "bytes", "tokens"}`` where ``bytes`` counts exactly the text of the scored
    tokens (each document minus its first token).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = encode_docs(tokenizer, docs)
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    bar = tqdm(
        total=sum(max(0, len(ids) - 1) for ids, _ in encoded),
        desc=desc or "bpb",
        unit="tok",
        leave=False,
        disable=desc is None,
    )
    for text, (ids, offsets) in zip(docs, encoded, strict=True):
        if len(ids) < 2:
            continue
        # Scored text = everything after the first token (which has no context to be predicted from).
        total_bytes += len(text[offsets[0][1] :].encode("utf-8"))
        x = torch.tensor(ids, dtype=torch.long, device=device)
        for start, end, n_scored in _windows(len(ids), window, stride):
            # logits at position p predict token p+1: keep the last n_scored+1 positions, drop the final one.
            logits = model(input_ids=x[start:end][None], logits_to_keep=n_scored + 1).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[end - n_scored : end], reduction="sum")
            total_nats += float(nll)
            total_tokens += n_scored
            bar.update(n_scored)
    bar.close()
    if was_training:
        model.train()
    bpb = total_nats / (math.log(2) * total_bytes) if total_bytes else float("nan")
    return {"bpb": bpb, "nats": total_nats, "bytes": total_bytes, "tokens": total_tokens}
