"""Held-out BPB measured once per run: a stage that scores a model folder on held-out text leaves the figures
in its own output folder (``bpb_memo.json``), keyed by everything the number depends on, and a later stage that
would score the same folder on the same bytes reads them instead of running the model again.

The key: the folder (real path, and the name, size and modification time of every file in it), the
tokenizer's full definition, the documents and where scoring starts in each, the window and stride, the dtype,
the device (not the thread count: it changes float rounding at most, far below the 4 decimals reported).
Anything else is a miss and the stage measures as usual. On the demo,
eval-speed's BPB of the original model is init-embeddings' own (the same 8,000 bytes per domain): 24 s saved.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MEMO_FILE = "bpb_memo.json"


def folder_identity(folder: Path) -> dict[str, Any]:
    """The folder's real path and (size, mtime_ns) of each file directly in it: a rewritten weight file, a new
    config or tokenizer changes it."""
    folder = Path(folder).resolve()
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            files[p.name] = [st.st_size, st.st_mtime_ns]
    return {"path": str(folder), "files": files}


def tokenizer_identity(tokenizer: Any) -> str:
    """sha256 of the tokenizer's whole definition (the fast tokenizer's JSON, else its sorted vocabulary), with
    its class and special-token settings (BOS decides the scoring prefix)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [
            type(tokenizer).__name__,
            getattr(tokenizer, "bos_token_id", None),
            getattr(tokenizer, "add_bos_token", None),
        ]
    )
    return hashlib.sha256((body + extra).encode("utf-8")).hexdigest()


def bpb_key(
    folder: Path,
    tokenizer: Any,
    docs: Sequence[str],
    starts: Sequence[int],
    *,
    window: int,
    stride: int,
    model: Any,
) -> str:
    """The memo key of scoring ``model`` (loaded from ``folder``; its dtype and device count) with ``tokenizer``
    on ``docs`` from ``starts``."""
    p = next(model.parameters())
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    parts = {
        "folder": folder_identity(folder),
        "tokenizer": tokenizer_identity(tokenizer),
        "docs": h.hexdigest(),
        "starts": list(starts),
        "window": window,
        "stride": stride,
        "dtype": str(p.dtype),
        "device": str(p.device),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def read_memo(folder: Path | None) -> dict[str, dict[str, Any]]:
    """The memo left in ``folder`` ({} when there is none or it does not parse: a miss, never an error)."""
    if folder is None:
        return {}
    try:
        data = json.loads((Path(folder) / MEMO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_memo(folder: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Add ``entries`` to ``folder``'s memo (written whole, then renamed into place)."""
    path = Path(folder) / MEMO_FILE
    memo = {**read_memo(folder), **entries}
    tmp = path.with_name(f".{MEMO_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(memo, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def remembered(
    memo: dict[str, dict[str, Any]], key: str, compute: Callable[[], dict[str, Any]], need: str | None = None
) -> tuple[dict, bool]:
    """(the figures, whether they came from the memo); an entry without ``need`` is measured again."""
    entry = memo.get(key)
    if isinstance(entry, dict) and "bpb" in entry and (need is None or need in entry):
        return dict(entry), True
    return compute(), False
