"""The checkpoint side of init-embeddings: find the embedding and head tensors, and write every shard of the
new checkpoint tensor by tensor (rebuilt matrices from rows.py, every other tensor copied byte for byte).

Only the input embedding and the LM head are ever held in memory (one at a time), so peak memory grows
with vocab x hidden, not with the number of layers (an 8B model needs ~2 GB, not 32).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from retok.embeddings import methods
from retok.embeddings.rows import Plan, matrix_chunks
from retok.errors import RetokError
from retok.safetensors_io import (
    DTYPES,
    INDEX_FILE,
    OutTensor,
    TensorInfo,
    copy_range,
    load_tensor,
    read_header,
    tensor_bytes,
    write_all,
    write_shard,
)

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


def write_model(
    model_dir: Path,
    out: Path,
    infos: dict[str, TensorInfo],
    files: list[str],
    index_meta: dict[str, Any] | None,
    names: IoNames,
    plan: Plan,
) -> dict[str, Any]:
    """Write every shard of the new checkpoint (same shard names) and the index. Returns counts of bytes."""
    n_rows = plan.tmap.n_rows
    embed_info = infos[names.embed]
    d = embed_info.shape[1]
    # What each rebuilt tensor is made of: (source key, side).
    rebuilt: dict[str, tuple[str, methods.Side]] = {names.embed: (names.embed, "input")}
    if names.head_to_write is not None:
        if names.separate:
            rebuilt[names.head_to_write] = (names.head or names.embed, "head")
        else:  # tied, with a (redundant) head tensor in the checkpoint: it IS the input matrix
            rebuilt[names.head_to_write] = (names.embed, "input")

    cache: dict[str, torch.Tensor] = {}

    def source(key: str) -> torch.Tensor:
        if key not in cache:
            cache.clear()  # at most one old matrix in memory at a time
            cache[key] = load_tensor(infos[key])
        return cache[key]

    def producer(key: str) -> Callable[[BinaryIO, Callable[[int], None]], int]:
        if key not in rebuilt:
            return lambda out, progress: copy_range(infos[key], out, progress)
        src, side = rebuilt[key]

        def write(out: BinaryIO, progress: Callable[[int], None]) -> int:
            n = 0
            for chunk in matrix_chunks(source(src), plan, side):
                data = tensor_bytes(chunk)
                write_all(out, data)
                n += data.nbytes
                progress(data.nbytes)
            return n

        return write

    # Shard contents: the old order, with the new head (untying a model that had none) after the embedding.
    per_file: dict[str, list[str]] = {f: [] for f in files}
    for key, info in sorted(infos.items(), key=lambda kv: (files.index(kv[1].file.name), kv[1].start)):
        per_file[info.file.name].append(key)
    extra_head = names.head_to_write is not None and names.head_to_write not in infos
    if extra_head:
        keys = per_file[embed_info.file.name]
        keys.insert(keys.index(names.embed) + 1, names.head_to_write)

    total = 0
    for keys in per_file.values():
        for key in keys:
            if key in rebuilt:
                total += n_rows * d * DTYPES[infos[rebuilt[key][0]].dtype].itemsize
            else:
                total += infos[key].end - infos[key].start
    weight_map: dict[str, str] = {}
    with tqdm(total=total, desc="write shards", unit="B", unit_scale=True, mininterval=1.0) as bar:
        for fname, keys in per_file.items():
            header, _ = read_header(model_dir / fname)
            shard_meta = header.get("__metadata__", {"format": "pt"})
            tensors = []
            for key in keys:
                if key in rebuilt:
                    src = rebuilt[key][0]
                    tensors.append(OutTensor(key, infos[src].dtype, [n_rows, d], producer(key)))
                else:
                    info = infos[key]
                    tensors.append(OutTensor(key, info.dtype, info.shape, producer(key)))
                weight_map[key] = fname
            write_shard(out / fname, tensors, shard_meta, bar)
            cache.clear()
    if index_meta is not None:
        meta = dict(index_meta)
        meta["total_size"] = total
        index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {"total_bytes": total, "shards": files, "rebuilt": sorted(rebuilt)}
