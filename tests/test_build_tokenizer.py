"""build-tokenizer: extend (both BPE families) and train, the report contract, the CLI and bad input.

Hermetic tests use the in-process tokenizers of tests/tiny.py and a small generated corpus; the real test
(``-m real``) extends SmolLM2-135M's tokenizer with Chinese tokens learned on the fetched corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from retok.core.config import validate_dict
from retok.core.errors import RetokError
from retok.core.stages import stage_dir
from retok.core.tokens import detect_family, token_to_bytes
from retok.pipeline import run_stage
from retok.tokenizer.extend import TrainingText, extend_tokenizer, repeat_counts, splits_digits_individually
from retok.tokenizer.stage import training_text
from tests.tiny import (
    SAMPLE_TEXT,
    byte_level_tokenizer,
    save_model_folder,
    sentencepiece_tokenizer,
    tiny_llama,
)

# Chinese technical sentences; several use characters that are not in SAMPLE_TEXT, so the SentencePiece
# fixture spells them with byte fallback.
ZH = [
    "机器学习是人工智能的一个分支。",
    "语言模型把文本切分成词元，再预测下一个词元。",
    "分词器的压缩率越高，模型处理同样的文本所需的词元就越少。",
    "操作系统负责管理内存、进程和文件。",
    "编译器把源代码翻译成机器码，链接器再把目标文件合并。",
    "网络协议规定了数据包的格式和传输顺序。",
    "数据库通过索引加快查询速度。",
    "请在终端中输入命令，然后按回车键执行。",
    "版本控制系统记录每一次修改，方便回滚和协作。",
    "这个函数返回一个列表，其中包含所有匹配的结果。",
    "缓存可以减少重复计算，但会占用更多内存。",
    "配置文件通常位于用户主目录下的隐藏文件夹中。",
]
EN = [line for line in SAMPLE_TEXT.splitlines() if line.strip() and line.isascii()]
NASTY = [
    "混合 text 和数字 2024 年 3.14159 以及 emoji 👩‍💻🚀！",
    "  leading spaces\n\ttabs\r\nwindows newlines\n\n\nand trailing  ",
    "操作系统负责管理内存、进程和文件。\n第 12 章：编译器\u3000全角空格",
    "def f(x):\n    return x * 2  # 注释\n",
    "<|im_end|> literal special text <s> </s> <start_of_turn>",
    "ÀÉÎÕÜ ñ ß ø 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero width",
]
FAMILIES = ["byte_level", "sentencepiece"]


def _zh_docs(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    docs = []
    for i in range(n):
        parts = [rnd.choice(ZH) for _ in range(rnd.randint(8, 16))]
        parts.insert(rnd.randint(0, len(parts)), f"第 {i % 9 + 1} 章，{2000 + i} 年。")
        docs.append("".join(parts) + "\n" + rnd.choice(EN))
    return docs


def _jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("corpus")
    return {
        "zh_train": _jsonl(d / "zh_train.jsonl", _zh_docs(80, seed=0)),
        "zh_eval": _jsonl(d / "zh_eval.jsonl", _zh_docs(8, seed=1) + NASTY),
        "en_eval": _jsonl(d / "en_eval.jsonl", EN),
        "code_eval": _jsonl(d / "code_eval.jsonl", [SAMPLE_TEXT[SAMPLE_TEXT.index("def encode") :]]),
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family, make in (("byte_level", byte_level_tokenizer), ("sentencepiece", sentencepiece_tokenizer)):
        tok = make()
        out[family] = save_model_folder(
            tiny_llama(tok, tied=True), tok, tmp_path_factory.mktemp(f"model-{family}")
        )
    return out


def _cfg_dict(out: Path, model: Path, corpus: dict[str, Path], **tok) -> dict:
    return {
        "output_dir": str(out),
        "model": {"path": str(model)},
        "data": {
            "train": [{"name": "zh", "path": str(corpus["zh_train"])}],
            "eval": [
                {"name": "zh", "path": str(corpus["zh_eval"])},
                {"name": "en", "path": str(corpus["en_eval"])},
                {"name": "code", "path": str(corpus["code_eval"])},
            ],
        },
        "tokenizer": {"new_tokens": 150, **tok},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus, model_dirs) -> dict[tuple[str, str], Path]:
    """One build per (family, mode), through run_stage as the CLI does."""
    out = {}
    for family in FAMILIES:
        for mode in ("extend", "train"):
            root = tmp_path_factory.mktemp(f"run-{family}-{mode}")
            cfg = validate_dict(_cfg_dict(root, model_dirs[family], corpus, mode=mode))
            out[(family, mode)] = run_stage(cfg, "tokenizer")
    return out


def _load(path: Path):
    return AutoTokenizer.from_pretrained(str(path))


def _report(folder: Path) -> dict:
    return json.loads((folder / "compression.json").read_text())


# ------------------------------------------------------------------------------------------------ extend


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_keeps_every_old_token_at_its_id(built, model_dirs, family):
    old, new = _load(model_dirs[family]), _load(built[(family, "extend")])
    new_vocab = new.get_vocab()
    old_vocab = old.get_vocab()
    assert len(old_vocab) == len(old)
    for token, i in old_vocab.items():  # the whole old vocabulary, added and special tokens included
        assert new_vocab.get(token) == i, token
    oj, nj = json.loads(old.backend_tokenizer.to_str()), json.loads(new.backend_tokenizer.to_str())
    n_old = len(oj["model"]["merges"])
    assert [tuple(m) for m in nj["model"]["merges"][:n_old]] == [tuple(m) for m in oj["model"]["merges"]]
    assert len(nj["model"]["merges"]) > n_old
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert nj[key] == oj[key], key


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_new_ids_are_contiguous_after_the_highest(built, model_dirs, family):
    old, new = _load(model_dirs[family]), _load(built[(family, "extend")])
    meta = json.loads((built[(family, "extend")] / "retok_tokenizer.json").read_text())
    first = max(old.get_vocab().values()) + 1
    assert meta["first_new_id"] == first
    assert meta["mode"] == "extend" and meta["family"] == family and meta["old_vocab_size"] == len(old)
    n = meta["num_new_tokens"]
    assert n == 150
    assert meta["new_ids"] == list(range(first, first + n))
    assert len(new) == first + n == meta["new_vocab_size"]
    assert sorted(new.get_vocab().values()) == list(range(len(new)))
    report = _report(built[(family, "extend")])
    assert report["counts"]["new_tokens"] == n and report["counts"]["first_new_id"] == first


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["extend", "train"])
def test_specials_single_ids_and_chat_template(built, model_dirs, family, mode):
    old, new = _load(model_dirs[family]), _load(built[(family, mode)])
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(new, role) == getattr(old, role), role
    assert new.chat_template == old.chat_template
    assert new.model_max_length == old.model_max_length
    specials = {
        t.content: i for i, t in old.backend_tokenizer.get_added_tokens_decoder().items() if t.special
    }
    assert specials
    for content, i in specials.items():
        ids = new.encode(content, add_special_tokens=False)
        assert len(ids) == 1, content
        if mode == "extend":
            assert ids == [i]
    # BOS behaviour is the old one (the SentencePiece fixture adds <s>, the byte-level one adds nothing).
    o_ids, n_ids = old("你好 world")["input_ids"], new("你好 world")["input_ids"]
    assert (o_ids[0] == old.bos_token_id) == (n_ids[0] == new.bos_token_id)
    assert (o_ids[-1] == old.eos_token_id) == (n_ids[-1] == new.eos_token_id)
    msgs = [
        {"role": "user", "content": "编译器是什么？"},
        {"role": "assistant", "content": "把源代码翻译成机器码。"},
    ]
    text = new.apply_chat_template(msgs, tokenize=False)
    assert text == old.apply_chat_template(msgs, tokenize=False)
    ids = new.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    for content in specials:
        if content in text:
            assert ids.count(new.convert_tokens_to_ids(content)) == text.count(content), content


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_every_new_token_is_reachable(built, family):
    folder = built[(family, "extend")]
    new = _load(folder).backend_tokenizer
    meta = json.loads((folder / "retok_tokenizer.json").read_text())
    for i in meta["new_ids"]:
        token = new.id_to_token(i)
        assert [t.id for t in new.model.tokenize(token)] == [i], token
    assert _report(folder)["reachable_share"] == 1.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["extend", "train"])
def test_round_trip_is_lossless(built, model_dirs, family, mode):
    new = _load(built[(family, mode)]).backend_tokenizer
    old = _load(model_dirs[family]).backend_tokenizer

    def back(tok: Tokenizer, text: str) -> str:
        return tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)

    for text in NASTY + _zh_docs(3, seed=7):
        if family == "sentencepiece" and any(t in text for t in ("<s>", "</s>", "<start_of_turn>")):
            # Llama-2-style normalisers put "▁" before every piece between special tokens, so literal
            # special-token text gains spaces with the OLD tokenizer too; the new one must do no worse.
            assert back(old, text) != text and back(new, text) == back(old, text)
            continue
        assert back(new, text) == text, text
    report = _report(built[(family, mode)])
    for name, d in report["domains"].items():
        if family == "sentencepiece" and name == "zh":
            # The held-out zh text holds literal "<s>": lossy with the old tokenizer too -> a warning, no error.
            assert (
                d["roundtrip_ok"] is False and d["old_roundtrip_ok"] is False and d["roundtrip_failures"] == 1
            )
            assert any("OLD tokenizer" in w for w in report["warnings"])
        else:
            assert d["roundtrip_ok"] is True, name


@pytest.mark.parametrize("family", FAMILIES)
def test_extend_compresses_the_training_domain_and_never_the_others_worse(built, family):
    domains = _report(built[(family, "extend")])["domains"]
    assert domains["zh"]["ratio"] > 1.5, domains["zh"]
    assert domains["zh"]["new_tokens"] < domains["zh"]["old_tokens"]
    for name in ("en", "code"):
        # New merges rank after every old one and each application removes a token: never more tokens.
        assert domains[name]["new_tokens"] <= domains[name]["old_tokens"], name
        assert domains[name]["ratio"] >= 0.99, name
    for d in domains.values():
        assert d["ratio"] == pytest.approx(d["new_bytes_per_token"] / d["old_bytes_per_token"], rel=1e-9)
        assert d["new_bytes_per_token"] == pytest.approx(d["bytes"] / d["new_tokens"])
        assert d["new_chars_per_token"] == pytest.approx(d["chars"] / d["new_tokens"])


def test_report_files_and_json_contract(built):
    folder = built[("byte_level", "extend")]
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "compression.json",
        "compression.md",
        "compression.png",
        "retok_tokenizer.json",
        "retok_config.yaml",
        "retok_stage.json",
    ):
        assert (folder / name).is_file(), name
    r = _report(folder)
    assert set(r["domains"]) == {"zh", "en", "code"}
    for d in r["domains"].values():
        assert isinstance(d["old_bytes_per_token"], float) and isinstance(d["new_bytes_per_token"], float)
        assert isinstance(d["ratio"], float) and d["roundtrip_ok"] is True and d["old_roundtrip_ok"] is True
        assert d["old_tokens"] > 0 and d["new_tokens"] > 0 and d["bytes"] > 0 and d["chars"] > 0
    md = (folder / "compression.md").read_text()
    assert "| zh |" in md and "Reachable" in md
    assert (folder / "compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert tc.get("chat_template") or (folder / "chat_template.jinja").is_file()


def test_extend_keeps_single_digit_numbers(built, model_dirs):
    """SmolLM2-style Digits(individual_digits=True): no new token holds a digit, numbers split as before."""
    folder = built[("byte_level", "extend")]
    r = _report(folder)
    assert r["digits"]["individual_digits"] is True
    assert r["digits"]["same"] is True and r["digits"]["probes"] > 20
    new = _load(folder).backend_tokenizer
    for i in json.loads((folder / "retok_tokenizer.json").read_text())["new_ids"]:
        text = token_to_bytes("byte_level", new.id_to_token(i)).decode("utf-8", "replace")
        assert not any(c.isdigit() for c in text), text
    old = _load(model_dirs["byte_level"]).backend_tokenizer

    def digit_tokens(tok: Tokenizer, s: str) -> list[bytes]:
        pieces = [token_to_bytes("byte_level", t) for t in tok.encode(s, add_special_tokens=False).tokens]
        return [b for b in pieces if any(48 <= c <= 57 for c in b)]

    for s in ("2024年", "第 12 章", "3.14159", " 1000000"):
        assert digit_tokens(new, s) == digit_tokens(old, s)
        assert all(len(b) == 1 for b in digit_tokens(new, s))


def test_digit_split_detected_from_the_vocabulary():
    tok = Tokenizer(models.BPE(vocab={"▁": 0, "1": 1, "2": 2, "a": 3, "▁a": 4}, merges=[("▁", "a")]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    data = json.loads(tok.to_str())
    assert splits_digits_individually(data, "sentencepiece") is True
    data["model"]["vocab"]["12"] = 5
    assert splits_digits_individually(data, "sentencepiece") is False


def test_sentencepiece_extension_adds_byte_fallback_characters(built, model_dirs):
    """Characters the old SentencePiece vocab spells with <0xNN> bytes become single tokens."""
    old, new = _load(model_dirs["sentencepiece"]), _load(built[("sentencepiece", "extend")])
    report = _report(built[("sentencepiece", "extend")])
    assert report["counts"]["char_tokens"] > 0
    ch = "链"  # not in SAMPLE_TEXT, frequent in the training text
    assert ch not in old.get_vocab()
    assert [t for t in old.tokenize(ch) if t.startswith("<0x")]
    assert ch in new.get_vocab()
    assert new.backend_tokenizer.model.tokenize(ch)[0].id == new.get_vocab()[ch]


def test_max_token_length_is_respected(tmp_path, corpus, model_dirs):
    cfg = validate_dict(
        _cfg_dict(tmp_path / "o", model_dirs["byte_level"], corpus, max_token_length=6, new_tokens=60)
    )
    folder = run_stage(cfg, "tokenizer")
    new = _load(folder).backend_tokenizer
    ids = json.loads((folder / "retok_tokenizer.json").read_text())["new_ids"]
    assert len(ids) == 60
    assert all(len(new.id_to_token(i)) <= 6 for i in ids)


def test_added_tokens_above_the_model_vocab_keep_their_ids():
    """Qwen2/Llama-3 layout: specials outside the model vocabulary, above it, and a BPE that ignores merges
    for whole-vocabulary words. tokenizers re-numbers such added tokens on load unless they are pinned."""
    base = json.loads(byte_level_tokenizer().backend_tokenizer.to_str())
    base["model"]["ignore_merges"] = True
    top = max(base["model"]["vocab"].values())
    extra = ["<|qwen_a|>", "<|qwen_b|>"]
    for k, content in enumerate(extra):
        base["added_tokens"].append(
            {
                "id": top + 1 + k,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    old = Tokenizer.from_str(json.dumps(base))
    assert [old.token_to_id(c) for c in extra] == [top + 1, top + 2]
    ext = extend_tokenizer(old, [TrainingText("zh", _zh_docs(30, seed=3))], new_tokens=80, progress=False)
    reloaded = Tokenizer.from_str(ext.tokenizer.to_str())  # what AutoTokenizer does with tokenizer.json
    for tok in (ext.tokenizer, reloaded):
        assert [tok.token_to_id(c) for c in extra] == [top + 1, top + 2]
        assert tok.encode("x<|qwen_b|>y", add_special_tokens=False).ids[1] == top + 2
    assert ext.first_new_id == top + 3 and ext.new_ids == list(range(top + 3, top + 83))
    assert sorted(reloaded.get_vocab(with_added_tokens=True).values()) == list(range(top + 83))
    for i in ext.new_ids:
        assert [t.id for t in reloaded.model.tokenize(reloaded.id_to_token(i))] == [i]


def test_extend_without_enough_text_warns_and_stays_valid(bl_tokenizer):
    ext = extend_tokenizer(
        bl_tokenizer.backend_tokenizer,
        [TrainingText("zh", ["编译器编译器编译器"])],
        new_tokens=500,
        progress=False,
    )
    assert 0 < len(ext.new_ids) < 500
    assert any("only" in w for w in ext.warnings)


def test_unsupported_tokenizer_types_are_refused():
    wp = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(RetokError, match="not BPE"):
        extend_tokenizer(wp, [TrainingText("en", ["a a a"])], new_tokens=5, progress=False)
    uni = Tokenizer(models.Unigram())
    uni.train_from_iterator(["hello world"] * 5, trainers.UnigramTrainer(vocab_size=20, show_progress=False))
    with pytest.raises(RetokError, match="Unigram"):
        extend_tokenizer(uni, [TrainingText("en", ["a a a"])], new_tokens=5, progress=False)


@pytest.mark.parametrize("value", [0, -5])
def test_new_tokens_must_be_positive(tmp_path, value):
    with pytest.raises(RetokError, match="tokenizer.new_tokens"):
        validate_dict(
            {"output_dir": str(tmp_path), "model": {"path": "x"}, "tokenizer": {"new_tokens": value}}
        )
    with pytest.raises(RetokError, match="new_tokens"):
        extend_tokenizer(
            byte_level_tokenizer().backend_tokenizer,
            [TrainingText("en", ["a b"])],
            new_tokens=value,
            progress=False,
        )


# ------------------------------------------------------------------------------------------------- train


@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_keeps_the_pipeline(built, model_dirs, family):
    folder = built[(family, "train")]
    old, new = _load(model_dirs[family]), _load(folder)
    oj, nj = json.loads(old.backend_tokenizer.to_str()), json.loads(new.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert nj[key] == oj[key], key
    assert detect_family(new.backend_tokenizer) == family
    meta = json.loads((folder / "retok_tokenizer.json").read_text())
    assert meta["mode"] == "train" and meta["first_new_id"] is None
    r = _report(folder)
    assert r["domains"]["zh"]["ratio"] > 1.5
    assert len(new) <= len(old) + 150
    if family == "sentencepiece":
        assert all(f"<0x{b:02X}>" in new.get_vocab() for b in range(256))  # byte fallback survives


# ---------------------------------------------------------------------------------------- training text


def test_training_text_budget_domains_and_weights(tmp_path, corpus, model_dirs):
    d = _cfg_dict(tmp_path, model_dirs["byte_level"], corpus, max_bytes=20_000)
    d["data"]["train"].append({"name": "en", "path": str(corpus["en_eval"]), "weight": 2.5})
    texts = training_text(validate_dict(d))
    assert [t.name for t in texts] == ["zh", "en"]
    assert sum(t.n_bytes for t in texts) <= 20_000
    assert texts[0].n_bytes <= 10_000 + 1
    assert texts[1].weight == 2.5
    d["tokenizer"]["domains"] = ["en"]
    assert [t.name for t in training_text(validate_dict(d))] == ["en"]
    counts = repeat_counts(1000, 2.5)
    assert set(counts) == {2, 3} and sum(counts) == pytest.approx(2500, abs=2)


# ------------------------------------------------------------------------------------------ CLI, bad input


def _retok(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "retok.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_cli_builds_the_folder_and_refuses_an_existing_one(tmp_path, corpus, model_dirs):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(_cfg_dict(tmp_path / "out", model_dirs["byte_level"], corpus, new_tokens=40))
    )
    p = _retok("build-tokenizer", "--config", str(cfg))
    assert p.returncode == 0, p.stderr[-2000:]
    folder = tmp_path / "out" / "tokenizer"
    r = json.loads((folder / "compression.json").read_text())
    for d in r["domains"].values():
        assert {"old_bytes_per_token", "new_bytes_per_token", "ratio", "roundtrip_ok"} <= set(d)
    assert r["reachable_share"] == 1.0
    before = _tree_hash(tmp_path / "out")
    p = _retok("build-tokenizer", str(cfg))
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "already exists" in errors[0] and "Traceback" not in p.stderr
    assert _tree_hash(tmp_path / "out") == before


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty = _jsonl(tmp_path / "empty.jsonl", ["", ""])
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"content": "编译器"}\n', encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    head = "编译器 ok\n".encode()
    latin1.write_bytes(head + "café au lait".encode("latin-1"))
    return {
        "empty": (empty, "no text"),
        "nofield": (nofield, "no field 'text'"),
        "not_utf8": (latin1, f"not UTF-8 text: invalid byte at offset {len(head) + 3}"),
    }


@pytest.mark.parametrize("case", ["empty", "nofield", "not_utf8"])
def test_bad_training_text_is_one_line_exit_2_and_writes_nothing(
    tmp_path, corpus, model_dirs, case, monkeypatch, capsys
):
    from retok import cli

    path, needle = _bad_files(tmp_path)[case]
    d = _cfg_dict(tmp_path / "out", model_dirs["byte_level"], corpus)
    d["data"]["train"] = [{"name": "zh", "path": str(path)}]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    monkeypatch.setattr(sys, "argv", ["retok", "build-tokenizer", str(cfg)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert path.name in lines[0]
    assert not (tmp_path / "out" / "tokenizer").exists()
    assert not [p for p in (tmp_path / "out").glob("*") if p.name.startswith(".tokenizer")]


def test_unsupported_model_through_the_stage(tmp_path, corpus, model_dirs):
    """A WordPiece tokenizer in model.path: a clear error, no folder."""
    folder = tmp_path / "wp-model"
    folder.mkdir()
    for f in model_dirs["byte_level"].iterdir():
        if f.suffix in (".json", ".safetensors") and not f.name.startswith("tokenizer"):
            (folder / f.name).write_bytes(f.read_bytes())
    wp = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]").save_pretrained(str(folder))
    cfg = validate_dict(_cfg_dict(tmp_path / "out", folder, corpus))
    with pytest.raises(RetokError, match="WordPiece, not BPE"):
        run_stage(cfg, "tokenizer")
    assert not (tmp_path / "out" / "tokenizer").exists()


# -------------------------------------------------------------------------------------------------- real


@pytest.mark.real
def test_real_smollm2_extension_on_chinese(tmp_path, assets):
    gguf, corp = assets.gguf, assets.corpora
    assets.need(gguf, assets.corpus("zh", "train"))
    cfg = validate_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"path": str(gguf)},
            "data": {
                "train": [{"name": "zh", "path": str(corp / "zh" / "train.jsonl")}],
                "eval": [{"name": d, "path": str(corp / d / "eval.jsonl")} for d in ("zh", "en", "code")],
            },
            "tokenizer": {"new_tokens": 16000},
        }
    )
    folder = run_stage(cfg, "tokenizer")
    r = _report(folder)
    # the target: 16,000 tokens learned on the Chinese training text, held-out Chinese >= 2.2x
    # (measured 2.31x; a BPE trained from scratch with the same total vocabulary gives 2.38x)
    assert r["domains"]["zh"]["ratio"] >= 2.2, r["domains"]["zh"]
    for d in ("en", "code"):
        assert r["domains"][d]["ratio"] >= 0.99, r["domains"][d]
    assert all(d["roundtrip_ok"] for d in r["domains"].values())
    assert r["reachable_share"] == 1.0
    assert r["digits"]["same"] is True
    old = AutoTokenizer.from_pretrained(
        json.loads((folder / "retok_tokenizer.json").read_text())["old_model_dir"]
    )
    new = _load(folder)
    new_vocab = new.get_vocab()
    assert all(new_vocab.get(t) == i for t, i in old.get_vocab().items())
    assert len(new) == len(old) + 16000
    assert new.eos_token == old.eos_token and new.chat_template == old.chat_template


def test_a_new_round_trip_failure_is_an_error():
    from retok.tokenizer.report import check_roundtrip

    docs = {"zh": ["编译器", "链接器"]}
    assert check_roundtrip({"zh": {"_new_fail": [1], "_old_fail": [1]}}, docs)  # old lossy too: a warning
    with pytest.raises(RetokError, match="does not round-trip"):
        check_roundtrip({"zh": {"_new_fail": [1], "_old_fail": []}}, docs)


@pytest.mark.real
@pytest.mark.parametrize("vocab", ["llama-spm", "qwen2"])
def test_real_vocabularies_of_both_families(vocab, assets):
    """Llama-2's SentencePiece BPE (byte fallback) and Qwen2's byte-level BPE (specials above the model
    vocabulary), from llama.cpp's vocabulary-only GGUFs (scripts/fetch_assets.py --vocabs)."""
    gguf, zh = assets.vocab(vocab), assets.corpus("zh", "train")
    assets.need(gguf, zh)
    from retok.tokenizer.report import domain_compression

    old = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).backend_tokenizer
    docs = [json.loads(line)["text"] for line in zh.read_text(encoding="utf-8").splitlines()[:200]]
    train, held = docs[:-20], docs[-20:]
    ext = extend_tokenizer(old, [TrainingText("zh", train)], new_tokens=500, progress=False)
    new = Tokenizer.from_str(ext.tokenizer.to_str())
    old_vocab, new_vocab = old.get_vocab(with_added_tokens=True), new.get_vocab(with_added_tokens=True)
    assert all(new_vocab.get(t) == i for t, i in old_vocab.items())
    assert ext.new_ids == list(range(max(old_vocab.values()) + 1, max(old_vocab.values()) + 501))
    for i in ext.new_ids:
        assert [t.id for t in new.model.tokenize(new.id_to_token(i))] == [i]
    r = domain_compression(old, new, held)
    assert r["roundtrip_ok"] and r["ratio"] > 1.05, r
    if vocab == "llama-spm":
        assert ext.char_tokens > 0  # Chinese characters Llama-2 spells with <0xNN> bytes


