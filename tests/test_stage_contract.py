"""The stage contract holds: every config field a stage reads reaches its fingerprint, so a changed setting
can never leave a stale folder looking up to date; stage folders check where their inputs came from.

The first test runs every stage of a tiny project with a config that records each field read (a proxy
around the validated config), and fails when a stage reads a field that is neither in its own
``Stage.reads`` nor upstream of it, nor in ``NOT_FINGERPRINTED``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from retok.core.config import validate_dict
from retok.core.errors import RetokError
from retok.core.freshness import stage_status
from retok.core.stages import (
    NOT_FINGERPRINTED,
    ORDER,
    STAGE_FILE,
    entry_function,
    fingerprint,
    require_stage,
    stage_dir,
    stage_output,
    upstream_fields,
)
from retok.pipeline import run_all, run_stage
from tests.tiny import tiny_project


class Tracked:
    """A read-only view of a config section that records the dotted path of every field read."""

    def __init__(self, obj: BaseModel, path: str, log: set[str]) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_log", log)

    @property
    def __wrapped__(self) -> BaseModel:
        return object.__getattribute__(self, "_obj")

    @property  # isinstance(tracked, RetokConfig) holds, as stage code expects
    def __class__(self) -> type:  # type: ignore[override]
        return type(object.__getattribute__(self, "_obj"))

    def _sub(self, name: str) -> str:
        path = object.__getattribute__(self, "_path")
        return f"{path}.{name}" if path else name

    def __getattr__(self, name: str) -> Any:
        obj = object.__getattribute__(self, "_obj")
        log = object.__getattribute__(self, "_log")
        value = getattr(obj, name)
        if name in type(obj).model_fields:
            path = self._sub(name)
            if isinstance(value, BaseModel):
                return Tracked(value, path, log)
            log.add(path)
            if isinstance(value, list):
                return [Tracked(v, path, log) if isinstance(v, BaseModel) else v for v in value]
            return value
        if name in ("model_dump", "model_dump_json", "model_copy"):
            log.add(object.__getattribute__(self, "_path") or "<the whole config>")
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("stages must not change the config")


def _covered(read: str, allowed: list[str]) -> bool:
    return any(read == f or read.startswith(f + ".") for f in allowed)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("contract")
    # head_shift + untie exercise the calibration path of init-embeddings, full.steps the joint phase
    return tiny_project(
        root,
        init={"untie_head": True, "head_shift": 1.0, "head_shift_outside": 1.0, "eval_max_bytes": 300},
        train={"max_steps": 2, "full": {"steps": 1}},
    )


@pytest.fixture(scope="module")
def reads(project: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Every stage run once with the recording config: the fields each one read."""
    cfg = validate_dict({**project, "output_dir": str(tmp_path_factory.mktemp("tracked") / "out")})
    out: dict[str, set[str]] = {}
    for key in ORDER:
        log: set[str] = set()
        with stage_output(cfg, key) as tmp:
            entry_function(key)(Tracked(cfg, "", log), tmp)
        out[key] = log
    return out


def _missing(reads: dict[str, set[str]]) -> dict[str, list[str]]:
    allowed = {k: upstream_fields(k) + list(NOT_FINGERPRINTED) for k in ORDER}
    return {k: sorted(r for r in reads[k] if not _covered(r, allowed[k])) for k in ORDER}


def test_every_field_a_stage_reads_reaches_its_fingerprint(reads: dict[str, set[str]]):
    missing = _missing(reads)
    assert not any(missing.values()), f"fields read but not fingerprinted: {missing}"
    # The tracker sees what it should: each stage reads its own section.
    assert any(r.startswith("tokenizer.") for r in reads["tokenizer"])
    assert any(r.startswith("init.") for r in reads["model-init"]) and "seed" in reads["model-init"]
    assert any(r.startswith("train.") for r in reads["model-trained"])
    assert "eval" in reads["eval"] or any(r.startswith("eval.") for r in reads["eval"])
    assert any(r.startswith("export.") for r in reads["export"])


