"""train-io's distillation objectives (train.objective: distill | lm+distill) on the tiny project.

- paired blocks: every new position's teacher position ends at the same byte, across block cuts;
- each objective lowers its own loss, and lm+distill the held-out BPB; distill moves only input rows;
- the body stays bit-identical; resume after a stop is exact with the distillation objective;
- a tokenizer that hardly meets the old one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import retok.train.loop as loop_mod
from retok.core.config import validate_dict
from retok.core.errors import RetokError
from retok.core.stages import stage_dir
from retok.pipeline import run_all, run_stage
from retok.teacher.alignment import ByteLengths
from retok.train.packing import doc_pairs, pack_pairs, special_ids
from tests.tiny import SAMPLE_TEXT, byte_level_tokenizer, tiny_project

ZH = "机器学习是人工智能的一个分支。语言模型把文本切分成词元，再预测下一个词元。"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_paired_blocks_align_across_cuts():
    from tests.test_teacher import _extended

    old = byte_level_tokenizer()
    new = _extended(old)
    docs = [ZH * 3, SAMPLE_TEXT[:500], "龘 " + ZH]
    pairs = list(doc_pairs(new, old, iter(docs), special_ids(new), special_ids(old)))
    blocks = list(pack_pairs(iter(pairs), 24))
    assert len(blocks) >= 5
    lo, ln = ByteLengths(old), ByteLengths(new)
    for b in blocks:
        assert len(b.new) == len(b.teacher) == 24
        t = np.array(b.teacher)
        ok = t >= 0
        assert ok.mean() > 0.95  # extend mode: every text position (the EOS between documents too)
        # within a block, the bytes from the block start to each aligned pair are the same on both sides
        assert np.array_equal(lo.ends(b.old)[t[ok]], ln.ends(b.new)[ok])
    # the old blocks together are exactly the old ids of the documents, nothing lost or repeated
    old_all = [i for p in pairs for i in p.old]
    assert [i for b in blocks for i in b.old] == old_all[: sum(len(b.old) for b in blocks)]


def _run(tmp: Path, init: dict | None = None, fit: dict | None = None, **train) -> tuple:
    cfg = validate_dict(
        tiny_project(
            tmp,
            train={"max_steps": 12, "eval_every": 12, "lr": 3e-3, "distill_layers": [1, 2], **train},
            **({"init": init} if init else {}),
            **({"fit": fit} if fit else {}),
        )
    )
    run_all(cfg, only=["tokenizer", "model-init", "model-trained"])
    out = stage_dir(cfg, "model-trained")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, out, rows


def _mean(rows: list[dict], key: str, part: slice) -> float:
    vals = [r[key] for r in rows if key in r][part]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("objective", ["distill", "lm+distill"])
def test_objectives_lower_their_losses_and_keep_the_body(tmp_path, objective):
    # the steps alone (fit.after_train, which refits the head afterwards, is tested below)
    cfg, out, rows = _run(
        tmp_path, objective=objective, max_steps=24, eval_every=24, fit={"after_train": False}
    )
    own = "loss_distill" if objective == "distill" else "loss"  # lm+distill minimises the sum
    assert _mean(rows, own, slice(-6, None)) < _mean(rows, own, slice(0, 6))
    before = load_file(str(stage_dir(cfg, "model-init") / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    for name, t in before.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(t, after[name]), name  # the body, bit for bit
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    bpb = [r["bpb"] for r in rows if "bpb" in r]
    if objective == "distill":
        assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # no gradient reaches the head
    else:
        assert _mean(rows, "loss_lm", slice(-6, None)) < _mean(rows, "loss_lm", slice(0, 6))
        assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
        assert bpb[-1]["zh"] < bpb[0]["zh"] and bpb[-1]["en"] < bpb[0]["en"]  # held-out NLL down


@pytest.mark.parametrize("forward", ["model", "bfloat16"])
def test_head_fit_after_distillation_fits_only_new_head_rows(tmp_path, forward):
    """fit.after_train (the default): after the steps the new tokens' head rows are fitted on the trained input
    rows' states; the old head rows, the trained input rows and the body are left exactly as they were (also
    when the fit's forward passes run on a bfloat16 copy: fit.forward_dtype), the fit lowers its held-out
    loss and the held-out zh BPB, and the report and metrics say so."""
    cfg, out, rows = _run(
        tmp_path, fit={"forward_dtype": forward}, objective="distill", max_steps=24, eval_every=24
    )
    assert cfg.fit.after_train and not cfg.fit.at_init  # the defaults
    init = load_file(str(stage_dir(cfg, "model-init") / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    for name, t in init.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(t, after[name]), name
    n_old = len(load_tokenizer_of(cfg.model.path))
    head0, head1 = init["lm_head.weight"], after["lm_head.weight"]
    assert torch.equal(head0[:n_old], head1[:n_old])  # old rows bit for bit
    assert not torch.equal(head0[n_old:], head1[n_old:])
    assert torch.equal(init["model.embed_tokens.weight"][:n_old], after["model.embed_tokens.weight"][:n_old])
    report = json.loads((out / "train_report.json").read_text())
    hf = report["head_fit"]
    assert hf["forward_dtype"] == {"model": "float32", "bfloat16": "bfloat16"}[forward]
    assert after["lm_head.weight"].dtype == torch.float32  # the model stays in compute.dtype
    assert hf["rows_fitted"] > 0 and hf["held_out_ce"]["fitted"] < hf["held_out_ce"]["start"]
    evals = [r for r in rows if "bpb" in r]
    assert evals[-1]["phase"] == "head-fit" and evals[-2]["phase"] != "head-fit"
    assert evals[-1]["bpb"]["zh"] < evals[-2]["bpb"]["zh"]  # the fit helps held-out text of the new tokens
    assert report["bpb"]["zh"]["final"] == evals[-1]["bpb"]["zh"]
    assert "fit.after_train" in (out / "train_report.md").read_text()


def test_head_fit_is_skipped_for_a_tied_head(tmp_path, capsys):
    cfg = validate_dict(
        tiny_project(
            tmp_path / "tied",
            init={"untie_head": False, "eval_max_bytes": 400},
            train={"objective": "distill", "distill_layers": [1], "max_steps": 2, "eval_every": 2},
        )
    )
    run_all(cfg, only=["tokenizer", "model-init", "model-trained"])
    report = json.loads((stage_dir(cfg, "model-trained") / "train_report.json").read_text())
    assert "tied" in report["head_fit"]["skipped"]
    assert "fit.after_train skipped" in capsys.readouterr().out


def test_a_head_fit_over_the_memory_cap_is_refused_before_any_step(tmp_path):
    cfg = validate_dict(
        tiny_project(
            tmp_path,
            init={"eval_max_bytes": 400},
            fit={"max_memory_mb": 1, "bytes": 6000},
            train={"objective": "distill", "distill_layers": [1], "max_steps": 2},
        )
    )
    run_all(cfg, only=["tokenizer", "model-init"])
    with pytest.raises(RetokError, match=r"fit.bytes: the head fit would cache .* fit.max_memory_mb=1"):
        run_stage(cfg, "model-trained")
    assert not stage_dir(cfg, "model-trained").exists()
    assert not (cfg.out / "train-state" / "checkpoint").exists()  # refused before the first step


def load_tokenizer_of(folder):
    from retok.core.sources import load_tokenizer

    return load_tokenizer(folder)


def test_held_out_distillation_loss_goes_down(tmp_path):
    """distill alone: the held-out distance to the teacher's states falls (its own held-out loss)."""
    from retok.core.sources import load_model, load_tokenizer
    from retok.teacher.body import load_teacher
    from retok.train.distill import DistillLoss
    from retok.train.packing import collate_pairs

    cfg, out, _ = _run(tmp_path, objective="distill")
    old = load_tokenizer(cfg.model.path)
    new = load_tokenizer(out)
    text = [json.loads(ln)["text"] for ln in Path(cfg.data.eval[0].path).read_text().splitlines()]
    blocks = list(pack_pairs(doc_pairs(new, old, iter(text), special_ids(new), special_ids(old)), 32))[:6]
    batch = collate_pairs(blocks)

    def held_out(folder: Path) -> float:
        model = load_model(folder, dtype="float32", device="cpu").eval()
        loss = DistillLoss(
            model, load_teacher(model, cfg.model.path), (1, 2), lm_weight=0, distill_weight=1, chunk_tokens=64
        )
        with torch.no_grad():
            return float(loss(batch))

    assert held_out(out) < held_out(stage_dir(cfg, "model-init"))


