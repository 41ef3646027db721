"""The embedding math, all of it: pure tensor functions, no files, no models.

A new token that is not in the old vocabulary gets a combination of the old rows of its pieces (the ids
the OLD tokenizer splits its bytes into):

- ``mean``: the plain average (ReTok).
- ``first`` / ``last``: the first / last piece's row.
- ``weighted``: position weights ``decay**distance`` from a favoured end, normalised. The INPUT row leans on
  the LAST piece (the model has "just read" it when the new token stands for the whole span); the HEAD row
  leans on the FIRST piece (predicting the span starts with predicting its first piece).
- ``random``: normal noise with the old rows' per-dimension mean and std; ``zero``: zeros (ablations).

Every combination is computed in float32 and cast to the checkpoint's dtype once, at the end. Copied rows
never pass through float32 (see ``rows_for_chunk``): they stay bit-identical.

``fit_direction`` + ``shift_vector`` are the lever against the trap of METHOD.md ("new head rows take
probability mass at every position"): subtracting a vector ``v`` from a head row lowers that token's logit by
``h . v``. Fitted on the model's final hidden states ``h`` (least squares), ``b_all`` has ``h . b_all ~= 1``
everywhere and ``b_out`` has ``h . b_out ~= 1`` in text outside the new tokens' target domains and ``~= 0``
inside them, so ``v = s_all * b_all + s_out * b_out`` lowers every new token's logit by about ``s_all`` nats
everywhere plus ``s_out`` more where the text is not the target language, leaving old tokens untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from retok.core.tokenmap import AVERAGED, FALLBACK

Method = Literal["mean", "first", "last", "weighted", "random", "zero"]
Side = Literal["input", "head"]


_STAT_CHUNK = 8192  # rows per step when computing statistics of a (possibly bf16, 128k-row) matrix


def combine_pieces(
    old: torch.Tensor, pieces: Sequence[Sequence[int]], method: Method, side: Side, decay: float = 0.5
) -> torch.Tensor:
    """float32 rows [len(pieces), d]: per token, the weighted mean of ``old[pieces[i]]``.

    ``sum(w_j * row_j) / sum(w_j)``: for ``mean`` that is the sum of the rows divided by their count, so it
    equals ``torch.stack(rows).mean(0)`` up to float32 rounding.
    """
    d = old.shape[1]
    if not pieces:
        return torch.zeros(0, d)
    lengths = torch.as_tensor([len(p) for p in pieces])
    total = int(lengths.sum())
    flat = torch.as_tensor(np.fromiter((i for p in pieces for i in p), dtype=np.int64, count=total))
    seg = torch.repeat_interleave(torch.arange(len(pieces)), lengths)
    rows = old.index_select(0, flat).float()
    if method == "mean":  # weights all 1: the plain sum of the rows, divided by their count
        return torch.zeros(len(pieces), d).index_add_(0, seg, rows) / lengths[:, None]
    # Position of each piece in its token and its token's length, for every flat piece: vectorised weights.
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(total) - starts[seg]
    n = lengths[seg]
    if method == "first":
        w = (pos == 0).float()
    elif method == "last":
        w = (pos == n - 1).float()
    elif method == "weighted":
        dist = (n - 1 - pos) if side == "input" else pos  # input leans on the LAST piece, head on the FIRST
        w = torch.full((total,), float(decay)) ** dist.float()
    else:
        raise ValueError(f"method {method!r} does not combine pieces")
    out = torch.zeros(len(pieces), d).index_add_(0, seg, rows * w[:, None])
    totals = torch.zeros(len(pieces)).index_add_(0, seg, w)
    return out / totals[:, None]


def row_mean(w: torch.Tensor) -> torch.Tensor:
    """float32 mean of the rows of ``w``: float32 sums of chunks, accumulated in float64 (never a float32
    copy of a whole bf16 matrix)."""
    total = torch.zeros(w.shape[1], dtype=torch.float64)
    for s in range(0, w.shape[0], _STAT_CHUNK):
        total += w[s : s + _STAT_CHUNK].sum(0, dtype=torch.float32).double()
    return (total / w.shape[0]).float()


def row_std(w: torch.Tensor) -> torch.Tensor:
    """float32 per-dimension standard deviation of the rows of ``w``, in chunks."""
    mean = row_mean(w).double()
    total = torch.zeros(w.shape[1], dtype=torch.float64)
    for s in range(0, w.shape[0], _STAT_CHUNK):
        total += ((w[s : s + _STAT_CHUNK].double() - mean) ** 2).sum(0)
    return (total / max(1, w.shape[0] - 1)).sqrt().float()


def fit_direction(
    hidden: torch.Tensor, target: torch.Tensor | None = None, ridge: float = 1e-3
) -> tuple[torch.Tensor, float]:
    """Ridge least-squares ``b`` with ``hidden @ b ~= target`` (default: all ones), and the fit's mean squared
    error (0 = exact)."""
    h = hidden.double()
    y = torch.ones(h.shape[0], dtype=torch.float64) if target is None else target.double()
    gram = h.T @ h
    gram += ridge * torch.eye(h.shape[1], dtype=torch.float64) * gram.diagonal().mean()
    b = torch.linalg.solve(gram, h.T @ y)
    return b.float(), float(((h @ b - y) ** 2).mean())


def shift_vector(directions: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``sum(amount * direction)``: the vector subtracted from new tokens' head rows."""
    return sum(float(a) * d.float() for d, a in directions)


def rows_for_chunk(
    old: torch.Tensor,
    kind: np.ndarray,
    source: np.ndarray,
    pieces: dict[int, list[int]],
    start: int,
    end: int,
    *,
    method: Method,
    side: Side,
    decay: float,
    fallback: torch.Tensor | None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """New rows ``start:end`` of one matrix (embedding or head), in ``old``'s dtype.

    ``kind``/``source``/``pieces`` come from the TokenMap. COPY, SPECIAL and PADDING rows are
    ``old[source]`` copied as is; AVERAGED rows follow ``method`` (``stats`` = per-dimension (mean, std) of
    the old rows for ``random``); FALLBACK rows are ``fallback``. ``shift`` (a hidden-size vector, see
    :func:`shift_vector`) is subtracted from the AVERAGED and FALLBACK rows only (the head's new tokens).
    """
    d = old.shape[1]
    k = kind[start:end]
    # One gather for the whole chunk (index_select is several times faster than scattering into `out`):
    # kept rows come from their source, the others from row 0 and are overwritten below.
    src = np.where(source[start:end] >= 0, source[start:end], 0)
    out = old.index_select(0, torch.as_tensor(src))

    avg = np.flatnonzero(k == AVERAGED)
    fb = np.flatnonzero(k == FALLBACK)
    new_local = np.concatenate([avg, fb])
    if len(new_local) == 0:
        return out
    rows = torch.empty(len(new_local), d)
    if len(avg):
        if method == "zero":
            rows[: len(avg)] = 0.0
        elif method == "random":
            if stats is None:
                raise ValueError("method 'random' needs stats=(mean, std) of the old rows")
            noise = torch.randn(len(avg), d, generator=generator)
            rows[: len(avg)] = stats[0] + noise * stats[1]
        else:
            rows[: len(avg)] = combine_pieces(old, [pieces[start + int(i)] for i in avg], method, side, decay)
    if len(fb):
        if fallback is None:
            raise ValueError("FALLBACK rows need the fallback row")
        rows[len(avg) :] = fallback.float()
    if shift is not None:
        rows -= shift.float()[None, :]
    out[torch.as_tensor(new_local)] = rows.to(old.dtype)
    return out