def test_a_field_missing_from_the_table_is_reported(reads: dict[str, set[str]], monkeypatch):
    """The check above can fail: without ``seed`` in model-init's table (the old bug), seed is reported."""
    import retok.core.stages as stages

    st = stages.STAGES["model-init"]
    patched = type(st)(
        st.key, st.command, st.entry, st.inputs, tuple(f for f in st.reads if f != "seed"), st.report
    )
    monkeypatch.setitem(stages.STAGES, "model-init", patched)
    assert _missing(reads)["model-init"] == ["seed"]


def test_fingerprints_follow_reads_and_inputs(project: dict):
    base = validate_dict(project)

    def fp(**sets: Any) -> dict[str, str]:
        data = json.loads(json.dumps(project))
        for dotted, value in sets.items():
            node = data
            *parents, last = dotted.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        cfg = validate_dict(data)
        return {k: fingerprint(cfg, k, every) for k in ORDER}

    def every(key: str) -> bool:  # as after a whole run: eval and export read model-trained
        return True

    same = {k: fingerprint(base, k, every) for k in ORDER}
    # which model eval and export read is part of what they are: model-init's figures are not model-trained's
    only_init = {k: fingerprint(base, k, lambda key: key != "model-trained") for k in ORDER}
    assert [k for k in ORDER if only_init[k] != same[k]] == ["eval", "export"]
    # seed changes model-init's weights (random init) and everything after it, not the tokenizer
    s = fp(seed=7)
    assert s["tokenizer"] == same["tokenizer"] and all(s[k] != same[k] for k in ORDER[1:])
    # eval.window is used by model-init's and train-io's BPB: it reaches them
    w = fp(eval__window=128)
    assert w["tokenizer"] == same["tokenizer"] and w["model-init"] != same["model-init"]
    # eval.repeats only changes eval (and export, which embeds eval's table)
    r = fp(eval__repeats=5)
    assert [k for k in ORDER if r[k] != same[k]] == ["eval", "export"]
    # where things go and how many threads: nothing
    t = fp(compute__threads=2, output_dir="elsewhere")
    assert t == same


def test_run_redoes_a_stale_model_init_and_export_refuses_a_stale_source(project: dict, tmp_path: Path):
    data = {**json.loads(json.dumps(project)), "output_dir": str(tmp_path / "out")}
    cfg = validate_dict(data)
    run_all(cfg, only=["tokenizer", "model-init"])
    assert stage_status(cfg, "model-init") == "same"
    changed = validate_dict({**data, "seed": 3})
    assert stage_status(changed, "model-init") == "different"  # the bug: seed was not in its fingerprint
    with pytest.raises(RetokError, match=r"model-init was made by a different config \(seed changed\)"):
        require_stage(changed, "model-init", "export")
    # a rebuilt tokenizer makes the model-init made from the old one stale for every later stage
    bigger = validate_dict({**data, "tokenizer": {**data["tokenizer"], "new_tokens": 30}})
    with pytest.raises(RetokError, match=r"tokenizer.new_tokens"):
        run_stage(bigger, "export", overwrite=True)
    assert not stage_dir(cfg, "export").exists()


def test_stage_metadata_records_inputs(project: dict, tmp_path: Path):
    cfg = validate_dict({**project, "output_dir": str(tmp_path / "out")})
    run_all(cfg, only=["tokenizer", "model-init"])
    meta = json.loads((stage_dir(cfg, "model-init") / STAGE_FILE).read_text())
    assert meta["stage"] == "model-init" and meta["fingerprint"] == fingerprint(cfg, "model-init")
    tok = json.loads((stage_dir(cfg, "tokenizer") / STAGE_FILE).read_text())
    assert meta["inputs"] == {"tokenizer": {"fingerprint": tok["fingerprint"], "run_id": tok["run_id"]}}
    assert tok["fingerprint"] == fingerprint(cfg, "tokenizer") and meta["complete"] is True
    assert 0 < meta["seconds"] < 600  # the stage's own wall time, for benchmarks that reuse a folder
