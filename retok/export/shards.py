"""export's weights: every tensor of the source folder streamed into new safetensors shards, one output shard in
memory at a time, with an optional dtype cast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retok.core.errors import RetokError
from retok.core.safetensors_io import DTYPE_BYTES, INDEX_FILE, tensor_table

_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it (sharded with an index, or single files)."""
    return {name: info.file for name, info in tensor_table(folder).items()}


def plan_shards(folder: Path, max_bytes: int, dtype: str = "keep") -> list[list[tuple[str, Path, int]]]:
    """Group tensors, in name order, into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    table = tensor_table(folder)
    if not table:
        raise RetokError(f"{folder} holds no *.safetensors weights to export")
    shards: list[list[tuple[str, Path, int]]] = [[]]
    used = 0
    for name in sorted(table):
        info = table[name]
        size = info.end - info.start
        if dtype in _ST_DTYPE and _is_float(info.dtype):
            size = size // DTYPE_BYTES[info.dtype] * DTYPE_BYTES[_ST_DTYPE[dtype]]
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, info.file, size))
        used += size
    return shards


def _is_float(st_dtype: str) -> bool:
    return st_dtype in ("F64", "F32", "F16", "BF16")


def stream_weights(src: Path, out: Path, max_bytes: int, dtype: str = "keep") -> dict[str, Any]:
    """Copy every tensor of ``src`` into shards in ``out``, one output shard in memory at a time."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    shards = plan_shards(src, max_bytes, dtype)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    handles: dict[Path, Any] = {}
    try:
        for shard, fname in tqdm(list(zip(shards, names, strict=True)), desc="export shards", unit="shard"):
            tensors = {}
            for name, path, _ in shard:
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt")
                t = handles[path].get_tensor(name)
                if target is not None and t.is_floating_point():
                    t = t.to(target)
                tensors[name] = t.contiguous()
                total += t.numel() * t.element_size()
                weight_map[name] = fname
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            del tensors
    finally:
        handles.clear()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {"files": names, "tensors": len(weight_map), "total_bytes": total}
