"""Stage folders: written through a temporary folder, documented, skipped when made by the same config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from retok.core.config import apply_overrides, validate_dict
from retok.core.errors import RetokError
from retok.core.freshness import stage_status
from retok.core.stages import require_stage, stage_dir, stage_output


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


def test_damaged_stage_metadata_is_one_clear_error(tmp_path):
    c = cfg(tmp_path)
    with stage_output(c, "tokenizer") as tmp:
        (tmp / "tokenizer.json").write_text("{}")
    (stage_dir(c, "tokenizer") / "retok_stage.json").write_text("{not json")
    with pytest.raises(RetokError, match=r"retok_stage.json is damaged .*remove .* and run the stage again"):
        require_stage(c, "tokenizer", "init-embeddings")
    assert stage_status(c, "tokenizer") == "different"


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    import subprocess

    c = cfg(tmp_path)
    c.out.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    stale = c.out / f".export.tmp-{dead.pid}-abc"
    (stale / "sub").mkdir(parents=True)
    live = c.out / f".export.tmp-{os.getppid()}-xyz"  # our parent is alive: its folder is left alone
    live.mkdir()
    other = c.out / f".eval.old-{dead.pid}-q"  # another stage's leftovers go too (a killed 8B export: ~16 GB)
    other.mkdir()
    with stage_output(c, "tokenizer") as tmp:
        (tmp / "x").write_text("x")
    names = sorted(p.name for p in c.out.iterdir())
    assert names == sorted(["tokenizer", live.name])


@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_output_dir_that_cannot_be_used_is_one_clear_error(tmp_path, case):
    if case == "file":
        target = tmp_path / "a-file"
        target.write_text("keep me")
        want = "exists and is not a folder"
    else:
        if os.geteuid() == 0:
            target = Path("/proc/retok-cannot-write-here")  # even root cannot create folders in /proc
        else:
            ro = tmp_path / "ro"
            ro.mkdir()
            ro.chmod(0o500)
            target = ro / "out"
        want = "cannot be created"
    c = validate_dict({"output_dir": str(target), "model": {"path": "m/x"}})
    with pytest.raises(RetokError, match=want), stage_output(c, "tokenizer"):
        pass
    if case == "file":
        assert target.read_text() == "keep me"


def test_a_too_long_output_dir_is_one_clear_error(tmp_path):
    c = validate_dict({"output_dir": str(tmp_path / ("x" * 300)), "model": {"path": "m/x"}})
    with (
        pytest.raises(RetokError, match="output_dir .*(cannot be created|cannot create)"),
        stage_output(c, "tokenizer"),
    ):
        pass
