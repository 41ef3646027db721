"""Bad input found by trying retok as a new user would: each is one line saying what is wrong and what to do,
exit code 2, no traceback, and nothing lost."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from retok.core.config import DataSource, validate_dict
from retok.core.data import iter_source
from retok.core.errors import RetokError
from retok.core.safetensors_io import read_checkpoint, read_header
from retok.core.sources import hub_error
from retok.pipeline import run_stage
from tests.tiny import byte_level_tokenizer, save_model_folder, tiny_llama, tiny_project


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from retok.cli import main

    monkeypatch.setattr(sys, "argv", ["retok", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    tok = byte_level_tokenizer()
    return save_model_folder(tiny_llama(tok, tied=True), tok, tmp_path / "model")


def test_truncated_safetensors(model_dir: Path):
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        RetokError,
        match=r"not a valid safetensors file: tensor .* ends at byte \d+ of a \d+-byte file; it is truncated",
    ):
        read_checkpoint(model_dir)


def test_safetensors_with_a_huge_header_length(model_dir: Path):
    f = model_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)  # was an OverflowError deep inside mmap
    f.write_bytes(bytes(data))
    with pytest.raises(
        RetokError,
        match=r"header length 4611686018427387904 for a \d+-byte file\); it is truncated or damaged",
    ):
        read_header(f)


def test_safetensors_whose_sizes_disagree(model_dir: Path):
    f = model_dir / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32")
    text = raw[8 : 8 + n].decode()
    # the same header with one tensor said to be F16: as long, but its byte range no longer fits its shape
    at = text.index(json.dumps(key)) + len(json.dumps(key))
    text = text[:at] + text[at:].replace('"F32"', '"F16"', 1)
    f.write_bytes(raw[:8] + text.encode() + raw[8 + n :])
    with pytest.raises(RetokError, match=rf"tensor '{key}' has \d+ bytes for shape"):
        read_header(f)


def test_init_embeddings_on_a_truncated_model_is_one_line(tmp_path: Path, monkeypatch, capsys):
    cfg = tiny_project(tmp_path)
    run_stage(validate_dict(cfg), "tokenizer")
    f = Path(cfg["model"]["path"]) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(cfg))
    code, err = _cli(["init-embeddings", str(p)], monkeypatch, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and "truncated" in errors[0]
    assert not (tmp_path / "out" / "model-init").exists()


def test_a_lone_surrogate_in_json_lines(tmp_path: Path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "broken \\ud800 here"}\n', encoding="utf-8")
    src = DataSource(name="zh", path=str(f))
    with pytest.raises(RetokError, match=r"unpaired surrogate that is not text"):
        list(iter_source(src, "data.train.0"))


def test_eval_speed_with_a_tokenizer_longer_than_the_rows(tmp_path: Path, monkeypatch, capsys):
    cfg = tiny_project(tmp_path)
    old = byte_level_tokenizer()
    bigger = byte_level_tokenizer(vocab_size=640)  # more ids than the model below has rows
    short = save_model_folder(tiny_llama(old, tied=True), bigger, tmp_path / "short")
    cfg["eval"]["candidate_model"] = str(short)
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(cfg))
    code, err = _cli(["eval-speed", str(p)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert "eval.candidate_model" in err and "embedding rows" in err
    assert not (tmp_path / "out" / "eval").exists()


def test_init_config_on_a_folder(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "dir").mkdir()
    code, err = _cli(["init-config", str(tmp_path / "dir"), "--force"], monkeypatch, capsys)
    assert code == 2 and "is a folder; give a file name" in err and "Traceback" not in err
    assert list((tmp_path / "dir").iterdir()) == []


def test_hub_errors_say_what_happened():
    def err(name: str, msg: str = "details") -> Exception:
        return type(name, (Exception,), {})(msg)

    assert "gated" in hub_error(err("GatedRepoError"), "org/m") and "hf auth login" in hub_error(
        err("GatedRepoError"), "org/m"
    )
    assert "no such repository" in hub_error(err("RepositoryNotFoundError"), "org/m")
    assert "model.revision" in hub_error(err("RevisionNotFoundError"), "org/m")
    assert "cannot be reached" in hub_error(err("LocalEntryNotFoundError"), "org/m")
    assert "cannot be reached" in hub_error(err("OfflineModeIsEnabled"), "org/m")
    other = hub_error(err("ConnectionError", "name resolution failed"), "org/m")
    assert "ConnectionError: name resolution failed" in other
    # four different causes, four different messages
    assert (
        len(
            {
                hub_error(err(n), "org/m")
                for n in ("GatedRepoError", "RepositoryNotFoundError", "LocalEntryNotFoundError", "X")
            }
        )
        == 4
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--bogus"], "No such option: --bogus (see `retok run --help`)"),
        (["check"], "Missing argument 'folder'. (see `retok check --help`)"),
        (["bogus"], "No such command 'bogus'."),
        (["plan", "x.yaml", "-n", "0"], "Invalid value for '--processes' / '-n'"),
        (["train-io", "--resume=maybe"], "Option '--resume' does not take a value."),
    ],
)
def test_usage_errors_are_one_line(args, needle, monkeypatch, capsys):
    """The bug: typer vendors its own click (typer._click), whose exceptions cli.main did not recognise, so
    every usage error printed a traceback."""
    code, err = _cli(args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "Abort"])
def test_ctrl_c_outside_the_training_steps_is_one_line(how, tmp_path, monkeypatch, capsys):
    """Ctrl-C while a stage loads (outside train-io's own handler) or at a click prompt: one line, exit 130."""
    import typer

    import retok.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt if how == "KeyboardInterrupt" else typer.Abort()

    monkeypatch.setattr(retok.pipeline, "run_stage", interrupted)
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(tiny_project(tmp_path)))
    code, err = _cli(["build-tokenizer", str(p)], monkeypatch, capsys)
    assert code == 130 and err.endswith("\nretok: interrupted\n") and "Traceback" not in err