@pytest.mark.parametrize("legacy_merges", [False, True])
def test_spliced_json_equals_the_rebuilt_one(legacy_merges):
    from retok.tokenizer.extend import tokenizer_json, with_tokens

    old = byte_level_tokenizer().backend_tokenizer
    data = tokenizer_json(old)
    if legacy_merges:  # the older "a b" merge format
        data["model"]["merges"] = [f"{a} {b}" for a, b in data["model"]["merges"]]
        old = Tokenizer.from_str(json.dumps(data))
    top = max(old.get_vocab(with_added_tokens=True).values())
    vocab = [('"q', top + 1), ('"q"', top + 2)]  # quotes: escaped in JSON
    merges = [('"', "q"), ('"q', '"')]
    spliced = with_tokens(data, vocab, merges, old.to_str())
    rebuilt = with_tokens(data, vocab, merges)
    assert spliced.to_str() == rebuilt.to_str()
    assert [t.id for t in spliced.model.tokenize('"q"')] == [top + 2]


# ------------------------------------------------------------------ the other domains keep their segmentation


PROTECT_ZH = (
    "编译器把源代码翻译成机器码。配置文件的 charset 选项和 shutdown 命令见手册。字符集转换由 iconv 完成。"
)
PROTECT_EN = "def close(sock):\n    sock.shutdown()  # flush first\n    return charset_of(sock)\n"


