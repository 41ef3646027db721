"""Head rows of new tokens fitted on the states the new model really produces, with the original model's
next-token distribution as a soft target. No backprop through the body: a softmax regression over cached
final hidden states, minutes on a CPU.

1. :func:`collect_states` runs the model (the frozen body with the new input rows) over text of EVERY
   training domain, so the new rows also learn where NOT to fire (English, code), and keeps each position's
   final state (float16), the next token, and, at the aligned teacher position, the original model's top-k
   next-OLD-token probabilities (retok.teacher, retok.alignment).
2. :func:`fit_rows` fits the rows that may learn (the new tokens') by cross-entropy on the next token, plus
   ``kl_weight`` x KL(teacher || student), where the student's distribution is marginalised onto first old
   pieces (a new token counts for the old token it starts with) over the teacher's top-k and one "rest"
   bucket. Rows that do not learn are constant, so their log-sum-exp is computed once per state and each step
   touches only the learning rows; its gradient is written out (``_RowObjective.loss_and_grad``: a few passes
   over the batch's logits instead of autograd's dozens, 1.2x faster on the demo, tested equal to autograd's).
   Held-out states (every 20th window) stop the fit when it starts to overfit.

The tree terms (``tree_depth`` >= 1) go down the teacher's piece tree along the realised text: the teacher's
distribution over the piece after the realised first piece r1 (its state one old position later, no extra
forward pass) is matched by the student's mass of new tokens spelled (r1, q, ...), grouped by q and
renormalised over the keys both sides have; depth d conditions on r1..rd. A new token is a PATH of pieces, so
its row is pinned down by every piece of it, not only its first: on the demo depth 1 took the zh BPB after
init from 1.289x to 1.230x of the original's, on the same states.

The fit is data-bound (on the demo ~1.6 Chinese targets per new row), so the rows share what they learn: each
is its start + ``features @ map`` + its own residual, where the features are the original head rows of its first
piece and of its other pieces, and (``init.fit_input_feature``) the token's own input row (:func:`piece_features`),
and the map is one matrix for all new tokens. The map learns from the tokens the text shows how a spelling
(and what the input side learned) sets a row and applies it to those it shows rarely or not at all; on the
demo the pieces took zh after init from 1.230x to 1.175x, on the same states, and after train-io the input
row took zh from 1.113x to 1.095x (2 epochs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from retok.alignment import ByteLengths, align
from retok.teacher import Teacher, body_forward

FIT_BATCH = 1024  # states per Adam step of the fit


@dataclass
class States:
    """Final states of the new model at every scored position, and what follows each."""

    hidden: torch.Tensor  # (N, H) float16
    target: torch.Tensor  # (N,) the next token (new vocabulary)
    held_out: torch.Tensor  # (N,) bool: states of every 20th window, for early stopping
    domain: torch.Tensor  # (N,) index into ``domains``
    domains: list[str]
    teacher_p: torch.Tensor | None = None  # (N, K) the teacher's top-k next-old-token probabilities
    teacher_i: torch.Tensor | None = None  # (N, K) their old ids
    # the tree terms: at depth d (1..D), the teacher's top-k next old piece after the realised pieces r1..rd
    tree_p: torch.Tensor | None = None  # (N, D, K) float32
    tree_i: torch.Tensor | None = None  # (N, D, K) int32 old ids
    # (N, D) the realised old pieces r1..rD after each state, -1 if none
    tree_prefix: torch.Tensor | None = None
    tokens: dict[str, int] = field(default_factory=dict)  # tokens run through the model, per side
    seconds: dict[str, float] = field(default_factory=dict)


def _windows(n: int, window: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + window)) for s in range(0, max(0, n - 1), window) if min(n, s + window) - s >= 2]


@torch.no_grad()
def collect_states(
    model: nn.Module,
    new_tok: Any,
    docs: dict[str, list[str]],
    *,
    window: int,
    teacher: Teacher | None = None,
    old_tok: Any = None,
    top_k: int = 64,
    tree_depth: int = 0,
    teacher_fraction: float = 1.0,
    held_out_every: int = 20,
    embed_weight: torch.Tensor | None = None,
    desc: str = "collect states",
) -> States:
    """Windows of ``window`` new tokens over every document of every domain, through ``model``'s body (with
    ``embed_weight`` as its input embedding when given: the new rows on the original model's body).
    ``tree_depth``: how many old positions past each aligned one the teacher's top-k is also kept (the tree
    terms of :func:`fit_rows`). ``teacher_fraction``: the share of the windows that need a teacher forward pass
    (those whose ids are not the original's own) that get one, evenly spread; the others keep only the
    next-token target (their teacher probabilities stay zero, which the fit reads as "no teacher here").
    Windows the teacher reads as they are cost no forward pass and always keep it."""
    from retok.metrics import bos_id

    device = next(model.parameters()).device
    bos = bos_id(new_tok)
    lengths = (ByteLengths(old_tok), ByteLengths(new_tok)) if teacher is not None else None
    same_rows = _same_rows(teacher, embed_weight if embed_weight is not None else model) if teacher else None
    hidden, target, held, dom, tp, ti, trees = [], [], [], [], [], [], []
    n_win = 0
    credit = 0.0  # teacher_fraction's running share: a forward pass each time it reaches 1
    tokens = {"student": 0, "teacher": 0}
    seconds = {"student": 0.0, "teacher": 0.0}
    total = sum(len(d.encode("utf-8")) for ds in docs.values() for d in ds)
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False) as bar:
        for d_idx, texts in enumerate(docs.values()):
            for text in texts:
                bar.update(len(text))
                new_ids = new_tok(text, add_special_tokens=False)["input_ids"]
                old_ids = (
                    old_tok(text, add_special_tokens=False)["input_ids"] if teacher is not None else None
                )
                amap = align(*lengths, old_ids, new_ids).teacher if teacher is not None else None
                for s, e in _windows(len(new_ids), window):
                    ids = ([bos] if bos is not None else []) + new_ids[s:e]
                    x = torch.tensor([ids], device=device)
                    t0 = time.perf_counter()
                    h = body_forward(model, x, embed_weight=embed_weight).last[0]
                    seconds["student"] += time.perf_counter() - t0
                    tokens["student"] += len(ids)
                    off = 1 if bos is not None else 0
                    # the state after new token p (p in s..e-2) predicts token p+1
                    hidden.append(h[off : off + e - s - 1].to(torch.float16).cpu())
                    target.append(torch.tensor(new_ids[s + 1 : e]))
                    held.append(torch.full((e - s - 1,), n_win % held_out_every == held_out_every - 1))
                    dom.append(torch.full((e - s - 1,), d_idx))
                    if teacher is not None:
                        # Same ids with the same input rows through the same body: the teacher's states
                        # are this window's own, and only its head differs (English and code in extend mode).
                        shared = same_rows is not None and _same_window(
                            old_ids, new_ids, amap, s, e, same_rows
                        )
                        skip = False
                        if not shared:
                            credit += teacher_fraction
                            skip = credit < 1.0 - 1e-9
                            credit -= 0.0 if skip else 1.0
                        p, i, tree = (
                            _no_teacher(e - s - 1, top_k, tree_depth)
                            if skip
                            else _teacher_topk(
                                teacher,
                                old_ids,
                                amap,
                                s,
                                e,
                                bos,
                                top_k,
                                device,
                                tokens,
                                seconds,
                                states=h if shared else None,
                                depth=tree_depth,
                            )
                        )
                        tp.append(p)
                        ti.append(i)
                        trees.append(tree)
                    n_win += 1
    if not hidden:
        raise ValueError("no text to collect states from")
    return States(
        hidden=torch.cat(hidden),
        target=torch.cat(target),
        held_out=torch.cat(held),
        domain=torch.cat(dom),
        domains=list(docs),
        teacher_p=torch.cat(tp) if tp else None,
        teacher_i=torch.cat(ti) if ti else None,
        tree_p=torch.cat([t[0] for t in trees]) if trees and tree_depth else None,
        tree_i=torch.cat([t[1] for t in trees]) if trees and tree_depth else None,
        tree_prefix=torch.cat([t[2] for t in trees]) if trees and tree_depth else None,
        tokens=tokens,
        seconds=seconds,
    )


def _no_teacher(
    n: int, k: int, depth: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Teacher targets of ``n`` states that have none: zero probabilities (the fit's "no teacher here"), no
    realised pieces (-1)."""
    return (
        torch.zeros(n, k),
        torch.zeros(n, k, dtype=torch.long),
        (
            torch.zeros(n, depth, k),
            torch.zeros(n, depth, k, dtype=torch.int32),
            torch.full((n, depth), -1, dtype=torch.long),
        ),
    )


def _teacher_topk(
    teacher: Teacher,
    old_ids: list[int],
    amap: Any,
    s: int,
    e: int,
    bos: int | None,
    k: int,
    device: Any,
    tokens: dict[str, int],
    seconds: dict[str, float],
    states: torch.Tensor | None = None,
    depth: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The teacher's top-k next-old-token probabilities at the old positions aligned with new s..e-2 (zeros
    where a new position has no teacher: train-mode tokenizers), and the tree's (probabilities, ids, realised
    pieces) at the ``depth`` old positions after each. ``states``: the teacher's final states of this window
    when they are known to equal the student's (see :func:`_same_window`), so no forward pass."""
    pos = torch.as_tensor(amap[s : e - 1])
    probs, idx, (tree_p, tree_i, prefix) = _no_teacher(len(pos), k, depth)
    ok = pos >= 0
    if not ok.any():
        return probs, idx, (tree_p, tree_i, prefix)
    first = 0 if s == 0 else int(amap[s - 1]) + 1 if amap[s - 1] >= 0 else int(pos[ok].min())
    # ``depth`` old tokens past the last aligned one: the tree reads the teacher's states there
    last = min(len(old_ids), int(pos[ok].max()) + 1 + depth)
    old = ([bos] if bos is not None else []) + old_ids[first:last]
    t0 = time.perf_counter()
    if states is None:
        states = teacher.forward(torch.tensor([old], device=device)).last[0]
        tokens["teacher"] += len(old)
    else:
        tokens["teacher_shared"] = tokens.get("teacher_shared", 0) + len(old)
    off = 1 if bos is not None else 0
    rel = pos[ok] - first + off
    keep = rel >= 0
    rows = torch.nonzero(ok).squeeze(1)[keep]
    at = [rel[keep]]
    has = []
    for d in range(1, depth + 1):  # the state after the realised pieces r1..rd (inside what was run)
        has.append(rel[keep] + d < states.shape[0])
        at.append((rel[keep] + d)[has[-1]])
    logits = teacher.logits(states[torch.cat(at)]).float()
    seconds["teacher"] += time.perf_counter() - t0
    top = torch.softmax(logits, -1).topk(k, dim=-1)
    values, indices = top.values.cpu(), top.indices.cpu()
    n = len(rows)
    probs[rows] = values[:n]
    idx[rows] = indices[:n]
    aligned = pos[ok][keep]
    for d in range(1, depth + 1):
        r, m = rows[has[d - 1]], int(has[d - 1].sum())
        tree_p[r, d - 1] = values[n : n + m]
        tree_i[r, d - 1] = indices[n : n + m].to(torch.int32)
        prefix[r, d - 1] = torch.as_tensor(
            [old_ids[int(a) + d] for a in aligned[has[d - 1]]], dtype=torch.long
        )
        n += m
    return probs, idx, (tree_p, tree_i, prefix)


