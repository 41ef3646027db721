"""Bad input found by trying retok as a new user would: each is one line saying what is wrong and what to do,
exit code 2, no traceback, and nothing lost."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from retok.config import DataSource, validate_dict
from retok.data import iter_source
from retok.errors import RetokError
from retok.pipeline import run_stage
from retok.safetensors_io import read_checkpoint, read_header
from retok.sources import hub_error
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
