"""The one place that knows how a token maps to raw bytes, for each tokenizer family.

Token strings are not text. Two BPE families cover the LLMs retok supports:

- ``byte_level`` (GPT-2, Llama-3, Qwen2, SmolLM2): every byte is stored as one printable character of
  GPT-2's ``bytes_to_unicode`` alphabet ("Ġ" is the space byte). Many tokens are partial UTF-8 sequences
  (half a Chinese character), so ``decode()`` would turn them into U+FFFD; we invert the alphabet instead.
- ``sentencepiece`` (Llama-2, Mistral, Gemma): text with "▁" for space, plus ``<0xNN>`` byte-fallback
  tokens for bytes that have no piece.

Everything else in retok compares and decomposes tokens by the bytes this module returns, and re-encodes
bytes with the old tokenizer through :func:`old_pieces`, which goes straight to the BPE model so that
nothing is added (no BOS/EOS, no dummy prefix "▁", no normaliser rewriting).

All functions take a ``tokenizers.Tokenizer`` (``hf_tokenizer.backend_tokenizer`` or
``Tokenizer.from_file``). Pass ``family`` where a function accepts it when calling in a loop: detecting it
re-reads the tokenizer's components.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any, Literal

from tokenizers import Tokenizer

from retok.core.errors import RetokError

Family = Literal["byte_level", "sentencepiece"]

SPIECE_SPACE = "▁"  # U+2581, SentencePiece's stand-in for the space byte
_BYTE_FALLBACK_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class UnencodableError(RetokError):
    """The old tokenizer's BPE model cannot spell these bytes (no byte fallback and an unknown character)."""


# ---------------------------------------------------------------------------------------------------------
# GPT-2's byte alphabet
# ---------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 bytes are shifted to
    U+0100 and up (in byte order) so that every byte is one visible, non-whitespace character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


# ---------------------------------------------------------------------------------------------------------
# Family detection
# ---------------------------------------------------------------------------------------------------------


def _component(obj: Any) -> dict[str, Any] | None:
    """A pipeline component as its JSON dict. ``__getstate__`` serialises just that component, which is
    cheap; ``tok.to_str()`` would serialise the whole vocabulary."""
    if obj is None:
        return None
    return json.loads(obj.__getstate__())


