"""The real pipeline end to end on SmolLM2-135M at a reduced budget: every stage, every report contract,
`retok check` on every model folder, and a second `retok run` that skips everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.real


def retok(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retok.cli", *args], capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, assets) -> Path:
    gguf, corp = assets.gguf, assets.corpora
    assets.need(gguf, corp)
    out = tmp_path_factory.mktemp("e2e")
    cfg = {
        "output_dir": str(out / "run"),
        "model": {"path": str(gguf)},
        "compute": {"device": "cpu", "dtype": "float32", "threads": 2},
        "data": {
            "train": [
                {"name": "zh", "path": str(corp / "zh" / "train.jsonl"), "max_bytes": 400_000},
                {"name": "en", "path": str(corp / "en" / "train.jsonl"), "max_bytes": 20_000},
            ],
            "eval": [
                {"name": "zh", "path": str(corp / "zh" / "eval.jsonl")},
                {"name": "en", "path": str(corp / "en" / "eval.jsonl")},
            ],
        },
        "tokenizer": {"mode": "extend", "new_tokens": 1000, "domains": ["zh"]},
        "init": {"method": "mean", "fit_bytes": 30_000},
        "train": {
            "max_steps": 3,
            "seq_len": 64,
            "batch_size": 2,
            "eval_every": 3,
            "save_every": 3,
            "eval_max_bytes": 600,
            "warmup_steps": 1,
        },
        "eval": {
            "max_bytes": 1500,
            "window": 128,
            "stride": 96,
            "prompt_bytes": 300,
            "continuation_bytes": 60,
            "repeats": 1,
            "warmup": 0,
        },
        "export": {"max_shard_size": "200MB"},
    }
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = retok("run", str(path))
    assert p.returncode == 0, p.stderr[-3000:]
    (out / "stdout.txt").write_text(p.stdout)
    return out


def test_every_stage_folder_documents_itself(run_dir):
    run = run_dir / "run"
    for stage in ("tokenizer", "model-init", "model-trained", "eval", "export"):
        folder = run / stage
        assert (folder / "retok_config.yaml").is_file(), stage
        assert json.loads((folder / "retok_stage.json").read_text())["stage"] == stage
    assert (run / "summary.md").is_file()
    stdout = (run_dir / "stdout.txt").read_text()
    assert "retok summary" in stdout
    # the table printed into a pipe is whole: no column header cut to "spe…" at 80 columns
    assert "speed-up" in stdout and "BPB trained" in stdout


def test_report_contracts(run_dir):
    run = run_dir / "run"
    comp = json.loads((run / "tokenizer" / "compression.json").read_text())
    for d in ("zh", "en"):
        r = comp["domains"][d]
        assert r["roundtrip_ok"] is True
        assert r["ratio"] == pytest.approx(r["new_bytes_per_token"] / r["old_bytes_per_token"], rel=1e-6)
    assert comp["domains"]["zh"]["ratio"] > 1.2
    assert comp["domains"]["en"]["ratio"] >= 0.99
    init = json.loads((run / "model-init" / "init_report.json").read_text())
    assert init["copied"] >= 49152 - 17 and init["averaged"] + init["fallback"] >= 990
    train = json.loads((run / "model-trained" / "train_report.json").read_text())
    assert train["steps"] == 3 and train["tokens_per_second"] > 0
    for d in ("zh", "en"):
        assert {"original", "init", "final"} <= set(train["bpb"][d])
    ev = json.loads((run / "eval" / "report.json").read_text())
    for d in ("zh", "en"):
        for side in ("old", "new"):
            for k in ("bytes_per_token", "bpb", "tokens_per_s", "bytes_per_s", "prefill_ms"):
                assert ev["domains"][d][side][k] > 0, (d, side, k)
        assert ev["domains"][d]["speedup_bytes_per_s"] > 0


def test_retok_check_passes_on_model_folders(run_dir):
    for stage in ("model-init", "model-trained", "export"):
        p = retok("check", str(run_dir / "run" / stage))
        assert p.returncode == 0, (stage, p.stdout[-2000:], p.stderr[-2000:])


def test_second_run_skips_every_stage(run_dir):
    p = retok("run", str(run_dir / "cfg.yaml"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("is up to date, skipped") == 5, p.stdout
