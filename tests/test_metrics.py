"""Bits per byte, the number every claim rests on, checked against hand computations.

- the windows score every token exactly once, with the context they promise, BOS or not;
- with the whole document in one window, BPB is total NLL / (ln 2 x bytes scored), computed here by hand;
- a context-free (bigram) model gives the same BPB whatever the window: no token scored twice or missed;
- a first token that is half a Chinese character is context, and the bytes counted start after the character;
- a tokenizer that adds BOS (SentencePiece family, Gemma-style) gets BOS in front of every window, uncounted;
- two tokenizers compared score exactly the same bytes.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from retok.core.metrics import (
    bits_per_byte,
    bos_id,
    clean_boundaries,
    encode_docs,
    score_starts,
    score_windows,
)
from tests.tiny import SAMPLE_TEXT, byte_level_tokenizer, sentencepiece_tokenizer, tiny_gemma, tiny_llama

EN = SAMPLE_TEXT[:400]
ZH = "机器学习是人工智能的一个分支。语言模型把文本切分成词元，再预测下一个词元。"


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize(
    ("n", "window", "stride", "first"),
    [
        (1, 8, 4, 0),
        (2, 8, 4, 1),
        (50, 8, 3, 1),
        (50, 8, 100, 0),
        (50, 16, 5, 30),
        (7, 4, 1, 2),
        (300, 64, 32, 5),
    ],
)
def test_windows_score_each_token_once_with_context(n, window, stride, first, bos):
    wins = score_windows(n, window, stride, first, bos)
    scored = [k for start, end, m in wins for k in range(end - m, end)]
    expect_first = max(first, 0 if bos else 1)
    assert scored == list(range(expect_first, n))  # each once, in order
    for start, end, m in wins:
        assert (end - start) + int(bos) <= window  # BOS takes a place of the window
        # a scored token has its predecessor in the window; only token 0 may lean on BOS instead
        assert end - m >= start + 1 or (bos and start == 0 and end - m == 0)
    if n > window:  # tokens after the first window keep at least window - 1 - stride tokens of context
        start, end, m = wins[-1]
        assert end - start == window - int(bos)


def _manual_bpb(model, ids: list[int], first: int, n_bytes: int, bos: int | None) -> float:
    x = torch.tensor(([bos] if bos is not None else []) + ids)[None]
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    shift = 1 if bos is not None else 0
    # logits[p] predicts x[p+1]; doc token k sits at position k + shift and is predicted by position k+shift-1
    pred = logits[torch.arange(first, len(ids)) + shift - 1]
    nll = F.cross_entropy(pred, torch.tensor(ids[first:]), reduction="sum")
    return float(nll) / (math.log(2) * n_bytes)


def test_full_context_equals_total_nll_over_bytes():
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, tied=True).eval()
    assert bos_id(tok) is None  # SmolLM2-shaped: no BOS
    ((ids, offsets),) = encode_docs(tok, [EN])
    got = bits_per_byte(model, tok, [EN], window=4096, stride=4096)
    # without BOS the first token is context: the bytes scored are the text after it
    n_bytes = len(EN[offsets[0][1] :].encode())
    assert got["bytes"] == n_bytes and got["tokens"] == len(ids) - 1 and got["bos"] is False
    assert got["bpb"] == pytest.approx(_manual_bpb(model, ids, 1, n_bytes, None), rel=1e-5)


class Bigram(torch.nn.Module):
    """A model whose next-token distribution depends only on the current token: its NLL of a token does not
    depend on how much context a window gives, so any window must give the same total."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))
        self.inputs: list[list[int]] = []

    def forward(self, input_ids, logits_to_keep=0, **_):
        self.inputs.append(input_ids[0].tolist())
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece"])
def test_sliding_windows_equal_one_window_for_a_context_free_model(family):
    tok = byte_level_tokenizer() if family == "byte_level" else sentencepiece_tokenizer()
    docs = [EN, ZH * 3, "x"]
    model = Bigram(len(tok) + 8)
    whole = bits_per_byte(model, tok, docs, window=100_000, stride=100_000)
    for window, stride in ((16, 5), (9, 8), (32, 31)):
        model.inputs.clear()
        slid = bits_per_byte(model, tok, docs, window=window, stride=stride)
        assert slid["tokens"] == whole["tokens"] and slid["bytes"] == whole["bytes"]
        assert slid["nats"] == pytest.approx(whole["nats"], rel=1e-6)
        assert max(len(x) for x in model.inputs) <= window


def test_a_first_token_that_is_half_a_character():
    tok = byte_level_tokenizer()
    doc = "龘" + ZH  # a character the tiny tokenizer never saw: its 3 bytes are separate byte tokens
    ((ids, offsets),) = encode_docs(tok, [doc])
    assert offsets[0] == offsets[1] == (0, 1)  # two tokens share the character's span
    assert 1 in clean_boundaries(offsets, len(doc)) and 0 < len(doc.encode()) - len(doc[1:].encode())
    model = tiny_llama(tok, tied=True).eval()
    got = bits_per_byte(model, tok, [doc], window=4096, stride=4096)
    first = next(k for k, (s, _) in enumerate(offsets) if s >= 1)  # the first token after the character
    n_bytes = len(doc[1:].encode())  # the 3 bytes of the character are not counted
    assert got["bytes"] == n_bytes and got["tokens"] == len(ids) - first
    assert got["bpb"] == pytest.approx(_manual_bpb(model, ids, first, n_bytes, None), rel=1e-5)


