"""One finding of ``retok check`` (shared by the folder checks and the GGUF checks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Check:
    """One finding of ``retok check``."""

    name: str
    ok: bool
    detail: str
    internal: bool = False  # the check itself crashed: a retok bug, not a verdict on the folder
