"""retok's GGUF of the families beyond Llama/Mistral/Qwen2 in the real llama.cpp (scripts/build_llamacpp.py):
tiny Qwen3 (q/k norms, head_dim != hidden / heads), Gemma-3 (norms stored + 1, sliding-window layers,
embedding scale, tied head, SentencePiece vocabulary with BOS) and Gemma-2 (the same with logit soft-capping) models, written by retok, must give in llama.cpp
the tokens transformers gives, the same greedy ids, and perplexity within 1% of transformers' on the same chunks."""

from __future__ import annotations

import pytest

from retok.core.metrics import bos_id
from retok.core.tokens import token_bytes_table
from tests.test_gguf import _folder, _write
from tests.tiny import SAMPLE_TEXT

pytestmark = [pytest.mark.real, pytest.mark.llamacpp]

PROMPT = "The quick brown fox jumps over the lazy dog. Tokenizers turn text into tokens"


@pytest.fixture(scope="module")
def tools(assets):
    import sys

    assets.need_llamacpp()
    sys.path.insert(0, "scripts")
    import llamacpp_tools

    return llamacpp_tools


@pytest.mark.parametrize(
    ("kind", "family"), [("qwen3", "byte_level"), ("gemma3", "sentencepiece"), ("gemma2", "sentencepiece")]
)
def test_llamacpp_runs_the_family_as_transformers_does(tools, tmp_path, kind, family):
    folder, tok, model = _folder(tmp_path, kind, family)
    model.eval()
    gguf = _write(folder, tok)
    text = (SAMPLE_TEXT * 3)[:2400]
    ids = tok(text, add_special_tokens=False).input_ids
    assert tools.tokenize(gguf, text) == ids

    got = tools.decode(gguf, PROMPT, n=16)
    prompt_ids = tok(PROMPT).input_ids  # with BOS where the tokenizer adds it (the Gemma-like one does)
    assert got["prompt_ids"] == prompt_ids
    assert got["ids"] == tools.transformers_greedy(model, prompt_ids, 16)

    n_ctx = 64
    bos = bos_id(tok)
    ids = ([bos] if bos is not None else []) + ids  # llama-perplexity's chunks start after its BOS
    assert len(ids) >= 4 * n_ctx
    table = token_bytes_table(tok.backend_tokenizer)
    llama_bpb = tools.bpb_from_ppl(tools.perplexity(gguf, text, n_ctx), ids, n_ctx, table)
    hf_bpb = tools.transformers_bpb(model, ids, n_ctx, table, bos=bos)
    assert abs(llama_bpb / hf_bpb - 1) < 0.001, (llama_bpb, hf_bpb)