@pytest.mark.slow
def test_resume_is_exact_with_distillation(tmp_path, monkeypatch):
    cfg, out, _ = _run(tmp_path / "a", objective="lm+distill", save_every=4)
    whole = load_file(str(out / "model.safetensors"))

    cfg2 = validate_dict(
        {**json.loads(json.dumps(cfg.model_dump(mode="json"))), "output_dir": str(tmp_path / "b" / "out")}
    )
    run_all(cfg2, only=["tokenizer", "model-init"])

    def stop(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_mod, "_on_step", stop)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg2, "model-trained")
    monkeypatch.setattr(loop_mod, "_on_step", None)
    assert json.loads((cfg2.out / "train-state" / "checkpoint" / "state.json").read_text())["step"] == 4
    resumed = load_file(str(run_stage(cfg2, "model-trained", resume=True) / "model.safetensors"))
    for name, t in whole.items():
        assert torch.equal(t, resumed[name]), name


def test_distill_layers_past_the_model_are_refused(tmp_path):
    cfg = validate_dict(
        tiny_project(tmp_path, train={"objective": "distill", "distill_layers": [8], "max_steps": 2})
    )
    run_all(cfg, only=["tokenizer", "model-init"])
    with pytest.raises(RetokError, match=r"train.distill_layers: 8 is past the model's 2 decoder layers"):
        run_stage(cfg, "model-trained")
    assert not stage_dir(cfg, "model-trained").exists()


