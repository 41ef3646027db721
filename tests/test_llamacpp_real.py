"""retok's GGUF vocabularies in a real llama.cpp, for four real tokenizer families: each original vocabulary
(llama.cpp's own vocabulary GGUFs: GPT-2, Llama-3, Qwen2 byte-level BPE and Llama-2 SentencePiece with byte
fallback) is extended with Chinese tokens by retok, written to GGUF by retok, and llama.cpp's own tokenizer must
give exactly the ids llama.cpp's reference gives for the original vocabulary and transformers gives for the
extended one: on llama.cpp's tokenizer test strings and on held-out Chinese."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from retok.core.sources import read_gguf_metadata
from retok.export.gguf_out import write_gguf
from retok.tokenizer.extend import TrainingText, extend_tokenizer
from tests.tiny import save_model_folder, tiny_llama

pytestmark = [pytest.mark.real, pytest.mark.llamacpp]


def _hf_tokenizer(gguf: Path) -> PreTrainedTokenizerFast:
    """The original tokenizer from llama.cpp's vocabulary GGUF, through transformers' GGUF conversion. Llama-3's
    own tokenizer.json matches whole words before merging (ignore_merges), which that conversion leaves out."""
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if read_gguf_metadata(gguf).get("tokenizer.ggml.pre") == "llama-bpe":
        data = json.loads(tok.backend_tokenizer.to_str())
        data["model"]["ignore_merges"] = True
        tok = _fast(Tokenizer.from_str(json.dumps(data)), tok)
    return tok


def _fast(backend: Tokenizer, like: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    specials = {k: getattr(like, k) for k in ("bos_token", "eos_token", "unk_token") if getattr(like, k)}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def _gguf_of(tok: PreTrainedTokenizerFast, pre: str | None, d: Path) -> Path:
    """retok's GGUF of a tiny Llama with this vocabulary (llama-tokenize reads the vocabulary only)."""
    folder = save_model_folder(tiny_llama(tok, tied=True), tok, d)
    conf = json.loads((folder / "config.json").read_text())
    out = d / "m.gguf"
    write_gguf(folder, out, ftype="f32", tok=tok, conf=conf, pre=pre, name=d.name, progress=False)
    return out


@pytest.mark.parametrize("vocab", ["gpt-2", "llama-bpe", "qwen2", "llama-spm"])
def test_llamacpp_tokenizes_retok_vocabularies_like_transformers(vocab, assets, tmp_path):
    assets.need_llamacpp()
    gguf, zh_train, zh_eval = assets.vocab(vocab), assets.corpus("zh", "train"), assets.corpus("zh", "eval")
    inp, out_ref = gguf.with_name(gguf.name + ".inp"), gguf.with_name(gguf.name + ".out")
    assets.need(gguf, inp, out_ref, zh_train, zh_eval)
    import llamacpp_tools

    pre = read_gguf_metadata(gguf).get("tokenizer.ggml.pre")
    cases = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ref = [[int(i) for i in line.split()] for line in out_ref.read_text(encoding="utf-8").split("\n")]
    assert len(cases) > 30 and len(ref) >= len(cases)

    # 1. The ORIGINAL vocabulary written by retok tokenizes llama.cpp's test strings exactly as llama.cpp's own
    #    reference output says (token list, types, merges or scores, flags all as llama.cpp expects).
    old = _hf_tokenizer(gguf)
    old_gguf = _gguf_of(old, pre, tmp_path / "old")
    # llama-tokenize itself on one string, then llama_tokenize (the same call) on all of them in one process.
    assert llamacpp_tools.tokenize(old_gguf, cases[-1]) == ref[len(cases) - 1]
    got_all = llamacpp_tools.tokenize_many(old_gguf, cases)
    for text, got, want in zip(cases, got_all, ref, strict=False):
        assert got == want, (vocab, text[:60])

    # 2. The vocabulary EXTENDED by retok: llama.cpp gives transformers' ids on held-out Chinese and on every
    #    test string where transformers' conversion of the original agrees with llama.cpp to begin with.
    docs = [json.loads(line)["text"] for line in zh_train.read_text(encoding="utf-8").splitlines()[:120]]
    ext = extend_tokenizer(old.backend_tokenizer, [TrainingText("zh", docs)], new_tokens=300, progress=False)
    new = _fast(Tokenizer.from_str(ext.tokenizer.to_str()), old)
    new_gguf = _gguf_of(new, pre, tmp_path / "new")
    held_out = json.loads(zh_eval.read_text(encoding="utf-8").splitlines()[0])["text"][:1500]
    agreeing = [
        t for t, r in zip(cases, ref, strict=False) if old(t, add_special_tokens=False).input_ids == r
    ]
    assert len(agreeing) >= len(cases) - 15
    used_new = False
    texts = [*agreeing, held_out]
    for text, got in zip(texts, llamacpp_tools.tokenize_many(new_gguf, texts), strict=True):
        want = new(text, add_special_tokens=False).input_ids
        assert got == want, (vocab, text[:60])
        used_new |= any(i in ext.new_ids for i in want)
    assert used_new  # the Chinese tokens retok added are the ones both sides chose