# ---------------------------------------------------------------- files that cannot be read or written


def _config_file(tmp_path: Path, **sections) -> tuple[dict, Path]:
    cfg = tiny_project(tmp_path, **sections)
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(cfg))
    return cfg, p


def test_an_extension_that_learns_no_token_is_refused(tmp_path, monkeypatch, capsys):
    """The bug: 0 new tokens gave a tokenizer equal to the old one, and train-io ran every step for nothing
    before failing in the head fit."""
    _, p = _config_file(tmp_path, tokenizer={"new_tokens": 40, "domains": ["zh"], "min_frequency": 10**6})
    code, err = _cli(["build-tokenizer", str(p)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert "learned 0 new tokens" in err and "tokenizer.min_frequency" in err
    assert not (tmp_path / "out" / "tokenizer").exists()


def test_unreadable_data_file_is_one_line(tmp_path, monkeypatch, capsys):
    """An OSError while reading a data file (permission denied, an I/O error): one line naming the key and the
    file. Root reads anything, so the refusal is simulated where the file is opened."""
    cfg, p = _config_file(tmp_path)
    bad = Path(cfg["data"]["train"][0]["path"])
    real_open = Path.open

    def refuse(self, *a, **k):
        if self == bad:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *a, **k)

    monkeypatch.setattr(Path, "open", refuse)
    code, err = _cli(["build-tokenizer", str(p)], monkeypatch, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert f"data.train.0.path: {bad} cannot be read (Permission denied)" in errors[0]
    assert not (tmp_path / "out" / "tokenizer").exists()


def test_validate_reads_every_safetensors_header(tmp_path, monkeypatch, capsys):
    """`retok validate` opens the model's shards (a folder where a shard should be, a truncated one), so what a
    stage would meet after minutes of work is found at once."""
    _, p = _config_file(tmp_path)
    shard = tmp_path / "model" / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-64])
    code, err = _cli(["validate", str(p)], monkeypatch, capsys)
    assert code == 2 and "truncated" in err and "Traceback" not in err
    shard.unlink()
    shard.mkdir()
    code, err = _cli(["validate", str(p)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and "model.safetensors" in err


def test_a_full_disk_during_a_stage_keeps_the_previous_folder(tmp_path, monkeypatch, capsys):
    """No space left while a stage writes: one line naming output_dir and what was kept; the earlier folder is
    as it was and no temporary is left."""
    cfg, p = _config_file(tmp_path)
    run_stage(validate_dict(cfg), "tokenizer")
    folder = tmp_path / "out" / "tokenizer"
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    _fault(monkeypatch, "tokenizer", OSError(28, "No space left on device", str(tmp_path / "out" / "x")))
    code, err = _cli(["build-tokenizer", str(p), "--overwrite"], monkeypatch, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert (
        "no space left on the device" in errors[0] and f"the previous {folder} is kept as it was" in errors[0]
    )
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["tokenizer"]


def _fault(monkeypatch, key: str, error: BaseException) -> None:
    """Make stage ``key`` fail with ``error`` where it would write (a seam for faults of the file system)."""
    import dataclasses

    import retok.core.stages

    def fail(*a, **k):
        raise error

    mod = type(sys)("retok_fault")
    mod.run = fail
    monkeypatch.setitem(sys.modules, "retok_fault", mod)
    monkeypatch.setitem(
        retok.core.stages.STAGES,
        key,
        dataclasses.replace(retok.core.stages.STAGES[key], entry="retok_fault:run"),
    )


def test_init_config_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    """The bug: `retok init-config --overwrite` (then --force) on a full disk left the user's config truncated."""
    import os

    target = tmp_path / "mine.yaml"
    target.write_text("output_dir: runs/mine  # my settings\n")
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:10])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    code, err = _cli(["init-config", str(target), "--overwrite"], monkeypatch, capsys)
    assert code == 2 and "no space left on the device" in err and "the existing file is kept" in err
    assert target.read_text() == "output_dir: runs/mine  # my settings\n"
    assert [x.name for x in tmp_path.iterdir()] == ["mine.yaml"]


def test_a_damaged_checkpoint_on_resume_is_one_line(tmp_path, monkeypatch, capsys):
    from retok.pipeline import run_all

    cfg, p = _config_file(
        tmp_path, train={"max_steps": 2, "eval_every": 2, "save_every": 1}, fit={"after_train": False}
    )
    run_all(validate_dict(cfg), only=["tokenizer", "model-init", "model-trained"])
    ckpt = tmp_path / "out" / "train-state" / "checkpoint"
    params = ckpt / "params.safetensors"
    params.write_bytes(params.read_bytes()[:100])
    code, err = _cli(["train-io", str(p), "--overwrite", "--resume"], monkeypatch, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert f"--resume: the checkpoint in {ckpt} is damaged" in errors[0] and "truncated" in errors[0]
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "step": "x"}))
    code, err = _cli(["train-io", str(p), "--overwrite", "--resume"], monkeypatch, capsys)
    assert code == 2 and "state.json is damaged" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "content, needle",
    [
        ("not json", "not a readable JSON file"),
        ('{"hidden_size": 8}', "no model_type in it"),
        ('{"model_type": "nonsense-llm"}', "model_type 'nonsense-llm' is unknown to transformers"),
    ],
)
def test_plan_with_a_bad_model_config_is_one_line(tmp_path, monkeypatch, capsys, content, needle):
    _, p = _config_file(tmp_path)
    mc = tmp_path / "config.json"
    mc.write_text(content)
    code, err = _cli(["plan", str(p), "--model-config", str(mc)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and needle in err


def test_init_embeddings_never_publishes_a_folder_that_fails_its_checks(tmp_path, monkeypatch):
    """The bug: the folder was published with a warning only."""
    import retok.embeddings.stage as emb

    cfg = validate_dict(tiny_project(tmp_path))
    run_stage(cfg, "tokenizer")
    monkeypatch.setattr(
        emb, "verify_folder", lambda out, tmap: {"ok": False, "problems": ["config eos_token_id=7 but ..."]}
    )
    with pytest.raises(RetokError, match=r"fails its own checks \(config eos_token_id=7 but ...\)"):
        run_stage(cfg, "model-init")
    assert not (tmp_path / "out" / "model-init").exists()


def test_check_on_a_folder_with_an_unreadable_shard_is_a_fail_row(model_dir: Path, monkeypatch, capsys):
    shard = model_dir / "model.safetensors"
    shard.unlink()
    shard.mkdir()  # what a reader meets where a file cannot be opened
    from retok.cli import main

    monkeypatch.setattr(sys, "argv", ["retok", "check", str(model_dir)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert e.value.code == 1 and "Traceback" not in out.err + out.out
    assert "FAIL" in out.out
