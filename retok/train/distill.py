"""The distillation objectives of train-io: the new rows learn to make the frozen body do what the original
model does on the same text.

Student: the model being trained, on the NEW segmentation. Teacher: the same frozen body with the OLD
embedding and head, on the OLD segmentation of the same bytes (retok.teacher.body: no second model in memory).
At every student position that has a teacher position (they end at the same byte, retok.teacher.alignment), the
student's hidden state after decoder layer l is pulled towards the teacher's, for each l in
``train.distill_layers``: mean squared error normalised by the teacher's mean squared norm at that layer,
so layers of different scales weigh alike; a block's first position is left out (see forward). The deepest
layer decides the cost: without the next-token term
only the first ``max(distill_layers)`` layers run.

``objective: distill`` trains the input rows this way (the head gets no gradient); ``lm+distill`` adds the
next-token loss of the chunked head (retok.train.loss), which trains the head too.
"""

from __future__ import annotations

import torch
from torch import nn

from retok.core.config import RetokConfig
from retok.teacher.body import Teacher, body_forward
from retok.train.loss import chunked_lm_loss
from retok.train.packing import PairBatch


def distill_layers(cfg: RetokConfig, model: nn.Module) -> tuple[int, ...]:
    """train.distill_layers, or (null) the layer at a quarter of the depth plus one (8 of 30)."""
    if cfg.train.distill_layers:
        return tuple(cfg.train.distill_layers)
    return (model.config.get_text_config().num_hidden_layers // 4 + 1,)


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean ||s - t||^2 / mean ||t||^2 over the rows (positions) given."""
    return (student - teacher).pow(2).sum(-1).mean() / teacher.pow(2).sum(-1).mean().clamp_min(1e-6)


class DistillLoss(nn.Module):
    """``lm_weight`` x next-token loss + ``distill_weight`` x hidden-state distillation, on a PairBatch."""

    def __init__(
        self,
        model: nn.Module,
        teacher: Teacher,
        layers: tuple[int, ...],
        *,
        lm_weight: float,
        distill_weight: float,
        chunk_tokens: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.teacher = teacher
        self.layers = tuple(sorted(set(layers)))
        self.lm_weight = lm_weight
        self.distill_weight = distill_weight
        self.chunk_tokens = chunk_tokens
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.last_parts: dict[str, float] = {}

    def forward(self, batch: PairBatch) -> torch.Tensor:
        need_lm = self.lm_weight > 0
        student = body_forward(self.model, batch.new, self.layers, last=need_lm)
        teacher = self.teacher.forward(batch.old, self.layers, last=False)
        matched = batch.teacher >= 0
        # A block's first position carries the attention-sink activations of a sequence start (norms hundreds of
        # times the rest) in the student but not at its teacher position (the teacher has read the whole token
        # there): matching it would swamp every other position's signal.
        matched[:, 0] = False
        idx = batch.teacher.clamp(min=0)
        distill = torch.zeros((), device=batch.new.device)
        for k in self.layers:
            t = teacher.layers[k]
            t = t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
            distill = distill + normalised_mse(student.layers[k][matched].float(), t[matched].float())
        distill = distill / len(self.layers)
        loss = self.distill_weight * distill
        parts = {"distill": float(distill.detach())}
        if need_lm:
            head = self.model.get_output_embeddings()
            h = student.last[:, :-1]
            lm = chunked_lm_loss(
                h.reshape(-1, h.shape[-1]),
                head.weight,
                batch.new[:, 1:].reshape(-1),
                chunk_tokens=self.chunk_tokens,
                bias=getattr(head, "bias", None),
                softcap=self.softcap,
            )
            loss = loss + self.lm_weight * lm
            parts["lm"] = float(lm.detach())
        self.last_parts = parts
        return loss
