"""Stage dispatch: which function makes which folder, in what order, and when a stage can be skipped."""

from __future__ import annotations

import time
from pathlib import Path

from retok.config import STAGES, RetokConfig
from retok.errors import RetokError
from retok.stage import stage_output, stage_status

COMMANDS = {
    "tokenizer": "build-tokenizer",
    "model-init": "init-embeddings",
    "model-trained": "train-io",
    "eval": "eval-speed",
    "export": "export",
}


def _stage_fn(stage: str):
    if stage == "tokenizer":
        from retok.tokenizer.build import build_tokenizer

        return build_tokenizer
    if stage == "model-init":
        from retok.embeddings.surgery import init_embeddings

        return init_embeddings
    if stage == "model-trained":
        from retok.train import train_io

        return train_io
    if stage == "eval":
        from retok.evaluate import eval_speed

        return eval_speed
    if stage == "export":
        from retok.export import export_model

        return export_model
    raise AssertionError(stage)


def preflight(cfg: RetokConfig) -> list[str]:
    """Cheap checks that need no model loading: input paths exist. Returns notes for the user."""
    from retok.data import source_files

    notes = []
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


def run_stage(cfg: RetokConfig, stage: str, *, overwrite: bool = False, **kwargs) -> Path:
    """Run one stage into its folder under output_dir (atomically)."""
    start = time.time()
    with stage_output(cfg, stage, overwrite=overwrite) as tmp:
        _stage_fn(stage)(cfg, tmp, **kwargs)
    print(f"retok: {COMMANDS[stage]} took {time.time() - start:.1f}s", flush=True)
    return cfg.stage_dir(stage)


def run_all(cfg: RetokConfig, *, force: bool = False, only: list[str] | None = None) -> None:
    """Every stage in order, skipping those whose output was made by the same config."""
    stages = list(STAGES)
    if only:
        unknown = [s for s in only if s not in STAGES]
        if unknown:
            raise RetokError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
        stages = [s for s in STAGES if s in only]
    redo = force
    for stage in stages:
        status = stage_status(cfg, stage)
        if status == "same" and not redo:
            print(f"retok: {stage}/ is up to date, skipped (--force redoes it)", flush=True)
            continue
        if status == "different" and not redo:
            raise RetokError(
                f"{cfg.stage_dir(stage)} was made by a different config; pass --force to redo it "
                "(and the stages after it), or set output_dir to a new folder"
            )
        print(f"retok: ---- {COMMANDS[stage]} -> {cfg.stage_dir(stage)}", flush=True)
        run_stage(cfg, stage, overwrite=True)
        redo = True  # everything downstream of a redone stage is redone too
    from retok.summary import print_summary

    print_summary(cfg)
