"""retok plan: memory per device for each train-io phase, before anything is loaded.

(Plan against measured peak memory: tests/test_fsdp.py for the tiny model, one process and FSDP over two;
tests/test_e2e_real.py for SmolLM2-135M.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from retok.core.config import load_config
from retok.core.errors import RetokError
from retok.core.stages import stage_dir
from retok.pipeline import run_stage
from retok.plan import GB, model_shape, plan
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
    from retok.core.sources import load_tokenizer

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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_the_head_fit_after_the_steps_is_a_phase_of_its_own(tmp_path, monkeypatch):
    import math

    from retok.core.data import domains
    from retok.headfit.run import fit_budgets, fit_cache_bytes
    from retok.plan import fit_states

    cfg, path = _project(tmp_path)  # model-init built: the tokenizer's compression.json is there
    assert "fit" not in [p.phase for p in plan(cfg).phases]  # fit.after_train: false
    fit = load_config(path, ["fit.after_train=true"])
    parts = {i.name: i.bytes for i in {p.phase: p for p in plan(fit).phases}["fit"].items}
    s = model_shape(fit)
    # states: each domain's share of fit.bytes over the new tokenizer's measured bytes per token
    comp = json.loads((stage_dir(fit, "tokenizer") / "compression.json").read_text())["domains"]
    budgets = fit_budgets(domains(fit.data.train), fit.tokenizer.domains, fit.fit.bytes)
    assert set(budgets) <= set(comp)
    n = sum(math.ceil(b / comp[d]["new_bytes_per_token"]) for d, b in budgets.items())
    assert fit_states(fit) == (n, "bytes/token of compression.json")
    assert fit.fit.bytes / 10 < n < fit.fit.bytes
    assert parts["cached states"] == fit_cache_bytes(fit, n, s.hidden, s.new_vocab - s.old_vocab) > 0
    assert parts["weights"] == 4 * (s.body + 2 * s.new_rows * s.hidden)
    assert parts["fit logits"] == 1024 * s.new_rows * 4 * 3
    # fit.max_memory_mb bounds the cache (a larger one is refused before any step)
    capped = load_config(path, ["fit.after_train=true", "fit.max_memory_mb=1"])
    assert {i.name: i.bytes for i in plan(capped).phases[-1].items}["cached states"] == 10**6
    # before the tokenizer exists: at most one state per byte
    fresh = load_config(path, ["fit.after_train=true", f"output_dir={tmp_path / 'none'}"])
    assert fit_states(fresh)[0] == sum(budgets.values())
    # a tied head has no rows of its own to fit: no phase
    assert "fit" not in [p.phase for p in plan(fit, shape=replace(s, new_tied=True)).phases]
    # fit.forward_dtype: a bfloat16 copy of the trained (float32) weights for the fit's forward passes
    import retok.plan.phases as hr  # where the plan reads native_bf16

    copy = 2 * (s.body + 2 * s.new_rows * s.hidden)
    cases = [("model", True, "cpu", None), ("bfloat16", False, "cpu", copy), ("auto", True, "cpu", copy)]
    cases += [("auto", False, "cpu", None), ("auto", False, "cuda", copy)]
    for setting, native, device, want in cases:
        monkeypatch.setattr(hr, "native_bf16", lambda d, native=native: native)
        c = load_config(path, ["fit.after_train=true", f"fit.forward_dtype={setting}"])
        items = {i.name: i.bytes for i in {p.phase: p for p in plan(c, device=device).phases}["fit"].items}
        assert items.get("forward copy") == want, (setting, native, device)


def test_a_70b_head_fit_under_fsdp_loads_the_whole_model_on_one_device(tmp_path):
    """Why configs/llama3-70b-zh.yaml turns fit.after_train off: the consolidated 70B in bf16 (141 GB) on the
    main process's GPU does not fit 80 GB, while the 8B's (16 GB) does."""
    shape = model_shape(_big("llama3-70b-zh", tmp_path), SHAPES / "llama-3-70b.json")
    on = _big("llama3-70b-zh", tmp_path, "fit.after_train=true")
    p = plan(on, 8, shape=shape)
    fit = {ph.phase: ph for ph in p.phases}["fit"]
    whole = 2 * (shape.body + 2 * shape.new_rows * shape.hidden)
    assert {i.name: i.bytes for i in fit.items}["weights"] >= whole > 140 * GB
    assert not p.fits and {ph.phase: ph for ph in p.phases}["io"].total < 80 * GB
    eight = _big("llama3-8b-zh", tmp_path)
    assert eight.fit.after_train and plan(eight, 8, shape=model_shape(eight, SHAPES / "llama-3-8b.json")).fits


def test_a_device_whose_memory_is_unknown_is_not_said_to_fit(tmp_path):
    """The bug: a GPU config planned on a machine without one printed "fits". Now it says it cannot tell and
    what to pass; --json has fits: null; compute.memory_gb makes it a verdict again."""
    _, path = _project(tmp_path)
    gpu = load_config(path, ["compute.device=cuda"])
    p = plan(gpu)
    assert p.capacity is None and p.to_json()["fits"] is None
    last = [ln for ln in p.lines() if ln.startswith("  peak")][0]
    assert "cannot tell whether it fits (no GPU visible here); set compute.memory_gb" in last
    assert not last.endswith(": fits")
    known = plan(load_config(path, ["compute.device=cuda", "compute.memory_gb=80"]))
    assert known.to_json()["fits"] is True and [ln for ln in known.lines() if ln.startswith("  peak")][
        0
    ].endswith(": fits")