def test_bos_is_prepended_to_every_window_and_not_counted():
    tok = sentencepiece_tokenizer()  # Llama-2/Gemma-shaped: adds <s>
    bos = bos_id(tok)
    assert bos == tok.bos_token_id and bos is not None
    doc = EN
    ((ids, _),) = encode_docs(tok, [doc])
    model = tiny_gemma(tok).eval()
    got = bits_per_byte(model, tok, [doc], window=4096, stride=4096)
    # with BOS every token is scored, predicted from BOS for the first one, and every byte counts
    assert got["bos"] is True and got["tokens"] == len(ids) and got["bytes"] == len(doc.encode())
    assert got["bpb"] == pytest.approx(_manual_bpb(model, ids, 0, len(doc.encode()), bos), rel=1e-5)
    # sliding: every window starts with BOS
    stub = Bigram(len(tok) + 8)
    bits_per_byte(stub, tok, [doc], window=16, stride=7)
    assert len(stub.inputs) > 3 and all(x[0] == bos and bos not in x[1:] for x in stub.inputs)
    # and leaving BOS out is what inflated Gemma's BPB: it scores worse on the same bytes
    no_bos = _manual_bpb(model, ids, 1, len(doc[_first_end(tok, doc) :].encode()), None)
    assert no_bos != pytest.approx(got["bpb"], rel=1e-3)


def _first_end(tok, doc: str) -> int:
    return encode_docs(tok, [doc])[0][1][0][1]


def test_two_tokenizers_score_the_same_bytes():
    old = byte_level_tokenizer()
    new = byte_level_tokenizer(extra_text=ZH * 8, vocab_size=640)
    docs = [ZH * 2, EN, "龘" + ZH]
    starts = score_starts([old, new], docs)
    for doc, s in zip(docs, starts, strict=True):
        for t in (old, new):
            ((_, offsets),) = encode_docs(t, [doc])
            assert s in clean_boundaries(offsets, len(doc)) and s >= offsets[0][1]
    a = bits_per_byte(Bigram(len(old) + 8), old, docs, window=64, stride=32, starts=starts)
    b = bits_per_byte(Bigram(len(new) + 8), new, docs, window=64, stride=32, starts=starts)
    assert a["bytes"] == b["bytes"] == sum(len(d[s:].encode()) for d, s in zip(docs, starts, strict=True))
    doc = "The quick brown fox"
    ((_, offsets),) = encode_docs(old, [doc])
    s, e = next((s, e) for s, e in offsets if e - s >= 2)
    with pytest.raises(ValueError, match="not a token boundary"):
        bits_per_byte(Bigram(len(old) + 8), old, [doc], starts=[s + 1])


def test_per_token_costs_sum_to_the_total_and_sit_where_they_were_scored():
    tok = byte_level_tokenizer()
    model = Bigram(len(tok))
    docs = [EN, EN[:40]]
    got = bits_per_byte(model, tok, docs, window=16, stride=5, keep_tokens=True)
    assert len(got["token_nll"]) == 2
    assert sum(sum(v) for _, v in got["token_nll"]) == pytest.approx(got["nats"], rel=1e-4)
    # per token: the bigram's own NLL of that token after its predecessor
    (ids, _), _ = encode_docs(tok, docs)
    first, vals = got["token_nll"][0]
    assert first == 1 and len(vals) == len(ids) - 1  # no BOS: the first token is context
    logp = torch.log_softmax(model.table.detach(), -1)
    for k in (0, 7, len(vals) - 1):
        want = -float(logp[ids[first + k - 1], ids[first + k]])
        assert vals[k] == pytest.approx(want, abs=2e-5)


def test_new_token_costs_against_the_original_pieces_by_hand():
    """A new token's bits against the original's bits on the old pieces of the same bytes, summed per use."""
    from retok.teacher.alignment import new_token_costs

    old = byte_level_tokenizer()
    new = byte_level_tokenizer()
    new.add_tokens(["机器"])  # one new token over several old pieces
    text = "机器学习 机器"
    o_ids = old(text, add_special_tokens=False)["input_ids"]
    n_ids = new(text, add_special_tokens=False)["input_ids"]
    nid = new.convert_tokens_to_ids("机器")
    assert n_ids.count(nid) == 2 and len(o_ids) > len(n_ids)
    # every position scored (first index 0); the original pays 1 nat per piece, the new model 2 nats a token
    old_nll = [[0, [1.0] * len(o_ids)]]
    new_nll = [[0, [2.0] * len(n_ids)]]
    c = new_token_costs(old, new, [text], old_nll, new_nll, {nid})
    pieces = len(old("机器", add_special_tokens=False)["input_ids"])
    ln2 = math.log(2)
    assert (c["uses"], c["aligned"]) == (2, 2)
    assert c["bits_new"] == pytest.approx(2 * 2.0 / ln2)
    assert c["bits_original"] == pytest.approx(2 * pieces * 1.0 / ln2)
    assert c["bits_change"] == pytest.approx(c["bits_new"] - c["bits_original"])
    # a use whose pieces the original did not score (before its scoring start) is counted but not compared
    late = new_token_costs(old, new, [text], [[pieces, [1.0] * (len(o_ids) - pieces)]], new_nll, {nid})
    assert (late["uses"], late["aligned"]) == (2, 1)
