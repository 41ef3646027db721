"""eval-speed on tiny models: the cut of the shared text, the decoding loop, the timing arithmetic, the report
contract, and one-line errors for bad input."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertModel

from retok.core.config import validate_dict
from retok.core.errors import RetokError
from retok.core.metrics import bits_per_byte, bytes_per_token, score_starts
from retok.evaluate.kvcache import prefill, step
from retok.evaluate.speed import (
    SpeedText,
    cut_text,
    greedy_run,
    greedy_stats,
    long_text,
    reference_run,
    reference_stats,
    run_rounds,
    split_tokens,
)
from retok.pipeline import run_stage
from tests.tiny import (
    SAMPLE_TEXT,
    byte_level_tokenizer,
    save_model_folder,
    sentencepiece_tokenizer,
    tiny_llama,
)

ZH = (
    "机器学习是人工智能的一个分支。语言模型把文本切分成词元，再预测下一个词元。分词器的压缩率越高，解码越快。"
)
LONG = (SAMPLE_TEXT + ZH * 3) * 2


# ------------------------------------------------------------------------------------------- the cut


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece"])
def test_split_tokens_keeps_natural_tokenization_and_counts_fed_bytes(family):
    tok = (
        byte_level_tokenizer(extra_text=ZH * 4, vocab_size=600)
        if family == "byte_level"
        else sentencepiece_tokenizer()
    )
    text, boundary, end = cut_text(LONG, 700, 300)
    st = split_tokens(tok, text, boundary, end)
    whole = tok(text, add_special_tokens=True)["input_ids"]
    # The prompt and continuation are a prefix of the whole text's own tokenization, not two separate encodings.
    assert whole[: len(st.prompt_ids) + len(st.continuation_ids)] == st.prompt_ids + st.continuation_ids
    # Bytes counted are exactly those of the tokens fed.
    fed = tok.decode(st.prompt_ids + st.continuation_ids, skip_special_tokens=True)
    assert len(fed.encode("utf-8")) == st.prompt_bytes + st.continuation_bytes
    assert text.encode("utf-8").startswith(fed.encode("utf-8"))
    # The cut lands near the requested sizes: a token at most either side.
    assert 700 - 40 <= st.prompt_bytes <= 700 and 300 - 40 <= st.continuation_bytes <= 300 + 40
    if family == "sentencepiece":
        assert st.prompt_ids[0] == tok.bos_token_id  # the tokenizer's own BOS is part of the prompt


def test_boundary_token_goes_to_the_continuation():
    tok = byte_level_tokenizer()
    text = "The quick brown fox jumps over the lazy dog."
    for boundary in range(5, 30):
        st = split_tokens(tok, text, boundary, len(text))
        prompt, first = tok.decode(st.prompt_ids), tok.decode(st.continuation_ids[:1])
        # The prompt ends at or before the boundary; the first continuation token straddles or starts at it.
        assert text.startswith(prompt) and len(prompt) <= boundary < len(prompt) + len(first)
        assert prompt + tok.decode(st.continuation_ids) == text
        assert st.continuation_bytes == len(text) - len(prompt)


def test_long_text_prefers_one_document_then_joins():
    assert long_text(["short", "x" * 50, "y" * 80], 40) == ("x" * 50, 50)
    text, n = long_text(["a" * 10, "b" * 10], 20)
    assert text == "a" * 10 + "\n\n" + "b" * 10 and n == 22
    assert long_text(["a" * 10, "b" * 10], 100) == (None, 22)


# ---------------------------------------------------------------------------------------- decoding loop


def test_feeding_through_the_cache_is_real_decoding():
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, tied=True)
    ids = tok(SAMPLE_TEXT[:400])["input_ids"]
    x = torch.tensor([ids])
    with torch.inference_mode():
        full = model(input_ids=x).logits[0].argmax(-1).tolist()
        cache, first = prefill(model, x[:, :50])
        steps = [first]
        for t in ids[50:]:
            cache, nxt = step(model, torch.tensor([[t]]), cache, "cache")
            steps.append(nxt)
    # Each step's choice equals what a full forward pass predicts at that position.
    assert steps[:-1] == full[49:-1] and steps[-1] == full[-1]


class FixedStepLM(torch.nn.Module):
    """A stand-in LM whose every forward takes ``step_s`` and always prefers token ``favourite``."""

    def __init__(self, vocab: int, step_s: float, favourite: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.step_s, self.favourite = vocab, step_s, favourite
        self.calls: list[int] = []

    def forward(self, input_ids, use_cache=True, cache=None, logits_to_keep=0):
        time.sleep(self.step_s)
        self.calls.append(input_ids.shape[1])
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[..., self.favourite] = 1.0
        return SimpleNamespace(logits=logits, cache=(cache or 0) + input_ids.shape[1])


def test_time_reference_arithmetic():
    tok = byte_level_tokenizer()
    text, boundary, end = cut_text(LONG, 300, 120)
    st = split_tokens(tok, text, boundary, end)
    model = FixedStepLM(len(tok), 0.01, 5)
    # what eval-speed composes: rounds of reference runs, then the medians
    runs = run_rounds({"m": lambda: reference_run([(model, st, "cpu")])[0]}, repeats=3, warmup=1)["m"]
    r = reference_stats(st, runs)
    n = len(st.continuation_ids)
    # 4 runs, each one prefill over the whole prompt, then one single-token step per continuation token.
    assert model.calls == ([len(st.prompt_ids)] + [1] * n) * 4
    assert r["continuation_tokens"] == n and len(r["decode_s_all"]) == 3
    assert 10.0 <= r["ms_per_token"] < 25.0
    assert r["tokens_per_s"] == pytest.approx(n / r["decode_s"])
    assert r["bytes_per_s"] == pytest.approx(st.continuation_bytes / r["decode_s"])
    assert r["prefill_ms"] >= 10.0


def test_reference_run_interleaves_steps_evenly():
    log: list[str] = []
    a, b = FixedStepLM(50, 0.004, 1), FixedStepLM(50, 0.004, 1)
    a.calls, b.calls = _Tagged(log, "a"), _Tagged(log, "b")
    ta = SpeedText(
        prompt_ids=[1, 2, 3], continuation_ids=list(range(10)), prompt_bytes=3, continuation_bytes=20
    )
    tb = SpeedText(prompt_ids=[1, 2], continuation_ids=list(range(5)), prompt_bytes=3, continuation_bytes=20)
    (pa, da), (pb, db) = reference_run([(a, ta, "cpu"), (b, tb, "cpu")])
    assert log[:2] == ["a", "b"]  # the prefills
    steps = log[2:]
    assert steps.count("a") == 10 and steps.count("b") == 5
    # b steps once per two steps of a, spread over the whole run (not all at the start or the end)
    assert [i for i, x in enumerate(steps) if x == "b"] == [1, 4, 7, 10, 13]
    assert 0.04 <= da < 0.1 and 0.02 <= db < 0.06 and pa >= 0.004 and pb >= 0.004


class _Tagged(list):
    def __init__(self, log: list[str], tag: str) -> None:
        super().__init__()
        self.log, self.tag = log, tag

    def append(self, item) -> None:
        self.log.append(self.tag)
        super().append(item)


def test_time_greedy_counts_bytes_and_invalid_ids():
    model = FixedStepLM(20, 0.0, 7)
    nbytes = {i: 3 for i in range(10)}
    runs = run_rounds({"m": lambda: greedy_run(model, [1, 2, 3], nbytes, 20, 40, "cpu")}, repeats=2, warmup=0)
    r = greedy_stats(runs["m"], nbytes, valid_ids=set(range(10)), stop_ids={7})
    assert r["generated_tokens"] == 7 and r["generated_bytes"] == 21 and r["stopped_at"] == 0
    assert r["invalid_ids"] == 0 and r["ids"] == [7] * 7
    # A favourite outside the vocabulary (a padding row) counts 0 bytes: the loop stops at its token cap.
    pad = FixedStepLM(20, 0.0, 15)
    runs = run_rounds({"m": lambda: greedy_run(pad, [1], nbytes, 20, 9, "cpu")}, repeats=1, warmup=0)
    r = greedy_stats(runs["m"], nbytes, valid_ids=set(range(10)))
    assert r["generated_tokens"] == 9 and r["generated_bytes"] == 0 and r["invalid_ids"] == 9


def test_run_rounds_alternates_models():
    order: list[str] = []
    kept = run_rounds(
        {"a": lambda: order.append("a") or 1, "b": lambda: order.append("b") or 2}, repeats=2, warmup=1
    )
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert kept == {"a": [1, 1], "b": [2, 2]}
    assert greedy_stats([(0.1, 1.0, [1, 2])], {1: 2, 2: 3})["bytes_per_s"] == pytest.approx(5.0)


# ------------------------------------------------------------------------------------------ the stage


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    return path


def _cfg(root: Path, **ev) -> object:
    settings = {
        "prompt_bytes": 300,
        "continuation_bytes": 160,
        "speed_pieces": 2,
        "generate_bytes": 30,
        "repeats": 1,
        "warmup": 0,
        "max_bytes": 1500,
        "window": 64,
        "stride": 32,
        "candidate_model": str(root / "new"),
        **ev,
    }
    return validate_dict(
        {
            "output_dir": str(root / "out"),
            "model": {"path": str(root / "old")},
            "data": {
                "eval": [
                    {"name": "zh", "path": str(root / "zh.jsonl")},
                    {"name": "en", "path": str(root / "en.jsonl")},
                ]
            },
            "eval": settings,
        }
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-project")
    old = byte_level_tokenizer()
    save_model_folder(tiny_llama(old, tied=True), old, root / "old")
    new = byte_level_tokenizer(extra_text=ZH * 6, vocab_size=640)
    save_model_folder(tiny_llama(new, tied=True, seed=1), new, root / "new")
    _write_jsonl(root / "zh.jsonl", ["短文。", ZH * 12])
    _write_jsonl(root / "en.jsonl", [SAMPLE_TEXT[:900], SAMPLE_TEXT[900:]])
    return root


@pytest.fixture(scope="module")
def report(project: Path) -> dict:
    folder = run_stage(_cfg(project), "eval")
    return json.loads((folder / "report.json").read_text(encoding="utf-8"))


def test_report_contract(project: Path, report: dict):
    folder = project / "out" / "eval"
    assert set(report["domains"]) == {"zh", "en"}
    for d in report["domains"].values():
        for side in ("old", "new"):
            for key in (
                "bytes_per_token",
                "bpb",
                "tokens_per_s",
                "bytes_per_s",
                "prefill_ms",
                "ms_per_token",
            ):
                assert isinstance(d[side][key], float) and d[side][key] > 0, (side, key)
            assert d[side]["greedy"]["generated_bytes"] >= 30
        assert d["speedup_bytes_per_s"] == pytest.approx(d["new"]["bytes_per_s"] / d["old"]["bytes_per_s"])
        assert d["compression_ratio"] == pytest.approx(
            d["new"]["bytes_per_token"] / d["old"]["bytes_per_token"]
        )
        assert "greedy_speedup_bytes_per_s" in d
        o, n = d["old"]["speed"], d["new"]["speed"]
        assert o["pieces"] == n["pieces"] == 2
        # both models scored exactly the same bytes
        assert d["old"]["bpb_bytes"] == d["new"]["bpb_bytes"] > 0
        cont = (n["continuation_bytes"] / n["continuation_tokens"]) / (
            o["continuation_bytes"] / o["continuation_tokens"]
        )
        assert d["continuation_compression_ratio"] == pytest.approx(cont)
        # the speed-up is judged against the compression of the text that was timed
        assert d["speedup_vs_compression"] == pytest.approx(d["speedup_bytes_per_s"] / cont)
        # speed-up = compression on the fed text x per-token cost ratio, exactly
        assert d["speedup_bytes_per_s"] == pytest.approx(
            cont * d["old"]["ms_per_token"] / d["new"]["ms_per_token"]
        )
    env = report["environment"]
    assert (
        env["device"] == "cpu"
        and env["dtype"] == "float32"
        and env["threads"] >= 1
        and env["interleaved"] is True
    )
    assert report["candidate"]["tokenizer_len"] == 640 and report["baseline"]["tokenizer_len"] == 512
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert "| zh |" in md and "Free greedy generation" in md
    for png in ("bytes_per_token.png", "bytes_per_s.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    assert (folder / "retok_config.yaml").is_file()


def test_report_figures_match_the_metrics(project: Path, report: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zh = report["domains"]["zh"]
    docs = ["短文。", (ZH * 12).encode()[: 1500 - len("短文。".encode())].decode("utf-8", "ignore")]
    tok = AutoTokenizer.from_pretrained(project / "new")
    old_tok = AutoTokenizer.from_pretrained(project / "old")
    model = AutoModelForCausalLM.from_pretrained(project / "new")
    assert zh["new"]["bytes_per_token"] == pytest.approx(bytes_per_token(tok, docs)["bytes_per_token"])
    starts = score_starts([old_tok, tok], docs)
    assert zh["new"]["bpb"] == pytest.approx(
        bits_per_byte(model, tok, docs, window=64, stride=32, starts=starts)["bpb"], rel=1e-5
    )
    # The extended tokenizer compresses Chinese better; the reference continuation is the same text.
    assert zh["compression_ratio"] > 1.3
    # each of the 2 pieces ends at a whole token of each tokenizer: they differ by less than a token (<= 15
    # bytes: this tiny extended tokenizer has whole phrases as tokens)
    assert abs(zh["new"]["speed"]["continuation_bytes"] - zh["old"]["speed"]["continuation_bytes"]) <= 2 * 15
    assert zh["new"]["speed"]["continuation_tokens"] < zh["old"]["speed"]["continuation_tokens"]


def test_sequential_mode_and_speed_domains(project: Path, tmp_path: Path):
    cfg = _cfg(project, interleave=False, speed_domains=["en"], domains=["en"], generate_bytes=0)
    cfg.output_dir = str(tmp_path / "out")
    rep = json.loads((run_stage(cfg, "eval") / "report.json").read_text())
    assert list(rep["domains"]) == ["en"] and rep["environment"]["interleaved"] is False
    assert "greedy" not in rep["domains"]["en"]["new"] and rep["domains"]["en"]["new"]["bytes_per_s"] > 0


def test_bad_input(project: Path, tmp_path: Path):
    def cfg(**ev):
        c = _cfg(project, **ev)
        c.output_dir = str(tmp_path / "out")
        return c

    with pytest.raises(RetokError, match=r"'zh' has only \d+ bytes of text, but eval.prompt_bytes"):
        run_stage(cfg(prompt_bytes=100_000), "eval")
    with pytest.raises(RetokError, match=r"eval.speed_domains names \['fr'\]"):
        run_stage(cfg(speed_domains=["fr"]), "eval")
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(bert)
    with pytest.raises(RetokError, match=r"eval.candidate_model.*not a causal language model"):
        run_stage(cfg(candidate_model=str(bert)), "eval")
    no_candidate = cfg(candidate_model=None)
    with pytest.raises(RetokError, match="run `retok init-embeddings`"):
        run_stage(no_candidate, "eval")
    assert not (tmp_path / "out" / "eval").exists()


def test_cli_bad_device_exits_2(project: Path, tmp_path: Path, monkeypatch, capsys):
    from retok.cli import main

    monkeypatch.setattr(
        sys,
        "argv",
        [
            "retok",
            "eval-speed",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            f"model.path={project / 'old'}",
            "--set",
            "compute.device=npu",
        ],
    )
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: config (from --set): compute.device: unknown device 'npu'; use auto, cpu, cuda, cuda:N or mps"
    ]


# ------------------------------------------------------------------------------------------------ real


@pytest.mark.real
def test_real_smollm2_against_itself(tmp_path: Path, assets):
    """The same model on both sides: compression and BPB identical, speed ratio about 1, the same task scores
    and samples (tiny budgets), on the real MMLU file and a zh continuation task."""
    gguf, corpora = assets.gguf, assets.corpora
    assets.need(gguf, assets.corpus("zh", "eval"), assets.corpus("en", "eval"), assets.mmlu)
    cfg = validate_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"path": str(gguf)},
            "data": {"eval": [{"name": d, "path": str(corpora / d / "eval.jsonl")} for d in ("zh", "en")]},
            "compute": {"threads": 1},  # 2 threads on a shared 2-core machine spin-wait and run 10x slower
            "eval": {
                "candidate_model": str(gguf),
                "max_bytes": 1200,
                "window": 256,
                "stride": 256,
                "prompt_bytes": 400,
                "continuation_bytes": 60,
                "repeats": 1,
                "warmup": 0,
                "tasks": [
                    {"name": "mmlu", "path": str(assets.mmlu), "max_items": 3},
                    {
                        "name": "zh-cont",
                        "domain": "zh",
                        "max_items": 3,
                        "prompt_bytes": 90,
                        "continuation_bytes": 30,
                    },
                ],
                "samples": 1,
                "sample_bytes": 12,
                "sample_prompts": ["What is 2+2?"],
            },
        }
    )
    out = run_stage(cfg, "eval")
    rep = json.loads((out / "report.json").read_text())
    for t in rep["tasks"].values():  # the same model: the same log-likelihoods, a zero paired difference
        assert t["questions"] == 3 and t["chance"] == 0.25
        assert t["old"] == t["new"] and t["gold_bpb_diff"] == 0.0 and t["accuracy_diff"] == 0.0
        assert 0.2 < t["old"]["gold_bpb"] < 8
    assert [s["kind"] for s in rep["samples"]] == ["text", "text", "chat"]
    assert all(s["old"]["text"] == s["new"]["text"] and s["old"]["tokens"] >= 1 for s in rep["samples"])
    md = (out / "report.md").read_text()
    assert "## Tasks" in md and "| mmlu | 3 |" in md and "## Samples" in md
    zh, en = rep["domains"]["zh"], rep["domains"]["en"]
    assert zh["compression_ratio"] == 1.0 and en["compression_ratio"] == 1.0
    assert zh["old"]["bpb"] == pytest.approx(zh["new"]["bpb"], rel=1e-6)
    assert 1.6 <= zh["old"]["bytes_per_token"] <= 3.0 and 3.0 <= en["old"]["bytes_per_token"] <= 5.0
    assert 0.8 <= zh["old"]["bpb"] <= 2.5 and 0.4 <= en["old"]["bpb"] <= 1.5
    assert 0.5 <= zh["speedup_bytes_per_s"] <= 2.0


def test_warmup_round_runs_the_first_piece_only(monkeypatch, tmp_path):
    """A warm-up round runs each model on the first piece once; every timed round runs every piece, and only
    the timed rounds' sums are kept (a warm-up's times never reach the medians)."""
    import retok.evaluate.stage as stage
    from retok.evaluate.stage import _time_reference

    calls: list[tuple[str, int]] = []
    clock = iter(range(1, 1000))

    def fake_run(runs):
        out = []
        for model, text, _ in runs:
            calls.append((model, text.prompt_ids[0]))
            # a warm-up call takes 1000 s so that any leak into the medians shows
            t = 1000.0 if len(calls) <= 2 else float(next(clock))
            out.append((t, t))
        return out

    monkeypatch.setattr(stage, "reference_run", fake_run)
    cfg = _cfg(tmp_path, warmup=1, repeats=2, speed_pieces=3)
    models = [SimpleNamespace(role=r, model=r, device="cpu") for r in ("old", "new")]
    texts = {r: [SpeedText([j], [7, 8], 3, 2) for j in range(3)] for r in ("old", "new")}
    stats = _time_reference(models, texts, cfg)
    # the warm-up: one call of piece 0 (both models), then 2 rounds x 3 pieces
    assert [p for _, p in calls] == [0, 0] + [0, 0, 1, 1, 2, 2] * 2
    assert len(calls) == 2 + 12
    for s in stats:
        assert s["decode_s_all"] and max(s["decode_s_all"]) < 1000.0
        assert len(s["decode_s_all"]) == 2