def _flatten(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The leaves of a (possibly nested) Sequence of normalizers / pre-tokenizers / decoders."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        children = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
        return [leaf for child in children for leaf in _flatten(child)]
    return [node]


def _replace_pattern(node: dict[str, Any]) -> str | None:
    pattern = node.get("pattern") or {}
    return pattern.get("String") if isinstance(pattern, dict) else None


def detect_family(tok: Tokenizer) -> Family:
    """Which byte encoding ``tok``'s BPE vocabulary uses.

    ``byte_level``: a ByteLevel pre-tokenizer or decoder, possibly inside a Sequence.
    ``sentencepiece``: "▁" for space, from a Metaspace pre-tokenizer/decoder or a normaliser that replaces
    " " by "▁" or prepends "▁" (HF's Llama-2 and Gemma conversions); usually with byte fallback.

    Raises RetokError for any other model (Unigram, WordPiece, WordLevel) or a BPE with neither marker:
    mapping their tokens to bytes would be a guess.
    """
    model_type = type(tok.model).__name__
    supported = (
        "retok supports BPE tokenizers of two families: byte-level (GPT-2, Llama-3, Qwen2, SmolLM2) and "
        "SentencePiece-style BPE with '▁' for space (Llama-2, Mistral, Gemma)"
    )
    if model_type != "BPE":
        raise RetokError(f"the tokenizer's model is {model_type}, not BPE; {supported}")

    pre = _flatten(_component(tok.pre_tokenizer))
    dec = _flatten(_component(tok.decoder))
    norm = _flatten(_component(tok.normalizer))

    if any(n.get("type") == "ByteLevel" for n in pre + dec):
        return "byte_level"

    metaspace = any(n.get("type") == "Metaspace" for n in pre + dec)
    space_normalizer = any(
        (n.get("type") == "Replace" and _replace_pattern(n) == " " and n.get("content") == SPIECE_SPACE)
        or (n.get("type") == "Prepend" and n.get("prepend") == SPIECE_SPACE)
        for n in norm
    )
    if metaspace or space_normalizer:
        return "sentencepiece"

    raise RetokError(
        "the tokenizer is a BPE without a ByteLevel pre-tokenizer/decoder and without '▁' for space "
        f"(Metaspace, or a Replace(' ', '▁') normalizer), so its tokens cannot be mapped to bytes; {supported}"
    )


# ---------------------------------------------------------------------------------------------------------
# Token <-> bytes
# ---------------------------------------------------------------------------------------------------------


def token_to_bytes(family: Family, token: str) -> bytes:
    """The raw bytes a model-vocabulary token stands for.

    byte_level: invert the alphabet character by character, so partial UTF-8 tokens come out exactly
    (``decode()`` would give U+FFFD). Raises RetokError for a character outside the alphabet.
    sentencepiece: ``<0xNN>`` is that single byte; otherwise "▁" is a space and the rest is UTF-8.
    """
    if family == "byte_level":
        try:
            return bytes(UNICODE_TO_BYTE[c] for c in token)
        except KeyError as err:
            raise RetokError(
                f"token {token!r} has character {err.args[0]!r} outside the byte-level alphabet; "
                "is this really a byte-level BPE tokenizer?"
            ) from None
    if family == "sentencepiece":
        m = _BYTE_FALLBACK_RE.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(SPIECE_SPACE, " ").encode("utf-8")
    raise ValueError(f"unknown tokenizer family {family!r}")


def _split_utf8(data: bytes) -> list[str | int]:
    """``data`` as a list of decoded characters, with every byte that is not part of a valid UTF-8
    character kept as an int. The first window of 1-4 bytes that decodes strictly is exactly one
    character (a shorter valid character would have decoded in an earlier window)."""
    out: list[str | int] = []
    i = 0
    while i < len(data):
        for n in range(1, 5):
            try:
                out.append(data[i : i + n].decode("utf-8"))
            except UnicodeDecodeError:
                continue
            i += n
            break
        else:
            out.append(data[i])
            i += 1
    return out


def _spiece_parts(data: bytes) -> list[str | int]:
    """:func:`_split_utf8` for SentencePiece-style symbols: spaces become "▁", and a literal "▁" in the
    data is kept as its three bytes, because a "▁" symbol would read back as a space."""
    out: list[str | int] = []
    for part in _split_utf8(data):
        if part == SPIECE_SPACE:
            out.extend(SPIECE_SPACE.encode("utf-8"))
        else:
            out.append(SPIECE_SPACE if part == " " else part)
    return out


def bytes_to_symbols(family: Family, data: bytes, tok: Tokenizer | None = None) -> list[str]:
    """The model-level symbols (characters as the BPE model sees them) that spell ``data``.

    byte_level: one alphabet character per byte. sentencepiece: one symbol per UTF-8 character, "▁" for
    space; a byte that is not part of a valid UTF-8 character becomes the ``<0xNN>`` symbol, and so do the
    three bytes of a literal "▁" (which would otherwise read back as a space).
    ``tok`` is accepted for symmetry with the other helpers; the symbols depend only on the family.
    """
    del tok
    if family == "byte_level":
        return [BYTE_TO_UNICODE[b] for b in data]
    if family == "sentencepiece":
        return [f"<0x{part:02X}>" if isinstance(part, int) else part for part in _spiece_parts(data)]
    raise ValueError(f"unknown tokenizer family {family!r}")


def _byte_fallback_id(tok: Tokenizer, byte: int, data: bytes) -> int:
    for name in (f"<0x{byte:02X}>", f"<0x{byte:02x}>"):
        tid = tok.model.token_to_id(name)
        if tid is not None:
            return tid
    raise UnencodableError(
        f"the old tokenizer has no byte-fallback token <0x{byte:02X}>, so it cannot spell {data!r}"
    )


_SPECIAL_IDS: weakref.WeakKeyDictionary[Tokenizer, tuple[int, frozenset[int]]] = weakref.WeakKeyDictionary()


def _special_ids(tok: Tokenizer) -> frozenset[int]:
    """Ids of special added tokens, cached per tokenizer (Gemma has thousands of added tokens and
    old_pieces runs once per new token); the cache is refreshed when tokens are added."""
    size = tok.get_vocab_size(with_added_tokens=True)
    cached = _SPECIAL_IDS.get(tok)
    if cached is None or cached[0] != size:
        specials = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        cached = _SPECIAL_IDS[tok] = (size, specials)
    return cached[1]


def _model_tokenize(tok: Tokenizer, symbols: str, specials: frozenset[int], data: bytes) -> list[int]:
    """``tok.model.tokenize`` that never yields a special token. A BPE with ``ignore_merges`` (Llama-3)
    returns any whole word found in its vocabulary, so the text "<|im_end|>" would come back as the
    special id in a tokenizer that keeps its specials in the model vocab (SmolLM2). Specials map by role,
    never by spelling: such a piece is split in two and each half is tokenized on its own."""
    ids: list[int] = []
    for t in tok.model.tokenize(symbols):
        if t.id not in specials:
            ids.append(t.id)
        elif len(t.value) > 1:
            half = len(t.value) // 2
            ids += _model_tokenize(tok, t.value[:half], specials, data)
            ids += _model_tokenize(tok, t.value[half:], specials, data)
        else:
            raise UnencodableError(
                f"the old tokenizer can only spell {data!r} with special token {t.value!r}"
            )
    return ids


def old_pieces(tok: Tokenizer, data: bytes, family: Family | None = None) -> list[int]:
    """The ids the tokenizer's BPE MODEL gives for exactly these bytes.

    The normaliser, pre-tokenizer and post-processor are skipped on purpose: re-encoding a token must not
    gain a BOS/EOS or SentencePiece's dummy prefix "▁", and must not be matched against added tokens.
    Special tokens never appear in the result, even when they are also model tokens. The concatenated
    bytes of the result always equal ``data`` (UnencodableError otherwise, e.g. an unknown character in a
    tokenizer without byte fallback). ``[]`` only for empty ``data``.
    """
    if not data:
        return []
    family = family or detect_family(tok)
    specials = _special_ids(tok)

    ids: list[int] = []
    if family == "byte_level":
        ids = _model_tokenize(tok, "".join(bytes_to_symbols(family, data)), specials, data)
    else:
        # Invalid UTF-8 cannot be written as a string for the model, and the real tokenizer (whose input is
        # text) never sees it either: such bytes go straight to their byte-fallback tokens, and the valid
        # runs in between are tokenized on their own.
        run: list[str] = []
        for part in [*_spiece_parts(data), None]:
            if isinstance(part, str):
                run.append(part)
                continue
            if run:
                ids += _model_tokenize(tok, "".join(run), specials, data)
                run = []
            if isinstance(part, int):
                ids.append(_byte_fallback_id(tok, part, data))

    spelled = b"".join(token_to_bytes(family, tok.model.id_to_token(i)) for i in ids)
    if spelled != data:
        raise UnencodableError(
            f"the old tokenizer's BPE model cannot spell {data!r} exactly (its pieces give {spelled!r}); "
            "an unknown character without byte fallback?"
        )
    return ids


# ---------------------------------------------------------------------------------------------------------
# Whole-vocabulary tables
# ---------------------------------------------------------------------------------------------------------


def vocab_bytes(tok: Tokenizer) -> dict[int, bytes]:
    """id -> raw bytes for every token of the BPE model's vocabulary (added tokens that live only in the
    added vocabulary are not included; added tokens that are also model tokens, like SmolLM2's specials,
    are, spelled as model tokens)."""
    family = detect_family(tok)
    vocab = tok.get_vocab(with_added_tokens=False)
    return {i: token_to_bytes(family, t) for t, i in sorted(vocab.items(), key=lambda kv: kv[1])}


def added_tokens(tok: Tokenizer) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) for every added token (tokenizer.json's ``added_tokens``)."""
    return {i: (t.content, bool(t.special)) for i, t in sorted(tok.get_added_tokens_decoder().items())}


def token_bytes_table(tok: Tokenizer) -> dict[int, bytes]:
    """Every id that stands for text -> its bytes.

    Model tokens go through :func:`token_to_bytes`; non-special added tokens are matched on raw text, so
    their content's UTF-8 is what they stand for (and wins over a model spelling of the same id). Special
    tokens are excluded: they map by role and content, never by bytes.
    """
    table = vocab_bytes(tok)
    for i, (content, special) in added_tokens(tok).items():
        if special:
            table.pop(i, None)
        else:
            table[i] = content.encode("utf-8")
    return dict(sorted(table.items()))
