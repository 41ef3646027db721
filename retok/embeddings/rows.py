"""The new rows of both matrices, chunk by chunk: a TokenMap (where each row comes from) + a method (how
pieces combine, methods.py) -> the new embedding or head, in the old matrix's dtype."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from retok.core.tokenmap import FALLBACK, PADDING, TokenMap
from retok.embeddings import methods


@dataclass
class Plan:
    """Everything that decides the new rows of both matrices."""

    tmap: TokenMap
    method: methods.Method
    head_method: methods.Method
    decay: float
    seed: int
    head_shift: torch.Tensor | None = None  # subtracted from new tokens' head rows (methods.shift_vector)
    head_rows: torch.Tensor | None = None  # the whole head, fitted (fit.at_init): written as it is


def matrix_chunks(
    old: torch.Tensor, plan: Plan, side: methods.Side, chunk_rows: int | None = None
) -> Iterator[torch.Tensor]:
    """The new matrix built from ``old`` for ``side`` ("input" or "head"), in row chunks, in order."""
    tmap = plan.tmap
    if side == "head" and plan.head_rows is not None:
        rows = plan.head_rows
        step = chunk_rows or max(256, (1 << 24) // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            yield rows[start : start + step].to(old.dtype)
        return
    method = plan.method if side == "input" else plan.head_method
    if (tmap.source[tmap.ids(PADDING)] < 0).any():
        raise AssertionError("padding rows need a donor: call pick_pad_donor first")
    chunk_rows = chunk_rows or max(256, (1 << 24) // max(1, old.shape[1]))
    # Statistics over every old row cost a pass over the matrix: only when a row needs them.
    fallback = methods.row_mean(old) if len(tmap.ids(FALLBACK)) else None
    stats = (methods.row_mean(old), methods.row_std(old)) if method == "random" else None
    gen = torch.Generator().manual_seed(plan.seed + (0 if side == "input" else 1))
    shift = plan.head_shift if side == "head" else None
    for start in range(0, tmap.n_rows, chunk_rows):
        end = min(tmap.n_rows, start + chunk_rows)
        yield methods.rows_for_chunk(
            old,
            tmap.kind,
            tmap.source,
            tmap.pieces,
            start,
            end,
            method=method,
            side=side,
            decay=plan.decay,
            fallback=fallback,
            stats=stats,
            generator=gen,
            shift=shift,
        )


def build_matrix(old: torch.Tensor, plan: Plan, side: methods.Side) -> torch.Tensor:
    """The whole new matrix in memory (for in-process comparisons on small models)."""
    return torch.cat(list(matrix_chunks(old, plan, side)))
