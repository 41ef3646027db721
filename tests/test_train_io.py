"""train-io: frozen body bit for bit, inert padding rows, io_new_rows, the chunked loss, exact resume, Ctrl-C,
NaN, bad input (one line, exit 2, nothing lost), the report, and one run under `accelerate launch` (2 processes).

Every test builds its own tiny tokenizer/ and model-init/ stage folders (tests/tiny.py), so it does not
depend on build-tokenizer or init-embeddings.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import retok.train.loop as loop_mod
import retok.train.params as params_mod
from retok.core.config import to_yaml, validate_dict
from retok.core.errors import RetokError
from retok.core.stages import mark_stage, stage_dir, write_tokenizer_meta
from retok.pipeline import run_stage
from retok.train.loss import chunked_lm_loss
from tests.tiny import SAMPLE_TEXT, byte_level_tokenizer, save_model_folder, tiny_llama

PAD_ROWS = 24  # model-init rows past len(tokenizer), as init-embeddings' pad_to_multiple_of makes
SEQ, BATCH = 32, 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and it keeps a shared 2-core machine from thrashing."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizers():
    old = byte_level_tokenizer()
    new = byte_level_tokenizer(vocab_size=640)  # same corpus, more merges: stands in for the extended one
    return old, new


def _write_data(folder: Path) -> dict:
    """Two train domains and two eval domains of JSONL documents shuffled from SAMPLE_TEXT."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in SAMPLE_TEXT.splitlines() if ln.strip()]
    zh = [ln for ln in lines if any("\u4e00" <= c <= "\u9fff" for c in ln)]
    rnd = random.Random(0)

    def write(name: str, pool: list[str], n: int, k: int) -> str:
        with open(folder / name, "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(
                    json.dumps({"text": "\n".join(rnd.sample(pool, min(k, len(pool))))}, ensure_ascii=False)
                    + "\n"
                )
        return str(folder / name)

    return {
        "train": [
            {"name": "en", "path": write("en_train.jsonl", lines, 60, 8)},
            {"name": "zh", "path": write("zh_train.jsonl", zh, 60, 4), "weight": 2.0},
        ],
        "eval": [
            {"name": "en", "path": write("en_eval.jsonl", lines, 3, 8)},
            {"name": "zh", "path": write("zh_eval.jsonl", zh, 3, 4)},
        ],
    }


def make_project(
    root: Path, tokenizers, *, tied: bool = True, train: dict | None = None, rows: int | None = None
):
    """output_dir with tokenizer/ and model-init/ stage folders, the original model, data; returns the config."""
    old, new = tokenizers
    data = _write_data(root / "data")
    orig = root / "original"
    if not orig.exists():
        save_model_folder(tiny_llama(old, tied=tied), old, orig)
    settings = {
        "objective": "lm",  # these tests are about the next-token path (tests/test_distill.py: distillation)
        "max_steps": 8,
        "seq_len": SEQ,
        "batch_size": BATCH,
        "lr": 1e-2,
        "warmup_steps": 2,
        "eval_every": 4,
        "save_every": 3,
        "loss_chunk_tokens": 40,
        "eval_max_bytes": 2000,
        "shuffle_buffer": 16,
    }
    settings.update(train or {})
    cfg = validate_dict(
        {
            "output_dir": str(root / "out"),
            "model": {"path": str(orig)},
            "data": data,
            "train": settings,
            "eval": {"window": 64, "stride": 32},
        }
    )
    tok_dir = stage_dir(cfg, "tokenizer")
    tok_dir.mkdir(parents=True, exist_ok=True)
    new.save_pretrained(tok_dir)
    write_tokenizer_meta(
        tok_dir, new_ids=list(range(len(old), len(new))), old_vocab_size=len(old), new_vocab_size=len(new)
    )
    mark_stage(tok_dir, cfg, "tokenizer")
    model = tiny_llama(new, tied=tied, seed=1)
    model.resize_token_embeddings(rows or len(new) + PAD_ROWS)
    with torch.no_grad():  # make padded rows recognisable, and distinct from anything training would write
        model.get_input_embeddings().weight[len(new) :] = 0.5
        if not tied:
            model.get_output_embeddings().weight[len(new) :] = -0.5
    init = save_model_folder(model, new, stage_dir(cfg, "model-init"))
    mark_stage(init, cfg, "model-init")
    return cfg


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _losses(folder: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize(("softcap", "factor"), [(None, 1.0), (None, 3.0), (5.0, 1.0)])
def test_chunked_loss_matches_full_cross_entropy(softcap, factor):
    g = torch.Generator().manual_seed(0)
    n, h, v = 50, 16, 37
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)

    ours = chunked_lm_loss(hidden, weight, targets, chunk_tokens=7, bias=bias, softcap=softcap)
    (ours * factor if factor != 1 else ours).backward()
    got = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = hidden @ weight.T + bias
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(logits, targets)
    (ref * factor).backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, t in zip(got, (hidden, weight, bias), strict=True):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)


