"""The original model as a teacher, without a second model in memory.

The body of the new model is the original body (frozen, bit for bit), so the original model IS this body
run with the OLD input embedding on the OLD token ids, read out through the OLD LM head. ``Teacher`` holds
only those two old matrices (read alone from the original checkpoint, retok.model_io) and runs the shared
body with them: the embedding module is called with its weight swapped (torch.func.functional_call), so
whatever it does on top of the lookup (Gemma scales by sqrt(hidden)) is done for the teacher too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class BodyOutput:
    """Hidden states of one forward pass: ``layers[k]`` is the output of decoder layer k (1-based, as
    ``output_hidden_states`` numbers them; 0 is the embedding), ``last`` the final normed states."""

    layers: dict[int, torch.Tensor]
    last: torch.Tensor


def body_forward(
    model: nn.Module,
    ids: torch.Tensor,
    layers: tuple[int, ...] = (),
    embed_weight: torch.Tensor | None = None,
) -> BodyOutput:
    """Run ``model``'s body on ``ids`` (batch, seq) with its own input embedding, or with ``embed_weight``
    in its place; return the requested layers' states and the final normed states."""
    emb = model.get_input_embeddings()
    if embed_weight is None:
        embeds = emb(ids)
    else:
        embeds = torch.func.functional_call(emb, {"weight": embed_weight}, (ids,))
    out = model.base_model(inputs_embeds=embeds, output_hidden_states=bool(layers), use_cache=False)
    hidden = out.hidden_states or ()
    return BodyOutput({k: hidden[k] for k in layers}, out.last_hidden_state)


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
    def forward(self, old_ids: torch.Tensor, layers: tuple[int, ...] = ()) -> BodyOutput:
        return body_forward(self.model, old_ids, layers, embed_weight=self.embed)

    @torch.no_grad()
    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model, states, self.head)


def load_teacher(model: nn.Module, original_dir: Any, *, trust_remote_code: bool = False) -> Teacher:
    """The teacher for ``model`` from the original checkpoint's embedding and head (nothing else is read)."""
    from retok.model_io import read_io_matrices

    embed, head = read_io_matrices(original_dir, trust_remote_code=trust_remote_code)
    return Teacher(model, embed, head)
