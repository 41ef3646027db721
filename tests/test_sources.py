"""Model sources: folders, pickles refused, GGUF conversion (real model), tokenizer fixes from GGUF metadata."""

from __future__ import annotations

import json

import pytest

from retok.core.config import ModelConfig
from retok.core.errors import RetokError
from retok.core.sources import check_model_folder, fix_gguf_tokenizer, load_model, resolve_model
from tests.tiny import byte_level_tokenizer


def test_pickled_checkpoints_are_refused_unless_allowed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(RetokError, match="only pickled weights"):
        check_model_folder(tmp_path, allow_pickle=False)
    check_model_folder(tmp_path, allow_pickle=True)


def test_missing_paths_and_not_a_model(tmp_path):
    with pytest.raises(RetokError, match="not found"):
        resolve_model(ModelConfig(path=str(tmp_path / "nothing")), tmp_path)
    with pytest.raises(RetokError, match="GGUF file .* not found"):
        resolve_model(ModelConfig(path=str(tmp_path / "x.gguf")), tmp_path)
    with pytest.raises(RetokError, match="has no config.json"):
        resolve_model(ModelConfig(path=str(tmp_path)), tmp_path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not gguf" * 10)
    with pytest.raises(RetokError, match="not a readable GGUF file"):
        resolve_model(ModelConfig(path=str(bad)), tmp_path / "cache")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(RetokError, match="not a causal language model"):
        load_model(tmp_path, device="cpu")
    # bert has a causal-LM class (BertLMHeadModel), but a folder saved as BertModel is an encoder
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(bert)
    with pytest.raises(RetokError, match="'bert' model saved as BertModel, not a causal language model"):
        load_model(bert, device="cpu")


def test_gguf_metadata_fixes_tokenizer():
    tok = byte_level_tokenizer()
    tok.model_max_length = int(1e30)
    tok.eos_token = "<|endoftext|>"
    meta = {
        "general.architecture": "llama",
        "llama.context_length": 8192,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.pre": "smollm",
    }
    changes = fix_gguf_tokenizer(tok, meta)
    assert tok.model_max_length == 8192
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert "eos=<|im_end|>" in changes


@pytest.mark.real
def test_real_smollm2_gguf_converts_and_says_paris(assets):
    gguf = assets.gguf
    assets.need(gguf)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(ModelConfig(path=str(gguf)))
    assert (folder / "model.safetensors").is_file()
    assert resolve_model(ModelConfig(path=str(gguf))) == folder  # cached, not converted again
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.tie_word_embeddings is True
    assert (
        tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and model.generation_config.eos_token_id == 2
    )
    assert tok.model_max_length == 8192
    assert tok("x").input_ids[0] != tok.bos_token_id  # the GGUF says add_bos = False
    assert tok("2024", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(c) for c in "2024"]
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_long_documents_do_not_warn_of_indexing_errors(tmp_path):
    """retok windows long documents itself: loading a tokenizer silences transformers' "longer than the maximum
    sequence length ... will result in indexing errors" warning, without changing what the folder says."""
    import logging

    from retok.core.sources import load_tokenizer

    tok = byte_level_tokenizer()
    tok.model_max_length = 16
    tok.save_pretrained(tmp_path)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("transformers.tokenization_utils_base")
    log.addHandler(handler)
    try:
        plain = byte_level_tokenizer()
        plain.model_max_length = 16
        plain("a long document " * 20)  # transformers' own tokenizer warns: the check can see it
        assert any("indexing errors" in m for m in seen)
        seen.clear()
        loaded = load_tokenizer(tmp_path)
        assert len(loaded("a long document " * 20)["input_ids"]) > 16
    finally:
        log.removeHandler(handler)
    assert not any("indexing errors" in m for m in seen)
    assert loaded.model_max_length == 16
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["model_max_length"] == 16
