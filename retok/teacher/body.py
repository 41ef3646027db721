"""The original model as a teacher, without a second model in memory.

The body of the new model is the original body (frozen, bit for bit), so the original model IS this body
run with the OLD input embedding on the OLD token ids, read out through the OLD LM head. ``Teacher`` holds
only those two old matrices (read alone from the original checkpoint, retok.core.model_io) and runs the shared
body with them: the embedding module is called with its weight swapped (torch.func.functional_call), so
whatever it does on top of the lookup (Gemma scales by sqrt(hidden)) is done for the teacher too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retok.core.model_io import read_io_matrices


@dataclass
class BodyOutput:
    """Hidden states of one forward pass: ``layers[k]`` is the output of decoder layer k (1-based, as
    ``output_hidden_states`` numbers them; 0 is the embedding), ``last`` the final normed states."""

    layers: dict[int, torch.Tensor]
    last: torch.Tensor | None  # None when the forward stopped after the deepest requested layer


class _Stop(Exception):
    """Raised by a forward hook to end a body forward early (only the first layers are needed)."""


def body_forward(
    model: nn.Module,
    ids: torch.Tensor,
    layers: tuple[int, ...] = (),
    embed_weight: torch.Tensor | None = None,
    *,
    last: bool = True,
) -> BodyOutput:
    """Run ``model``'s body on ``ids`` (batch, seq) with its own input embedding, or with ``embed_weight``
    in its place; return the requested layers' outputs and (``last``) the final normed states.

    Without ``last`` only the first ``max(layers)`` decoder layers run (a forward hook ends the forward):
    distilling layer 8 of 30 costs about a quarter of a full forward and backward.
    """
    emb = model.get_input_embeddings()
    if embed_weight is None:
        embeds = emb(ids)
    else:
        embeds = torch.func.functional_call(emb, {"weight": embed_weight}, (ids,))
    decoder = getattr(model.base_model, "layers", None)
    if not layers or decoder is None:  # an architecture without .layers: output_hidden_states, all layers
        out = model.base_model(inputs_embeds=embeds, output_hidden_states=bool(layers), use_cache=False)
        hidden = out.hidden_states or ()
        return BodyOutput({k: hidden[k] for k in layers}, out.last_hidden_state)
    # Layer outputs through forward hooks, the same way whether the forward runs to the end or stops: the
    # output of the LAST layer before the final norm too (output_hidden_states would give it after the norm).
    got: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook(output: Any, k: int) -> None:
        got[k] = output[0] if isinstance(output, tuple) else output
        if k == deepest and not last:
            raise _Stop

    handles = [decoder[k - 1].register_forward_hook(lambda m, a, o, k=k: hook(o, k)) for k in layers]
    try:
        out = model.base_model(inputs_embeds=embeds, use_cache=False)
    except _Stop:
        out = None
    finally:
        for h in handles:
            h.remove()
    return BodyOutput(got, out.last_hidden_state if out is not None else None)  # type: ignore[arg-type]


def head_logits(model: nn.Module, states: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
    """Logits of ``states`` through ``head_weight``, with the model's final logit soft-capping (Gemma)."""
    logits = states @ head_weight.to(states.dtype).T
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class Teacher:
    """The original model, as this model's body with the old embedding and head."""

    def __init__(self, model: nn.Module, old_embed: torch.Tensor, old_head: torch.Tensor) -> None:
        device = next(model.parameters()).device
        self.model = model
        self.embed = old_embed.to(device=device, dtype=model.get_input_embeddings().weight.dtype)
        self.head = (
            self.embed if old_head is old_embed else old_head.to(device=device, dtype=self.embed.dtype)
        )

    @torch.no_grad()
    def forward(
        self, old_ids: torch.Tensor, layers: tuple[int, ...] = (), *, last: bool = True
    ) -> BodyOutput:
        return body_forward(self.model, old_ids, layers, embed_weight=self.embed, last=last)

    @torch.no_grad()
    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model, states, self.head)


class OriginalLM(nn.Module):
    """The teacher as a causal LM (``model(input_ids=...).logits``), for measuring the original model's
    held-out BPB without loading it: under FSDP the body exists only as shards, and a 70B original would not
    fit one device anyway. The same numbers as the original checkpoint while the body is still frozen."""

    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.model = teacher.model
        self.teacher = teacher

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_: Any) -> Any:
        from types import SimpleNamespace

        with torch.no_grad():
            states = self.teacher.forward(input_ids).last
            if logits_to_keep:
                states = states[:, -logits_to_keep:]
            return SimpleNamespace(logits=self.teacher.logits(states))


def load_teacher(model: nn.Module, original_dir: Any, *, trust_remote_code: bool = False) -> Teacher:
    """The teacher for ``model`` from the original checkpoint's embedding and head (nothing else is read)."""

    embed, head = read_io_matrices(Path(original_dir), trust_remote_code=trust_remote_code)
    return Teacher(model, embed, head)
