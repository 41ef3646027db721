"""Writing files so that a failure never leaves half a file where a whole one was, and naming what the file
system refused."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def disk_error(e: BaseException) -> str | None:
    """What went wrong when ``e`` is the file system refusing a write (full, read-only, no permission), else
    None. Also the errors of libraries that wrap it (safetensors, torch.save) by their message."""
    codes = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        getattr(errno, "EDQUOT", -1): "the disk quota is exceeded",
    }
    if isinstance(e, OSError) and e.errno in codes:
        where = f" ({e.filename})" if e.filename else ""
        return codes[e.errno] + where
    text = str(e)
    if "No space left on device" in text or "os error 28" in text:
        return "no space left on the device"
    if "file write failed" in text:  # torch.save's writer does not say why
        return "a file write failed (is the disk full?)"
    return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a full disk or a
    crash leaves the previous file as it was (and no temporary behind)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