def _protected(bl_tokenizer, protect: bool, share: float = 0.01):
    zh = [PROTECT_ZH] * 40
    en = [PROTECT_EN] * 40
    return extend_tokenizer(
        bl_tokenizer.backend_tokenizer,
        [TrainingText("zh", zh)],
        new_tokens=40,
        progress=False,
        protect=[TrainingText("code", en)] if protect else None,
        protect_share=share,
    )


def _uses(ext, docs: list[str]) -> int:
    new = set(ext.new_ids)
    return sum(1 for d in docs for i in ext.tokenizer.encode(d, add_special_tokens=False).ids if i in new)


def test_new_tokens_that_fire_in_a_protected_domain_are_not_learned(bl_tokenizer):
    """The ASCII a Chinese corpus holds (option names, commands) is learned as tokens that then fire in code,
    where their rows never learned anything. With the code domain protected, those tokens are replaced by the
    next merges: code keeps its old segmentation, the Chinese text still gets its tokens."""
    free, kept = _protected(bl_tokenizer, False), _protected(bl_tokenizer, True, share=0.0)
    assert _uses(free, [PROTECT_EN]) > 0  # without protection, new tokens fire in the code (the bug)
    assert _uses(kept, [PROTECT_EN]) == 0
    assert len(kept.new_ids) == 40 and kept.dropped_protected
    # what was dropped is the ASCII both texts share (pieces of "charset", "shutdown", ...), never Chinese
    assert all(t.replace("Ġ", " ").strip() in PROTECT_EN for t in kept.dropped_protected), (
        kept.dropped_protected
    )
    # the Chinese text is still compressed by the new tokens
    assert _uses(kept, [PROTECT_ZH]) > 0
    old = len(bl_tokenizer.backend_tokenizer.encode(PROTECT_ZH, add_special_tokens=False).ids)
    assert len(kept.tokenizer.encode(PROTECT_ZH, add_special_tokens=False).ids) < old
    assert kept.unprotected is not None and _uses_of(kept.unprotected, free.new_ids, PROTECT_EN) > 0


