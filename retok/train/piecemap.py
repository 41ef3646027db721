"""The shared piece map of train-io: the input row of each new token learns as its own residual plus ONE map,
shared by every new token, applied to the original rows of the pieces it is spelled with.

    row(t) = start(t) + residual(t) + features(t) @ map
    features(t) = [orig[last piece], orig[first piece], mean of orig[piece] over its pieces]     (3H)

A short run sees most new tokens once or twice (on the demo 10,058 of 16,000 new rows get any gradient in
200 steps), so each row alone learns little; the map learns from every token in every batch how a spelling
sets a row and moves all of them, the rare and the unseen ones too. On the demo (objective distill, 200 steps of
512 tokens) the held-out layer-8 distillation loss went 0.211 -> 0.149 with it (map lr 3e-4), and zh BPB after
the head fit 1.134x -> 1.106x of the original's.

It lives on the gradient side, so the rest of train-io sees a plain embedding: the embedding holds the whole
row at every moment (evaluation, checkpoints, export need nothing new) and the map is one more parameter of the
same optimizer. Before each step its gradient is features^T @ G (G: the embedding's gradient on the new rows,
which is also the residuals' gradient), after the step the rows move by features @ (what the step did to the
map). Adam on the embedding's row then plays the residual, so this is exactly training start + residual +
features @ map with both as parameters (tested against that). The map parameter holds only the last step's
change and is zeroed after it is applied: AdamW without weight decay never reads the parameter, only its
moments, which are in the optimizer's checkpoint, so ``--resume`` is exact (bit for bit) with nothing more.

The features are never materialised (16,000 x 3H on the demo, 1.6 GB for a 70B): one sparse matrix picks them
from the original rows of the distinct pieces (2,188 on the demo), so a step costs three (pieces x H x H)
products and two sparse products.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn


class PieceMap:
    """The map of the rows of ``embed`` named in ``pieces`` (new id -> its old piece ids) over ``orig_rows``
    (the original embedding, any dtype, may be memory-mapped: only the pieces' rows are read)."""

    def __init__(
        self,
        embed: nn.Parameter,
        pieces: dict[int, Sequence[int]],
        orig_rows: torch.Tensor,
    ) -> None:
        rows = sorted(int(t) for t, ps in pieces.items() if ps)
        if not rows:
            raise ValueError("no new token has pieces to map")
        uniq = sorted({int(p) for t in rows for p in pieces[t]})
        pos = {p: k for k, p in enumerate(uniq)}
        device = embed.device
        u = len(uniq)
        self.embed = embed
        self.ids = torch.tensor(rows, dtype=torch.long, device=device)  # the rows' token ids
        self.rows = self.ids  # where they sit in ``embed``
        self.basis = orig_rows[torch.tensor(uniq, dtype=torch.long)].to(device=device, dtype=torch.float32)
        # One sparse (rows x 3 pieces) matrix picks the features: column block 0 the last piece, 1 the first,
        # 2 every piece at 1/len (the mean); features @ map = picks @ [basis @ map_k stacked over k].
        r, c, v = [], [], []
        for j, t in enumerate(rows):
            ps = [pos[int(p)] for p in pieces[t]]
            r += [j, j] + [j] * len(ps)
            c += [ps[-1], u + ps[0]] + [2 * u + k for k in ps]
            v += [1.0, 1.0] + [1.0 / len(ps)] * len(ps)
        picks = torch.sparse_coo_tensor(
            torch.tensor([r, c]), torch.tensor(v), (len(rows), 3 * u), check_invariants=True
        ).coalesce()  # a piece repeated inside a token adds up
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.picks = picks.to_sparse_csr().to(device)
            self.picks_t = picks.t().coalesce().to_sparse_csr().to(device)
        H = orig_rows.shape[1]
        self.map = nn.Parameter(torch.zeros(3 * H, H, device=device))  # zero between steps

    def bind(self, param: nn.Parameter, slot: torch.Tensor | None = None) -> None:
        """Move rows of ``param`` from now on: the embedding (``slot`` None), or the compact rows of
        retok.train.rows, where token id t sits at ``slot[t]``."""
        self.embed = param
        self.rows = self.ids if slot is None else slot[self.ids]

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def features(self) -> torch.Tensor:
        """(n_rows, 3H) features, materialised (for tests and small models)."""
        u = len(self.basis)
        return torch.cat([self.picks @ _block(self.basis, k, u) for k in range(3)], 1)

    def apply(self, m: torch.Tensor) -> torch.Tensor:
        """features @ m, (n_rows, H), without materialising the features."""
        H = self.basis.shape[1]
        return self.picks @ torch.cat([self.basis @ m[k * H : (k + 1) * H] for k in range(3)])

    def transpose_apply(self, g: torch.Tensor) -> torch.Tensor:
        """features^T @ g for g (n_rows, H): the map's gradient when g is the rows' gradient."""
        at = (self.picks_t @ g.float()).view(3, len(self.basis), -1)
        return torch.cat([self.basis.T @ at[k] for k in range(3)], 0)

    def before_step(self) -> None:
        """Set the map's gradient from the embedding's (after clipping, before the optimizer step)."""
        grad = self.embed.grad
        g = (
            torch.zeros(self.n_rows, self.embed.shape[1], device=self.rows.device)
            if grad is None
            else grad[self.rows]
        )
        self.map.grad = self.transpose_apply(g)

    @torch.no_grad()
    def after_step(self) -> None:
        """Move the rows by what the optimizer step did to the map (from zero), and zero it again."""
        delta = self.map.detach().clone()
        self.map.zero_()
        self.embed.index_add_(0, self.rows, self.apply(delta).to(self.embed.dtype))


def _block(basis: torch.Tensor, k: int, u: int) -> torch.Tensor:
    """(3u, H) with ``basis`` in row block k and zeros elsewhere."""
    out = torch.zeros(3 * u, basis.shape[1], dtype=basis.dtype, device=basis.device)
    out[k * u : (k + 1) * u] = basis
    return out