def _same_rows(teacher: Teacher, student: nn.Module | torch.Tensor) -> torch.Tensor:
    """Per old id: is the student's input row for that id bit-identical to the teacher's (a copied row)?"""
    weight = student if isinstance(student, torch.Tensor) else student.get_input_embeddings().weight
    n = min(len(weight), len(teacher.embed))
    same = torch.zeros(len(teacher.embed), dtype=torch.bool)
    same[:n] = (
        (weight[:n].to(teacher.embed.device, teacher.embed.dtype) == teacher.embed[:n]).all(dim=1).cpu()
    )
    return same


def _same_window(
    old_ids: list[int], new_ids: list[int], amap: Any, s: int, e: int, same_rows: torch.Tensor
) -> bool:
    """Does the teacher read exactly this window: the old ids that :func:`_teacher_topk` would run equal the new
    window's ids, position for position, and each of those ids has the same input row on both sides?"""
    if s > 0 and amap[s - 1] < 0:
        return False
    first = 0 if s == 0 else int(amap[s - 1]) + 1
    window = new_ids[s:e]
    if old_ids[first : first + len(window)] != window or int(amap[e - 2]) != first + len(window) - 2:
        return False
    return all(t < len(same_rows) and bool(same_rows[t]) for t in window)


# --------------------------------------------------------------------------------------------- the fit


