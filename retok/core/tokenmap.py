"""Where each row of the new embedding comes from: the old pieces of every new token, found by raw BYTES.

For every id of the new vocabulary (padded to ``n_rows``) the :class:`TokenMap` says one of:

- COPY: the token's bytes are an old token's bytes -> that old row, unchanged (input and head).
- SPECIAL: a special token -> the old special token with the same role (bos/eos/pad/unk), else the same
  content; it keeps that row. Specials never go through the BPE (their spelling is not their meaning).
- AVERAGED: any other token -> its bytes encoded by the OLD tokenizer's BPE model (no BOS/EOS, no prefix
  space, no normaliser: :func:`retok.core.tokens.old_pieces`) -> a combination of those old rows (methods.py).
- FALLBACK: a token whose decomposition is empty (empty bytes, bytes the old BPE cannot spell, a brand-new
  special token with no old counterpart) -> the mean of every old token row ("the average token").
- PADDING: an id with no token (vocabulary padding, holes in the id space) -> a copy of a DONOR token's
  rows; see :func:`pick_pad_donor` for why that can never win greedy decoding.

Nothing here depends on ids lining up between the two tokenizers: it works the same for an extended
tokenizer (every old id kept) and a tokenizer trained from scratch (every id new).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from retok.core.errors import RetokError
from retok.core.tokens import (
    Family,
    UnencodableError,
    added_tokens,
    detect_family,
    old_pieces,
    token_bytes_table,
)

COPY, SPECIAL, AVERAGED, FALLBACK, PADDING = 0, 1, 2, 3, 4
KIND_NAMES = {
    COPY: "copied",
    SPECIAL: "special",
    AVERAGED: "averaged",
    FALLBACK: "fallback",
    PADDING: "padding",
}
ROLES = ("bos", "eos", "pad", "unk")
_DONOR_SAMPLE = 16384


@dataclass
class TokenMap:
    """Row sources of the new embedding/head, one entry per new row."""

    n_rows: int  # rows of the new matrices (vocabulary padded to the multiple)
    n_tokens: int  # highest new token id + 1
    kind: np.ndarray  # int8 [n_rows]: COPY / SPECIAL / AVERAGED / FALLBACK / PADDING
    source: (
        np.ndarray
    )  # int64 [n_rows]: old row for COPY/SPECIAL (and the donor's old row for PADDING), else -1
    pieces: dict[int, list[int]] = field(default_factory=dict)  # AVERAGED: new id -> old piece ids
    fallback_reason: dict[int, str] = field(default_factory=dict)  # FALLBACK: new id -> why
    old_to_new_special: dict[int, int] = field(default_factory=dict)  # old special id -> new id
    pad_donor: int | None = None  # new id whose rows the padding rows copy
    new_family: str = ""
    old_family: str = ""

    def ids(self, kind: int) -> np.ndarray:
        return np.flatnonzero(self.kind == kind)

    def counts(self) -> dict[str, int]:
        return {name: int((self.kind == k).sum()) for k, name in KIND_NAMES.items()}

    @property
    def padding_ids(self) -> list[int]:
        return [int(i) for i in self.ids(PADDING)]


# --------------------------------------------------------------------------------------------- specials


def _role_ids(hf_tok: Any) -> dict[str, int]:
    """bos/eos/pad/unk -> id, for the roles the tokenizer defines."""
    out = {}
    for role in ROLES:
        tid = getattr(hf_tok, f"{role}_token_id", None)
        if isinstance(tid, int):
            out[role] = tid
    return out


def _special_ids(hf_tok: Any) -> dict[int, str]:
    """Every special token: special added tokens plus role tokens (some tokenizers do not flag those)."""
    backend = hf_tok.backend_tokenizer
    out = {i: content for i, (content, special) in added_tokens(backend).items() if special}
    for tid in _role_ids(hf_tok).values():
        out.setdefault(tid, backend.id_to_token(tid))
    return out


def map_specials(old_hf: Any, new_hf: Any, where: str) -> dict[int, int]:
    """new special id -> old id, by role first, then by content. Raises when an old special token is lost
    (its chat template and generation config would break)."""
    old_specials, new_specials = _special_ids(old_hf), _special_ids(new_hf)
    old_roles, new_roles = _role_ids(old_hf), _role_ids(new_hf)
    old_by_content = {c: i for i, c in sorted(old_specials.items(), reverse=True)}  # lowest id wins
    out: dict[int, int] = {}
    for role, new_id in new_roles.items():
        if role in old_roles and new_id in new_specials:
            out.setdefault(new_id, old_roles[role])
    for new_id, content in new_specials.items():
        if new_id in out:
            continue
        if content in old_by_content:
            out[new_id] = old_by_content[content]
    new_contents = set(new_specials.values())
    lost = [c for c in old_specials.values() if c not in new_contents]
    if lost:
        raise RetokError(
            f"{where} drops the old special token {lost[0]!r} ({len(lost)} lost); every special token of the "
            "model must survive as one id: rebuild the tokenizer with `retok build-tokenizer`"
        )
    return out


# --------------------------------------------------------------------------------------------- mapping


def build_token_map(
    old_hf: Any,
    new_hf: Any,
    *,
    old_rows: int,
    pad_to_multiple_of: int = 1,
    where: str = "the new tokenizer",
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> TokenMap:
    """Decide the source of every new row. ``old_rows`` is the old embedding's row count (may exceed the old
    tokenizer's length, as in Qwen2.5); ``where`` names the new tokenizer folder in error messages;
    ``meta`` (retok_tokenizer.json) is checked against the model with :func:`check_fits`."""
    old_tok, new_tok = old_hf.backend_tokenizer, new_hf.backend_tokenizer
    old_family: Family = detect_family(old_tok)
    new_family: Family = detect_family(new_tok)

    old_max = max(old_tok.get_vocab(with_added_tokens=True).values())
    if old_max >= old_rows:
        raise RetokError(
            f"the model's tokenizer has id {old_max} but its embedding has only {old_rows} rows; "
            "the model folder's tokenizer does not belong to its weights"
        )

    new_vocab = new_tok.get_vocab(with_added_tokens=True)
    if len(set(new_vocab.values())) != len(new_vocab):
        seen: dict[int, str] = {}
        for t, i in new_vocab.items():
            if i in seen:
                raise RetokError(
                    f"{where}: tokens {seen[i]!r} and {t!r} both have id {i} (added tokens outside the model "
                    "vocabulary are renumbered on load); rebuild it with `retok build-tokenizer`"
                )
            seen[i] = t
    # A tokenizer made for another model says so before anything else can fail in a confusing way.
    old_table, table = token_bytes_table(old_tok), token_bytes_table(new_tok)
    if meta is not None:
        check_fits(meta, len(old_hf), old_family, old_table, table, where)

    n_tokens = max(new_vocab.values()) + 1
    n_rows = -(-n_tokens // pad_to_multiple_of) * pad_to_multiple_of
    kind = np.full(n_rows, PADDING, dtype=np.int8)
    source = np.full(n_rows, -1, dtype=np.int64)
    tmap = TokenMap(n_rows, n_tokens, kind, source, new_family=new_family, old_family=old_family)

    # Specials first: they never match by bytes.
    specials = map_specials(old_hf, new_hf, where)
    for new_id, content in _special_ids(new_hf).items():
        if new_id in specials:
            kind[new_id], source[new_id] = SPECIAL, specials[new_id]
            tmap.old_to_new_special.setdefault(specials[new_id], new_id)
        else:
            kind[new_id] = FALLBACK
            tmap.fallback_reason[new_id] = f"new special token {content!r} with no old counterpart"

    # Every old id that stands for text, by its bytes. Two old ids can spell the same bytes (SentencePiece's
    # "7" piece and its <0x37> byte-fallback token have different rows): see _pick_same_bytes.
    old_by_bytes: dict[bytes, list[int]] = {}
    for i, data in old_table.items():
        old_by_bytes.setdefault(data, []).append(i)

    items = [(i, d) for i, d in table.items() if kind[i] == PADDING]
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="decompose new tokens", unit="tok", mininterval=1.0)
    for new_id, data in items:
        candidates = old_by_bytes.get(data)
        if candidates:
            kind[new_id], source[new_id] = (
                COPY,
                _pick_same_bytes(candidates, new_id, data, old_tok, new_tok, old_family),
            )
            continue
        if not data:
            kind[new_id] = FALLBACK
            tmap.fallback_reason[new_id] = "empty bytes"
            continue
        try:
            pieces = old_pieces(old_tok, data, old_family)
        except UnencodableError as e:
            kind[new_id] = FALLBACK
            tmap.fallback_reason[new_id] = str(e)
            continue
        kind[new_id] = AVERAGED
        tmap.pieces[new_id] = pieces
    return tmap


def _pick_same_bytes(
    candidates: list[int], new_id: int, data: bytes, old_tok: Any, new_tok: Any, old_family: Family
) -> int:
    """Among old ids with the same bytes: the one with the same token string (a byte-fallback token stays
    a byte-fallback token), else the one the old BPE gives for these bytes, else the lowest id."""
    if len(candidates) == 1:
        return candidates[0]
    spelled = new_tok.id_to_token(new_id)
    for i in candidates:
        if old_tok.id_to_token(i) == spelled:
            return i
    try:
        pieces = old_pieces(old_tok, data, old_family)
    except UnencodableError:
        pieces = []
    if len(pieces) == 1 and pieces[0] in candidates:
        return pieces[0]
    return candidates[0]


def check_fits(
    meta: dict[str, Any],
    old_len: int,
    old_family: str,
    old_table: dict[int, bytes],
    new_table: dict[int, bytes],
    where: str,
) -> None:
    """Refuse a tokenizer folder built for another model: its recorded old vocabulary size and family must be
    this model's, and an extended tokenizer must keep every old text token (``*_table``: id -> bytes) at its
    old id."""
    recorded = meta.get("old_vocab_size")
    if isinstance(recorded, int) and recorded != old_len:
        raise RetokError(
            f"{where} was built from a tokenizer with {recorded} tokens, but model.path's tokenizer has {old_len}; "
            "rebuild it with `retok build-tokenizer` for this model"
        )
    fam = meta.get("family")
    if isinstance(fam, str) and fam and fam != old_family:
        raise RetokError(
            f"{where} is a {fam} tokenizer but model.path's tokenizer is {old_family}; "
            "rebuild it with `retok build-tokenizer` for this model"
        )
    if meta.get("mode") == "extend":
        moved = [i for i, b in old_table.items() if new_table.get(i) != b]
        if moved:
            i = moved[0]
            raise RetokError(
                f"{where} says mode 'extend' but old token id {i} ({old_table[i]!r}) is not kept at its id "
                f"({len(moved)} such ids); it was not built from model.path's tokenizer: rebuild it"
            )


# ----------------------------------------------------------------------------------------------- padding


def pick_pad_donor(tmap: TokenMap, old_head: torch.Tensor) -> int | None:
    """Choose the token whose rows every padding id copies, and record it in ``tmap``.

    Why a copy is safe: a padding id's logit is then the donor's logit (same head row, same hidden state),
    so a padding id can only reach the maximum when the donor does, and on a tie greedy decoding's argmax
    takes the FIRST maximal index, which is the donor (every padding id is higher). A zero head row would
    give logit 0, which wins whenever every real logit is negative; a constant "very negative" row does not
    exist for a bias-free head, since hidden states have no fixed sign. The donor is a copied (non-special)
    token whose head row points least along the mean head row, a cheap proxy for "rarely likely", so that the
    duplicates add little probability mass under sampling. HF ``generate`` additionally suppresses the
    padding ids (generation_config.suppress_tokens), which is the hard guarantee there.
    """
    pads = tmap.ids(PADDING)
    if len(pads) == 0:
        return None
    copied = tmap.ids(COPY)
    if len(copied) == 0:
        copied = tmap.ids(SPECIAL)
    if len(copied) == 0:
        raise RetokError(
            "the new tokenizer shares no token with the old one; nothing to copy into padding rows"
        )
    # Only ids below every padding id qualify (argmax's first-index rule must pick the donor); holes in the
    # id space of an odd tokenizer could leave none, then ties are merely as unlikely as the donor winning.
    below = copied[copied < pads.min()]
    copied = below if len(below) else copied
    # An evenly spaced sample of at most 16k candidates: scoring all 128k rows of an 8B model's head would
    # read the whole matrix once more just to pick one row (``old_head`` may be memory-mapped).
    if len(copied) > _DONOR_SAMPLE:
        copied = copied[np.linspace(0, len(copied) - 1, _DONOR_SAMPLE).round().astype(np.int64)]
    rows = old_head.index_select(0, torch.as_tensor(tmap.source[copied])).float()
    score = rows @ rows.mean(0)
    donor = int(copied[int(torch.argmin(score))])
    tmap.pad_donor = donor
    tmap.source[pads] = tmap.source[donor]
    return donor