def test_a_tokenizer_that_cannot_be_aligned_is_refused(tmp_path):
    """A new tokenizer whose normaliser spells the text with other bytes has no teacher positions."""
    from tokenizers import normalizers
    from transformers import AutoModelForCausalLM

    from retok.core.sources import load_tokenizer
    from retok.train.stage import _teacher

    cfg = validate_dict(tiny_project(tmp_path, train={"objective": "distill", "distill_layers": [1]}))
    old = load_tokenizer(cfg.model.path)
    other = load_tokenizer(cfg.model.path)
    other.backend_tokenizer.normalizer = normalizers.Replace("\n", "\n\n")  # every line break becomes two
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path)
    with pytest.raises(RetokError, match="do not share a normaliser, so their positions cannot be aligned"):
        _teacher(cfg, model, other, old)


def test_distillation_reads_the_new_tokens_domains_unless_train_domains_says(tmp_path: Path):
    from retok.train.stage import training_sources

    def names(**train):
        cfg = validate_dict(tiny_project(tmp_path, tokenizer={"domains": ["zh"]}, train=train))
        return [s.name for s in training_sources(cfg)]

    assert names(objective="distill") == ["zh"]  # English blocks hold no new token: no gradient
    assert names(objective="lm") == ["zh", "en"]
    assert names(objective="lm+distill") == ["zh", "en"]
    assert names(objective="distill", domains=["zh", "en"]) == ["zh", "en"]
    with pytest.raises(Exception, match=r"train.domains names \['fr'\]"):
        names(domains=["fr"])
