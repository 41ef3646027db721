"""Which checkpoint tensors are a model's input embedding and LM head, and reading those two alone.

Every stage that rebuilds or needs the original rows goes through here, so that an 8B or 70B checkpoint is
never loaded whole for two tensors: the architecture is instantiated on the meta device (no memory) to ask
it which modules are the embedding and the head, and their tensors are memory-mapped from the shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from retok.core.errors import RetokError
from retok.core.safetensors_io import load_tensor, read_checkpoint

TESTED_ARCHITECTURES = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM"


@dataclass
class IoNames:
    """Checkpoint keys of the input embedding and LM head."""

    embed: str
    head: str | None  # None: tied model without a head tensor in the checkpoint
    head_to_write: str | None  # key of the head tensor in the new checkpoint (None: tied, no head tensor)
    tied: bool  # the old model ties them
    separate: bool  # the new model has its own head rows (untied, or a tied model untied by init.untie_head)


def _match_key(name: str, keys: set[str]) -> str | None:
    """The checkpoint key of a module weight: exact, else the one key that ends with it (a wrapper prefix
    such as ``language_model.``), else the one key it ends with (a prefix the checkpoint dropped)."""
    if name in keys:
        return name
    longer = [k for k in keys if k.endswith("." + name)]
    if len(longer) == 1:
        return longer[0]
    shorter = [k for k in keys if name.endswith("." + k)]
    if len(shorter) == 1:
        return shorter[0]
    return None


def find_io_names(
    model_dir: Path, keys: set[str], *, untie: bool, trust_remote_code: bool = False
) -> IoNames:
    """Instantiate the architecture on the meta device (no memory, no weights) and ask it which modules are
    the input embedding and the LM head; match their weight names to the checkpoint's keys."""
    from transformers import AutoConfig, AutoModelForCausalLM

    unknown = (
        f"retok cannot find the input embedding / LM head of the model in {model_dir}; it finds them through "
        f"transformers' get_input_embeddings()/get_output_embeddings() and is tested on {TESTED_ARCHITECTURES}"
    )
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RetokError(f"{unknown} (loading its architecture failed: {e.__class__.__name__})") from None
    names = {id(m): n for n, m in model.named_modules()}
    emb_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    if emb_mod is None or id(emb_mod) not in names or not hasattr(emb_mod, "weight"):
        raise RetokError(unknown)
    embed = _match_key(names[id(emb_mod)] + ".weight", keys)
    if embed is None:
        raise RetokError(f"{unknown} (no checkpoint key matches {names[id(emb_mod)]}.weight)")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_name = names[id(head_mod)] + ".weight" if head_mod is not None and id(head_mod) in names else None
    head = _match_key(head_name, keys) if head_name else None
    if not tied and head is None:
        raise RetokError(
            f"{unknown} (the model is untied but no checkpoint key matches its LM head {head_name})"
        )
    if head == embed:
        head = None
    if tied and not untie:
        return IoNames(embed, head, head, True, False)
    if head is None:
        # Untying a tied model without a head tensor: name it as the architecture does, with the same
        # wrapper prefix the checkpoint puts in front of the embedding.
        if head_name is None:
            raise RetokError(f"{unknown} (the architecture has no separate LM head, so it cannot be untied)")
        emb_module_name = names[id(emb_mod)] + ".weight"
        prefix = embed[: -len(emb_module_name)] if embed.endswith(emb_module_name) else ""
        return IoNames(embed, None, prefix + head_name, tied, True)
    return IoNames(embed, head, head, tied, True)


def read_io_matrices(
    model_dir: Path, *, trust_remote_code: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input embedding and LM head of a checkpoint (the same tensor twice when tied), memory-mapped."""
    infos, _, _ = read_checkpoint(model_dir)
    names = find_io_names(model_dir, set(infos), untie=False, trust_remote_code=trust_remote_code)
    embed = load_tensor(infos[names.embed])
    return embed, (load_tensor(infos[names.head]) if names.head is not None else embed)
