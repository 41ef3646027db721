"""Where the old and the new segmentation of the same text meet: the positions at which the original model
(the teacher, old tokens) and the new one (the student, new tokens) have read exactly the same bytes.

Positions are matched by the BYTE offset where each token ends (UTF-8 bytes of the text as the tokenizers'
shared normaliser leaves it). Byte-level tokens that are half a Chinese character have exact byte lengths,
so matching by bytes (not by characters) is exact.

- extend mode (new tokens are merges of old pieces): every boundary of the new segmentation is a boundary of
  the old one, so every new position has its teacher position;
- train mode (a new tokenizer): the two segmentations meet only at some boundaries; positions in between
  have no teacher and are left out of any teacher-based objective (``Alignment.coverage`` says how many).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retok.core.errors import RetokError
from retok.core.tokens import token_bytes_table


class ByteLengths:
    """Byte length of every id of one tokenizer: text tokens by their bytes, special and added tokens by the
    UTF-8 of their content (as they appear in the text)."""

    def __init__(self, tokenizer: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        table = {i: len(b) for i, b in token_bytes_table(backend).items()}
        for i, t in backend.get_added_tokens_decoder().items():
            table.setdefault(i, len(t.content.encode("utf-8")))
        size = max(table) + 1 if table else 0
        self.lengths = np.zeros(size, dtype=np.int64)
        for i, n in table.items():
            self.lengths[i] = n

    def ends(self, ids: Sequence[int]) -> np.ndarray:
        """Byte offset where each token ends (cumulative byte lengths)."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.max() >= len(self.lengths) or arr.min() < 0):
            raise RetokError(f"token id {int(arr.max())} is outside the tokenizer's {len(self.lengths)} ids")
        return np.cumsum(self.lengths[arr]) if arr.size else np.zeros(0, dtype=np.int64)


@dataclass
class Alignment:
    """``teacher[i]``: the old position that ends where new position ``i`` ends, or -1 when none does."""

    teacher: np.ndarray

    @property
    def matched(self) -> np.ndarray:
        return self.teacher >= 0

    @property
    def coverage(self) -> float:
        """The share of new positions that have a teacher position."""
        return float(self.matched.mean()) if len(self.teacher) else 0.0


def align_ends(old_ends: np.ndarray, new_ends: np.ndarray) -> Alignment:
    """Match every new position to the old position with the same end byte (both arrays increasing)."""
    j = np.searchsorted(old_ends, new_ends)
    inside = j < len(old_ends)
    hit = np.zeros(len(new_ends), dtype=bool)
    hit[inside] = old_ends[j[inside]] == new_ends[inside]
    return Alignment(np.where(hit, j, -1))


def align(old: ByteLengths, new: ByteLengths, old_ids: Sequence[int], new_ids: Sequence[int]) -> Alignment:
    """The alignment of two segmentations of the same text; RetokError when they are not of the same bytes or
    share no boundary at all."""
    old_ends, new_ends = old.ends(old_ids), new.ends(new_ids)
    if len(old_ends) and len(new_ends) and old_ends[-1] != new_ends[-1]:
        raise RetokError(
            f"the old and new tokenizers spell the same text as {int(old_ends[-1])} and {int(new_ends[-1])} bytes: "
            "they do not share a normaliser, so their positions cannot be aligned; build the tokenizer with "
            "`retok build-tokenizer` from model.path's tokenizer"
        )
    return align_ends(old_ends, new_ends)


def new_token_costs(
    old_tok: Any,
    new_tok: Any,
    docs: Sequence[str],
    old_nll: Sequence[Sequence[Any]],
    new_nll: Sequence[Sequence[Any]],
    new_ids: set[int],
) -> dict[str, Any]:
    """Where the new tokens fire in ``docs`` and what they cost: at every scored position of the new model whose
    token is new, its nats against the nats the original model spends on the old tokens of exactly the same
    bytes (``old_nll``/``new_nll``: the ``token_nll`` of retok.core.metrics.bits_per_byte on ``docs``).
    Returns uses (scored new tokens), aligned (those whose bytes are old tokens the original scored too: all of
    them in extend mode), and bits_new / bits_original / bits_change (new minus original; negative = a gain)
    summed over the aligned uses."""
    ol, nl = ByteLengths(old_tok), ByteLengths(new_tok)
    old_enc = old_tok(list(docs), add_special_tokens=False)["input_ids"] if docs else []
    new_enc = new_tok(list(docs), add_special_tokens=False)["input_ids"] if docs else []
    uses = aligned = 0
    nats_new = nats_old = 0.0
    for o_ids, n_ids, (o_first, o_vals), (n_first, n_vals) in zip(
        old_enc, new_enc, old_nll, new_nll, strict=True
    ):
        oe, ne = ol.ends(o_ids), nl.ends(n_ids)
        for j in range(n_first, n_first + len(n_vals)):
            if n_ids[j] not in new_ids:
                continue
            uses += 1
            start, end = (int(ne[j - 1]) if j else 0), int(ne[j])
            k0 = int(np.searchsorted(oe, start, side="right"))  # the first old token ending after ``start``
            k1 = int(np.searchsorted(oe, end, side="left"))  # the old token ending at ``end``
            starts_clean = (k0 == 0 and start == 0) or (k0 > 0 and int(oe[k0 - 1]) == start)
            if k1 >= len(oe) or int(oe[k1]) != end or not starts_clean:
                continue  # no old token boundary here (a tokenizer trained anew)
            if k0 < o_first or k1 >= o_first + len(o_vals):
                continue  # the original did not score those pieces (before the scoring start)
            aligned += 1
            nats_new += float(n_vals[j - n_first])
            nats_old += sum(float(o_vals[k - o_first]) for k in range(k0, k1 + 1))
    ln2 = float(np.log(2))
    return {
        "uses": uses,
        "aligned": aligned,
        "bits_new": nats_new / ln2,
        "bits_original": nats_old / ln2,
        "bits_change": (nats_new - nats_old) / ln2,
    }
