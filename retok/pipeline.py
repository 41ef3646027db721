"""``retok run`` and the single-stage commands: run a stage into its folder, or every stage in order, redoing
only what is not up to date (retok.core.freshness says why; the stage table is retok.core.stages)."""

from __future__ import annotations

import time
from pathlib import Path

from retok.core.config import RetokConfig
from retok.core.errors import RetokError
from retok.core.freshness import Verdict, plan_run
from retok.core.stages import (
    entry_function,
    protect_inputs,
    remove_stale_temporaries,
    stage,
    stage_dir,
    stage_output,
)


def preflight(cfg: RetokConfig) -> list[str]:
    """Cheap checks that need no model loading: input paths exist, a local model folder is one.
    Returns notes for the user."""
    from retok.core.data import source_files
    from retok.core.sources import check_local_model_path

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


def print_plan(verdicts: list[Verdict]) -> None:
    for v in verdicts:
        print(f"retok: {v.line()}", flush=True)


def run_all(
    cfg: RetokConfig, *, force: bool = False, only: list[str] | None = None, dry_run: bool = False
) -> list[Verdict]:
    """Every selected stage in order: those not up to date are redone, with the reason printed first; the rest
    kept. A folder retok did not make, or one that would replace what the config reads, stops the run before
    anything starts. ``dry_run``: print the plan only (nothing is loaded or written)."""
    verdicts = plan_run(cfg, only, force=force)
    print_plan(verdicts)
    refused = [v for v in verdicts if v.action == "refuse"]
    if refused:
        raise RetokError(refused[0].reasons[0])
    todo = [v.key for v in verdicts if v.action == "run"]
    protect_inputs(cfg, todo)
    if dry_run:
        print(
            f"retok: dry run: {len(todo)} of {len(verdicts)} stage(s) would run; nothing was done", flush=True
        )
        return verdicts
    for name in remove_stale_temporaries(cfg.out):
        print(f"retok: removed {cfg.out / name}, left by an interrupted run", flush=True)
    for key in todo:
        print(f"retok: ---- {stage(key).command} -> {stage_dir(cfg, key)}", flush=True)
        run_stage(cfg, key, overwrite=True)
    from retok.summary import print_summary

    print_summary(cfg)
    return verdicts
