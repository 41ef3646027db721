"""The alignment of old and new positions, and the shared-body teacher.

- extend mode: every boundary of the new segmentation is one of the old (both families, partial UTF-8
  pieces, special tokens in the text); train mode: only some are, the rest are reported unmatched;
- the teacher (this body + the old embedding and head) gives the same states and logits as the original model
  loaded on its own, for a tied Llama and for Gemma (scaled embedding, soft-capped logits).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from retok.core.errors import RetokError
from retok.teacher.alignment import ByteLengths, align, align_ends
from retok.teacher.body import Teacher, body_forward
from retok.tokenizer.extend import TrainingText, extend_tokenizer
from tests.tiny import SAMPLE_TEXT, byte_level_tokenizer, sentencepiece_tokenizer, tiny_gemma, tiny_llama

ZH = (
    "机器学习是人工智能的一个分支。语言模型把文本切分成词元，再预测下一个词元。分词器的压缩率越高，解码越快。"
)
TEXTS = [
    ZH * 2,
    SAMPLE_TEXT[:600],
    "龘龘 rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 🙂 "
    + ZH,  # characters the tiny tokenizers never saw: partial UTF-8 / byte fallback
    "<|im_start|>user\n机器学习<|im_end|>\n",  # special tokens inside the text
]


def _extended(old: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    ext = extend_tokenizer(
        old.backend_tokenizer, [TrainingText("zh", [ZH * 20, SAMPLE_TEXT])], new_tokens=60, progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(ext.tokenizer.to_str()),
        bos_token=old.bos_token,
        eos_token=old.eos_token,
        unk_token=old.unk_token,
    )


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece"])
def test_extend_mode_every_new_boundary_is_an_old_one(family):
    old = byte_level_tokenizer() if family == "byte_level" else sentencepiece_tokenizer()
    new = _extended(old)
    lo, ln = ByteLengths(old), ByteLengths(new)
    merged = 0
    for text in TEXTS:
        o = old(text, add_special_tokens=False)["input_ids"]
        n = new(text, add_special_tokens=False)["input_ids"]
        a = align(lo, ln, o, n)
        assert a.coverage == 1.0, text
        # the matched old position ends exactly where the new one does
        assert np.array_equal(lo.ends(o)[a.teacher], ln.ends(n))
        merged += len(o) - len(n)
    assert merged > 10  # the new tokenizer does merge: the alignment is not the identity


def test_partial_utf8_pieces_are_aligned_by_bytes():
    old = byte_level_tokenizer()
    text = "龘" + ZH
    o = old(text, add_special_tokens=False, return_offsets_mapping=True)
    assert o["offset_mapping"][0] == o["offset_mapping"][1]  # two tokens inside one character
    ends = ByteLengths(old).ends(o["input_ids"])
    assert ends[0] < 3 and 3 in set(ends.tolist())  # a byte end inside the character, then its end


def test_train_mode_aligns_only_common_boundaries():
    old = byte_level_tokenizer()
    other = byte_level_tokenizer(extra_text="the thermometer then there theory " * 40, vocab_size=700)
    text = SAMPLE_TEXT[:800]
    o = old(text, add_special_tokens=False)["input_ids"]
    n = other(text, add_special_tokens=False)["input_ids"]
    lo, ln = ByteLengths(old), ByteLengths(other)
    a = align(lo, ln, o, n)
    assert 0.3 < a.coverage < 1.0
    ok = a.matched
    assert np.array_equal(lo.ends(o)[a.teacher[ok]], ln.ends(n)[ok])
    assert not np.isin(ln.ends(n)[~ok], lo.ends(o)).any()  # unmatched ends really are not old ends


def test_texts_of_different_bytes_cannot_be_aligned():
    old = byte_level_tokenizer()
    lo = ByteLengths(old)
    with pytest.raises(RetokError, match="cannot be aligned"):
        align(
            lo,
            lo,
            old("abc", add_special_tokens=False)["input_ids"],
            old("abcd", add_special_tokens=False)["input_ids"],
        )
    assert align_ends(np.array([2, 5, 9]), np.array([5, 7, 9])).teacher.tolist() == [1, -1, 2]


@pytest.mark.parametrize("kind", ["llama_tied", "gemma"])
def test_shared_body_teacher_equals_the_original_model(kind):
    tok = byte_level_tokenizer() if kind == "llama_tied" else sentencepiece_tokenizer()
    original = tiny_llama(tok, tied=True) if kind == "llama_tied" else tiny_gemma(tok)
    original.eval()
    old_embed = original.get_input_embeddings().weight.detach().clone()
    # the new model: the same body, a bigger embedding with other rows
    new = tiny_llama(tok, tied=True) if kind == "llama_tied" else tiny_gemma(tok)
    new.load_state_dict(original.state_dict())
    new.resize_token_embeddings(len(tok) + 64, mean_resizing=False)
    with torch.no_grad():
        new.get_input_embeddings().weight.normal_()
    new.eval()
    ids = torch.tensor([tok(ZH + SAMPLE_TEXT[:200], add_special_tokens=False)["input_ids"][:80]])
    teacher = Teacher(new, old_embed, old_embed)
    got = teacher.forward(ids, layers=(1, 2))
    with torch.no_grad():
        want = original(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(
        got.last, want.hidden_states[-1] if kind == "gemma" else original.model(ids).last_hidden_state
    )
    torch.testing.assert_close(got.layers[1], want.hidden_states[1])
    torch.testing.assert_close(teacher.logits(got.last), want.logits, rtol=1e-4, atol=1e-4)
    # and the student (new rows) differs: the teacher did not simply run the new embedding
    assert not torch.allclose(body_forward(new, ids).last, got.last)


def test_a_forward_stopped_after_a_layer_gives_that_layer_and_grads():
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, tied=True).eval()
    ids = torch.tensor([tok(ZH, add_special_tokens=False)["input_ids"][:40]])
    full = body_forward(model, ids, layers=(1, 2))
    w = model.get_input_embeddings().weight.detach().clone().requires_grad_(True)
    part = body_forward(model, ids, layers=(1,), embed_weight=w, last=False)
    assert part.last is None and set(part.layers) == {1}
    torch.testing.assert_close(part.layers[1], full.layers[1])
    part.layers[1].pow(2).mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
