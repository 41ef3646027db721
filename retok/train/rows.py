"""The learning rows of the input embedding as a parameter of their own, so that a step of train-io's io phase
costs nothing per row of the vocabulary.

With ``train.trainable: io_new_rows`` only the new tokens' input rows learn. Trained through the whole embedding,
every step would still make a vocabulary-sized gradient, mask it, clip it and give AdamW vocabulary-sized moments
(on Gemma-3-270M's 278k x 640 embedding: steps 1.39x slower and 1.7x the peak memory, 1.4 GB of moments for
10M learning values; on Llama-3-8B's 128k x 4096, 4.2 GB of moments). Here the embedding's weight is frozen and the
learning rows live in an (n x H) parameter; a forward hook on the embedding module puts them in place of the
frozen rows wherever their tokens occur. After each optimizer step they are written back into the weight, so
the rest of train-io (held-out BPB, checkpoints, the head fit, export) sees a plain embedding at every moment.

This is exactly training those rows of the embedding: the same rows, the same gradients (the module's output is
its weight's rows times a constant, the scale Gemma applies, measured when the hook is set), AdamW per element.
It is used on one process; under DDP or FSDP the embedding trains whole (those wrap the model's own
parameters), and where the module is not such a lookup it falls back to the whole matrix as well.
"""

from __future__ import annotations

import torch
from torch import nn


class CompactRows:
    """Rows ``ids`` of ``module.weight`` learning as the parameter ``param`` (n x H)."""

    def __init__(self, module: nn.Module, ids: torch.Tensor, scale: float) -> None:
        weight = module.weight
        self.module = module
        self.weight = weight  # the hook leaves alone a call made with another weight (the teacher's old rows)
        self.ids = ids.to(weight.device)
        self.scale = scale
        self.param = nn.Parameter(weight.detach()[self.ids].clone())
        self.slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        self.slot[self.ids] = torch.arange(len(self.ids), device=weight.device)
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    @classmethod
    def attach(cls, model: nn.Module, learn_rows: torch.Tensor) -> CompactRows | None:
        """The compact rows of ``model``'s input embedding for the rows ``learn_rows`` marks, or None when the
        embedding module is not a plain (scaled) lookup of its weight."""
        module = model.get_input_embeddings()
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            return None
        ids = torch.nonzero(learn_rows, as_tuple=False).flatten()
        if len(ids) == 0:
            return None
        scale = lookup_scale(module)
        return None if scale is None else cls(module, ids, scale)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        if module.weight is not self.weight:  # torch.func.functional_call with the original model's rows
            return out
        ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
        slot = self.slot[ids]
        mine = slot >= 0
        rows = self.param[slot.clamp(min=0)]
        if self.scale != 1.0:  # as the module scales its lookup: by the scale in the weight's dtype
            rows = rows * torch.tensor(self.scale, dtype=rows.dtype, device=rows.device)
        return torch.where(mine[..., None], rows.to(out.dtype), out)

    @torch.no_grad()
    def push(self) -> None:
        """Write the rows into the embedding's weight (after each optimizer step)."""
        self.weight[self.ids] = self.param.detach().to(self.weight.dtype)

    def close(self) -> None:
        """Write the rows back and take the hook off (the end of the phase)."""
        self.push()
        self._handle.remove()


@torch.no_grad()
def lookup_scale(module: nn.Module) -> float | None:
    """The constant c with module(ids) == c * weight[ids] (1 for nn.Embedding, sqrt(H) for Gemma's scaled
    embedding), or None when the module's output is not that."""
    weight = module.weight
    norms = weight.detach().float().norm(dim=1)
    probe = torch.topk(norms, k=min(4, len(norms))).indices
    if float(norms[probe[0]]) == 0.0:
        return None
    try:
        out = module(probe[None].to(weight.device))
    except Exception:  # noqa: BLE001 - any module that is not a lookup of ids falls back to the whole matrix
        return None
    if not isinstance(out, torch.Tensor) or out.shape != (1, len(probe), weight.shape[1]):
        return None
    w = weight.detach()[probe].float()
    o = out[0].float()
    c = float((o * w).sum() / (w * w).sum())
    exact = getattr(module, "embed_scale", None)  # Gemma's scaled embedding names its constant
    if exact is not None and abs(float(exact) - c) <= 1e-4 * abs(c):
        c = float(exact)
    elif abs(c - 1.0) < 1e-6:
        c = 1.0
    tol = 1e-3 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if not torch.allclose(o, c * w, rtol=tol, atol=tol * float(w.abs().max())):
        return None
    return c
