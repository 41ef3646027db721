"""The command line: every command exists, bad input is one line + exit 2, nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

COMMANDS = [
    "build-tokenizer",
    "init-embeddings",
    "train-io",
    "eval-speed",
    "export",
    "run",
    "check",
    "validate",
    "init-config",
]


def retok(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "retok.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def assert_one_line_error(p: subprocess.CompletedProcess, needle: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, p.stderr
    assert needle in lines[0], lines[0]


def write_cfg(tmp_path: Path, **extra) -> Path:
    txt = tmp_path / "t.txt"
    txt.write_text("hello world\n")
    data = {
        "output_dir": str(tmp_path / "out"),
        "model": {"path": str(tmp_path / "no-such-model")},
        "data": {"train": [{"name": "en", "path": str(txt)}], "eval": [{"name": "en", "path": str(txt)}]},
        **extra,
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_help_lists_every_command():
    p = retok("--help")
    assert p.returncode == 0
    for c in COMMANDS:
        assert c in p.stdout, c


def test_validate_ok_and_bad(tmp_path):
    cfg = write_cfg(tmp_path, model={"path": "org/name"})  # a hub id: validate does not download it
    p = retok("validate", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "config ok" in p.stdout and "model.path: hub id org/name" in p.stdout
    # a local model path is resolved: a missing folder, or a folder that is not a model, fails up front
    assert_one_line_error(retok("validate", str(write_cfg(tmp_path))), "no-such-model not found")
    (tmp_path / "empty").mkdir()
    empty = write_cfg(tmp_path, model={"path": str(tmp_path / "empty")})
    assert_one_line_error(retok("validate", str(empty)), "has no config.json")
    assert_one_line_error(
        retok("validate", str(cfg), "--set", "train.max_stepz=3"), "train.max_stepz: unknown key"
    )
    assert_one_line_error(retok("validate", str(cfg), "--set", "train.max_steps=abc"), "train.max_steps:")
    assert_one_line_error(retok("validate", str(tmp_path / "nope.yaml")), "not found")
    bad = write_cfg(
        tmp_path,
        model={"path": "org/name"},
        data={"train": [{"name": "en", "path": str(tmp_path / "missing.txt")}]},
    )
    assert_one_line_error(retok("validate", str(bad)), "missing.txt not found")


def test_init_config_writes_valid_commented_file_and_never_overwrites(tmp_path):
    out = tmp_path / "new.yaml"
    p = retok("init-config", str(out), "--model", "org/name")
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert text.startswith("# retok config")
    assert yaml.safe_load(text)["model"]["path"] == "org/name"
    before = out.read_text()
    assert_one_line_error(retok("init-config", str(out)), "already exists")
    assert out.read_text() == before


def test_stage_with_missing_model_writes_nothing(tmp_path):
    cfg = write_cfg(tmp_path)
    p = retok("build-tokenizer", "--config", str(cfg))
    assert_one_line_error(p, "model.path")
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_existing_output_folder_is_refused_and_kept(tmp_path):
    cfg = write_cfg(tmp_path)
    stage = tmp_path / "out" / "tokenizer"
    stage.mkdir(parents=True)
    (stage / "keep.txt").write_text("mine")
    # a folder retok did not make is never replaced, --overwrite or not
    for extra in ([], ["--overwrite"]):
        assert_one_line_error(retok("build-tokenizer", str(cfg), *extra), "holds files retok did not make")
        assert (stage / "keep.txt").read_text() == "mine" and [p.name for p in stage.iterdir()] == [
            "keep.txt"
        ]


def test_two_configs_and_no_config(tmp_path):
    cfg = write_cfg(tmp_path)
    assert_one_line_error(
        retok("validate", str(cfg), "--config", str(tmp_path / "other.yaml")), "two configs"
    )
    assert_one_line_error(retok("build-tokenizer"), "no config given")


@pytest.mark.parametrize(
    "cmd", ["build-tokenizer", "init-embeddings", "train-io", "eval-speed", "export", "run"]
)
def test_every_stage_command_takes_config_and_set(cmd):
    p = retok(cmd, "--help")
    assert p.returncode == 0
    assert "--config" in p.stdout and "--set" in p.stdout
