"""Long-text decoding speed: pure measurement functions (no config, no files).

The headline figure is the time a model needs to emit the SAME reference continuation as the other model:
the prompt is prefilled once, then the continuation's tokens are fed one step at a time through the KV cache,
with the argmax read back to the host at every step, which is exactly the work of decoding that text. So
bytes/s does not depend on what each model happens to generate. Free greedy generation from the same prompt
is the second figure. Every timing has warm-up runs, several repeats, CUDA synchronised around the clock, and
reports medians.

Where the text comes from: one continuation is not the domain (a 240-byte snippet of a Chinese page can be a
code sample that compresses 1.5x where the page compresses 2.4x), so :func:`spread_segments` takes several
pieces evenly spread through the held-out text, and the figures add up their prompts, tokens and times.

How a piece is cut (the same BYTES for both models, each with its own natural tokenization):
it is cut at a character boundary into prompt (about ``prompt_bytes``) and continuation
(about ``continuation_bytes``), but it is tokenized WHOLE (plus a short margin) by each tokenizer and split
at the first token whose character span ends past the prompt boundary. Tokenizing the two parts separately
would give each model a segmentation it never sees in real decoding (a word cut in two at the boundary).
The token that straddles the boundary belongs to the continuation, tokens that end past the continuation's
end are dropped, and bytes are counted over exactly the text of the tokens fed, so each model's bytes/s is
honest even though the two cuts differ by a few bytes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from retok.evaluate.kvcache import cache_kwarg, prefill, step

# Extra text tokenized after the continuation so the tokens at its end are split as in running text.
MARGIN_BYTES = 64


@dataclass
class SpeedText:
    """One tokenizer's view of the shared prompt + continuation."""

    prompt_ids: list[int]
    continuation_ids: list[int]
    prompt_bytes: int
    continuation_bytes: int

    def summary(self) -> dict[str, int]:
        return {
            "prompt_tokens": len(self.prompt_ids),
            "prompt_bytes": self.prompt_bytes,
            "continuation_tokens": len(self.continuation_ids),
            "continuation_bytes": self.continuation_bytes,
        }


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def char_index_at_byte(text: str, n_bytes: int) -> int:
    """The largest character index whose UTF-8 prefix has at most ``n_bytes`` bytes (a character boundary)."""
    return len(text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore"))


def long_text(docs: Iterable[str], need_bytes: int, joiner: str = "\n\n") -> tuple[str | None, int]:
    """The first document with at least ``need_bytes`` bytes; else the documents joined, if that is long
    enough. Returns (text or None, the most bytes found) so a caller can say how short the text was."""
    seen: list[str] = []
    joined_bytes = 0
    longest = 0
    for doc in docs:
        n = nbytes(doc)
        longest = max(longest, n)
        if n >= need_bytes:
            return doc, n
        seen.append(doc)
        joined_bytes += n + (nbytes(joiner) if len(seen) > 1 else 0)
    if seen and joined_bytes >= need_bytes:
        return joiner.join(seen), joined_bytes
    return None, max(longest, joined_bytes)


def spread_segments(text: str, n: int, need_bytes: int) -> list[str]:
    """``n`` pieces of ``text``, each ``need_bytes`` bytes plus the margin, starting at evenly spread places
    (the first at the start, the last ending at the end); [] when the text is shorter than one piece."""
    data = text.encode("utf-8")
    span = need_bytes + MARGIN_BYTES
    if len(data) < need_bytes or n < 1:
        return []
    room = max(0, len(data) - span)
    starts = [round(k * room / (n - 1)) if n > 1 else 0 for k in range(n)]
    # errors="ignore" drops the partial characters a byte cut leaves at either end
    return [data[s : s + span].decode("utf-8", errors="ignore") for s in starts]


def cut_text(text: str, prompt_bytes: int, continuation_bytes: int) -> tuple[str, int, int]:
    """(text to tokenize, prompt boundary, continuation end), boundaries as character indices."""
    boundary = char_index_at_byte(text, prompt_bytes)
    end = char_index_at_byte(text, prompt_bytes + continuation_bytes)
    keep = char_index_at_byte(text, prompt_bytes + continuation_bytes + MARGIN_BYTES)
    return text[:keep], boundary, end


def split_tokens(tokenizer: Any, text: str, boundary: int, end: int) -> SpeedText:
    """Tokenize ``text`` whole (special tokens as the tokenizer adds them, e.g. BOS) and split it at the
    first text token whose span ends past ``boundary``; keep continuation tokens that end by ``end``."""
    enc = tokenizer(
        text, add_special_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True
    )
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    special: list[int] = enc["special_tokens_mask"]
    prompt: list[int] = []
    cont: list[int] = []
    prompt_end = 0  # character index where the prompt's last token ends
    cont_end = 0
    for tid, (start, stop), is_special in zip(ids, offsets, special, strict=True):
        if is_special and start == stop:  # inserted by the post-processor, not part of the text
            if not cont:  # BOS and the like belong to the prompt; a trailing EOS is not decoding work
                prompt.append(tid)
            continue
        if not cont and stop <= boundary:
            prompt.append(tid)
            prompt_end = max(prompt_end, stop)
        elif stop <= end:
            cont.append(tid)
            cont_end = max(cont_end, stop)
        else:
            break
    # Bytes from the end of the prompt's last token to the end of the last token fed: robust to tokenizers
    # whose offsets leave out the leading space of a token (trim_offsets).
    return SpeedText(
        prompt_ids=prompt,
        continuation_ids=cont,
        prompt_bytes=nbytes(text[:prompt_end]),
        continuation_bytes=nbytes(text[prompt_end:cont_end]) if cont else 0,
    )


# ------------------------------------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so the clock measures it."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


@torch.inference_mode()
def reference_run(runs: Sequence[tuple[Any, SpeedText, torch.device | str]]) -> list[tuple[float, float]]:
    """One run of one or more models: (prefill seconds, seconds to feed the continuation) for each.

    The prompts are prefilled one after the other; then the models' continuation steps are interleaved
    evenly (a model with half the tokens steps every other time) and every step is timed on its own. On a
    shared machine whose load changes from second to second, this makes the load fall on both models alike,
    which alternating whole runs cannot do. Each model's work is unchanged: its own cache, one step per token.
    """
    caches: list[Any] = []
    prefill_s: list[float] = []
    for model, text, device in runs:
        prompt = torch.tensor([text.prompt_ids], dtype=torch.long, device=device)
        sync(device)
        t0 = time.perf_counter()
        cache, _ = prefill(model, prompt)
        sync(device)
        prefill_s.append(time.perf_counter() - t0)
        caches.append(cache)
    conts = [torch.tensor(t.continuation_ids, dtype=torch.long, device=d).view(-1, 1, 1) for _, t, d in runs]
    kwargs = [cache_kwarg(m) for m, _, _ in runs]
    # Step i of a model with n steps sits at (i + 0.5) / n of the run: the schedules interleave evenly.
    order = sorted(((i + 0.5) / len(c), k, i) for k, c in enumerate(conts) for i in range(len(c)))
    decode = [0.0] * len(runs)
    for _, k, i in order:
        model, _, device = runs[k]
        t0 = time.perf_counter()
        caches[k], _ = step(model, conts[k][i], caches[k], kwargs[k])  # int(argmax) waits for the device
        sync(device)
        decode[k] += time.perf_counter() - t0
    return list(zip(prefill_s, decode, strict=True))


@torch.inference_mode()
def greedy_run(
    model: Any,
    prompt_ids: list[int],
    token_nbytes: Mapping[int, int],
    target_bytes: int,
    max_tokens: int,
    device: torch.device | str,
) -> tuple[float, float, list[int]]:
    """One run of free greedy generation until ``target_bytes`` bytes (or ``max_tokens`` tokens):
    (prefill seconds, decode seconds, generated ids). It does not stop at EOS, so every run does the same work."""
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out_ids: list[int] = []
    got = 0
    kwarg = cache_kwarg(model)
    sync(device)
    t0 = time.perf_counter()
    cache, nxt = prefill(model, prompt)
    sync(device)
    t1 = time.perf_counter()
    while got < target_bytes and len(out_ids) < max_tokens:
        out_ids.append(nxt)
        got += token_nbytes.get(nxt, 0)
        cache, nxt = step(model, torch.tensor([[nxt]], dtype=torch.long, device=device), cache, kwarg)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out_ids


def run_rounds(
    runs: Mapping[str, Callable[[], tuple]], *, repeats: int, warmup: int
) -> dict[str, list[tuple]]:
    """Call every run once per round, ``warmup`` untimed rounds then ``repeats`` kept ones.

    With two models loaded, alternating them round by round (and flipping the order every round) makes a
    busy machine slow both alike instead of whichever model happened to run during the busy minute.
    """
    keys = list(runs)
    kept: dict[str, list[tuple]] = {k: [] for k in keys}
    for r in range(warmup + repeats):
        for k in keys if r % 2 == 0 else keys[::-1]:
            result = runs[k]()
            if r >= warmup:
                kept[k].append(result)
    return kept


def _median_stats(
    prefill_s: list[float], decode_s: list[float], n_tokens: int, n_bytes: int
) -> dict[str, Any]:
    pre = statistics.median(prefill_s)
    dec = statistics.median(decode_s)
    return {
        "prefill_ms": pre * 1000,
        "decode_s": dec,
        "ms_per_token": dec * 1000 / n_tokens if n_tokens else float("nan"),
        "tokens_per_s": n_tokens / dec if dec > 0 else float("nan"),
        "bytes_per_s": n_bytes / dec if dec > 0 else float("nan"),
        "decode_s_all": list(decode_s),
    }


def reference_stats(text: SpeedText | Sequence[SpeedText], runs: list[tuple[float, float]]) -> dict[str, Any]:
    """Medians of reference runs. Each of the N continuation tokens costs one forward step (the step that
    reads token i and predicts i+1), so ms/token = decode time / N, bytes/s = continuation bytes / decode time.
    With several pieces, a run's times are the sums over the pieces and N and the bytes are summed too."""
    texts = [text] if isinstance(text, SpeedText) else list(text)
    total = {k: sum(t.summary()[k] for t in texts) for k in texts[0].summary()}
    stats = _median_stats(
        [r[0] for r in runs], [r[1] for r in runs], total["continuation_tokens"], total["continuation_bytes"]
    )
    return {**total, "pieces": len(texts), **stats}


def greedy_stats(
    runs: list[tuple[float, float, list[int]]],
    token_nbytes: Mapping[int, int],
    *,
    valid_ids: Container[int] | None = None,
    stop_ids: Container[int] = (),
) -> dict[str, Any]:
    """Medians of greedy runs. Special tokens and ids without a token count 0 bytes; ``invalid_ids`` counts
    generated ids outside ``valid_ids`` (e.g. padding rows); ``stopped_at`` is where decoding would have
    stopped (first id in ``stop_ids``)."""
    generated = runs[-1][2]
    n_bytes = sum(token_nbytes.get(t, 0) for t in generated)
    stats = _median_stats([r[0] for r in runs], [r[1] for r in runs], len(generated), n_bytes)
    return {
        "generated_tokens": len(generated),
        "generated_bytes": n_bytes,
        "bytes_per_token": n_bytes / len(generated) if generated else float("nan"),
        "invalid_ids": 0 if valid_ids is None else sum(1 for t in generated if t not in valid_ids),
        "stopped_at": next((i for i, t in enumerate(generated) if t in stop_ids), None),
        **stats,
        "ids": generated,
    }


def default_max_tokens(target_bytes: int) -> int:
    # A token that stands for text has at least one byte; specials and padding ids have none, so cap the loop.
    return max(16, 2 * target_bytes)
