"""Run the llama.cpp that scripts/build_llamacpp.py built, and score the same thing through transformers, so the
two can be compared: tokenization, greedy ids, perplexity -> bits per byte, decoding speed.

Used by tests/test_e2e_real.py (llama.cpp tests) and scripts/bench_llamacpp.py.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_llamacpp import find_bin  # noqa: E402


def _bin(name: str) -> Path:
    d = find_bin()
    if d is None:
        raise RuntimeError("llama.cpp is not built; run `python scripts/build_llamacpp.py`")
    return d / name


def _text_file(text: str, d: Path, name: str) -> Path:
    p = d / name
    p.write_bytes(text.encode("utf-8"))
    return p


def _run(cmd: Sequence[str | Path], timeout: int = 1800) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed ({p.returncode}): {p.stderr[-1500:]}")
    return p


def tokenize(gguf: Path, text: str) -> list[int]:
    """llama.cpp's own tokenizer (llama-tokenize): the text's ids, no BOS, special tokens not parsed."""
    with tempfile.TemporaryDirectory() as d:
        f = _text_file(text, Path(d), "text.txt")
        p = _run([_bin("llama-tokenize"), "-m", gguf, "-f", f, "--ids", "--no-bos", "--log-disable"])
    line = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("[")][-1]
    return list(ast.literal_eval(line))


def tokenize_many(gguf: Path, texts: Sequence[str]) -> list[list[int]]:
    """llama.cpp's tokenizer (llama_tokenize, as llama-tokenize) on many texts in one process (retok-llama
    --tokenize loads the vocabulary once): no BOS, special tokens not parsed."""
    if any("\0" in t for t in texts):
        raise ValueError("texts must not contain NUL (the separator)")
    with tempfile.TemporaryDirectory() as d:
        f = _text_file("\0".join(texts), Path(d), "texts.txt")
        p = _run([_bin("retok-llama"), "-m", gguf, "-f", f, "--tokenize"])
    out = json.loads(p.stdout.strip().splitlines()[-1])["tokens"]
    if len(out) != len(texts):
        raise RuntimeError(f"retok-llama --tokenize gave {len(out)} results for {len(texts)} texts")
    return out


def decode(
    gguf: Path, prompt: str, *, n: int = 32, reference: str | None = None, threads: int = 2
) -> dict[str, Any]:
    """retok-llama: greedy ids of ``n`` new tokens, or (``reference``) the time to feed that text token by
    token after the prompt. Returns its JSON (prompt_ids, ids, prompt_s, decode_s, decode_calls)."""
    with tempfile.TemporaryDirectory() as d:
        cmd: list[Any] = [_bin("retok-llama"), "-m", gguf, "-f", _text_file(prompt, Path(d), "prompt.txt")]
        cmd += ["-t", str(threads)]
        cmd += ["-r", _text_file(reference, Path(d), "ref.txt")] if reference is not None else ["-n", str(n)]
        p = _run(cmd)
    return json.loads(p.stdout.strip().splitlines()[-1])


def perplexity(gguf: Path, text: str, n_ctx: int, threads: int = 2) -> float:
    """llama-perplexity's estimate over chunks of ``n_ctx`` tokens (the second half of each scored), computed by
    retok-llama --perplexity through llama.cpp's C API the way llama-perplexity does it. llama-perplexity itself
    prints from a logger thread that a busy machine can cut off before its last lines (seen: its final estimate
    missing in 3 runs of 3); retok-llama prints its one JSON line itself."""
    with tempfile.TemporaryDirectory() as d:
        f = _text_file(text, Path(d), "text.txt")
        p = _run(
            [_bin("retok-llama"), "-m", gguf, "-f", f, "--perplexity", n_ctx, "-t", threads], timeout=3600
        )
    return float(json.loads(p.stdout.strip().splitlines()[-1])["ppl"])


def scored_tokens(n_tokens: int, n_ctx: int) -> list[int]:
    """Positions llama-perplexity scores: in each whole chunk of n_ctx tokens, those after its first half."""
    first = n_ctx // 2
    return [c * n_ctx + j for c in range(n_tokens // n_ctx) for j in range(first + 1, n_ctx)]


def bpb_from_ppl(ppl: float, ids: Sequence[int], n_ctx: int, token_bytes: dict[int, bytes]) -> float:
    """Bits per byte from llama-perplexity's PPL: total nats over the scored tokens / their bytes. ``ids``: the
    token stream llama-perplexity cuts into chunks, which starts with BOS where the vocabulary adds one."""
    pos = scored_tokens(len(ids), n_ctx)
    n_bytes = sum(len(token_bytes[ids[p]]) for p in pos)
    return math.log(ppl) * len(pos) / (math.log(2) * n_bytes)


def transformers_bpb(
    model: Any, ids: Sequence[int], n_ctx: int, token_bytes: dict[int, bytes], bos: int | None
) -> float:
    """The same chunks scored by a transformers model (BOS in place of each chunk's first token when the
    tokenizer adds one, as llama-perplexity does)."""
    import torch

    first = n_ctx // 2
    nats, n_bytes = 0.0, 0
    for c in range(len(ids) // n_ctx):
        chunk = list(ids[c * n_ctx : (c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double()
        logp = torch.log_softmax(logits[first : n_ctx - 1], dim=-1)
        target = torch.tensor(chunk[first + 1 : n_ctx])
        nats -= logp.gather(1, target[:, None]).sum().item()
        n_bytes += sum(len(token_bytes[t]) for t in ids[c * n_ctx + first + 1 : (c + 1) * n_ctx])
    return nats / (math.log(2) * n_bytes)


def transformers_greedy(model: Any, prompt_ids: Sequence[int], n: int) -> list[int]:
    """n argmax tokens after the prompt (end-of-text does not stop it, as in retok-llama)."""
    import torch

    # the KV-cache argument's name differs between transformers versions
    from retok.evaluate.kvcache import cache_kwarg, cache_of

    kwarg = cache_kwarg(model)
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([list(prompt_ids)]), use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            if len(out) < n:
                res = model(torch.tensor([[nxt]]), use_cache=True, **{kwarg: cache_of(res)})
    return out
