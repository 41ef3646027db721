"""Head-shift calibration (``init.head_shift`` / ``init.head_shift_outside``): the vector subtracted from new
tokens' LM-head rows, fitted on the ORIGINAL model's final hidden states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from retok.core.config import RetokConfig
from retok.core.data import domains as domain_names
from retok.core.data import load_domains
from retok.core.errors import RetokError
from retok.core.sources import load_model
from retok.embeddings import methods


def fit_head_shift(cfg: RetokConfig, model_dir: Path, old_hf: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The vector subtracted from new tokens' head rows (``init.head_shift`` / ``init.head_shift_outside``).

    Runs the ORIGINAL model once over ``init.calibration_bytes`` of data.train (split over its domains) and
    fits two directions of the final hidden space on those states (methods.fit_direction): ``b_all`` with
    ``h . b_all ~= 1`` everywhere, and ``b_out`` with ``h . b_out ~= 1`` in domains outside
    ``tokenizer.domains`` (the text the new tokens were learned for) and ``~= 0`` inside them. This is the
    only part of the stage that runs the whole model.
    """

    init = cfg.init
    if not cfg.data.train:
        raise RetokError("init.head_shift / init.head_shift_outside need data.train text to fit the shift on")
    names = domain_names(cfg.data.train)
    target = set(cfg.tokenizer.domains or names)
    if init.head_shift_outside and not (set(names) - target and set(names) & target):
        raise RetokError(
            "init.head_shift_outside needs tokenizer.domains (the domains the new tokens are for) and at least one "
            f"other data.train domain to tell them apart (data.train has {names}); set both, or use init.head_shift"
        )
    docs = load_domains(cfg.data.train, "data.train", max(1000, init.calibration_bytes // len(names)))
    model = load_model(
        model_dir,
        dtype=cfg.compute.dtype,
        device=cfg.compute.device,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
    )
    device = next(model.parameters()).device
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    window = min(cfg.eval.window, 1024)
    states: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, texts in docs.items():
            parts = []
            for doc in tqdm(texts, desc=f"fit head shift on {name}", unit="doc", leave=False):
                ids = old_hf(doc, add_special_tokens=False)["input_ids"]
                for s in range(0, len(ids), window):
                    x = torch.tensor(ids[s : s + window], device=device)[None]
                    if x.shape[1] >= 2:
                        parts.append(body(input_ids=x).last_hidden_state[0].float().cpu())
            if parts:
                states[name] = torch.cat(parts)
    del model
    if not states:
        raise RetokError("init.head_shift: data.train gave no text to fit the shift on")
    hidden = torch.cat(list(states.values()))
    outside = torch.cat([torch.full((len(h),), float(n not in target)) for n, h in states.items()])
    b_all, mse_all = methods.fit_direction(hidden)
    directions = [(b_all, init.head_shift)]
    info: dict[str, Any] = {
        "positions": {n: int(len(h)) for n, h in states.items()},
        "target_domains": sorted(target),
        "fit_mse_all": round(mse_all, 5),
    }
    if init.head_shift_outside:
        b_out, mse_out = methods.fit_direction(hidden, outside)
        directions.append((b_out, init.head_shift_outside))
        info["fit_mse_outside"] = round(mse_out, 5)
    vec = methods.shift_vector(directions)
    # The logit drop each domain's text actually gets (mean over its calibration positions).
    info["logit_drop_nats"] = {n: round(float((h @ vec).mean()), 3) for n, h in states.items()}
    return vec, info
