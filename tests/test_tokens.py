"""retok.core.tokens: token <-> raw bytes for byte-level and SentencePiece-style BPE."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from retok.core.errors import RetokError
from retok.core.tokens import (
    BYTE_TO_UNICODE,
    UNICODE_TO_BYTE,
    UnencodableError,
    added_tokens,
    bytes_to_symbols,
    detect_family,
    old_pieces,
    token_bytes_table,
    token_to_bytes,
    vocab_bytes,
)

ZH = "中".encode()  # b"\xe4\xb8\xad", GPT-2 alphabet "ä¸Ń"
NASTY = [
    b"hello world",
    b" the",
    b"  \n\n\t  x",
    "机器学习是人工智能的一个分支".encode(),
    "龘".encode(),  # absent from both tiny vocabularies
    "🤗 emoji 👍🏽".encode(),
    "naïve café — “quotes”".encode(),
    b"<|im_end|><s></s><unk>",  # spells special tokens: must not come back as them
    b"\x00\x01\xff\xfe",
    ZH[:2],
    ZH[1:],
    "中".encode() + ZH[:1],
    b"12345 3.14",
    "a▁b ▁".encode(),  # a literal "▁" must not read back as a space
]


def _hand_byte_level(ignore_merges: bool = False) -> Tokenizer:
    """Byte-level BPE with a known vocabulary: the 256 alphabet chars, then 'ä¸' (first two bytes of 中),
    'ä¸Ń' (中), 'Ġh', 'Ġhi', and a special token inside the model vocab at the end."""
    alphabet = [BYTE_TO_UNICODE[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for t in ["ä¸", "ä¸Ń", "Ġh", "Ġhi", "<|end|>"]:
        vocab[t] = len(vocab)
    merges = [("ä", "¸"), ("ä¸", "Ń"), ("Ġ", "h"), ("Ġh", "i")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|end|>", special=True)])
    tok.add_tokens([AddedToken("<think>", special=False)])
    return tok


# ---------------------------------------------------------------------------------------------------------
# The byte alphabet and single tokens
# ---------------------------------------------------------------------------------------------------------


def test_byte_alphabet_is_gpt2s():
    assert len(BYTE_TO_UNICODE) == 256 and len(UNICODE_TO_BYTE) == 256
    assert set(BYTE_TO_UNICODE.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ"
    assert BYTE_TO_UNICODE[ord("\n")] == "Ċ"
    assert BYTE_TO_UNICODE[ord("\t")] == "ĉ"
    assert BYTE_TO_UNICODE[0] == "Ā"
    assert BYTE_TO_UNICODE[0xAD] == "Ń"
    assert BYTE_TO_UNICODE[ord("a")] == "a"
    assert "".join(BYTE_TO_UNICODE[b] for b in ZH) == "ä¸Ń"


def test_token_to_bytes_byte_level():
    assert token_to_bytes("byte_level", "Ġhello") == b" hello"
    assert token_to_bytes("byte_level", "ĊĊ") == b"\n\n"
    assert token_to_bytes("byte_level", "ä¸Ń") == ZH
    # Partial UTF-8: the first two bytes of 中 (decode() would give U+FFFD).
    assert token_to_bytes("byte_level", "ä¸") == b"\xe4\xb8"
    assert token_to_bytes("byte_level", "Ń") == b"\xad"
    assert token_to_bytes("byte_level", "<|im_end|>") == b"<|im_end|>"
    with pytest.raises(RetokError, match="outside the byte-level alphabet"):
        token_to_bytes("byte_level", "中")


def test_token_to_bytes_sentencepiece():
    assert token_to_bytes("sentencepiece", "▁hello") == b" hello"
    assert token_to_bytes("sentencepiece", "▁▁") == b"  "
    assert token_to_bytes("sentencepiece", "<0x0A>") == b"\n"
    assert token_to_bytes("sentencepiece", "<0xE4>") == b"\xe4"
    assert token_to_bytes("sentencepiece", "<0xff>") == b"\xff"
    assert token_to_bytes("sentencepiece", "中文") == "中文".encode()
    # Only the exact byte-fallback form is a byte; anything else is text.
    assert token_to_bytes("sentencepiece", "<0xE4>x") == b"<0xE4>x"
    assert token_to_bytes("sentencepiece", "<0x4>") == b"<0x4>"


def test_bytes_to_symbols():
    assert bytes_to_symbols("byte_level", b" hi\n") == ["Ġ", "h", "i", "Ċ"]
    assert bytes_to_symbols("byte_level", ZH) == ["ä", "¸", "Ń"]
    assert bytes_to_symbols("sentencepiece", b"a b") == ["a", "▁", "b"]
    assert bytes_to_symbols("sentencepiece", ZH + b" x") == ["中", "▁", "x"]
    assert bytes_to_symbols("sentencepiece", "🤗".encode()) == ["🤗"]
    # Partial and invalid UTF-8 become byte symbols; valid characters around them survive.
    assert bytes_to_symbols("sentencepiece", ZH[:2] + b"a") == ["<0xE4>", "<0xB8>", "a"]
    assert bytes_to_symbols("sentencepiece", b"\xff" + ZH) == ["<0xFF>", "中"]
    assert bytes_to_symbols("sentencepiece", b"\xed\xa0\x80") == ["<0xED>", "<0xA0>", "<0x80>"]  # surrogate
    assert bytes_to_symbols("sentencepiece", b"\xc0\xaf") == ["<0xC0>", "<0xAF>"]  # overlong "/"
    # A literal "▁" is spelled by its bytes: as a symbol it would mean a space.
    assert bytes_to_symbols("sentencepiece", "▁ ".encode()) == ["<0xE2>", "<0x96>", "<0x81>", "▁"]


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece"])
def test_symbols_spell_the_bytes(family):
    rng = random.Random(0)
    for data in NASTY + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 24))) for _ in range(200)]:
        assert b"".join(token_to_bytes(family, s) for s in bytes_to_symbols(family, data)) == data


# ---------------------------------------------------------------------------------------------------------
# Family detection
# ---------------------------------------------------------------------------------------------------------


def test_detect_family_fixtures(bl_tokenizer, sp_tokenizer):
    assert detect_family(bl_tokenizer.backend_tokenizer) == "byte_level"  # ByteLevel inside a Sequence
    assert detect_family(sp_tokenizer.backend_tokenizer) == "sentencepiece"  # Prepend/Replace normaliser


def test_detect_family_variants():
    qwen_like = Tokenizer(models.BPE())
    qwen_like.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(r"\p{N}", behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    assert detect_family(qwen_like) == "byte_level"

    decoder_only = Tokenizer(models.BPE())
    decoder_only.decoder = decoders.ByteLevel()
    assert detect_family(decoder_only) == "byte_level"

    metaspace = Tokenizer(models.BPE(byte_fallback=True))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    assert detect_family(metaspace) == "sentencepiece"

    gemma_like = Tokenizer(models.BPE(byte_fallback=True))
    gemma_like.normalizer = normalizers.Replace(" ", "▁")
    assert detect_family(gemma_like) == "sentencepiece"


@pytest.mark.parametrize(
    "model, name",
    [
        (models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0), "Unigram"),
        (models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"), "WordPiece"),
        (models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"), "WordLevel"),
    ],
)
def test_detect_family_rejects_other_models(model, name):
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(RetokError, match=rf"model is {name}, not BPE.*byte-level.*SentencePiece"):
        detect_family(tok)


def test_detect_family_rejects_plain_bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(RetokError, match="without a ByteLevel"):
        detect_family(tok)


# ---------------------------------------------------------------------------------------------------------
# old_pieces
# ---------------------------------------------------------------------------------------------------------


def test_old_pieces_hand_byte_level_concrete():
    tok = _hand_byte_level()
    v = tok.get_vocab(with_added_tokens=False)
    assert old_pieces(tok, ZH) == [v["ä¸Ń"]]
    assert old_pieces(tok, ZH[:2]) == [v["ä¸"]]  # a partial-UTF-8 piece, by its bytes
    assert old_pieces(tok, ZH + ZH[:2]) == [v["ä¸Ń"], v["ä¸"]]
    assert old_pieces(tok, b" hi") == [v["Ġhi"]]
    assert old_pieces(tok, b"hi") == [v["h"], v["i"]]  # no prefix space gained
    assert old_pieces(tok, b"") == []
    # The non-special added token is matched on raw text by the full tokenizer, never by the model.
    assert old_pieces(tok, b"<think>") == [v[c] for c in "<think>"]


def test_old_pieces_never_returns_special_even_with_ignore_merges():
    tok = _hand_byte_level(ignore_merges=True)
    v = tok.get_vocab(with_added_tokens=False)
    # ignore_merges makes the model return whole vocabulary words, so "<|end|>" would be the special id.
    assert [t.value for t in tok.model.tokenize("<|end|>")] == ["<|end|>"]
    assert old_pieces(tok, b"<|end|>") == [v[c] for c in "<|end|>"]
    assert old_pieces(tok, b" hi") == [v["Ġhi"]]


def test_old_pieces_sentencepiece_concrete(sp_tokenizer):
    tok = sp_tokenizer.backend_tokenizer
    v = tok.get_vocab(with_added_tokens=False)
    byte_id = {b: v[f"<0x{b:02X}>"] for b in range(256)}
    assert byte_id[0] == 3 and byte_id[255] == 258
    assert old_pieces(tok, "中文".encode()) == [v["中文"]]
    assert old_pieces(tok, "龘".encode()) == [byte_id[0xE9], byte_id[0xBE], byte_id[0x98]]
    assert old_pieces(tok, ZH[:2]) == [byte_id[0xE4], byte_id[0xB8]]
    assert old_pieces(tok, b"\n") == [byte_id[0x0A]]
    assert old_pieces(tok, "▁".encode()) == [byte_id[0xE2], byte_id[0x96], byte_id[0x81]]
    assert old_pieces(tok, b" the") == [v["▁the"]]
    # No dummy "▁" prefix, no BOS: b"the" is not " the".
    pieces = old_pieces(tok, b"the")
    assert v["▁the"] not in pieces and 1 not in pieces
    assert b"".join(token_to_bytes("sentencepiece", tok.id_to_token(i)) for i in pieces) == b"the"
    # What the full tokenizer does instead, for contrast.
    assert sp_tokenizer.encode("the") == [1, v["▁the"]]


def test_old_pieces_byte_level_fixture_agrees_with_tokenizer_inside_a_word(bl_tokenizer):
    tok = bl_tokenizer.backend_tokenizer
    for word in ["the", " tokens", "机器学习", "\n\n", "    "]:
        assert old_pieces(tok, word.encode()) == bl_tokenizer.encode(word, add_special_tokens=False)


@pytest.mark.parametrize("fixture", ["bl_tokenizer", "sp_tokenizer"])
def test_old_pieces_always_reproduces_the_bytes(fixture, request):
    hf = request.getfixturevalue(fixture)
    tok = hf.backend_tokenizer
    family = detect_family(tok)
    specials = {i for i, (_, special) in added_tokens(tok).items() if special}
    rng = random.Random(1234)
    samples = NASTY + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    for data in samples:
        ids = old_pieces(tok, data, family)
        assert ids, data
        assert b"".join(token_to_bytes(family, tok.id_to_token(i)) for i in ids) == data
        assert not specials & set(ids), data
        first = token_to_bytes(family, tok.id_to_token(ids[0]))
        assert data.startswith(b" ") or not first.startswith(b" "), data  # no added prefix space


def test_old_pieces_unencodable():
    # SentencePiece-style without byte fallback and a character it has never seen.
    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1, "▁": 2}, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    assert old_pieces(tok, b"a a") == [1, 2, 1]
    with pytest.raises(UnencodableError, match="cannot spell"):
        old_pieces(tok, "a中".encode())
    with pytest.raises(UnencodableError, match="no byte-fallback token <0xE4>"):
        old_pieces(tok, ZH[:1])
    assert issubclass(UnencodableError, RetokError)


# ---------------------------------------------------------------------------------------------------------
# Whole-vocabulary tables
# ---------------------------------------------------------------------------------------------------------


def test_tables_hand_byte_level():
    tok = _hand_byte_level()
    v = tok.get_vocab(with_added_tokens=False)
    vb = vocab_bytes(tok)
    assert len(vb) == 261  # 256 alphabet + 5; <think> is only an added token
    assert vb[v["ä¸"]] == b"\xe4\xb8" and vb[v["Ġhi"]] == b" hi" and vb[v["Ġ"]] == b" "
    assert vb[v["<|end|>"]] == b"<|end|>"
    added = added_tokens(tok)
    assert added == {v["<|end|>"]: ("<|end|>", True), 261: ("<think>", False)}
    table = token_bytes_table(tok)
    assert v["<|end|>"] not in table  # special: mapped by role, never by bytes
    assert table[261] == b"<think>"
    assert len(table) == 261


def test_tables_fixtures(bl_tokenizer, sp_tokenizer):
    bl = bl_tokenizer.backend_tokenizer
    assert added_tokens(bl) == {
        0: ("<|endoftext|>", True),
        1: ("<|im_start|>", True),
        2: ("<|im_end|>", True),
    }
    vb = vocab_bytes(bl)
    assert len(vb) == len(bl_tokenizer) == 512
    assert vb[2] == b"<|im_end|>"
    assert sorted(vb[i] for i in range(3, 259)) == [bytes([b]) for b in range(256)]  # full alphabet
    table = token_bytes_table(bl)
    assert set(table) == set(range(3, 512))
    # Every token round-trips through the alphabet, partial UTF-8 ones included.
    partial = [b for b in table.values() if not _is_utf8(b)]
    assert len(partial) > 128
    for i, b in table.items():
        assert "".join(bytes_to_symbols("byte_level", b)) == bl.id_to_token(i)

    sp = sp_tokenizer.backend_tokenizer
    assert added_tokens(sp) == {
        0: ("<unk>", True),
        1: ("<s>", True),
        2: ("</s>", True),
        579: ("<start_of_turn>", True),
        580: ("<end_of_turn>", True),
    }
    table = token_bytes_table(sp)
    assert set(table) == set(range(3, 579))
    assert table[3] == b"\x00" and table[3 + 0x0A] == b"\n" and table[258] == b"\xff"
    for i in range(259, 579):
        assert table[i] == sp.id_to_token(i).replace("▁", " ").encode()


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
