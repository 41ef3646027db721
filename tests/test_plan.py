"""retok plan: memory per device for each train-io phase, before anything is loaded.

(Plan against measured peak memory: tests/test_fsdp.py for the tiny model, one process and FSDP over two;
tests/test_e2e_real.py for SmolLM2-135M.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retok.config import load_config
from retok.errors import RetokError
from retok.pipeline import run_stage
from retok.plan import GB, model_shape, plan
from retok.stages import stage_dir
from tests.test_fsdp import _project

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "shapes"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retok.cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_shape_counts_the_model_init_parameters(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, _ = _project(tmp_path)
    s = model_shape(cfg)
    model = AutoModelForCausalLM.from_pretrained(stage_dir(cfg, "model-init"))
    emb = model.get_input_embeddings().weight
    assert s.new_rows == emb.shape[0] and s.hidden == emb.shape[1]
    assert s.new_tied is False  # init.untie_head
    total = sum(p.numel() for p in model.parameters())
    assert s.body + 2 * s.new_rows * s.hidden == total
    assert s.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())
    from retok.sources import load_tokenizer

    assert s.new_vocab == len(load_tokenizer(stage_dir(cfg, "tokenizer"))) == 552


def _big(name: str, tmp_path: Path, *sets: str):
    return load_config(
        ROOT / "configs" / f"{name}.yaml", [f"output_dir={tmp_path}", "compute.memory_gb=80", *sets]
    )


def test_llama3_8b_joint_phase_fits_8x80gb_only_under_fsdp(tmp_path):
    cfg = _big("llama3-8b-zh", tmp_path, "train.distributed=auto")
    shape = model_shape(cfg, SHAPES / "llama-3-8b.json")
    assert shape.new_rows == 128_256 + 32_000 and not shape.new_tied and shape.layers == 32
    assert 6.9e9 < shape.body < 7.1e9  # Llama-3-8B: 8.03B parameters, 1.05B of them embedding and head

    ddp = plan(cfg, 8, "ddp", shape=shape)
    fsdp = plan(cfg, 8, "fsdp", shape=shape)
    assert not ddp.fits and fsdp.fits
    assert plan(cfg, 8, shape=shape).strategy == "fsdp"  # auto picks what fits
    joint = {p.phase: p for p in fsdp.phases}["all"]
    parts = {i.name: i.bytes for i in joint.items}
    # AdamW: 8 bytes per parameter, a 1/8 shard each
    assert parts["optimizer"] == pytest.approx(
        8 * (shape.body + 2 * shape.new_rows * shape.hidden) / 8, rel=1e-6
    )
    assert {p.phase: p for p in ddp.phases}["all"].total > 160 * GB


def test_llama3_70b_io_phase_fits_8x80gb(tmp_path):
    cfg = _big("llama3-70b-zh", tmp_path)
    shape = model_shape(cfg, SHAPES / "llama-3-70b.json")
    p = plan(cfg, 8, shape=shape)
    assert p.strategy == "fsdp" and p.fits and p.peak < 80 * GB
    assert [ph.phase for ph in p.phases] == ["io", "bpb"]
    assert not plan(cfg, 8, "ddp", shape=shape).fits
    joint = _big("llama3-70b-zh", tmp_path, "train.full.steps=300")
    assert not plan(joint, 32, shape=shape).fits and plan(joint, 64, shape=shape).fits


def test_fsdp_divides_the_sharded_parts_by_the_processes(tmp_path):
    cfg = _big("llama3-8b-zh", tmp_path)
    shape = model_shape(cfg, SHAPES / "llama-3-8b.json")
    all_parts = [
        {i.name: i.bytes for i in plan(cfg, n, "fsdp", shape=shape).phases[1].items} for n in (2, 4, 8)
    ]
    for a, b in zip(all_parts, all_parts[1:], strict=False):
        assert b["optimizer"] == pytest.approx(a["optimizer"] / 2, rel=1e-6)
        assert b["weights"] < a["weights"] and b["activations"] == a["activations"]
    ckpt = _big("llama3-8b-zh", tmp_path, "train.gradient_checkpointing=false")
    no_ckpt = {i.name: i.bytes for i in plan(ckpt, 8, "fsdp", shape=shape).phases[1].items}
    assert no_ckpt["activations"] > 5 * all_parts[-1]["activations"]


def test_plan_cli_prints_every_phase_and_exits_1_when_it_does_not_fit(tmp_path):
    _, path = _project(tmp_path, full={"steps": 2})
    res = _cli("plan", str(path))
    assert res.returncode == 0, res.stderr
    for phase in ("io ", "all ", "bpb "):
        assert f"  {phase}" in res.stdout
    assert "fits" in res.stdout and "1 process(es), single" in res.stdout
    data = json.loads(_cli("plan", str(path), "-n", "2", "--json").stdout)
    assert data["strategy"] == "ddp" and data["processes"] == 2 and data["fits"] is True
    assert {p["phase"] for p in data["phases"]} == {"io", "all", "bpb"}
    small = _cli("plan", str(path), "--set", "compute.memory_gb=0.01")
    assert small.returncode == 1 and "DOES NOT FIT" in small.stdout and "to fit:" in small.stdout
    bad = _cli("plan", str(path), "--strategy", "fsdp")
    assert bad.returncode == 2 and bad.stderr.startswith(
        "error: --strategy fsdp shards over several processes"
    )


def test_train_io_stops_before_loading_when_the_plan_does_not_fit(tmp_path):
    cfg, path = _project(tmp_path)
    small = load_config(path, ["compute.memory_gb=0.05"])
    with pytest.raises(RetokError, match=r"train-io: the \w+ phase needs [\d.]+ GB per device under single"):
        run_stage(small, "model-trained")
    assert (
        not stage_dir(cfg, "model-trained").exists() and not (cfg.out / "train-state" / "checkpoint").exists()
    )
    res = _cli("train-io", str(path), "--set", "compute.memory_gb=0.05")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "compute.memory_gb overrides what is detected" in res.stderr


def test_plan_time_comes_from_the_measured_tokens_per_second(tmp_path):
    cfg, path = _project(tmp_path)
    assert plan(cfg).minutes is None
    torch.set_num_threads(1)
    run_stage(cfg, "model-trained")
    rep = json.loads((stage_dir(cfg, "model-trained") / "train_report.json").read_text())
    p = plan(cfg)
    assert p.tokens_per_second == pytest.approx(rep["tokens_per_second"])
    assert p.minutes == pytest.approx(cfg.train.max_steps * p.tokens_per_step / rep["tokens_per_second"] / 60)
