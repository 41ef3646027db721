"""The model's shape for the plan, from its config.json alone (built on the meta device: exact parameter
counts, no weights read) and the new vocabulary (the tokenizer stage, else tokenizer.new_tokens)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retok.core.config import RetokConfig
from retok.core.errors import RetokError
from retok.core.sources import resolve_model
from retok.core.stages import stage_dir


@dataclass
class Shape:
    """What the plan needs to know about the model (from its config.json, built on the meta device)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    kv_width: int  # key/value heads x head dim
    old_rows: int
    old_tied: bool
    new_rows: int  # embedding rows after init-embeddings (padded)
    new_tied: bool
    body: int  # parameters outside the embedding and head
    layer_params: int  # parameters of one decoder layer
    old_vocab: int  # tokens of the original tokenizer
    new_vocab: int  # tokens of the new tokenizer


def _model_config(cfg: RetokConfig, model_config: Path | None) -> tuple[Any, str]:
    """The ORIGINAL model's config: --model-config, or model.path's config.json (downloaded alone for a hub id)."""
    from transformers import AutoConfig

    rc = cfg.model.trust_remote_code
    if model_config is not None:
        path = model_config if model_config.is_file() else model_config / "config.json"
        if not path.is_file():
            raise RetokError(
                f"--model-config {model_config}: no config.json there; give the model's config.json"
            )
        where = f"--model-config {path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise RetokError(
                f"{where}: not a readable JSON file ({e.__class__.__name__}); give the model's config.json"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
            raise RetokError(f"{where}: no model_type in it; give the model's config.json")
        model_type = data.pop("model_type")
        try:
            conf = AutoConfig.for_model(model_type, **data)
        except (ValueError, KeyError):
            import transformers

            raise RetokError(
                f"{where}: model_type {model_type!r} is unknown to transformers {transformers.__version__}; check "
                "the file, or update transformers"
            ) from None
        return conf, str(model_config)

    try:
        folder = resolve_model(cfg.model, cfg.cache)
    except RetokError as e:
        raise RetokError(f"{e} (retok plan only needs its config.json: pass --model-config FILE)") from None
    return AutoConfig.from_pretrained(str(folder), trust_remote_code=rc), cfg.model.path


def _counts(conf: Any) -> tuple[int, int, int, bool]:
    """(all parameters, embedding rows, parameters of one decoder layer, tied) of the model ``conf`` describes."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is emb
    total = sum(p.numel() for p in model.parameters())
    layers = getattr(model.base_model, "layers", None)
    per_layer = sum(p.numel() for p in layers[0].parameters()) if layers else 0
    return total, emb.shape[0], per_layer, tied


def _new_vocab(cfg: RetokConfig, old_vocab: int) -> int:

    tok = stage_dir(cfg, "tokenizer") / "tokenizer.json"
    if tok.is_file():
        data = json.loads(tok.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab") or []
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in data.get("added_tokens", [])]
        if ids:
            return max(ids) + 1
    t = cfg.tokenizer
    if t.mode == "train" and t.vocab_size:
        return t.vocab_size
    return old_vocab + t.new_tokens


def model_shape(cfg: RetokConfig, model_config: Path | None = None) -> Shape:
    """The shape of the model train-io will train (model-init's config when it exists)."""
    from transformers import AutoConfig

    conf, name = _model_config(cfg, model_config)
    text = conf.get_text_config()
    total, old_rows, per_layer, old_tied = _counts(conf)
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    kv = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    old_vocab = old_rows
    new_vocab = _new_vocab(cfg, old_vocab)
    init = stage_dir(cfg, "model-init")
    if (
        init / "config.json"
    ).is_file() and model_config is None:  # the folder train-io reads: rows and tie final
        _, new_rows, _, new_tied = _counts(
            AutoConfig.from_pretrained(str(init), trust_remote_code=cfg.model.trust_remote_code)
        )
    else:
        k = cfg.init.pad_to_multiple_of or 1
        new_rows = max(old_rows, math.ceil(new_vocab / k) * k)
        new_tied = old_tied and not cfg.init.untie_head
    body = total - old_rows * hidden * (1 if old_tied else 2)
    return Shape(
        name=name,
        hidden=hidden,
        layers=text.num_hidden_layers,
        intermediate=getattr(text, "intermediate_size", 4 * hidden),
        kv_width=kv,
        old_rows=old_rows,
        old_tied=old_tied,
        new_rows=new_rows,
        new_tied=new_tied,
        body=body,
        layer_params=per_layer,
        old_vocab=old_vocab,
        new_vocab=new_vocab,
    )
