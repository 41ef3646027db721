"""scripts/llamacpp_tools.py without llama.cpp: the positions llama-perplexity scores, the PPL -> bits-per-byte
conversion against transformers' scoring of the same chunks, and greedy decoding through the KV cache."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import llamacpp_tools as lt  # noqa: E402

from retok.core.tokens import token_bytes_table  # noqa: E402
from tests.tiny import byte_level_tokenizer, tiny_llama  # noqa: E402


def test_scored_tokens_are_the_second_half_of_whole_chunks():
    # llama-perplexity: chunks of n_ctx tokens, logits from n_ctx/2 on predict the tokens after them.
    assert lt.scored_tokens(10, 4) == [3, 7]  # 2 whole chunks; the last 2 tokens are not scored
    assert lt.scored_tokens(16, 8) == [5, 6, 7, 13, 14, 15]
    assert lt.scored_tokens(7, 8) == []


def test_bits_per_byte_from_perplexity_matches_scoring_the_same_chunks():
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, tied=False)
    ids = tok("the tokenizer splits text into tokens and the model predicts the next one " * 6).input_ids
    table = token_bytes_table(tok.backend_tokenizer)
    n_ctx = 16
    want = lt.transformers_bpb(model, ids, n_ctx, table, bos=None)
    # The PPL llama-perplexity would print for these chunks: exp(mean nats over the scored tokens).
    pos = lt.scored_tokens(len(ids), n_ctx)
    nats = want * math.log(2) * sum(len(table[ids[p]]) for p in pos)
    ppl = math.exp(nats / len(pos))
    assert abs(lt.bpb_from_ppl(ppl, ids, n_ctx, table) - want) < 1e-9
    assert 0 < want < 20


def test_greedy_through_the_cache_equals_full_recomputation():
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, tied=True)
    ids = tok("hello world").input_ids
    full = list(ids)
    with torch.no_grad():
        for _ in range(8):
            full.append(int(model(torch.tensor([full])).logits[0, -1].argmax()))
    assert lt.transformers_greedy(model, ids, 8) == full[len(ids) :]
