"""The run contract users lean on when they iterate on a config: `retok run` redoes what is stale and nothing
else (like make), says why, never touches a folder it did not make or one that holds what it reads, and a
stage's figures are never shown as those of another model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retok.core.config import apply_overrides, to_yaml, validate_dict
from retok.core.errors import PartialOutput, RetokError
from retok.core.freshness import judge, plan_run
from retok.core.stages import ORDER, STAGE_FILE, protect_inputs, stage_dir, stage_output
from retok.pipeline import run_all, run_stage
from tests.tiny import tiny_project


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (every stage), to copy from."""
    root = tmp_path_factory.mktemp("contract")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = tiny_project(root, train={"max_steps": 2, "eval_every": 2})
        run_all(validate_dict(data))
    finally:
        torch.set_num_threads(threads)
    (root / "config.json").write_text(json.dumps(data))
    return root


def _copy(done: Path, tmp: Path, *sets: str):
    """A copy of the finished run in ``tmp``, and its config with ``sets`` applied."""
    shutil.copytree(done / "out", tmp / "out")
    data = json.loads((done / "config.json").read_text())
    data["output_dir"] = str(tmp / "out")
    return validate_dict(apply_overrides(data, list(sets)))


def _run_ids(cfg) -> dict[str, str]:
    return {
        k: json.loads((stage_dir(cfg, k) / STAGE_FILE).read_text())["run_id"]
        for k in ORDER
        if (stage_dir(cfg, k) / STAGE_FILE).is_file()
    }


def _to_run(cfg) -> list[str]:
    return [v.key for v in plan_run(cfg) if v.action == "run"]


@pytest.mark.parametrize(
    "change, redone",
    [
        ("tokenizer.new_tokens=30", list(ORDER)),
        ("init.method=mean", ["model-init", "model-trained", "eval", "export"]),
        ("train.max_steps=3", ["model-trained", "eval", "export"]),
        # a fit key reaches only the stage that fits: train-io (fit.after_train), not init (fit.at_init off)
        ("fit.epochs=3", ["model-trained", "eval", "export"]),
        ("fit.at_init=true", ["model-init", "model-trained", "eval", "export"]),
        ("eval.repeats=2", ["eval", "export"]),
        ("export.max_shard_size=1GB", ["export"]),
        ("compute.threads=2", []),  # how fast, not what
        ("train.distributed=ddp", []),  # how processes share the work: the same model
        ("compute.memory_gb=3", []),  # what the plan checks against (ddp or fsdp), not the recipe
    ],
)
def test_one_changed_key_redoes_its_stage_and_those_after_it(done, tmp_path, change, redone):
    cfg = _copy(done, tmp_path, change)
    plan = plan_run(cfg)
    assert [v.key for v in plan if v.action == "run"] == redone
    key = change.split("=")[0]
    if redone:  # the first stage redone names the key, with the value before and after
        first = next(v for v in plan if v.action == "run")
        assert any(r.startswith(f"changed {key}: ") and " -> " in r for r in first.reasons), first.reasons
        for v in plan[ORDER.index(redone[0]) + 1 :]:
            assert any("is redone before it" in r for r in v.reasons), v
    for v in plan:
        if v.key not in redone:
            assert v.action == "skip" and v.reasons == ("up to date",)


def test_run_after_a_change_redoes_exactly_the_stale_stages(done, tmp_path):
    cfg = _copy(done, tmp_path)
    before = _run_ids(cfg)
    changed = validate_dict(apply_overrides(cfg.model_dump(mode="json"), ["eval.repeats=2"]))
    run_all(changed)  # no --force needed: the stale stages are retok's own
    after = _run_ids(changed)
    assert [k for k in ORDER if after[k] != before[k]] == ["eval", "export"]
    assert _to_run(changed) == []  # and now everything is up to date


