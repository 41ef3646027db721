"""The checkpoint side of init-embeddings: find the embedding and head tensors, and write every shard of the
new checkpoint tensor by tensor (rebuilt matrices from rows.py, every other tensor copied byte for byte).

Only the input embedding and the LM head are ever held in memory (one at a time), so peak memory grows
with vocab x hidden, not with the number of layers (an 8B model needs ~2 GB, not 32).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from retok.core.model_io import IoNames
from retok.core.safetensors_io import (
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
from retok.embeddings import methods
from retok.embeddings.rows import Plan, matrix_chunks


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