@dataclass
class FitResult:
    head: torch.Tensor  # the whole head matrix, fitted rows replaced
    held_out_ce: float  # nats/token on the held-out states, best
    held_out_ce_start: float
    epochs: float  # where the best was reached
    steps: int
    seconds: float
    history: list[tuple[int, float]]


def _kl_to_teacher(
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


class _Tree:
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


class _RowObjective:
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
            _Tree(states, self.learn_ids, pieces)
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
        kl = _kl_to_teacher(
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
        """:func:`_kl_to_teacher` over the states ``has`` (mean), its gradient coefficients added to ``coef``."""
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


def fit_rows(
    states: States,
    head: torch.Tensor,
    learn: torch.Tensor,
    *,
    first_piece: torch.Tensor | None = None,
    pieces: dict[int, Sequence[int]] | None = None,
    kl_weight: float = 0.0,
    features: torch.Tensor | None = None,
    map_lr: float = 5e-4,
    lr: float = 1e-3,
    max_epochs: float = 8.0,
    batch: int = FIT_BATCH,
    patience: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit the rows of ``head`` marked in ``learn`` (bool per row); every other row stays as it is.

    ``first_piece[t]``: the old token new token t starts with (needed for ``kl_weight`` > 0, where the
    learning rows must all be new tokens). ``pieces[t]``: new token t's old pieces, for the tree terms (when
    ``states`` carries them; each is weighted like the first-piece KL). ``features`` (one row per learning row,
    in row order; see :func:`piece_features`): the rows become start + features @ map + residual, the map shared
    by all of them and learned at ``map_lr``, the residuals at ``lr``; without, each row is free. Adam (0.9,
    0.95), cosine decay to 10%, evaluation on the held-out states every half epoch, the best rows kept.
    """
    t0 = time.perf_counter()
    use_kl = kl_weight > 0 and states.teacher_p is not None
    train_idx = torch.nonzero(~states.held_out).squeeze(1)
    val_idx = torch.nonzero(states.held_out).squeeze(1)
    obj = _RowObjective(states, head, learn, first_piece, use_kl, device, pieces, features)
    groups = [{"params": [obj.residual], "lr": lr}]
    if obj.map is not None:
        groups.append({"params": [obj.map], "lr": map_lr})
    base_lr = [g["lr"] for g in groups]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    per_epoch = max(1, math.ceil(len(train_idx) / batch))
    total = max(1, int(max_epochs * per_epoch))
    best = start = obj.mean_ce(val_idx)
    with torch.no_grad():
        best_rows, best_step, worse = obj.rows().clone(), 0, 0
    history = [(0, start)]
    order = torch.empty(0, dtype=torch.long)
    step = 0
    while step < total:
        if len(order) < batch:
            order = torch.cat([order, train_idx[torch.randperm(len(train_idx), generator=gen)]])
        idx, order = order[:batch], order[batch:]
        for g, g_lr in zip(opt.param_groups, base_lr, strict=True):
            g["lr"] = g_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        ll = obj.logits(obj._rows(idx))
        _, _, grad = obj.loss_and_grad(idx, ll.detach(), kl_weight if use_kl else 0.0)
        opt.zero_grad(set_to_none=True)
        ll.backward(grad)
        opt.step()
        step += 1
        if step % max(1, per_epoch // 2) and step != total:
            continue
        # every half epoch: keep the best rows on the held-out states, stop when they stop improving
        v = obj.mean_ce(val_idx)
        history.append((step, v))
        if log:
            log(f"head fit: epoch {step / per_epoch:.1f}, held-out CE {v:.4f} (start {start:.4f})")
        if not len(val_idx) or v < best - 1e-4:
            with torch.no_grad():
                best, best_rows, best_step, worse = v, obj.rows().clone(), step, 0
        else:
            worse += 1
            if worse >= patience:
                break
    out = head.clone()
    out[obj.learn_ids] = best_rows.to("cpu", head.dtype)
    return FitResult(
        head=out,
        held_out_ce=best,
        held_out_ce_start=start,
        epochs=best_step / per_epoch,
        steps=step,
        seconds=time.perf_counter() - t0,
        history=history,
    )


def first_pieces(n_rows: int, pieces: dict[int, Sequence[int]], copy_source: dict[int, int]) -> torch.Tensor:
    """first_piece[t] for every row: an old token is its own first piece; a new token the first of its old
    pieces; rows with neither get 0 (they never carry mass: padding)."""
    out = torch.zeros(n_rows, dtype=torch.long)
    for new_id, old_id in copy_source.items():
        out[new_id] = old_id
    for new_id, ps in pieces.items():
        if ps:
            out[new_id] = ps[0]
    return out


def piece_features(
    old_head: torch.Tensor,
    pieces: dict[int, Sequence[int]],
    ids: torch.Tensor,
    input_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """(len(ids), 2H) float32 per new token: the original head row of its first piece, and the mean of the rows
    of its other pieces (zeros for a one-piece token or one without pieces). The map the fit learns on them
    says, for every new token at once, how its row should differ from the start given what it is spelled
    with. ``input_rows`` (the model's whole input embedding): a third block of H, the token's own input row,
    so the map can also read what the input side learned about the token (after train-io's distillation, what
    it means in context; on the demo zh 1.113x -> 1.095x of the original's BPB at 2 epochs)."""
    H = old_head.shape[1]
    out = torch.zeros(len(ids), (2 if input_rows is None else 3) * H)
    if input_rows is not None:
        out[:, 2 * H :] = input_rows[ids.to(input_rows.device)].float().cpu()
    for j, t in enumerate(ids.tolist()):
        ps = list(pieces.get(int(t)) or ())
        if not ps:
            continue
        out[j, :H] = old_head[ps[0]].float()
        if len(ps) > 1:
            out[j, H : 2 * H] = old_head[ps[1:]].float().mean(0)
    return out
