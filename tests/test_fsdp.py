"""train-io under FSDP2 (train.distributed: fsdp) with 2 CPU processes (gloo), launched by `accelerate launch`.

- the io phase and the joint phase give the same losses and weights as one process (which does the same
  work as grad_accum 2), and the folder loads with plain transformers;
- the body stays bit-identical in the io phase, and old rows too with objective distill;
- stop after a checkpoint, resume: the final weights equal an uninterrupted run's;
- bad input: fsdp on one process, a resume under another world size or strategy: one line, exit 2, the
  checkpoint untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retok.core.config import to_yaml, validate_dict
from retok.core.stages import stage_dir
from retok.pipeline import run_all
from tests.tiny import tiny_project

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # accelerate launches of 2 CPU processes
BODY = "model.layers."


def _project(
    tmp: Path, tied: bool = False, rows_odd: bool = False, compute: dict | None = None, **train
) -> tuple:
    settings = {
        "objective": "lm",
        "max_steps": 4,
        "eval_every": 2,
        "save_every": 2,
        "lr": 3e-3,
        "piece_map": False,  # not supported under FSDP: a config that resolves to FSDP must say so
    }
    settings |= train
    # No head fit unless asked (test_fsdp_head_fit_after_the_steps); tied: one matrix serves embedding and head.
    init = {"untie_head": not tied, "eval_bpb": False}
    fit = {"after_train": settings.pop("fit_after_train", False)}
    sections = {"train": settings, "init": init, "fit": fit}
    if compute:
        sections["compute"] = {"device": "cpu", "threads": 1, **compute}
    if rows_odd:  # 553 embedding rows: the two processes hold 277 and 276 of them
        sections |= {
            "init": {**init, "pad_to_multiple_of": 1},
            "tokenizer": {"new_tokens": 41, "domains": ["zh"]},
        }
    cfg = validate_dict(tiny_project(tmp, **sections))
    run_all(cfg, only=["tokenizer", "model-init"])
    path = tmp / "cfg.yaml"
    path.write_text(to_yaml(cfg))
    return cfg, path


def _env() -> dict[str, str]:
    """A clean environment for the runs: what earlier tests left in this process's environment (thread counts,
    library switches) must not change the runs' speed or memory, which test_fsdp_matches... compares with the plan."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "RETOK_CACHE", "RETOK_REQUIRE_REAL", "HF_HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    return env | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _launch(
    path: Path, *args: str, processes: int = 2, stop_at: int | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch` with no GPU visible: the torchrun launcher starts CPU processes that use gloo."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    entry = ["-m", "retok.cli"] if stop_at is None else [str(ROOT / "tests" / "fsdp_stop.py"), str(stop_at)]
    env = _env()
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(29500 + (os.getpid() + hash(str(path))) % 2000)]
    return subprocess.run(
        [*cmd, *entry, "train-io", "--config", str(path), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def _retok(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = _env()
    return subprocess.run(
        [sys.executable, "-m", "retok.cli", "train-io", "--config", str(path), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_fsdp_matches_one_process_in_both_phases(tmp_path):
    """2 processes x grad_accum 1 under FSDP == 1 process x grad_accum 2: the same micro-batches make each step."""
    from transformers import AutoModelForCausalLM

    # train.piece_map is not supported under FSDP; the config says false, so it is off on the one process too
    common = {"full": {"steps": 2, "lr": 1e-3}, "batch_size": 2, "tied": True, "piece_map": False}
    one, one_path = _project(tmp_path / "one", grad_accum=2, **common)
    res = _retok(one_path)  # its own process, so that its report's peak memory is its own
    assert res.returncode == 0, res.stderr[-3000:]
    two, path = _project(tmp_path / "two", grad_accum=1, distributed="fsdp", **common)

    res = _launch(path)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = stage_dir(one, "model-trained"), stage_dir(two, "model-trained")
    rep = json.loads((b / "train_report.json").read_text())
    assert rep["processes"] == 2 and rep["steps"] == 6

    la = [(r["step"], r["phase"], r["loss"]) for r in _metrics(a) if "loss" in r]
    lb = [(r["step"], r["phase"], r["loss"]) for r in _metrics(b) if "loss" in r]
    assert [x[:2] for x in la] == [x[:2] for x in lb] and {x[1] for x in la} == {"io", "all"}
    for (_, _, x), (_, _, y) in zip(la, lb, strict=True):
        assert y == pytest.approx(x, rel=1e-5)
    ba = [r["bpb"] for r in _metrics(a) if "bpb" in r]
    bb = [r["bpb"] for r in _metrics(b) if "bpb" in r]
    for x, y in zip(ba, bb, strict=True):
        assert y == pytest.approx(x, rel=1e-5)

    wa, wb = _weights(a), _weights(b)
    assert (
        wa.keys() == wb.keys() and "lm_head.weight" not in wb
    )  # tied: one matrix, as save_pretrained writes
    init_w = _weights(stage_dir(two, "model-init"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)
        if name.startswith(BODY):
            assert not torch.equal(wb[name], init_w[name]), name  # the joint phase trained the body
    # plain transformers loads the consolidated folder and gives the one-process model's outputs
    ma = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
    mb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
    assert mb.config.tie_word_embeddings is True
    x = torch.arange(1, 30)[None]
    torch.testing.assert_close(mb(x).logits, ma(x).logits, rtol=1e-4, atol=1e-4)
    assert (b / "tokenizer.json").is_file() and (b / "train_report.md").is_file()

    # retok plan's peak per device against the peak each run measured (the main process's resident memory)
    from retok.plan import plan

    for cfg, folder, n in ((one, a, 1), (two, b, 2)):
        planned = plan(cfg, n).peak
        measured = json.loads((folder / "train_report.json").read_text())["peak_rss_mb"] * 2**20
        assert abs(planned / measured - 1) <= 0.2, (n, planned, measured)


def test_fsdp_distill_resume_is_exact_and_the_body_stays(tmp_path):
    """The default objective (distill: only new input rows learn) under FSDP with activation checkpointing: stop
    after a checkpoint, resume, and the weights equal an uninterrupted run's; the body and old rows never change."""
    settings = {
        "objective": "distill",
        "distributed": "fsdp",
        "gradient_checkpointing": True,
        "max_steps": 6,
        "save_every": 2,
        "eval_every": 3,
    }
    whole_cfg, whole_path = _project(tmp_path / "whole", rows_odd=True, **settings)
    res = _launch(whole_path)
    assert res.returncode == 0, res.stderr[-4000:]
    whole = _weights(stage_dir(whole_cfg, "model-trained"))
    init = _weights(stage_dir(whole_cfg, "model-init"))
    new_ids = json.loads((stage_dir(whole_cfg, "tokenizer") / "retok_tokenizer.json").read_text())["new_ids"]
    assert init["model.embed_tokens.weight"].shape[0] % 2 == 1  # uneven shards
    moved = torch.zeros(init["model.embed_tokens.weight"].shape[0], dtype=torch.bool)
    moved[new_ids] = True
    for name, t in init.items():
        if name == "model.embed_tokens.weight":
            assert torch.equal(whole[name][~moved], t[~moved])  # old and padding rows bit for bit
            assert not torch.equal(whole[name][moved], t[moved])
        else:
            assert torch.equal(whole[name], t), name  # body, norm and (distill) head bit for bit

    cfg, path = _project(tmp_path / "cut", rows_odd=True, **settings)
    res = _launch(path, stop_at=2)  # Ctrl-C after step 2: the processes stop together after step 3
    # the main process leaves with 130 once every process has saved; the launcher then ends the other one
    assert res.returncode != 0 and "checkpoint at step 3 saved" in res.stdout, res.stderr[-4000:]
    ckpt = cfg.out / "train-state" / "checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["step"], state["strategy"], state["world_size"]) == (3, "fsdp", 2)
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # one shard file per process
    assert not stage_dir(cfg, "model-trained").exists()

    # a resume under another world size or strategy is refused, and the checkpoint is left as it was
    before = _digest(ckpt)
    one = _retok(path, "--resume", "--set", "train.distributed=auto")
    assert one.returncode == 2 and len(one.stderr.strip().splitlines()) == 1, one.stderr[-3000:]
    assert "was saved by 2 process(es) under fsdp; this launch is 1 under single" in one.stderr
    # under the launcher every process says the same line and exits 2 (torchrun then reports the failure)
    ddp = _launch(path, "--resume", "--set", "train.distributed=ddp")
    said = [ln for ln in ddp.stderr.splitlines() if ln.startswith("error: --resume:")]
    assert (
        said
        and "this launch is 2 under ddp; relaunch with --num_processes 2 and train.distributed: fsdp"
        in said[0]
    )
    assert ddp.returncode != 0 and "exitcode: 2" in ddp.stderr
    assert _digest(ckpt) == before

    res = _launch(path, "--resume")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming at step 3" in res.stdout
    resumed = _weights(stage_dir(cfg, "model-trained"))
    assert resumed.keys() == whole.keys()
    for name, t in whole.items():
        assert torch.equal(resumed[name], t), name


def test_fsdp_head_fit_after_the_steps(tmp_path):
    """fit.after_train under FSDP: the main process loads the consolidated folder, fits the new head rows and
    writes it again; the old head rows and the body stay as model-init has them (in its dtype, also when
    compute.dtype is another one: the fit reloaded the folder in compute.dtype and saved the body in it), the
    trained input rows as the steps left them, and plain transformers loads the result."""
    from transformers import AutoModelForCausalLM

    settings = {
        "objective": "distill",
        "distributed": "fsdp",
        "max_steps": 2,
        "eval_every": 2,
        "fit_after_train": True,
    }
    cfg, path = _project(tmp_path, compute={"dtype": "bfloat16"}, **settings)
    res = _launch(path)
    assert res.returncode == 0, res.stderr[-30000:]
    out = stage_dir(cfg, "model-trained")
    rep = json.loads((out / "train_report.json").read_text())
    assert rep["processes"] == 2 and rep["head_fit"]["rows_fitted"] > 0
    assert rep["head_fit"]["held_out_ce"]["fitted"] < rep["head_fit"]["held_out_ce"]["start"]
    assert [r["phase"] for r in _metrics(out) if "bpb" in r][-1] == "head-fit"
    init, after = _weights(stage_dir(cfg, "model-init")), _weights(out)
    from retok.core.sources import load_tokenizer

    n_old = len(load_tokenizer(cfg.model.path))
    assert {t.dtype for t in after.values()} == {torch.float32}
    for name, t in init.items():
        if name.startswith(BODY):
            assert torch.equal(t, after[name]), name
    head0, head1 = init["lm_head.weight"], after["lm_head.weight"]
    assert torch.equal(head0[:n_old], head1[:n_old])  # old rows bit for bit
    assert not torch.equal(head0[n_old:], head1[n_old:])
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(m.lm_head.weight, head1)


def test_fsdp_on_one_process_is_refused(tmp_path):
    cfg, path = _project(tmp_path, distributed="fsdp")
    res = _retok(path)
    assert res.returncode == 2
    assert res.stderr.strip().startswith(
        "error: train.distributed fsdp shards the model over several processes"
    )
    assert len(res.stderr.strip().splitlines()) == 1
    assert (
        not stage_dir(cfg, "model-trained").exists() and not (cfg.out / "train-state" / "checkpoint").exists()
    )
