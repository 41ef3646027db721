"""Task scores and samples (retok.evaluate.tasks / samples): the log-likelihood scorer against a hand
computation, a model that prefers one answer, the paired figures, the question files, the continuation task,
and eval-speed's report with both."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from retok.core.config import validate_dict
from retok.core.errors import RetokError
from retok.evaluate.samples import Prompt, generate, prompt_ids, sample_prompts
from retok.evaluate.tasks import (
    Item,
    compare_tasks,
    continuation_items,
    load_questions,
    score_items,
    spread,
)
from retok.pipeline import run_stage
from tests.tiny import (
    SAMPLE_TEXT,
    byte_level_tokenizer,
    save_model_folder,
    sentencepiece_tokenizer,
    tiny_llama,
)

# ------------------------------------------------------------------------------------------- the scorer


def _by_hand(model, tok, context: str, choice: str) -> float:
    """log P(choice | context) from one forward pass over the two encodings joined, summed token by token."""
    ctx = tok(context, add_special_tokens=True)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))


@pytest.mark.parametrize("family", ["byte_level", "sentencepiece"])
def test_scorer_matches_a_hand_computation(family):
    tok = byte_level_tokenizer() if family == "byte_level" else sentencepiece_tokenizer()
    model = tiny_llama(tok, tied=False).eval()
    items = [
        Item("The quick brown fox", (" jumps over", " sleeps", " x"), 0),
        Item(
            "Question: what runs?\nAnswer: ", ("the fox", "the dog"), 1
        ),  # trailing space moves to the choices
    ]
    got = score_items(model, tok, items, "cpu", max_context=512, desc="t")
    for item, lls in zip(items, got, strict=True):
        context = item.context.rstrip()
        tail = item.context[len(context) :]
        want = [_by_hand(model, tok, context, tail + c) for c in item.choices]
        assert lls == pytest.approx(want, abs=1e-4)
        assert all(v < 0 for v in lls)


def _prefers(tok, text: str):
    """A tiny model whose head gives every token of ``text`` a +12 logit whatever it reads: it prefers the
    choice made of those tokens."""
    model = tiny_llama(tok, tied=False).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            head.bias[t] = 12.0
    model.lm_head = head
    return model


def test_a_model_that_prefers_one_answer_scores_100_percent_and_the_other_0():
    tok = byte_level_tokenizer()
    items = [
        Item(
            f"Question {i}: pick one.\nAnswer:",
            tuple(" zzzz" if j == i % 3 else f" q{j}w" for j in range(3)),
            i % 3,
        )
        for i in range(6)
    ]
    right = compare_tasks(
        items,
        score_items(_prefers(tok, "dog"), tok, items, "cpu", 512, "t"),
        score_items(_prefers(tok, " zzzz"), tok, items, "cpu", 512, "t"),
    )
    assert right["old"]["accuracy"] < 0.5  # prefers "dog", which is no choice
    assert right["new"]["accuracy"] == 1.0 and right["new"]["accuracy_norm"] == 1.0
    # the preferred tokens share the probability (about 1 bit each); the other model pays ~12 nats a token
    assert right["new"]["gold_bpb"] < 1.5 and right["old"]["gold_bpb"] > 5
    assert right["gold_bpb_diff"] < 0 and right["chance"] == pytest.approx(1 / 3)
    wrong = compare_tasks(
        items, *[score_items(_prefers(tok, " q0w q1w q2w"), tok, items, "cpu", 512, "t")] * 2
    )
    assert wrong["new"]["accuracy"] == 0.0 and wrong["gold_bpb_diff"] == 0.0


def test_paired_figures_by_hand():
    items = [Item("c", (" a", " bb"), 0), Item("c", (" a", " bb"), 1), Item("c", (" a", " bb"), 1)]
    # nats of " a" (2 bytes) and " bb" (3 bytes) per question
    old = [[-1.0, -4.0], [-1.0, -4.0], [-2.0, -2.5]]  # sum-argmax: a, a, a; per byte: a, a, bb
    new = [
        [-1.0, -4.0],
        [-5.0, -1.0],
        [-2.0, -2.5],
    ]  # sum-argmax: a, bb, bb? (-2 > -2.5: a); per byte: a, bb, bb
    t = compare_tasks(items, old, new)
    assert t["old"]["accuracy"] == pytest.approx(1 / 3) and t["new"]["accuracy"] == pytest.approx(2 / 3)
    assert t["old"]["accuracy_norm"] == pytest.approx(2 / 3) and t["new"]["accuracy_norm"] == 1.0
    gold_old = [1.0 / 2, 4.0 / 3, 2.5 / 3]
    gold_new = [1.0 / 2, 1.0 / 3, 2.5 / 3]
    ln2 = math.log(2)
    assert t["old"]["gold_bpb"] == pytest.approx(sum(gold_old) / 3 / ln2)
    diffs = [(b - a) / ln2 for a, b in zip(gold_old, gold_new, strict=True)]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    assert t["gold_bpb_diff"] == pytest.approx(mean) and t["gold_bpb_diff_se"] == pytest.approx(se)
    assert t["accuracy_diff"] == pytest.approx(1 / 3) and t["questions"] == 3 and t["chance"] == 0.5


# ------------------------------------------------------------------------------------------- questions


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_question_files_of_both_shapes(tmp_path):
    mmlu = _write(
        tmp_path / "mmlu.jsonl",
        [
            {
                "question": "2+2?",
                "answer_a": "3",
                "answer_b": "4",
                "answer_c": "5",
                "answer_d": "6",
                "correct_answer": "B",
            }
        ],
    )
    (item,) = load_questions(mmlu, "k", "cloze")
    assert item == Item("Question: 2+2?\nAnswer:", (" 3", " 4", " 5", " 6"), 1)
    (item,) = load_questions(mmlu, "k", "letters")
    assert item.context == "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:" and item.choices == (
        " A",
        " B",
        " C",
        " D",
    )
    lm_eval = tmp_path / "hs.json"
    lm_eval.write_text(json.dumps([{"query": "A cat", "endings": ["sits.", "flies."], "label": 0}]))
    assert load_questions(lm_eval, "k", "cloze") == [
        Item("Question: A cat\nAnswer:", (" sits.", " flies."), 0)
    ]


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "names no choice"),
        ({"question": "q", "choices": ["a", "b"], "answer": "yes"}, "neither a choice index nor a letter"),
        ({"question": "q", "choices": ["a"], "answer": 0}, r"2\+ choices"),
        ({"choices": ["a", "b"], "answer": 0}, "needs a question"),
    ],
)
def test_a_bad_question_names_its_record(tmp_path, record, words):
    path = _write(tmp_path / "t.jsonl", [{"question": "ok", "choices": ["a", "b"], "answer": 0}, record])
    with pytest.raises(RetokError, match=rf"eval.tasks.0 \(t\): .*t.jsonl record 2: .*{words}"):
        load_questions(path, "eval.tasks.0 (t)", "cloze")


def test_spread_takes_evenly_and_keeps_order():
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread([1, 2], 5) == [1, 2]


def test_continuation_cuts_fall_where_both_tokenizers_end_a_token():
    """Encoding the passage and its continuation apart gives each tokenizer exactly the ids of the two joined:
    neither model is handed a segmentation it would never make (the new tokenizer, whose tokens are longer,
    paid for such cuts: the demo's zh task read 78% -> 47% with byte cuts)."""
    zh = "机器学习是人工智能的一个分支。语言模型把文本切分成词元，再预测下一个词元。分词器的压缩率越高，解码越快。"
    old = byte_level_tokenizer()
    new = byte_level_tokenizer(extra_text=zh * 6, vocab_size=640)
    docs = [f"第{d}篇。" + zh * 8 for d in range(5)]
    items = continuation_items(docs, 8, 100, 50, 4, "k", tokenizers=(old, new))
    assert len(items) == 8
    naive = continuation_items(docs, 8, 100, 50, 4, "k")
    cut_inside = 0
    for it, raw in zip(items, naive, strict=True):
        gold = it.choices[it.gold]
        for tok in (old, new):
            enc = tok(it.context + gold, add_special_tokens=False).input_ids
            assert (
                tok(it.context, add_special_tokens=False).input_ids
                + tok(gold, add_special_tokens=False).input_ids
                == enc
            )
        g = raw.choices[raw.gold]
        joined = new(raw.context + g, add_special_tokens=False).input_ids
        cut_inside += (
            new(raw.context, add_special_tokens=False).input_ids + new(g, add_special_tokens=False).input_ids
            != joined
        )
    assert cut_inside > 0  # byte cuts do split the new tokenizer's tokens: the snapping is what avoids it


def test_continuation_task_from_held_out_text():
    docs = [f"文档{d}。" + "".join(f"第{d}篇第{i}句话。" for i in range(60)) for d in range(6)]
    items = continuation_items(docs, 8, prompt_bytes=60, continuation_bytes=30, n_choices=4, key="k")
    assert len(items) == 8
    for k, it in enumerate(items):
        assert it.gold == k % 4 and len(it.choices) == 4 and len(set(it.choices)) == 4
        gold = it.choices[it.gold]
        owner = [d for d in docs if it.context + gold in d]
        assert len(owner) == 1  # the gold is the passage's own next text
        for j, c in enumerate(it.choices):  # the others come from other documents, one each
            if j != it.gold:
                assert c not in owner[0]
        assert all(len(c.encode()) <= 30 for c in it.choices) and len(it.context.encode()) <= 60
    with pytest.raises(RetokError, match="from 3 documents, and each question needs 4 documents"):
        continuation_items(docs[:3], 8, 60, 30, 4, "k")


# ------------------------------------------------------------------------------------------- samples


def test_a_sample_stops_at_the_stop_id_and_at_the_byte_budget():
    tok = byte_level_tokenizer()
    eos = tok.eos_token_id
    nbytes = {i: 1 for i in range(len(tok))}
    model = _prefers(tok, tok.eos_token)
    ids, _, stopped = generate(model, tok("hello")["input_ids"], nbytes, 50, {eos}, "cpu")
    assert ids == [] and stopped
    ids, _, stopped = generate(model, tok("hello")["input_ids"], nbytes, 7, set(), "cpu")
    assert ids == [eos] * 7 and not stopped


def test_sample_prompts_and_the_chat_template():
    tok = byte_level_tokenizer()  # ChatML template, like SmolLM2
    prompts = sample_prompts({"en": [SAMPLE_TEXT]}, 2, 40, ["Hi?"])
    assert [p.kind for p in prompts] == ["text", "text", "chat"]
    assert prompts[0].text == SAMPLE_TEXT[:40] and len(prompts[1].text.encode()) <= 40
    chat = tok.decode(prompt_ids(tok, Prompt("chat", None, "Hi?")))
    assert chat.startswith("<|im_start|>user\nHi?") and chat.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def task_project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    tok = byte_level_tokenizer()
    save_model_folder(tiny_llama(tok, tied=True), tok, root / "old")
    new = byte_level_tokenizer(vocab_size=560)
    save_model_folder(tiny_llama(new, tied=True, seed=1), new, root / "new")
    lines = SAMPLE_TEXT.splitlines()
    (root / "en.jsonl").write_text("".join(json.dumps({"text": ln * 3}) + "\n" for ln in lines if ln))
    _write(
        root / "qa.jsonl",
        [{"question": f"q{i}", "choices": ["yes", "no", "maybe"], "answer": i % 3} for i in range(7)],
    )
    return root


def _task_cfg(root: Path, **ev):
    return validate_dict(
        {
            "output_dir": str(root / "out"),
            "model": {"path": str(root / "old")},
            "data": {"eval": [{"name": "en", "path": str(root / "en.jsonl")}]},
            "eval": {
                "candidate_model": str(root / "new"),
                "max_bytes": 600,
                "window": 64,
                "stride": 32,
                "prompt_bytes": 100,
                "continuation_bytes": 40,
                "repeats": 1,
                "warmup": 0,
                "samples": 1,
                "sample_bytes": 20,
                "sample_prompts": ["Say hi."],
                **ev,
            },
        }
    )


def test_eval_speed_reports_tasks_and_samples(task_project):
    tasks = [
        {"name": "qa", "path": str(task_project / "qa.jsonl"), "max_items": 5},
        {"name": "en-cont", "domain": "en", "max_items": 6, "prompt_bytes": 80, "continuation_bytes": 30},
    ]
    out = run_stage(_task_cfg(task_project, tasks=tasks), "eval")
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["tasks"]) == ["qa", "en-cont"]
    qa, cont = rep["tasks"]["qa"], rep["tasks"]["en-cont"]
    assert qa["questions"] == 5 and qa["chance"] == pytest.approx(1 / 3) and cont["questions"] == 6
    for t in (qa, cont):
        assert t["gold_bpb_diff"] == pytest.approx(t["new"]["gold_bpb"] - t["old"]["gold_bpb"])
        assert t["gold_bpb_ratio"] == pytest.approx(t["new"]["gold_bpb"] / t["old"]["gold_bpb"])
        assert 0 <= t["old"]["accuracy"] <= 1 and t["gold_bpb_diff_se"] > 0
    assert [(s["kind"], s["domain"]) for s in rep["samples"]] == [("text", "en"), ("chat", None)]
    for s in rep["samples"]:
        for side in ("old", "new"):
            assert s[side]["tokens"] >= 1 and s[side]["prompt_tokens"] >= 1
    md = (out / "report.md").read_text()
    assert "## Tasks" in md and "| qa | 5 | 33% |" in md and "| en-cont | 6 |" in md
    assert "**2. chat prompt:** `Say hi.`" in md
    assert "| qa | 5 |" in (out / "table.md").read_text()  # the model card's table has the task rows


def test_the_default_is_a_continuation_task_per_domain_and_too_little_text_skips_it(task_project, capsys):
    out = run_stage(
        _task_cfg(task_project, prompt_bytes=100, samples=0, sample_prompts=[]), "eval", overwrite=True
    )
    rep = json.loads((out / "report.json").read_text())
    assert rep["samples"] == []
    assert rep["tasks"] == {}  # 300 + 100 bytes per passage: the held-out text is too short for 4 documents
    assert "no en-continuation task: " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("task", "words"),
    [
        (
            {"name": "x", "path": "/nonexistent/q.jsonl"},
            r"eval.tasks.0 \(x\): /nonexistent/q.jsonl does not exist",
        ),
        ({"name": "x", "domain": "zh"}, r"domain 'zh' is not among the data.eval domains \['en'\]"),
    ],
)
def test_a_bad_task_fails_before_any_model_loads(task_project, task, words):
    with pytest.raises(RetokError, match=words):
        run_stage(_task_cfg(task_project, tasks=[task]), "eval", overwrite=True)