def test_dry_run_says_what_would_run_and_touches_nothing(done, tmp_path):
    cfg = _copy(done, tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    stamp = {p: p.stat().st_mtime_ns for p in cfg.out.rglob("*")}
    res = subprocess.run(
        [sys.executable, "-m", "retok.cli", "run", str(path), "--dry-run", "--set", "train.max_steps=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("retok: ")]
    assert lines[0].startswith("retok: keep  tokenizer") and lines[1].startswith("retok: keep  model-init")
    assert lines[2].startswith("retok: run   model-trained  changed train.max_steps: 2 -> 3")
    assert lines[3].startswith("retok: run   eval") and "model-trained/ is redone before it" in lines[3]
    assert "3 of 5 stage(s) would run; nothing was done" in lines[-1]
    assert {p: p.stat().st_mtime_ns for p in cfg.out.rglob("*")} == stamp


def test_figures_of_model_init_are_stale_once_model_trained_exists(done, tmp_path):
    """eval-speed on model-init, then train-io: eval (and export) read another model now. The bug: `retok run`
    said "eval/ is up to date" and the summary printed model-init's figures as "BPB trained"."""
    cfg = _copy(done, tmp_path)
    for key in ("model-trained", "eval", "export"):
        shutil.rmtree(stage_dir(cfg, key))
    run_stage(cfg, "eval")
    run_stage(cfg, "export")
    assert judge(cfg, "eval").action == "skip"
    from retok.export.check import check_folder

    assert [c.ok for c in check_folder(stage_dir(cfg, "export")) if c.name == "up to date"] == [True]
    meta = json.loads((stage_dir(cfg, "eval") / STAGE_FILE).read_text())
    assert list(meta["inputs"]) == ["model-init"]
    run_stage(cfg, "model-trained")
    v = judge(cfg, "eval")
    assert v.action == "run" and v.reasons == ("it read model-init/, and would now read model-trained/",)
    assert _to_run(cfg) == ["eval", "export"]
    # `retok check` no longer passes the export of the untrained model once a trained one is there
    fresh = [c for c in check_folder(stage_dir(cfg, "export")) if c.name == "up to date"]
    assert len(fresh) == 1 and not fresh[0].ok and "would now read model-trained/" in fresh[0].detail
    from retok.summary import collect

    assert "eval" in collect(cfg)["stale"]


def test_a_remade_input_makes_what_read_it_stale(done, tmp_path):
    cfg = _copy(done, tmp_path)
    run_stage(cfg, "model-init", overwrite=True)  # the same config, remade (data files may have changed)
    plan = {v.key: v for v in plan_run(cfg)}
    assert plan["tokenizer"].action == "skip" and plan["model-init"].action == "skip"
    assert plan["model-trained"].action == "run"
    assert plan["model-trained"].reasons[0].startswith("model-init/ was remade after it")


@pytest.mark.parametrize("folder", ["eval", "export"])
def test_a_folder_retok_did_not_make_is_never_replaced(done, tmp_path, folder, monkeypatch, capsys):
    """The bug: an eval/ or export/ holding a user's files was deleted and rewritten once an earlier stage
    ran. Now the run stops before anything starts, naming the folder."""
    cfg = _copy(done, tmp_path)
    shutil.rmtree(stage_dir(cfg, folder))
    mine = stage_dir(cfg, folder)
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = _run_ids(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    from retok.cli import main

    monkeypatch.setattr(sys, "argv", ["retok", "run", str(path), "--set", "train.max_steps=3"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{mine} holds files retok did not make" in errors[0]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert _run_ids(cfg) == before  # train-io did not run either


def test_a_stage_never_writes_over_the_model_it_reads(done, tmp_path):
    """The bug: with model.path: <output_dir>/export the export overwrote the input model."""
    cfg = _copy(done, tmp_path)
    again = validate_dict(
        apply_overrides(cfg.model_dump(mode="json"), [f"model.path={stage_dir(cfg, 'export')}"])
    )
    before = _run_ids(again)
    with pytest.raises(
        RetokError, match=r"model.path \(.*export\) lies inside .*export, which `retok export`"
    ):
        run_all(again)
    assert _run_ids(again) == before
    with pytest.raises(RetokError, match="model.path"):
        run_stage(again, "export", overwrite=True)
    assert _run_ids(again) == before


def test_output_dir_inside_a_data_folder_is_refused(tmp_path):
    data_dir = tmp_path / "corpus"
    data_dir.mkdir()
    (data_dir / "a.txt").write_text("text")
    cfg = validate_dict(
        {
            "output_dir": str(data_dir / "runs"),
            "model": {"path": "org/model"},
            "data": {"train": [{"name": "zh", "path": str(data_dir)}]},
        }
    )
    with pytest.raises(RetokError, match="inside data.train.0.path's folder"):
        protect_inputs(cfg, ["tokenizer"])
    assert not (data_dir / "runs").exists()


def test_an_incomplete_stage_stays_stale_and_says_why(tmp_path):
    """The bug: an export whose GGUF was refused was marked complete; the next run said "up to date"."""
    cfg = validate_dict({"output_dir": str(tmp_path / "out"), "model": {"path": "org/model"}})
    with pytest.raises(PartialOutput), stage_output(cfg, "export") as tmp:
        (tmp / "config.json").write_text("{}")
        raise PartialOutput("export.gguf: the pre-tokenizer is unknown; set export.gguf_pre")
    meta = json.loads((stage_dir(cfg, "export") / STAGE_FILE).read_text())
    assert meta["complete"] is False and "export.gguf_pre" in meta["incomplete"]
    for _ in range(2):  # every run says so, until the part is made
        v = judge(cfg, "export")
        assert v.action == "run"
        assert v.reasons[0] == (
            "its last run left a part out (export.gguf: the pre-tokenizer is unknown; set export.gguf_pre)"
        )


def test_any_run_removes_the_temporaries_of_any_interrupted_stage(done, tmp_path):
    cfg = _copy(done, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [cfg.out / f".export.tmp-{dead.pid}-abc", cfg.out / f".model-trained.old-{dead.pid}-x"]
    for p in left:
        (p / "sub").mkdir(parents=True)
    live = cfg.out / f".eval.tmp-{os.getppid()}-y"  # a live process's folder is left alone
    live.mkdir()
    run_all(cfg)  # everything is up to date: no stage runs, the leftovers go anyway
    assert not any(p.exists() for p in left) and live.is_dir()