def test_separate_learning_rates_for_embedding_and_head(tokenizers):
    _, new = tokenizers
    model = tiny_llama(new, tied=False)
    cfg = validate_dict(
        {"output_dir": "x", "model": {"path": "x"}, "train": {"lr": 1e-3, "embed_lr": 2e-3, "head_lr": 5e-4}}
    )
    io = params_mod.io_params(model, len(new), None)
    opt = params_mod.make_optimizer(model, io, cfg, "io")
    lrs = {g["name"]: (g["lr"], g["params"]) for g in opt.param_groups}
    assert lrs["embed"][0] == 2e-3 and lrs["embed"][1][0] is model.get_input_embeddings().weight
    assert lrs["head"][0] == 5e-4 and lrs["head"][1][0] is model.get_output_embeddings().weight
    assert params_mod.count_params([p for g in opt.param_groups for p in g["params"]]) == 2 * len(new) * 32


# --------------------------------------------------------------------------------------- a whole run


def test_train_io_tied_body_frozen_padding_inert_report(tmp_path, tokenizers, capsys):
    cfg = make_project(tmp_path, tokenizers, train={"weight_decay": 0.1, "max_steps": 12, "eval_every": 6})
    _, new = tokenizers
    out = run_stage(cfg, "model-trained")
    printed = capsys.readouterr().out
    assert f"trainable parameters {(len(new) + PAD_ROWS) * 32:,}" in printed

    before, after = _tensors(stage_dir(cfg, "model-init")), _tensors(out)
    assert set(before) == set(after) and HEAD not in after  # tied: the head is not stored separately
    for name, t in before.items():
        if name != EMBED:
            assert torch.equal(t, after[name]), f"frozen {name} changed"
    emb0, emb1 = before[EMBED], after[EMBED]
    assert torch.equal(emb0[len(new) :], emb1[len(new) :]), (
        "padded rows moved (weight decay or softmax gradient)"
    )
    assert (emb0[: len(new)] != emb1[: len(new)]).any(dim=1).sum() > len(new) // 2

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (
        reloaded.get_output_embeddings().weight.data_ptr()
        == reloaded.get_input_embeddings().weight.data_ptr()
    )

    rep = json.loads((out / "train_report.json").read_text())
    assert set(rep["bpb"]) == {"en", "zh"}
    for figs in rep["bpb"].values():
        assert all(isinstance(figs[k], float) for k in ("original", "init", "final"))
    # 12 steps on this very text must help: the domain weighted 2 at least, and both together.
    assert rep["bpb"]["zh"]["final"] < rep["bpb"]["zh"]["init"]
    assert sum(f["final"] for f in rep["bpb"].values()) < sum(f["init"] for f in rep["bpb"].values())
    assert rep["steps"] == 12 and rep["tokens_seen"] == 12 * BATCH * SEQ and rep["tokens_per_second"] > 0
    assert rep["trainable_params"] == (len(new) + PAD_ROWS) * 32
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "bpb" in r] == [0, 6, 12]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))
    assert (out / "metrics.jsonl").read_text() == (cfg.out / "train-state" / "metrics.jsonl").read_text()
    assert (out / "train_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| zh |" in (out / "train_report.md").read_text()
    assert (out / "tokenizer.json").is_file()


def test_io_new_rows_untied_old_rows_bit_identical(tmp_path, tokenizers):
    old, new = tokenizers
    cfg = make_project(
        tmp_path,
        tokenizers,
        tied=False,
        train={
            "trainable": "io_new_rows",
            "weight_decay": 0.5,
            "max_steps": 6,
            "gradient_checkpointing": True,
        },
    )
    out = run_stage(cfg, "model-trained")
    before, after = _tensors(stage_dir(cfg, "model-init")), _tensors(out)
    for name in (EMBED, HEAD):
        assert torch.equal(before[name][: len(old)], after[name][: len(old)]), f"old rows of {name} moved"
        assert torch.equal(before[name][len(new) :], after[name][len(new) :]), f"padded rows of {name} moved"
        moved = (before[name][len(old) : len(new)] != after[name][len(old) : len(new)]).any(dim=1)
        assert moved.sum() > 0, f"no new row of {name} learned"
    for name, t in before.items():
        if name not in (EMBED, HEAD):
            assert torch.equal(t, after[name])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert (
        json.loads((out / "train_report.json").read_text())["learning_values"]
        == 2 * (len(new) - len(old)) * 32
    )


def test_full_stage_unfreezes_the_body_after_io(tmp_path, tokenizers):
    _, new = tokenizers
    cfg = make_project(
        tmp_path, tokenizers, train={"max_steps": 3, "grad_accum": 2, "full": {"steps": 3, "lr": 1e-3}}
    )
    out = run_stage(cfg, "model-trained")
    before, after = _tensors(stage_dir(cfg, "model-init")), _tensors(out)
    assert not torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(before[EMBED][len(new) :], after[EMBED][len(new) :])
    rep = json.loads((out / "train_report.json").read_text())
    assert (rep["steps"], rep["steps_io"], rep["steps_all"]) == (6, 3, 3)
    assert rep["tokens_seen"] == 6 * 2 * BATCH * SEQ  # two micro-batches per step


# -------------------------------------------------------------------------------- resume, Ctrl-C, NaN


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, tokenizers, monkeypatch):
    straight = make_project(tmp_path / "a", tokenizers)
    ref = run_stage(straight, "model-trained")

    cfg = make_project(tmp_path / "b", tokenizers)

    def ctrl_c(step: int) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the handler flags it; the loop stops after the next step

    monkeypatch.setattr(loop_mod, "_on_step", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "model-trained")
    monkeypatch.setattr(loop_mod, "_on_step", None)
    state_dir = cfg.out / "train-state"
    assert (
        json.loads((state_dir / "checkpoint" / "state.json").read_text())["step"] == 5
    )  # not a save_every multiple
    assert not stage_dir(cfg, "model-trained").exists()

    with pytest.raises(RetokError, match="unfinished run .* --resume"):
        run_stage(cfg, "model-trained")
    other = cfg.model_copy(deep=True)
    other.train.lr = 2e-2
    with pytest.raises(RetokError, match="different config"):
        run_stage(other, "model-trained", resume=True)

    out = run_stage(cfg, "model-trained", resume=True)
    a, b = _losses(ref), _losses(out)
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=1e-5)
    ta, tb = _tensors(ref), _tensors(out)
    torch.testing.assert_close(ta[EMBED], tb[EMBED], rtol=1e-5, atol=1e-6)
    ra, rb = (json.loads((d / "train_report.json").read_text())["bpb"] for d in (ref, out))
    assert rb["zh"]["final"] == pytest.approx(ra["zh"]["final"], rel=1e-5)
    assert rb["zh"]["init"] == ra["zh"]["init"]


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(tmp_path, tokenizers):
    cfg = make_project(
        tmp_path, tokenizers, train={"lr": 1e35, "warmup_steps": 0, "save_every": 1, "max_grad_norm": None}
    )
    with pytest.raises(RetokError, match=r"loss became (nan|inf)") as e:
        run_stage(cfg, "model-trained")
    assert "\n" not in str(e.value)
    state = json.loads((cfg.out / "train-state" / "checkpoint" / "state.json").read_text())
    assert 1 <= state["step"] and f"step {state['step']}" in str(e.value)
    assert not stage_dir(cfg, "model-trained").exists()


