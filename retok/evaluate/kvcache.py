"""The KV-cache primitives every decoding measurement shares (eval-speed's timing, the tasks' choices, the
samples): which keyword a model takes its cache by, the cache a forward pass returns, a prefill and one greedy
step."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_kwarg(model: Any) -> str:
    # transformers 5.2x renames the KV-cache argument from past_key_values to cache; use what the model takes.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def prefill(model: Any, prompt: torch.Tensor) -> tuple[Any, int]:
    # logits_to_keep=1: generation only needs the last position's logits, not the prompt's whole vocab matrix.
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    return cache_of(out), int(out.logits[0, -1].argmax())


def step(model: Any, token: torch.Tensor, cache: Any, kwarg: str) -> tuple[Any, int]:
    out = model(input_ids=token, use_cache=True, **{kwarg: cache})
    # int(argmax) each step: real decoding reads every choice back to the host (stop criteria, streaming).
    return cache_of(out), int(out.logits[0, -1].argmax())
