"""The head fit's objective over the rows that learn: the next token's cross-entropy, the KL to the teacher's
next-piece distribution on first pieces and down the piece tree, and its gradient written out."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from retok.headfit.states import States


def kl_to_teacher(
    lse: torch.Tensor,
    fixed_at_top: torch.Tensor,
    learn_logits: torch.Tensor,
    learn_group: torch.Tensor,
    n_groups: int,
    p: torch.Tensor,
    group_at_top: torch.Tensor,
) -> torch.Tensor:
    """KL(teacher top-k + rest || student marginalised onto first old pieces), per state. The learning rows are
    summed per first piece (``learn_group``: the group of each, ``n_groups`` of them); ``group_at_top``: the group
    each teacher entry names, -1 where no learning row starts with it (only fixed rows carry its mass)."""
    probs = torch.exp(learn_logits - lse[:, None])
    mass = torch.zeros(probs.shape[0], n_groups, dtype=probs.dtype, device=probs.device).index_add(
        1, learn_group, probs
    )
    learned = torch.where(group_at_top >= 0, mass.gather(1, group_at_top.clamp(min=0)), 0.0)
    q = (torch.exp(fixed_at_top - lse[:, None]) + learned).clamp_min(1e-8)
    rest_p = (1.0 - p.sum(1)).clamp_min(1e-6)
    rest_q = (1.0 - q.sum(1)).clamp_min(1e-6)
    pk = p.clamp_min(1e-12)
    return (pk * (pk.log() - q.log())).sum(1) + rest_p * (rest_p.log() - rest_q.log())


class TreeTerms:
    """The tree terms' fixed parts: at depth d, each learning row spelled with at least d+1 old pieces belongs
    to the group of its first d+1 pieces, and each state's teacher top-k entry (after the realised r1..rd) is
    mapped to the group (r1..rd, q) it names (-1 where no new token is spelled so)."""

    def __init__(self, states: States, learn_ids: torch.Tensor, pieces: dict[int, Sequence[int]]):
        assert states.tree_p is not None and states.tree_i is not None and states.tree_prefix is not None
        self.p = states.tree_p
        self.depth = states.tree_p.shape[1]
        self.members: list[torch.Tensor] = []  # per depth: positions in the learning rows that have a group
        self.group_of: list[torch.Tensor] = []  # per depth: their group
        self.sizes: list[int] = []
        self.gid = torch.full(states.tree_i.shape, -1, dtype=torch.int32)  # (N, D, K)
        spelled = [tuple(pieces.get(int(t)) or ()) for t in learn_ids]
        # keys (context, piece) as context * n_old + piece: n_old past every id either side can name
        n_old = 1 + max(int(states.tree_i.max()), max((max(sp) for sp in spelled if sp), default=0))
        for d in range(1, self.depth + 1):
            rows = [j for j, sp in enumerate(spelled) if len(sp) > d]
            contexts: dict[tuple[int, ...], int] = {}
            keys = []
            for j in rows:
                c = contexts.setdefault(spelled[j][:d], len(contexts))
                keys.append(c * n_old + spelled[j][d])
            if not keys:
                self.members.append(torch.zeros(0, dtype=torch.long))
                self.group_of.append(torch.zeros(0, dtype=torch.long))
                self.sizes.append(0)
                continue
            ukeys, inv = torch.unique(torch.as_tensor(keys), return_inverse=True)
            self.members.append(torch.as_tensor(rows, dtype=torch.long))
            self.group_of.append(inv)
            self.sizes.append(len(ukeys))
            realised = states.tree_prefix[:, :d].tolist()
            ctx = torch.as_tensor(
                [contexts.get(tuple(r), -1) if r[-1] >= 0 else -1 for r in realised], dtype=torch.long
            )
            qk = ctx[:, None] * n_old + states.tree_i[:, d - 1].long()
            at = torch.searchsorted(ukeys, qk.clamp(0, int(ukeys[-1])))
            hit = (ctx[:, None] >= 0) & (ukeys[at] == qk) & (states.tree_p[:, d - 1] > 0)
            self.gid[:, d - 1] = torch.where(hit, at, -1).to(torch.int32)

    def _depth_states(
        self, idx: torch.Tensor, d: int, dev: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """At depth d+1: the positions in ``idx`` whose teacher names at least two groups, and there which
        entries name one and which group (None if no state qualifies)."""
        if not self.sizes[d]:
            return None
        gid = self.gid[idx, d].to(dev).long()
        valid = gid >= 0
        rows = torch.nonzero(valid.sum(1) >= 2).squeeze(1)
        if not len(rows):
            return None
        return rows, valid[rows], gid[rows]

    @torch.no_grad()
    def kl_and_coef(self, idx: torch.Tensor, P: torch.Tensor, coef: torch.Tensor) -> float:
        """:meth:`kl` with its gradient, from ``P`` (the learning rows' probabilities, (B, n_learn)): returns
        the summed KL and adds to ``coef`` what it contributes to d(kl)/d(logit) / P. Each depth's KL is
        invariant to scaling every mass of a state, so the gradient of a member row j of group g is
        P_j * (b_g - sum_g' b_g' mass_g') with b_g = d(kl)/d(mass_g) (the second term is zero up to clamps)."""
        dev = P.device
        total = 0.0
        for d in range(self.depth):
            got = self._depth_states(idx, d, dev)
            if got is None:
                continue
            rows, valid, gid = got
            n_use = len(rows)
            members, group_of = self.members[d].to(dev), self.group_of[d].to(dev)
            mass = torch.zeros(n_use, self.sizes[d], device=dev, dtype=P.dtype).index_add(
                1, group_of, P[rows][:, members]
            )
            g = gid.clamp(min=0)
            p = torch.where(valid, self.p[idx, d].to(dev)[rows], 0.0)
            p = p / p.sum(1, keepdim=True)
            m = torch.where(valid, mass.gather(1, g), 0.0)
            z = m.sum(1, keepdim=True).clamp_min(1e-30)
            q = m / z
            total += float((p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1).mean())
            # d(kl)/d(mass_g): -p_k / mass_g where the log is not clamped, + (how often g is named) / Z
            live = valid & (q > 1e-12)
            per_entry = torch.where(live, -p / m.clamp_min(1e-30), 0.0) + torch.where(valid, 1.0 / z, 0.0)
            b = torch.zeros_like(mass).scatter_add_(1, g, torch.where(valid, per_entry, 0.0))
            shift = (b * mass).sum(1, keepdim=True)
            # coef[rows, members] += (b[:, group_of] - shift) / n_use, the rows' other columns -= shift / n_use
            block = coef[rows]
            block -= shift / n_use
            block[:, members] += b[:, group_of] / n_use
            coef[rows] = block
        return total

    def kl(self, idx: torch.Tensor, learn_logits: torch.Tensor) -> torch.Tensor | None:
        """Sum over depths of the mean KL(teacher's next piece || the student's mass of the new tokens spelled
        so), both renormalised over the groups present, over the states with at least two of them."""
        dev = learn_logits.device
        probs = torch.exp(learn_logits - learn_logits.max(1, keepdim=True).values)
        total = None
        for d in range(self.depth):
            got = self._depth_states(idx, d, dev)
            if got is None:
                continue
            use, valid, gid = got
            members = self.members[d].to(dev)
            mass = torch.zeros(len(use), self.sizes[d], device=dev, dtype=probs.dtype).index_add(
                1, self.group_of[d].to(dev), probs[use][:, members]
            )
            p = torch.where(valid, self.p[idx, d].to(dev)[use], 0.0)
            p = p / p.sum(1, keepdim=True)
            q = torch.where(valid, mass.gather(1, gid.clamp(min=0)), 0.0)
            q = q / q.sum(1, keepdim=True).clamp_min(1e-30)
            kl = (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1).mean()
            total = kl if total is None else total + kl
        return total


class RowObjective:
    """The fit's loss with the learning rows as the only parameter: what the fixed rows contribute (their
    log-sum-exp, the target's logit when the target is a fixed row, their logits at the teacher's top-k) is
    computed once per state."""

    def __init__(
        self,
        states: States,
        head: torch.Tensor,
        learn: torch.Tensor,
        first_piece: torch.Tensor | None,
        use_kl: bool,
        device: torch.device | str = "cpu",
        pieces: dict[int, Sequence[int]] | None = None,
        features: torch.Tensor | None = None,
    ) -> None:
        # The cache stays where it is (host memory, float16); a batch at a time goes to ``device`` in float32.
        self.device = torch.device(device)
        self.states = states
        self.H = states.hidden
        Y = states.target.long()
        self.learn_ids = torch.nonzero(learn).squeeze(1)
        fixed_ids = torch.nonzero(~learn).squeeze(1)
        pos_in_learn = torch.full((head.shape[0],), -1, dtype=torch.long)
        pos_in_learn[self.learn_ids] = torch.arange(len(self.learn_ids))
        self.tgt_learn = pos_in_learn[Y].to(self.device)
        self.use_kl = use_kl
        if use_kl:
            # the learning rows grouped by first piece (a few thousand groups, not the whole old vocabulary)
            firsts, group = torch.unique(first_piece[self.learn_ids], return_inverse=True)
            self.learn_group, self.n_groups = group.to(self.device), len(firsts)
            ti = states.teacher_i.long()
            at = torch.searchsorted(firsts, ti.clamp(max=int(firsts[-1])))
            self.group_at_top = torch.where(firsts[at] == ti, at, -1).to(self.device, torch.int32)
        W = head.to(self.device, torch.float32)
        # rows = start + features @ map + residual: the map is shared by every learning row, so what it learns
        # from the tokens seen in the text carries over to those seen rarely or never
        self.start = W[self.learn_ids.to(self.device)].clone()
        self.residual = nn.Parameter(torch.zeros_like(self.start))
        self.features = None if features is None else features.to(self.device, torch.float32)
        self.map = (
            None
            if features is None
            else nn.Parameter(torch.zeros(features.shape[1], W.shape[1], device=self.device))
        )
        self.lse_fixed, self.tgt_fixed, self.top_fixed = self._fixed_parts(W, fixed_ids.to(self.device), Y)
        self.tree = (
            TreeTerms(states, self.learn_ids, pieces)
            if use_kl and pieces is not None and states.tree_p is not None
            else None
        )

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.H[idx].to(self.device, torch.float32)

    def _fixed_parts(self, W: torch.Tensor, fixed_ids: torch.Tensor, Y: torch.Tensor) -> tuple:
        n, dev = len(Y), self.device
        lse = torch.empty(n, device=dev)
        tgt = torch.full((n,), -math.inf, device=dev)
        top = torch.full(self.states.teacher_p.shape, -math.inf, device=dev) if self.use_kl else None
        fixed_pos = torch.full((W.shape[0],), -1, dtype=torch.long, device=dev)
        fixed_pos[fixed_ids] = torch.arange(len(fixed_ids), device=dev)
        Wf = W[fixed_ids]
        with torch.no_grad():
            for s in range(0, n, 2048):
                lo = self._rows(torch.arange(s, min(n, s + 2048))) @ Wf.T
                lse[s : s + 2048] = torch.logsumexp(lo, 1)
                fp = fixed_pos[Y[s : s + 2048].to(dev)]
                hit = fp >= 0
                tgt[s : s + 2048][hit] = lo[hit].gather(1, fp[hit][:, None])[:, 0]
                if top is not None:
                    fpi = fixed_pos[self.states.teacher_i[s : s + 2048].to(dev)]
                    vals = lo.gather(1, fpi.clamp(min=0))
                    top[s : s + 2048] = torch.where(fpi >= 0, vals, torch.full_like(vals, -math.inf))
        return lse, tgt, top

    def rows(self) -> torch.Tensor:
        """The learning rows as they stand (differentiable in the residual and the map)."""
        out = self.start + self.residual
        return out if self.map is None else out + self.features @ self.map

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """X @ rows.T, in whichever order costs less: with the map, building every row costs n_learn x 2H x H
        multiply-adds a step, going through the features B x 2H x (H + n_learn); the first is cheaper for small
        hidden sizes (SmolLM2), the second for large ones (H = 4096: ~4x fewer)."""
        if self.map is None:
            return X @ self.rows().T
        (n, f), (b, h) = self.features.shape, X.shape
        if n * f * h <= b * f * (h + n):
            return X @ self.rows().T
        return X @ (self.start + self.residual).T + (X @ self.map.T) @ self.features.T

    def __call__(
        self, idx: torch.Tensor, with_kl: bool, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean next-token CE, mean KL to the teacher or None) of the states ``idx``, with ``rows`` as the
        learning rows (default: the current ones, see :meth:`logits`)."""
        X = self._rows(idx)
        ll = self.logits(X) if rows is None else X @ rows.T
        d = idx.to(self.device)
        lse = torch.logaddexp(self.lse_fixed[d], torch.logsumexp(ll, 1))
        tl = self.tgt_learn[d]
        tgt = torch.where(tl >= 0, ll.gather(1, tl.clamp(min=0)[:, None])[:, 0], self.tgt_fixed[d])
        ce = (lse - tgt).mean()
        if not (with_kl and self.use_kl):
            return ce, None
        p = self.states.teacher_p[idx].to(self.device, torch.float32)
        has = p.sum(1) > 0
        if not has.any():
            return ce, None
        g = self.group_at_top[idx].to(self.device).long()
        kl = kl_to_teacher(
            lse[has], self.top_fixed[d][has], ll[has], self.learn_group, self.n_groups, p[has], g[has]
        ).mean()
        tree = self.tree.kl(idx, ll) if self.tree is not None else None
        return ce, kl if tree is None else kl + tree

    @torch.no_grad()
    def loss_and_grad(
        self, idx: torch.Tensor, ll: torch.Tensor, kl_weight: float
    ) -> tuple[float, float | None, torch.Tensor]:
        """(mean CE, KL (with the tree terms) or None, d(CE + kl_weight * KL)/d(ll)) of the states ``idx`` with
        learning logits ``ll`` (B, n_learn): the same loss as :meth:`__call__`, its gradient written out so a
        step makes a few passes over the (B, n_learn) logits instead of autograd's dozens. With P_j the
        probability of learning row j: the CE contributes P_j - [j is the target]; the first-piece KL
        P_j * (A_g(j) - sum_k a_k q_k), a_k = d(KL)/d(q_k) and A_g the sum of a_k over the teacher entries
        naming group g (its q_k moves with every logit through the shared normaliser)."""
        d = idx.to(self.device)
        B = ll.shape[0]
        top = ll.max(1, keepdim=True).values
        P = torch.exp(ll - top)
        lse = torch.logaddexp(self.lse_fixed[d], (top + P.sum(1, keepdim=True).log()).squeeze(1))
        P *= torch.exp(top - lse[:, None])  # P_j = exp(ll_j - lse)
        tl = self.tgt_learn[d]
        tgt = torch.where(tl >= 0, ll.gather(1, tl.clamp(min=0)[:, None])[:, 0], self.tgt_fixed[d])
        ce = float((lse - tgt).mean())
        coef = torch.full_like(P, 1.0 / B)
        kl_value = None
        if self.use_kl and kl_weight > 0:
            p = self.states.teacher_p[idx].to(self.device, torch.float32)
            has = torch.nonzero(p.sum(1) > 0).squeeze(1)
            if len(has):
                kl_value = self._first_piece_kl(d, P, lse, p, has, coef, kl_weight)
                if self.tree is not None:
                    c2 = torch.zeros_like(P)
                    kl_value += self.tree.kl_and_coef(idx, P, c2)
                    coef += kl_weight * c2
        grad = P.mul_(coef)
        hit = torch.nonzero(tl >= 0).squeeze(1)
        grad[hit, tl[hit]] -= 1.0 / B
        return ce, kl_value, grad

    def _first_piece_kl(
        self,
        d: torch.Tensor,
        P: torch.Tensor,
        lse: torch.Tensor,
        p: torch.Tensor,
        has: torch.Tensor,
        coef: torch.Tensor,
        weight: float,
    ) -> float:
        """:func:`kl_to_teacher` over the states ``has`` (mean), its gradient coefficients added to ``coef``."""
        P_h, lse_h, p = P[has], lse[has], p[has]
        g = self.group_at_top[d[has]].long()
        mass = torch.zeros(len(has), self.n_groups, dtype=P.dtype, device=P.device).index_add(
            1, self.learn_group, P_h
        )
        learned = torch.where(g >= 0, mass.gather(1, g.clamp(min=0)), 0.0)
        q_raw = torch.exp(self.top_fixed[d[has]] - lse_h[:, None]) + learned
        q = q_raw.clamp_min(1e-8)
        rest_p = (1.0 - p.sum(1)).clamp_min(1e-6)
        rest_raw = 1.0 - q.sum(1)
        rest_q = rest_raw.clamp_min(1e-6)
        pk = p.clamp_min(1e-12)
        kl = (pk * (pk.log() - q.log())).sum(1) + rest_p * (rest_p.log() - rest_q.log())
        # a_k = d(KL)/d(q_k) through both the log and the rest bucket, zero where q_k is clamped
        a = (-pk / q + torch.where(rest_raw > 1e-6, rest_p / rest_q, 0.0)[:, None]) * (q_raw > 1e-8)
        A = torch.zeros_like(mass).scatter_add_(1, g.clamp(min=0), torch.where(g >= 0, a, 0.0))
        shift = (a * q_raw).sum(1, keepdim=True)
        coef[has] += weight / len(has) * (A[:, self.learn_group] - shift)
        return float(kl.mean())

    @torch.no_grad()
    def mean_ce(self, idx: torch.Tensor) -> float:
        if not len(idx):
            return float("nan")
        rows = self.rows()
        total = sum(
            float(self(idx[s : s + 4096], False, rows)[0]) * len(idx[s : s + 4096])
            for s in range(0, len(idx), 4096)
        )
        return total / len(idx)