def test_trackers_are_opt_in_through_accelerate(tmp_path, tokenizers):
    """tensorboard (a test dependency) gets the loss and BPB of every step, under the run's step numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_project(
        tmp_path, tokenizers, train={"max_steps": 2, "eval_every": 2, "log_with": ["tensorboard"]}
    )
    out = run_stage(cfg, "model-trained")
    events = list((cfg.out / "train-state" / "trackers").rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss" in tags and "bpb/zh" in tags and "bpb/en" in tags
    logged = [(e.step, e.value) for e in acc.Scalars("loss")]
    losses = [
        (r["step"], r["loss"])
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert [s for s, _ in logged] == [s for s, _ in losses] == [1, 2]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses], rel=1e-6)


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, tokenizers, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    cfg = make_project(tmp_path, tokenizers, train={"max_steps": 2, "log_with": ["wandb"]})
    with pytest.raises(RetokError, match="train.log_with: wandb is not installed"):
        run_stage(cfg, "model-trained")
    assert not (cfg.out / "train-state").exists()


# ------------------------------------------------------------------------------------------ bad input


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from retok import cli

    monkeypatch.setattr(sys, "argv", ["retok", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "case", ["too_little_text", "stale_tokenizer", "vocab_mismatch", "unknown_trainable"]
)
def test_bad_input_one_line_exit_2_nothing_lost(case, tmp_path, tokenizers, monkeypatch, capsys):
    _, new = tokenizers
    cfg = make_project(tmp_path, tokenizers, rows=len(new) - 5 if case == "vocab_mismatch" else None)
    data = cfg.model_dump(mode="json")
    if case in ("too_little_text", "stale_tokenizer"):
        tiny = tmp_path / "tiny.jsonl"
        tiny.write_text(json.dumps({"text": "hi"}) + "\n")
        data["data"]["train"][1]["path"] = str(tiny)
    if (
        case == "too_little_text"
    ):  # stage folders made with this data (stale_tokenizer: made with the old data)
        for stage in ("tokenizer", "model-init"):
            mark_stage(stage_dir(cfg, stage), validate_dict(data), stage)
    if case == "unknown_trainable":
        data["train"]["trainable"] = "everything"
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    init = stage_dir(cfg, "model-init")
    snapshot = {f.name: f.read_bytes() for f in init.iterdir()}
    code, err = _cli(["train-io", "--config", str(path)], monkeypatch, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    want = {
        "too_little_text": "data.train.1 (zh): only",
        "stale_tokenizer": "tokenizer was made by a different config (data.train changed); run `retok build-tokenizer --overwrite`",
        "vocab_mismatch": "embedding rows",
        "unknown_trainable": "train.trainable",
    }[case]
    assert want in lines[0]
    assert {f.name: f.read_bytes() for f in init.iterdir()} == snapshot
    assert (
        not stage_dir(cfg, "model-trained").exists() and not (cfg.out / "train-state" / "checkpoint").exists()
    )


# ---------------------------------------------------------------------------------- accelerate launch


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, tokenizers):
    """Two gloo processes (DDP) train the same model as one would; the main process alone publishes it.

    `accelerate launch --cpu` starts several CPU processes only through mpirun, so the portable way is the
    torchrun launcher (--multi_gpu) with no GPU visible: retok asks Accelerate for CPU, which picks gloo.
    """
    cfg = make_project(tmp_path, tokenizers, train={"max_steps": 4, "eval_every": 4})
    path = tmp_path / "cfg.yaml"
    path.write_text(to_yaml(cfg))
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [
            launcher,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "retok.cli",
            "train-io",
            "--config",
            str(path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = stage_dir(cfg, "model-trained")
    rep = json.loads((out / "train_report.json").read_text())
    assert rep["processes"] == 2 and rep["steps"] == 4 and rep["tokens_seen"] == 4 * 2 * BATCH * SEQ
    before, after = _tensors(stage_dir(cfg, "model-init")), _tensors(out)
    for name, t in before.items():
        if name != EMBED:
            assert torch.equal(t, after[name])
    assert not torch.equal(before[EMBED], after[EMBED])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert not [p.name for p in cfg.out.iterdir() if p.name.startswith(".")]  # no stray temporary folders


# ------------------------------------------------------------------------------------------ real model

ZH_WORDS = ["系统", "文件", "使用", "命令", "配置", "用户", "程序", "选项", "目录", "进程", "信息", "网络"]


@pytest.mark.real
def test_real_smollm2_short_run(tmp_path, assets):
    """SmolLM2-135M with a few added Chinese tokens (mean init), 3 steps: body frozen, tie kept, report sane."""
    from transformers import AutoModelForCausalLM

    from retok.core.sources import load_tokenizer, resolve_model

    GGUF, corpora = assets.gguf, assets.corpora
    assets.need(GGUF, corpora)
    cfg = validate_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"path": str(GGUF)},
            "data": {
                "train": [
                    {"name": d, "path": str(corpora / d / "train.jsonl"), "max_bytes": 200_000}
                    for d in ("zh", "en")
                ],
                "eval": [{"name": d, "path": str(corpora / d / "eval.jsonl")} for d in ("zh", "en")],
            },
            "train": {
                "max_steps": 3,
                "seq_len": 64,
                "batch_size": 2,
                "lr": 1e-3,
                "warmup_steps": 1,
                "eval_every": 3,
                "eval_max_bytes": 1500,
                "shuffle_buffer": 32,
            },
            "eval": {"window": 128, "stride": 64},
        }
    )
    src = resolve_model(cfg.model, cfg.cache)
    old, tok = load_tokenizer(src), load_tokenizer(src)
    words = [w for w in ZH_WORDS if len(old.encode(w, add_special_tokens=False)) > 1]
    tok.add_tokens(words)
    tok_dir, init_dir = stage_dir(cfg, "tokenizer"), stage_dir(cfg, "model-init")
    tok.save_pretrained(tok_dir)
    write_tokenizer_meta(
        tok_dir, new_ids=list(range(len(old), len(tok))), old_vocab_size=len(old), new_vocab_size=len(tok)
    )
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    emb = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[len(old) :] = 0.0
        for i, word in enumerate(words):
            w[len(old) + i] = emb[old.encode(word, add_special_tokens=False)].mean(0)
    model.save_pretrained(init_dir)
    tok.save_pretrained(init_dir)
    for stage, d in (("tokenizer", tok_dir), ("model-init", init_dir)):
        mark_stage(d, cfg, stage)

    out = run_stage(cfg, "model-trained")
    before, after = _tensors(init_dir), _tensors(out)
    for name, t in before.items():
        if name != EMBED:
            assert torch.equal(t, after[name]), name
    assert torch.equal(before[EMBED][len(tok) :], after[EMBED][len(tok) :])
    assert not torch.equal(before[EMBED][: len(tok)], after[EMBED][: len(tok)])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    rep = json.loads((out / "train_report.json").read_text())
    for d in ("zh", "en"):
        figs = rep["bpb"][d]
        assert all(0.3 < figs[k] < 5 for k in ("original", "init", "final")), figs
    # English segmentation is unchanged by Chinese words, so before training it scores like the original.
    assert rep["bpb"]["en"]["init"] == pytest.approx(rep["bpb"]["en"]["original"], rel=0.01)


def test_heap_trimmer_trims_only_when_the_heap_crept_up(monkeypatch):
    from retok.train.loop import HeapTrimmer as _HeapTrimmer

    trimmer = _HeapTrimmer(slack_bytes=100)
    calls: list[int] = []
    trimmer._trim = calls.append  # stands in for glibc's malloc_trim
    sizes = iter([1000, 1050, 1100, 1101, 990, 1200])
    monkeypatch.setattr(_HeapTrimmer, "resident_bytes", staticmethod(lambda: next(sizes)))
    for _ in range(6):
        trimmer.after_step()
    # reference 1000 after the first step; only 1101 and 1200 end more than 100 above it
    assert calls == [0, 0] and trimmer.trims == 2 and trimmer.reference == 1000
