"""init.fit_head: the LM-head rows of new tokens fitted on the states of the INITIAL input rows.

The new model is the ORIGINAL body with the new input rows (built in memory from the plan, not yet written);
the fit itself (text, checks, states, fit) is retok.headfit_run, shared with train-io's ``train.fit_head``,
which fits on the trained input rows instead (the default recipe). The fitted head goes into the folder
init-embeddings writes.
"""

from __future__ import annotations

from typing import Any

import torch

from retok.config import RetokConfig
from retok.embeddings.rows import Plan, build_matrix


def fit_head(
    cfg: RetokConfig,
    model_dir: Any,
    old_hf: Any,
    new_hf: Any,
    plan: Plan,
    old_embed: torch.Tensor,
    old_head: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """init-embeddings: (the fitted head matrix, a report of the fit), on the states of the initial input rows
    (the original body loaded from ``model_dir``)."""
    from retok.headfit_run import fit_new_rows
    from retok.sources import load_model

    new_input = build_matrix(old_embed, plan, "input")
    head0 = build_matrix(old_head, plan, "head")
    model = load_model(
        model_dir,
        dtype=cfg.compute.dtype,
        device=cfg.compute.device,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    head, report = fit_new_rows(cfg, model, old_hf, new_hf, plan.tmap, new_input, head0, old_embed, old_head)
    return head.to(old_head.dtype), report
