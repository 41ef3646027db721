"""Is a stage's folder up to date, and if not, why: what `retok run` redoes and `retok run --dry-run` shows.

Like make, dvc repro or Snakemake, a stage is redone when its folder is missing, when a key it reads changed
(named, with the old and new value), when the folder it reads is another one now (eval measured model-init
and model-trained is there now), when that folder was remade after it (its run id differs from the one
recorded), when an upstream stage is redone in the same run, or when its last run left an optional part out
(an export whose GGUF was refused). Anything else is kept. A folder retok did not make for that stage is
never replaced: the run is refused before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from retok.core.config import RetokConfig
from retok.core.errors import RetokError
from retok.core.stages import (
    MODEL_STAGES,
    ORDER,
    Present,
    changed_fields,
    fingerprint,
    foreign_folder,
    own_changes,
    read_stage_meta,
    stage,
    stage_dir,
    stage_inputs,
)


@dataclass(frozen=True)
class Verdict:
    """What `retok run` does with one stage, and why."""

    key: str
    action: Literal["run", "skip", "refuse"]
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def line(self) -> str:
        verb = {"run": "run ", "skip": "keep", "refuse": "stop"}[self.action]
        return f"{verb}  {self.key:<14} {'; '.join(self.reasons)}"


def _recorded_inputs(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    raw = meta.get("inputs")
    if not isinstance(raw, dict):
        return {}
    # folders made before retok recorded run ids hold {key: fingerprint}
    return {k: v if isinstance(v, dict) else {"fingerprint": v, "run_id": None} for k, v in raw.items()}


def _meta_or_none(folder: Path) -> dict[str, Any] | None:
    try:
        return read_stage_meta(folder)
    except RetokError:
        return None


def judge(
    cfg: RetokConfig,
    key: str,
    *,
    redone: set[str] | frozenset[str] = frozenset(),
    present: Present | None = None,
    force: bool = False,
) -> Verdict:
    """Whether stage ``key`` is up to date. ``redone``: stages redone before it in the same run; ``present``:
    which stage folders will be there when it runs (default: those there now)."""
    folder = stage_dir(cfg, key)
    if not folder.exists() and not folder.is_symlink():
        return Verdict(key, "run", ("not made yet",))
    why = foreign_folder(folder, key)
    if why:
        return Verdict(key, "refuse", (why,))
    if force:
        return Verdict(key, "run", ("--force",))
    meta = read_stage_meta(folder)
    reasons: list[str] = []
    if meta.get("complete") is False:
        reasons.append(f"its last run left a part out ({meta.get('incomplete') or 'unknown'})")
    reasons += [f"changed {c}" for c in own_changes(cfg, folder, key)]
    recorded = _recorded_inputs(meta)
    now = stage_inputs(cfg, key, present)
    then_src = [k for k in recorded if k in MODEL_STAGES]
    now_src = [k for k in now if k in MODEL_STAGES]
    if then_src != now_src and not any("candidate_model" in r or "export.source" in r for r in reasons):
        reasons.append(
            f"it read {then_src[0] if then_src else 'no model stage'}/, and would now read "
            f"{now_src[0] if now_src else 'none'}/"
        )
    for k in now:
        if k in redone:
            reasons.append(f"{k}/ is redone before it")
            continue
        current = _meta_or_none(stage_dir(cfg, k))
        if current is None:
            continue  # not there (yet): its own stage says so, or the stage reads it only when there
        if k not in recorded:
            if k not in then_src and k not in now_src:
                reasons.append(f"{k}/ was made after it")
            continue
        rid = recorded[k].get("run_id")
        if (rid and current.get("run_id") != rid) or current.get("fingerprint") != recorded[k].get(
            "fingerprint"
        ):
            reasons.append(f"{k}/ was remade after it ({current.get('created', 'time unknown')})")
    if not reasons and meta.get("fingerprint") != fingerprint(cfg, key, present):
        diff = changed_fields(cfg, folder, key)
        reasons.append(
            f"made with other settings upstream ({', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''})"
            if diff
            else "made by another config or retok version"
        )
    return Verdict(key, "run", tuple(reasons)) if reasons else Verdict(key, "skip", ("up to date",))


def stage_status(cfg: RetokConfig, key: str) -> Literal["missing", "same", "different"]:
    """Whether a stage's folder exists and is up to date ("same") with this config and its inputs."""
    folder = stage_dir(cfg, key)
    if not folder.exists():
        return "missing"
    return "same" if judge(cfg, key).action == "skip" else "different"


def selected(only: list[str] | None) -> list[str]:
    """``--stages`` checked and put in pipeline order (all stages when None)."""
    if not only:
        return list(ORDER)
    unknown = [s for s in only if s not in ORDER]
    if unknown:
        raise RetokError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(ORDER)}")
    return [s for s in ORDER if s in only]


def plan_run(cfg: RetokConfig, only: list[str] | None = None, *, force: bool = False) -> list[Verdict]:
    """The verdict of every selected stage, in order, each judged as if the stages before it had run. A
    selected stage that would read a stale folder outside the selection is refused (say to add it)."""
    keys = selected(only)
    will_run: set[str] = set()

    def present(k: str) -> bool:
        return k in will_run or stage_dir(cfg, k).is_dir()

    out: list[Verdict] = []
    for key in keys:
        v = judge(cfg, key, redone=will_run, present=present, force=force)
        if v.action == "run":
            blocked = _stale_input_outside(cfg, key, keys, present)
            if blocked:
                v = Verdict(key, "refuse", (blocked,))
            else:
                will_run.add(key)
        out.append(v)
    return out


def _stale_input_outside(cfg: RetokConfig, key: str, keys: list[str], present: Present) -> str | None:
    for k in stage_inputs(cfg, key, present):
        if k in keys or k not in stage(key).inputs + MODEL_STAGES:
            continue
        if k == "eval" and not stage_dir(cfg, k).exists():
            continue  # export reads eval only for its card's table
        v = judge(cfg, k)
        if v.action != "skip":
            return (
                f"{stage(key).command} reads {k}/, which is not up to date ({'; '.join(v.reasons)}); add {k} to "
                "--stages, or run without --stages"
            )
    return None