def _uses_of(tok, ids, text: str) -> int:
    return sum(1 for i in tok.encode(text, add_special_tokens=False).ids if i in set(ids))


def test_protection_that_leaves_nothing_to_learn_is_one_line(bl_tokenizer):
    with pytest.raises(RetokError, match=r"every token it could learn .* fires in the protected domains"):
        extend_tokenizer(
            bl_tokenizer.backend_tokenizer,
            [TrainingText("zh", [PROTECT_EN] * 40)],
            new_tokens=20,
            progress=False,
            protect=[TrainingText("code", [PROTECT_EN] * 40)],
            protect_share=0.0,
        )


def test_the_stage_protects_the_other_domains_by_default_and_reports_the_cost(tmp_path, model_dirs):
    from retok.pipeline import run_stage

    data = tmp_path / "data"
    data.mkdir()
    cfg = validate_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"path": str(model_dirs["byte_level"])},
            "data": {
                "train": [
                    {"name": "zh", "path": str(_jsonl(data / "zh.jsonl", [PROTECT_ZH] * 40))},
                    {
                        "name": "code",
                        "path": str(_jsonl(data / "code.jsonl", [PROTECT_EN] * 40)),
                        "max_bytes": 100,
                    },
                ],
                "eval": [
                    {"name": "zh", "path": str(_jsonl(data / "zh_eval.jsonl", [PROTECT_ZH]))},
                    {"name": "code", "path": str(_jsonl(data / "code_eval.jsonl", [PROTECT_EN]))},
                ],
            },
            "tokenizer": {"new_tokens": 40, "domains": ["zh"], "protect_share": 0.0},
        }
    )
    assert cfg.protected_domains() == ["code"]  # null: every data.train domain outside tokenizer.domains
    run_stage(cfg, "tokenizer")
    report = _report(stage_dir(cfg, "tokenizer"))
    pr = report["protection"]
    assert pr["domains"] == ["code"] and pr["dropped"] > 0
    # code's held-out compression: changed without the protection, unchanged with it
    assert pr["ratio_without"]["code"] > 1.0 and pr["ratio_with"]["code"] == 1.0
    assert pr["ratio_with"]["zh"] > 1.0
    md = (stage_dir(cfg, "tokenizer") / "compression.md").read_text()
    assert "Protected domains (code)" in md
