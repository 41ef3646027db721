"""The head fit's data: the new model's final states over text of every domain, the next token at each, and
the original model's top-k next-piece probabilities at the aligned positions (down its piece tree)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from retok.core.metrics import bos_id
from retok.teacher.alignment import ByteLengths, align
from retok.teacher.body import Teacher, body_forward


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
    terms of the fit). ``teacher_fraction``: the share of the windows that need a teacher forward pass
    (those whose ids are not the original's own) that get one, evenly spread; the others keep only the
    next-token target (their teacher probabilities stay zero, which the fit reads as "no teacher here").
    Windows the teacher reads as they are cost no forward pass and always keep it."""
    c = _Collector(model, new_tok, teacher, old_tok, top_k, tree_depth, teacher_fraction, embed_weight)
    total = sum(len(d.encode("utf-8")) for ds in docs.values() for d in ds)
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False) as bar:
        for d_idx, texts in enumerate(docs.values()):
            for text in texts:
                bar.update(len(text))
                c.document(text, d_idx, window, held_out_every)
    if not c.hidden:
        raise ValueError("no text to collect states from")
    return c.states(list(docs))


class _Collector:
    """collect_states' running lists: one document at a time, one window at a time."""

    def __init__(
        self,
        model: nn.Module,
        new_tok: Any,
        teacher: Teacher | None,
        old_tok: Any,
        top_k: int,
        tree_depth: int,
        teacher_fraction: float,
        embed_weight: torch.Tensor | None,
    ) -> None:
        self.model, self.new_tok, self.teacher, self.old_tok = model, new_tok, teacher, old_tok
        self.top_k, self.tree_depth, self.fraction, self.embed_weight = (
            top_k,
            tree_depth,
            teacher_fraction,
            embed_weight,
        )
        self.device = next(model.parameters()).device
        self.bos = bos_id(new_tok)
        self.lengths = (ByteLengths(old_tok), ByteLengths(new_tok)) if teacher is not None else None
        self.same_rows = (
            _same_rows(teacher, embed_weight if embed_weight is not None else model) if teacher else None
        )
        self.hidden: list[torch.Tensor] = []
        self.target: list[torch.Tensor] = []
        self.held: list[torch.Tensor] = []
        self.dom: list[torch.Tensor] = []
        self.tp: list[torch.Tensor] = []
        self.ti: list[torch.Tensor] = []
        self.trees: list[tuple] = []
        self.n_win = 0
        self.credit = 0.0  # teacher_fraction's running share: a forward pass each time it reaches 1
        self.tokens = {"student": 0, "teacher": 0}
        self.seconds = {"student": 0.0, "teacher": 0.0}

    def document(self, text: str, d_idx: int, window: int, held_out_every: int) -> None:
        new_ids = self.new_tok(text, add_special_tokens=False)["input_ids"]
        old_ids = amap = None
        if self.teacher is not None:
            old_ids = self.old_tok(text, add_special_tokens=False)["input_ids"]
            amap = align(*self.lengths, old_ids, new_ids).teacher
        for s, e in _windows(len(new_ids), window):
            h = self._student(new_ids, s, e)
            held = self.n_win % held_out_every == held_out_every - 1
            off = 1 if self.bos is not None else 0
            # the state after new token p (p in s..e-2) predicts token p+1
            self.hidden.append(h[off : off + e - s - 1].to(torch.float16).cpu())
            self.target.append(torch.tensor(new_ids[s + 1 : e]))
            self.held.append(torch.full((e - s - 1,), held))
            self.dom.append(torch.full((e - s - 1,), d_idx))
            if self.teacher is not None:
                p, i, tree = self._teacher(old_ids, new_ids, amap, s, e, h)
                self.tp.append(p)
                self.ti.append(i)
                self.trees.append(tree)
            self.n_win += 1

    def _student(self, new_ids: list[int], s: int, e: int) -> torch.Tensor:
        ids = ([self.bos] if self.bos is not None else []) + new_ids[s:e]
        x = torch.tensor([ids], device=self.device)
        t0 = time.perf_counter()
        h = body_forward(self.model, x, embed_weight=self.embed_weight).last[0]
        self.seconds["student"] += time.perf_counter() - t0
        self.tokens["student"] += len(ids)
        return h

    def _teacher(self, old_ids: list[int], new_ids: list[int], amap: Any, s: int, e: int, h: torch.Tensor):
        """The teacher's targets of window s..e: from the student's own states when the teacher reads this
        window as it is, none when teacher_fraction skips it, else from a teacher forward pass."""
        # Same ids with the same input rows through the same body: the teacher's states are this window's own,
        # and only its head differs (English and code in extend mode).
        shared = self.same_rows is not None and _same_window(old_ids, new_ids, amap, s, e, self.same_rows)
        if not shared:
            self.credit += self.fraction
            if self.credit < 1.0 - 1e-9:
                return _no_teacher(e - s - 1, self.top_k, self.tree_depth)
            self.credit -= 1.0
        return _teacher_topk(
            self.teacher,
            old_ids,
            amap,
            s,
            e,
            self.bos,
            self.top_k,
            self.device,
            self.tokens,
            self.seconds,
            states=h if shared else None,
            depth=self.tree_depth,
        )

    def states(self, domains: list[str]) -> States:
        trees, depth = self.trees, self.tree_depth
        return States(
            hidden=torch.cat(self.hidden),
            target=torch.cat(self.target),
            held_out=torch.cat(self.held),
            domain=torch.cat(self.dom),
            domains=domains,
            teacher_p=torch.cat(self.tp) if self.tp else None,
            teacher_i=torch.cat(self.ti) if self.ti else None,
            tree_p=torch.cat([t[0] for t in trees]) if trees and depth else None,
            tree_i=torch.cat([t[1] for t in trees]) if trees and depth else None,
            tree_prefix=torch.cat([t[2] for t in trees]) if trees and depth else None,
            tokens=self.tokens,
            seconds=self.seconds,
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
