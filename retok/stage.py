"""Stage output folders: written to a temporary folder, documented, and renamed into place only when complete.

Every stage folder holds ``retok_config.yaml`` (the resolved config that made it) and ``retok_stage.json``
(stage name, fingerprint of the config sections it depends on, retok version, time). ``retok run`` skips a
stage whose folder was made by the same fingerprint.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from retok import __version__
from retok.config import RetokConfig, fingerprint, to_yaml
from retok.errors import RetokError

STAGE_FILE = "retok_stage.json"
CONFIG_FILE = "retok_config.yaml"


def stage_status(cfg: RetokConfig, stage: str) -> Literal["missing", "same", "different"]:
    """Whether a stage's output folder exists and was made by the same (relevant) config."""
    folder = cfg.stage_dir(stage)
    meta = folder / STAGE_FILE
    if not folder.exists():
        return "missing"
    try:
        made = json.loads(meta.read_text())
    except (OSError, ValueError):
        return "different"
    return "same" if made.get("fingerprint") == fingerprint(cfg, stage) else "different"


def read_stage_config(folder: Path) -> dict:
    """The stage metadata of a folder made by retok, or a clear error if it is not one."""
    meta = folder / STAGE_FILE
    if not meta.is_file():
        raise RetokError(
            f"{folder} was not made by retok (no {STAGE_FILE}); run the stage that makes it first"
        )
    return json.loads(meta.read_text())


def require_stage(cfg: RetokConfig, stage: str, needed_by: str) -> Path:
    folder = cfg.stage_dir(stage)
    if not folder.is_dir():
        cmd = {
            "tokenizer": "build-tokenizer",
            "model-init": "init-embeddings",
            "model-trained": "train-io",
        }.get(stage, stage)
        raise RetokError(f"{needed_by} needs {folder}; run `retok {cmd}` with this config first")
    read_stage_config(folder)
    return folder


@contextmanager
def stage_output(cfg: RetokConfig, stage: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``output_dir/<stage>``, on failure it is removed."""
    final = cfg.stage_dir(stage)
    if final.exists() and not overwrite:
        raise RetokError(
            f"{final} already exists; pass --overwrite to replace it, or set output_dir to a new folder"
        )
    if final.exists() and not final.is_dir():
        raise RetokError(f"{final} exists and is not a folder; move it away first")
    cfg.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage}.tmp-", dir=cfg.out))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the finished folder should read like any other
    try:
        yield tmp
        (tmp / CONFIG_FILE).write_text(to_yaml(cfg), encoding="utf-8")
        meta = {
            "stage": stage,
            "fingerprint": fingerprint(cfg, stage),
            "retok_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
        }
        (tmp / STAGE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{stage}.old-", dir=cfg.out))
            old.rmdir()
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
