"""Safetensors checkpoints read and written by hand, tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. Doing it by hand lets init-embeddings stream a tensor into a file in row chunks and copy
the other tensors as raw bytes (bit-identical by construction, no dtype round trip, no RAM), and lets export
and check plan shards from the headers alone.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm.auto import tqdm

from retok.core.errors import RetokError

INDEX_FILE = "model.safetensors.index.json"

# Bytes per element of every safetensors dtype.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
# The float dtypes whose rows retok can rebuild, as torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_COPY_CHUNK = 64 << 20


@dataclass
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: list[int]
    start: int  # absolute byte offsets in ``file``
    end: int


# The reference loader (safetensors) refuses headers over 100 MB; a bigger length field is a broken file.
MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a .safetensors file and the offset where its data starts, checked: the header fits
    the file, and every tensor's byte range lies inside the file and matches its shape and dtype."""
    try:
        size = path.stat().st_size
        f = path.open("rb")
    except OSError as e:
        raise RetokError(
            f"{path} cannot be read ({e.strerror or e.__class__.__name__}); make it a readable file or write it again"
        ) from None
    broken = f"{path} is not a valid safetensors file"
    with f:
        raw = f.read(8)
        if len(raw) != 8:
            raise RetokError(f"{broken} (too short); download or write it again")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise RetokError(
                f"{broken} (header length {n} for a {size}-byte file); it is truncated or damaged"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise RetokError(f"{broken} (unreadable header); it is damaged") from None
    if not isinstance(header, dict):
        raise RetokError(f"{broken} (the header is not a JSON object)")
    base = 8 + n
    for key, h in header.items():
        if key == "__metadata__":
            continue
        try:
            b, e = (int(x) for x in h["data_offsets"])
            shape = [int(d) for d in h["shape"]]
            dtype = h["dtype"]
        except (KeyError, TypeError, ValueError):
            raise RetokError(f"{broken} (tensor {key!r} has no valid dtype/shape/data_offsets)") from None
        if not 0 <= b <= e or base + e > size:
            raise RetokError(
                f"{broken}: tensor {key!r} ends at byte {base + e} of a {size}-byte file; it is truncated"
            )
        width = DTYPE_BYTES.get(dtype)
        if width is not None and math.prod(shape) * width != e - b:
            raise RetokError(f"{broken}: tensor {key!r} has {e - b} bytes for shape {shape} of {dtype}")
    return header, base


def read_checkpoint(folder: Path) -> tuple[dict[str, TensorInfo], list[str], dict[str, Any] | None]:
    """Every tensor of a safetensors checkpoint (single file or sharded with an index), the shard file names
    in order, and the index's extra metadata (None for a single file)."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            files = list(dict.fromkeys(index["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise RetokError(
                f"{index_path} is damaged (not an index with a weight_map); write it again"
            ) from None
        metadata = index.get("metadata") or {}
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        metadata = None
        if len(files) != 1:
            raise RetokError(
                f"model.path: {folder} has {len(files)} .safetensors files and no {INDEX_FILE}; "
                "expected one model.safetensors or shards with an index"
            )
    infos: dict[str, TensorInfo] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise RetokError(f"model.path: {INDEX_FILE} names {name}, which is missing from {folder}")
        header, base = read_header(path)
        for key, h in header.items():
            if key == "__metadata__":
                continue
            b, e = h["data_offsets"]
            infos[key] = TensorInfo(key, path, h["dtype"], list(h["shape"]), base + b, base + e)
    return infos, files, metadata


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, memory-mapped from its file (copy-on-write, never written): pages are read when rows are
    touched and dropped when the tensor is freed, with no zero-filled buffer and no extra copy."""
    if info.dtype not in DTYPES:
        raise RetokError(
            f"{info.file.name}: tensor {info.name} has dtype {info.dtype}; retok rebuilds embeddings stored as "
            f"{', '.join(DTYPES)} (de-quantise the model first)"
        )
    dtype = DTYPES[info.dtype]
    if info.end == info.start:
        return torch.empty(info.shape, dtype=dtype)
    # numpy has no bfloat16: map the bytes as unsigned ints of the same width and reinterpret them in torch.
    width = torch.tensor([], dtype=dtype).element_size()
    raw = np.memmap(
        info.file,
        dtype={2: np.uint16, 4: np.uint32, 8: np.uint64}[width],
        mode="c",
        offset=info.start,
        shape=((info.end - info.start) // width,),
    )
    return torch.from_numpy(raw).view(dtype).reshape(info.shape)


def write_all(out: BinaryIO, data: bytes | memoryview) -> None:
    """An unbuffered write may take fewer bytes than given: loop until all are written."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = out.write(view)
        view = view[n:]


def copy_range(info: TensorInfo, out: BinaryIO, progress: Callable[[int], None]) -> int:
    """Copy a tensor's bytes from its shard into ``out`` (an unbuffered file): in the kernel where the
    system allows (copy_file_range: no trip through user memory), else by 64 MiB reads."""
    left = info.end - info.start
    with info.file.open("rb", buffering=0) as f:
        offset = info.start
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    n = os.copy_file_range(f.fileno(), out.fileno(), min(left, _COPY_CHUNK), offset)
                    if n == 0:
                        raise RetokError(f"{info.file} is truncated (tensor {info.name})")
                    offset, left = offset + n, left - n
                    progress(n)
                return info.end - info.start
            except OSError:  # e.g. an old kernel or a file system that refuses it: copy by hand
                pass
        f.seek(offset)
        while left:
            chunk = f.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise RetokError(f"{info.file} is truncated (tensor {info.name})")
            write_all(out, chunk)
            left -= len(chunk)
            progress(len(chunk))
    return info.end - info.start


@dataclass
class OutTensor:
    """A tensor of an output shard: its header entry and a producer of its bytes, in order."""

    name: str
    dtype: str
    shape: list[int]
    produce: Callable[[BinaryIO, Callable[[int], None]], int]  # writes the bytes, returns how many

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape)) if self.shape else 1
        return n * DTYPE_BYTES[self.dtype]


def write_shard(
    path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None, bar: tqdm | None = None
) -> None:
    """Write a .safetensors file whose tensors are produced one after the other (streamed)."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as the reference writer does
    progress = bar.update if bar is not None else (lambda n: None)
    # Unbuffered: copy_file_range moves the file position under Python's feet otherwise.
    with path.open("wb", buffering=0) as f:
        write_all(f, struct.pack("<Q", len(raw)))
        write_all(f, raw)
        for t in tensors:
            written = t.produce(f, progress)
            if written != t.nbytes:
                raise AssertionError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor (bf16 included), without a copy."""
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def tensor_table(folder: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo for every tensor of a checkpoint folder: sharded with an index, or any number of
    single .safetensors files (the loose layouts `retok check` meets)."""
    if (folder / INDEX_FILE).is_file():
        return read_checkpoint(folder)[0]
    out: dict[str, TensorInfo] = {}
    for path in sorted(folder.glob("*.safetensors")):
        header, base = read_header(path)
        for key, h in header.items():
            if key != "__metadata__":
                b, e = h["data_offsets"]
                out[key] = TensorInfo(key, path, h["dtype"], list(h["shape"]), base + b, base + e)
    return out
