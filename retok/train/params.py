"""What learns in each phase of train-io, the optimizer and the learning-rate schedule.

Phases: ``io`` (the embedding and head; the body frozen) and ``all`` (the optional joint phase, everything).
Only the embedding and the head get gradients in the io phase: the body's parameters have
``requires_grad=False``, so autograd computes no weight gradient for them and the optimizer never sees them
(they are bit-identical after training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from retok.core.config import RetokConfig

Phase = Literal["io", "all"]
ADAM_BETAS = (0.9, 0.95)  # the usual LLM-training betas; 0.999 reacts too slowly for a short run


@dataclass
class IOParams:
    """The embedding and head of a model, and which of their rows may learn."""

    embed: nn.Parameter
    head: nn.Parameter | None  # None when tied (one matrix serves both)
    head_bias: nn.Parameter | None
    n_tokens: int  # len(tokenizer); rows at or past it are padding and stay inert
    learn_rows: torch.Tensor  # bool (rows,): rows that may change in the io phase
    head_learns: bool = True  # False: objective distill, which gives the head no gradient
    compact: Any = None  # retok.train.rows.CompactRows while the io phase trains the input rows that way

    @property
    def matrices(self) -> list[nn.Parameter]:
        return [self.embed] + ([self.head] if self.head is not None else [])

    @property
    def input_param(self) -> nn.Parameter:
        """What the input rows learn through: the compact rows in the io phase where set, else the embedding."""
        return self.compact.param if self.compact is not None else self.embed

    def trainable(self, phase: Phase) -> list[nn.Parameter]:
        """The matrices that learn in ``phase`` (biases apart)."""
        if phase == "io" and not self.head_learns:
            return [self.input_param]
        if phase == "io":
            return [self.input_param] + ([self.head] if self.head is not None else [])
        return self.matrices

    def row_mask(self, p: nn.Parameter, phase: Phase) -> torch.Tensor:
        """(rows, 1) mask of the rows of ``p`` that may move in ``phase`` (padding rows never do; every
        compact row does)."""
        if self.compact is not None and p is self.compact.param:
            return torch.ones(p.shape[0], 1, dtype=p.dtype, device=p.device)
        rows = self.learn_rows if phase == "io" else torch.arange(self.embed.shape[0]) < self.n_tokens
        return _mask_col(rows, p)

    def compact_ok(self) -> bool:
        """Whether the io phase trains the input rows as compact rows: at most half the rows learn (the new
        tokens' rows: io_new_rows), and the head is not the same matrix learning through the head's side too."""
        few = int(self.learn_rows.sum()) <= self.learn_rows.numel() // 2
        return few and not (self.head is None and self.head_learns)

    def biases(self, phase: Phase) -> list[nn.Parameter]:
        learns = phase == "all" or self.head_learns
        return [self.head_bias] if self.head_bias is not None and learns else []


def io_params(model: nn.Module, n_tokens: int, new_ids: list[int] | None) -> IOParams:
    embed = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = None if head_mod.weight is embed else head_mod.weight
    rows = embed.shape[0]
    if new_ids is None:
        learn = torch.arange(rows) < n_tokens
    else:
        learn = torch.zeros(rows, dtype=torch.bool)
        learn[torch.as_tensor(new_ids, dtype=torch.long)] = True
    return IOParams(embed, head, getattr(head_mod, "bias", None), n_tokens, learn)


def _mask_col(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.to(device=like.device, dtype=like.dtype)[:, None]


def freeze(model: nn.Module, io: IOParams, phase: Phase) -> list[Any]:
    """requires_grad on exactly what learns in ``phase`` ("io" or "all"); returns the gradient-mask hooks.

    Rows that must not move (padding always; old tokens in io_new_rows) get their gradient zeroed by a hook
    before it reaches .grad. With a zero gradient from the first step, AdamW's moments stay 0 and its update
    is exactly 0, so those rows stay bit-identical (weight decay is applied by :func:`apply_decay`, masked too).
    """
    for p in model.parameters():
        p.requires_grad_(phase == "all")
    for p in io.trainable(phase) + io.biases(phase):
        p.requires_grad_(True)
    hooks = []
    for p in io.trainable(phase):
        col = io.row_mask(p, phase)
        if not bool(col.all()):
            hooks.append(p.register_hook(lambda g, col=col: g * col))
    return hooks


def row_masks(io: IOParams, phase: Phase) -> dict[int, torch.Tensor]:
    """id(matrix) -> (rows, 1) mask of the rows that may move in ``phase`` (padding rows never do)."""
    return {id(p): io.row_mask(p, phase) for p in io.trainable(phase)}


decay_masks = row_masks  # weight decay is masked to the same rows


def count_params(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


# ------------------------------------------------------------------------------ optimizer and schedule


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for the update made at ``step`` (0-based): linear warm-up, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: nn.Module, io: IOParams, cfg: RetokConfig, phase: Phase, piece_map: Any = None
) -> torch.optim.AdamW:
    """AdamW over what learns in ``phase``; in the io phase also ``piece_map``'s map (retok.train.piecemap)."""
    t = cfg.train
    if phase == "io":
        groups = [{"params": [io.input_param], "lr": t.embed_lr or t.lr, "name": "embed"}]
        if piece_map is not None:
            groups.append({"params": [piece_map.map], "lr": t.piece_map_lr, "name": "piece_map"})
        if io.head is not None and io.head_learns:
            groups.append({"params": [io.head], "lr": t.head_lr or t.lr, "name": "head"})
        if io.biases(phase):
            groups.append({"params": io.biases(phase), "lr": t.head_lr or t.lr, "name": "head_bias"})
        decay = 0.0  # applied row-masked by _decay
    else:
        io_ids = {id(p) for p in io.matrices}
        body = [p for p in model.parameters() if id(p) not in io_ids]
        groups = [
            {"params": io.matrices, "lr": t.full.lr, "name": "io"},
            {"params": body, "lr": t.full.lr, "name": "body"},
        ]
        decay = t.weight_decay
    for g in groups:
        g["base_lr"] = g["lr"]
        g["weight_decay"] = decay if g["name"] == "body" else 0.0
    # fused: one kernel per step, no vocabulary-sized temporaries (foreach makes several).
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=1e-8, fused=fused)


@torch.no_grad()
def apply_decay(opt: torch.optim.Optimizer, masks: dict[int, torch.Tensor], weight_decay: float) -> None:
    """Decoupled weight decay (AdamW's p *= 1 - lr*wd) on the embedding/head rows that may learn only."""
    if weight_decay <= 0:
        return
    for g in opt.param_groups:
        for p in g["params"]:
            m = masks.get(id(p))
            if m is not None:  # a sharded (FSDP) matrix decays the rows this process holds
                (p.to_local() if hasattr(p, "to_local") else p).mul_(1.0 - g["lr"] * weight_decay * m)


def activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each layer's activations in backward (non-reentrant: works with a frozen body)."""
    if not on:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
