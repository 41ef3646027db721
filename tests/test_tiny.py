"""The tiny fixtures are what every other test trusts: check they look like the real families."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny import SAMPLE_TEXT, byte_level_tokenizer, sentencepiece_tokenizer

CHAT = [{"role": "user", "content": "hi 中文"}, {"role": "assistant", "content": "ok"}]


def test_builders_are_deterministic():
    assert (
        byte_level_tokenizer().backend_tokenizer.to_str() == byte_level_tokenizer().backend_tokenizer.to_str()
    )
    assert (
        sentencepiece_tokenizer().backend_tokenizer.to_str()
        == sentencepiece_tokenizer().backend_tokenizer.to_str()
    )
    assert len(byte_level_tokenizer(extra_text="extra text " * 50)) == 512


def test_byte_level_tokenizer_is_smollm2_shaped(bl_tokenizer):
    spec = json.loads(bl_tokenizer.backend_tokenizer.to_str())
    assert [t["type"] for t in spec["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert spec["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] is True
    assert spec["decoder"]["type"] == "ByteLevel"
    assert [spec["model"]["vocab"][s] for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]] == [0, 1, 2]
    assert [(t["id"], t["special"]) for t in spec["added_tokens"]] == [(0, True), (1, True), (2, True)]
    assert (bl_tokenizer.bos_token_id, bl_tokenizer.eos_token_id, bl_tokenizer.pad_token_id) == (1, 2, 2)
    assert 400 <= len(bl_tokenizer) <= 600
    # No BOS added; digits one by one; round trip.
    ids = bl_tokenizer.encode("2024")
    assert bl_tokenizer.convert_ids_to_tokens(ids) == ["2", "0", "2", "4"]
    assert bl_tokenizer.decode(bl_tokenizer.encode(SAMPLE_TEXT)) == SAMPLE_TEXT
    assert bl_tokenizer.decode(bl_tokenizer.encode("龘 🤗\x00")) == "龘 🤗\x00"


def test_sentencepiece_tokenizer_is_llama2_shaped(sp_tokenizer):
    spec = json.loads(sp_tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    assert spec["model"]["byte_fallback"] is True and spec["pre_tokenizer"] is None
    assert [vocab[s] for s in ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]] == [0, 1, 2, 3, 258]
    assert sum(t.startswith("▁") for t in vocab) > 50
    assert (sp_tokenizer.bos_token_id, sp_tokenizer.eos_token_id, sp_tokenizer.unk_token_id) == (1, 2, 0)
    assert sp_tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [579, 580]

    ids = sp_tokenizer.encode(SAMPLE_TEXT)
    assert ids[0] == 1 and ids.count(1) == 1  # BOS added once by the post-processor
    assert sp_tokenizer.decode(ids, skip_special_tokens=True) == SAMPLE_TEXT
    # 龘 is not in the vocabulary: its three UTF-8 bytes go through byte fallback; "\n" has no piece.
    tokens = sp_tokenizer.convert_ids_to_tokens(sp_tokenizer.encode("龘\n", add_special_tokens=False))
    assert tokens == ["▁", "<0xE9>", "<0xBE>", "<0x98>", "<0x0A>"]
    assert sp_tokenizer.decode(sp_tokenizer.encode("a 龘\nb"), skip_special_tokens=True) == "a 龘\nb"


@pytest.mark.parametrize(
    "kind, family",
    [
        ("llama_tied", "byte_level"),
        ("llama_untied", "sentencepiece"),
        ("qwen2", "byte_level"),
        ("gemma", "sentencepiece"),
    ],
)
def test_model_folder_loads_and_generates(make_model_dir, kind, family):
    path = make_model_dir(kind, family, sharded=True)
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    assert (path / "generation_config.json").exists() and (path / "chat_template.jinja").exists()

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    rows = model.get_input_embeddings().weight.shape[0]
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == (kind in ("llama_tied", "gemma")) == model.config.tie_word_embeddings
    if kind == "qwen2":
        assert rows == len(tok) + 37
    else:
        assert rows == len(tok)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tok.eos_token_id
    assert model.config.bos_token_id == tok.bos_token_id

    # Every special token is a single id, in text and through the chat template.
    for special in tok.all_special_tokens:
        assert tok.encode(special, add_special_tokens=False) == [tok.convert_tokens_to_ids(special)]
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    turn = ["<|im_start|>", "<|im_end|>"] if family == "byte_level" else ["<start_of_turn>", "<end_of_turn>"]
    start, end = tok.convert_tokens_to_ids(turn)
    assert rendered.count(start) == 3 and rendered.count(end) == 2
    if family == "sentencepiece":
        assert rendered[0] == tok.bos_token_id and rendered.count(tok.bos_token_id) == 1

    enc = tok("hello 中文", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, enc.input_ids.shape[1] + 4)
    assert int(out.max()) < rows


def test_unsharded_folder(make_model_dir):
    path = make_model_dir("llama_untied", "byte_level")
    assert (path / "model.safetensors").exists() and not (path / "model.safetensors.index.json").exists()
