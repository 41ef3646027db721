"""The BPB memo: its key changes with everything the figure depends on, a broken memo is a miss, and on a tiny
run eval-speed takes the original model's BPB from init-embeddings' memo exactly when it scores the same bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from retok.core.bpb_memo import MEMO_FILE, bpb_key, read_memo, remembered, write_memo
from retok.core.config import validate_dict
from retok.pipeline import run_stage
from tests.tiny import byte_level_tokenizer, save_model_folder, tiny_llama, tiny_project


@pytest.fixture()
def folder(tmp_path: Path):
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, tied=True)
    save_model_folder(model, tok, tmp_path / "m")
    return tmp_path / "m", tok, model


def test_key_follows_everything_the_figure_depends_on(folder, tmp_path):
    path, tok, model = folder
    docs, starts = ["some text", "more text"], [0, 0]
    base = dict(window=64, stride=32, model=model)
    key = bpb_key(path, tok, docs, starts, **base)
    assert key == bpb_key(path, tok, list(docs), list(starts), **base)  # stable
    other_tok = byte_level_tokenizer(extra_text="机器学习" * 20, vocab_size=520)
    changed = [
        bpb_key(path, tok, ["some text", "more text!"], starts, **base),
        bpb_key(path, tok, docs, [0, 4], **base),
        bpb_key(path, tok, docs, starts, window=128, stride=32, model=model),
        bpb_key(path, tok, docs, starts, window=64, stride=16, model=model),
        bpb_key(path, other_tok, docs, starts, **base),
        bpb_key(path, tok, docs, starts, window=64, stride=32, model=model.to(dtype=torch.float16)),
    ]
    assert len({key, *changed}) == 1 + len(changed)
    model.float()
    # a rewritten weight file (new size or mtime) is another model
    weights = next(path.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert bpb_key(path, tok, docs, starts, **base) != key


def test_memo_round_trip_and_broken_memo_is_a_miss(tmp_path):
    assert read_memo(tmp_path) == {} and read_memo(None) == {}
    write_memo(tmp_path, {"a": {"bpb": 1.5}})
    write_memo(tmp_path, {"b": {"bpb": 2.5}})
    assert read_memo(tmp_path) == {"a": {"bpb": 1.5}, "b": {"bpb": 2.5}}
    assert [p.name for p in tmp_path.iterdir()] == [MEMO_FILE]  # no temporary file left
    calls = []
    assert remembered(read_memo(tmp_path), "a", lambda: calls.append(1) or {"bpb": 9.0}) == (
        {"bpb": 1.5},
        True,
    )
    assert remembered(read_memo(tmp_path), "c", lambda: calls.append(1) or {"bpb": 9.0}) == (
        {"bpb": 9.0},
        False,
    )
    assert calls == [1]
    (tmp_path / MEMO_FILE).write_text("{not json", encoding="utf-8")
    assert read_memo(tmp_path) == {}


def _eval_report(cfg) -> dict:
    folder = run_stage(cfg, "eval", overwrite=True)
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def test_eval_speed_reuses_the_original_bpb_init_measured(tmp_path):
    raw = tiny_project(tmp_path)
    cfg = validate_dict(raw)
    run_stage(cfg, "tokenizer")
    init_dir = run_stage(cfg, "model-init")
    init = json.loads((init_dir / "init_report.json").read_text(encoding="utf-8"))
    memo = read_memo(init_dir)
    assert len(memo) == len(init["bpb"]) == 2  # the original, per domain

    report = _eval_report(cfg)
    for d, figs in report["domains"].items():
        assert figs["old"]["bpb_measured_by"] == "init-embeddings"
        assert figs["old"]["bpb"] == pytest.approx(init["bpb"][d]["original"], abs=5e-6)
        assert "bpb_measured_by" not in figs["new"]

    # the figure really comes from the memo: a planted value shows up
    planted = {k: {**v, "bpb": 7.25} for k, v in memo.items()}
    (init_dir / MEMO_FILE).write_text(json.dumps(planted), encoding="utf-8")
    assert {f["old"]["bpb"] for f in _eval_report(cfg)["domains"].values()} == {7.25}

    # other bytes (eval.max_bytes) are a miss: measured again, the true figure
    other = validate_dict({**raw, "eval": {**raw["eval"], "max_bytes": 500}})
    for figs in _eval_report(other)["domains"].values():
        assert "bpb_measured_by" not in figs["old"] and figs["old"]["bpb"] != 7.25
