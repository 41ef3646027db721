"""``retok run`` and the single-stage commands: run a stage into its folder, or every stage in order,
skipping those whose folder was made by the same config (the stage table is retok.stages)."""

from __future__ import annotations

import time
from pathlib import Path

from retok.config import RetokConfig
from retok.errors import RetokError
from retok.stages import ORDER, entry_function, stage, stage_dir, stage_output, stage_status


def preflight(cfg: RetokConfig) -> list[str]:
    """Cheap checks that need no model loading: input paths exist, a local model folder is one.
    Returns notes for the user."""
    from retok.data import source_files
    from retok.sources import check_local_model_path

    notes = [check_local_model_path(cfg.model)]
    for section, sources in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for i, src in enumerate(sources):
            if src.path is not None:
                files = source_files(src, f"{section}.{i}")
                notes.append(f"{section}.{i} ({src.name}): {len(files)} file(s)")
            else:
                notes.append(f"{section}.{i} ({src.name}): hub dataset {src.hub}")
    if not cfg.data.train:
        notes.append("note: data.train is empty; build-tokenizer and train-io need it")
    if not cfg.data.eval:
        notes.append("note: data.eval is empty; reports will have no held-out figures")
    return notes


def run_stage(cfg: RetokConfig, key: str, *, overwrite: bool = False, **options) -> Path:
    """Run one stage into its folder under output_dir (atomically)."""
    start = time.time()
    with stage_output(cfg, key, overwrite=overwrite) as tmp:
        entry_function(key)(cfg, tmp, **options)
    print(f"retok: {stage(key).command} took {time.time() - start:.1f}s", flush=True)
    return stage_dir(cfg, key)


def run_all(cfg: RetokConfig, *, force: bool = False, only: list[str] | None = None) -> None:
    """Every stage in order, skipping those whose output was made by the same config."""
    keys = list(ORDER)
    if only:
        unknown = [s for s in only if s not in ORDER]
        if unknown:
            raise RetokError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(ORDER)}")
        keys = [s for s in ORDER if s in only]
    redo = force
    for key in keys:
        status = stage_status(cfg, key)
        if status == "same" and not redo:
            print(f"retok: {key}/ is up to date, skipped (--force redoes it)", flush=True)
            continue
        if status == "different" and not redo:
            raise RetokError(
                f"{stage_dir(cfg, key)} was made by a different config; pass --force to redo it "
                "(and the stages after it), or set output_dir to a new folder"
            )
        print(f"retok: ---- {stage(key).command} -> {stage_dir(cfg, key)}", flush=True)
        run_stage(cfg, key, overwrite=True)
        redo = True  # everything downstream of a redone stage is redone too
    from retok.summary import print_summary

    print_summary(cfg)
