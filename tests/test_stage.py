"""Stage folders: written through a temporary folder, documented, skipped when made by the same config."""

from __future__ import annotations

import json

import pytest

from retok.config import apply_overrides, validate_dict
from retok.errors import RetokError
from retok.stages import require_stage, stage_dir, stage_output, stage_status


def cfg(tmp_path, *sets):
    data = {"output_dir": str(tmp_path / "out"), "model": {"path": "m/x"}}
    return validate_dict(apply_overrides(data, list(sets)))


def test_success_renames_and_documents(tmp_path):
    c = cfg(tmp_path)
    assert stage_status(c, "tokenizer") == "missing"
    with stage_output(c, "tokenizer") as tmp:
        assert tmp != stage_dir(c, "tokenizer") and tmp.parent == c.out
        (tmp / "tokenizer.json").write_text("{}")
        assert not stage_dir(c, "tokenizer").exists()
    folder = stage_dir(c, "tokenizer")
    assert (folder / "tokenizer.json").read_text() == "{}"
    meta = json.loads((folder / "retok_stage.json").read_text())
    assert meta["stage"] == "tokenizer"
    assert "output_dir:" in (folder / "retok_config.yaml").read_text()
    assert stage_status(c, "tokenizer") == "same"
    assert stage_status(cfg(tmp_path, "eval.repeats=7"), "tokenizer") == "same"
    assert stage_status(cfg(tmp_path, "tokenizer.new_tokens=5"), "tokenizer") == "different"
    assert [p.name for p in c.out.iterdir()] == ["tokenizer"]


def test_failure_leaves_nothing_and_keeps_old_output(tmp_path):
    c = cfg(tmp_path)
    with stage_output(c, "eval") as tmp:
        (tmp / "report.json").write_text("old")
    with pytest.raises(ValueError), stage_output(c, "eval", overwrite=True) as tmp:
        (tmp / "report.json").write_text("half")
        raise ValueError("boom")
    assert (stage_dir(c, "eval") / "report.json").read_text() == "old"
    assert sorted(p.name for p in c.out.iterdir()) == ["eval"]
    with pytest.raises(RetokError, match="already exists; pass --overwrite"):
        with stage_output(c, "eval"):
            pass
    with stage_output(c, "eval", overwrite=True) as tmp:
        (tmp / "report.json").write_text("new")
    assert (stage_dir(c, "eval") / "report.json").read_text() == "new"
    assert sorted(p.name for p in c.out.iterdir()) == ["eval"]


def test_require_stage_errors(tmp_path):
    c = cfg(tmp_path)
    with pytest.raises(RetokError, match="run `retok build-tokenizer`"):
        require_stage(c, "tokenizer", "init-embeddings")
    stage_dir(c, "tokenizer").mkdir(parents=True)
    with pytest.raises(RetokError, match="was not made by retok"):
        require_stage(c, "tokenizer", "init-embeddings")
