"""Samples a person can read: greedy generations of both models for the same prompts, side by side.

Two kinds of prompt:

- from held-out text (``eval.samples`` per domain, evenly spread through it): the model continues the text,
  which shows whether it still writes the domain the same way;
- ``eval.sample_prompts``: questions answered through the chat template where the model has one (the new
  tokenizer keeps the original's template), which shows whether it still answers the same way.

Each sample stops at ``eval.sample_bytes`` bytes or at an end-of-turn/EOS token, and records the tokens,
bytes and seconds it took: the same text in fewer tokens is the point of a new tokenizer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from retok.evaluate.kvcache import cache_kwarg, prefill, step
from retok.evaluate.speed import default_max_tokens, nbytes, spread_segments


@dataclass(frozen=True)
class Prompt:
    kind: str  # "text" (continue held-out text) | "chat" (a question through the chat template)
    domain: str | None
    text: str


def sample_prompts(
    docs: dict[str, list[str]], per_domain: int, prompt_bytes: int, chats: list[str]
) -> list[Prompt]:
    """``per_domain`` passages of ``prompt_bytes`` from each domain's held-out text, then the chat prompts."""
    out = []
    for name, texts in docs.items():
        for seg in spread_segments("\n\n".join(texts), per_domain, prompt_bytes):
            cut = seg.encode("utf-8")[:prompt_bytes].decode("utf-8", errors="ignore")
            out.append(Prompt("text", name, cut))
    return out + [Prompt("chat", None, p) for p in chats]


def prompt_ids(tok: Any, prompt: Prompt) -> list[int]:
    """The ids a model is given: held-out text as the tokenizer encodes a document (with BOS where it adds
    one); a chat prompt through the template with the assistant turn opened, else as plain text."""
    if prompt.kind == "chat" and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
        )
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt.text, add_special_tokens=True)["input_ids"]


def generate(
    model: Any,
    ids: list[int],
    token_nbytes: dict[int, int],
    max_bytes: int,
    stop_ids: set[int],
    device: Any,
) -> tuple[list[int], float, bool]:
    """Greedy ids after ``ids`` until ``max_bytes`` bytes or a stop id: (ids, seconds, stopped at a stop id)."""
    import torch

    out: list[int] = []
    got = 0
    kwarg = cache_kwarg(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache, nxt = prefill(model, torch.tensor([ids], dtype=torch.long, device=device))
        while True:
            if nxt in stop_ids:
                return out, time.perf_counter() - t0, True
            out.append(nxt)
            got += token_nbytes.get(nxt, 0)
            if got >= max_bytes or len(out) >= default_max_tokens(max_bytes):
                return out, time.perf_counter() - t0, False
            cache, nxt = step(model, torch.tensor([[nxt]], dtype=torch.long, device=device), cache, kwarg)


def write_samples(
    model: Any,
    tok: Any,
    prompts: list[Prompt],
    token_nbytes: dict[int, int],
    stop_ids: set[int],
    max_bytes: int,
    device: Any,
) -> list[dict[str, Any]]:
    """One model's sample for every prompt."""
    out = []
    for p in prompts:
        ids = prompt_ids(tok, p)
        gen, seconds, stopped = generate(model, ids, token_nbytes, max_bytes, stop_ids, device)
        text = tok.decode(gen, skip_special_tokens=True)
        out.append(
            {
                "text": text,
                "prompt_tokens": len(ids),
                "tokens": len(gen),
                "bytes": nbytes(text),
                "seconds": seconds,
                "stopped": stopped,
            }
        )
    return out


def pair_samples(prompts: list[Prompt], old: list[dict], new: list[dict]) -> list[dict[str, Any]]:
    """The report's list: each prompt with both models' samples."""
    return [
        {"kind": p.kind, "domain": p.domain, "prompt": p.text, "old": o, "new": n}
        for p, o, n in zip(prompts, old, new, strict=True)
    ]
