"""export and check on tiny models: streamed shards, consistent ids, a model card, and a checker that catches
folders broken on purpose (each with the message a user needs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, BertModel

from retok.core.config import parse_size, validate_dict
from retok.core.errors import RetokError
from retok.core.safetensors_io import read_header
from retok.core.stages import mark_stage, stage_dir
from retok.evaluate.report import markdown_table
from retok.export.check import check_folder
from retok.export.llamacpp import CHKTXT, KNOWN_HASHES, chkhsh, gguf_advice
from retok.export.shards import plan_shards, weight_files
from retok.pipeline import run_stage
from tests.tiny import byte_level_tokenizer, save_model_folder, tiny_llama

ZH_EXTRA = "机器学习是人工智能的一个分支。语言模型把文本切分成词元，再预测下一个词元。" * 8


def _config(root: Path, **export) -> object:
    return validate_dict(
        {
            "output_dir": str(root / "out"),
            "model": {"path": str(root / "base")},
            "export": {"max_shard_size": "20KB", "gguf_pre": "smollm", **export},
        }
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """output_dir with a base model (model.path) and a model-init stage whose tokenizer is extended."""
    root = tmp_path_factory.mktemp("export-project")
    old = byte_level_tokenizer()
    save_model_folder(tiny_llama(old, tied=True), old, root / "base")
    new = byte_level_tokenizer(extra_text=ZH_EXTRA, vocab_size=640)
    init = save_model_folder(
        tiny_llama(new, tied=True, seed=1), new, root / "out" / "model-init", max_shard_size="30KB"
    )
    mark_stage(init, _config(root), "model-init")
    return root


@pytest.fixture(scope="module")
def exported(project: Path) -> Path:
    return run_stage(_config(project), "export")


@pytest.fixture()
def broken(exported: Path, tmp_path: Path) -> Path:
    """A private copy of the good exported folder, to break on purpose."""
    return Path(shutil.copytree(exported, tmp_path / "broken"))


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _by_name(results) -> dict:
    return {r.name: r for r in results}


# ------------------------------------------------------------------------------------------- export


def test_export_streams_every_tensor_into_shards(project: Path, exported: Path):
    src = project / "out" / "model-init"
    files = weight_files(exported)
    shards = sorted({f.name for f in files.values()})
    assert len(shards) > 1 and (exported / "model.safetensors.index.json").is_file()
    for f in files.values():  # 20KB shards; a tensor bigger than that is alone in its shard
        header, _ = read_header(f)
        sizes = [
            m["data_offsets"][1] - m["data_offsets"][0] for k, m in header.items() if k != "__metadata__"
        ]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    src_files = weight_files(src)
    assert set(files) == set(src_files)
    for name in src_files:
        with safe_open(str(src_files[name]), "pt") as a, safe_open(str(files[name]), "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name


def test_export_writes_consistent_ids_card_and_chkhsh(project: Path, exported: Path):
    conf = json.loads((exported / "config.json").read_text())
    gen = json.loads((exported / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(exported)
    assert (
        conf["eos_token_id"]
        == gen["eos_token_id"]
        == tok.eos_token_id
        == tok.convert_tokens_to_ids("<|im_end|>")
    )
    assert conf["bos_token_id"] == gen["bos_token_id"] == tok.bos_token_id
    assert (exported / "chat_template.jinja").is_file() and tok.chat_template
    report = json.loads((exported / "retok_export.json").read_text())
    assert all(c["ok"] for c in report["checks"]) and len(report["checks"]) == 9
    llama = report["llama_cpp"]
    old_tok = AutoTokenizer.from_pretrained(project / "base")
    assert llama["old_chkhsh"] == chkhsh(old_tok) != llama["new_chkhsh"] == chkhsh(tok)
    assert llama["pre_tokenizer_unchanged"] is True
    card = (exported / "README.md").read_text(encoding="utf-8")
    # No GGUF asked for: the card says how to get one, and asks nobody to patch llama.cpp's scripts.
    assert "No GGUF was written (export.gguf: off)" in card and "export.gguf: f16" in card
    assert "convert_hf_to_gguf" not in card and "get_vocab_base_pre" not in card
    assert report["gguf"] == {"written": False, "reason": "export.gguf: off"}
    assert "max_shard_size: 20KB" in card and "gguf_pre: smollm" in card  # the resolved config
    assert "Not measured" in card  # no eval/report.json in this project
    assert (exported / "retok_config.yaml").is_file()


def test_model_card_embeds_eval_table(project: Path, tmp_path: Path):
    root = Path(shutil.copytree(project, tmp_path / "p", ignore=shutil.ignore_patterns("export")))
    cfg = _config(root, dtype="bfloat16")
    mark_stage(stage_dir(cfg, "model-init"), cfg, "model-init")  # made for this copy's model.path
    ev = stage_dir(cfg, "eval")
    ev.mkdir()
    side = {"bytes_per_token": 2.0, "bpb": 1.5, "tokens_per_s": 10.0, "bytes_per_s": 20.0, "prefill_ms": 5.0}
    report = {
        "environment": {"device": "cpu", "dtype": "float32", "threads": 2},
        "candidate": {"folder": str(stage_dir(cfg, "model-init"))},
        "domains": {
            "zh": {
                "old": side,
                "new": {**side, "bytes_per_token": 4.0, "bytes_per_s": 37.0},
                "compression_ratio": 2.0,
                "speedup_bytes_per_s": 1.85,
                "speedup_vs_compression": 0.925,
            }
        },
    }
    (ev / "report.json").write_text(json.dumps(report))
    (ev / "table.md").write_text(markdown_table(report))
    mark_stage(ev, cfg, "eval")
    out = run_stage(cfg, "export")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| zh | 2.00 | 4.00 | 2.00x |" in card and "| 1.85x | 0.93 |" in card
    # dtype cast: every float tensor is bfloat16 and config.json says so
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name, f in weight_files(out).items():
        with safe_open(str(f), "pt") as h:
            assert h.get_tensor(name).dtype == torch.bfloat16


def test_exported_folder_loads_without_retok(exported: Path, tmp_path: Path):
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"p = {str(exported)!r}\n"
        "tok = AutoTokenizer.from_pretrained(p)\n"
        "model = AutoModelForCausalLM.from_pretrained(p)\n"
        "ids = tok('机器学习 hello', return_tensors='pt').input_ids\n"
        "out = model.generate(ids, max_new_tokens=3, do_sample=False)\n"
        "assert out.shape[1] == ids.shape[1] + 3\n"
        "assert 'retok' not in sys.modules, 'retok was imported'\n"
        "print('ok', len(tok))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith(f"ok {len(AutoTokenizer.from_pretrained(exported))}")


def test_export_fails_when_the_result_does_not_pass_check(project: Path, tmp_path: Path):
    root = Path(shutil.copytree(project, tmp_path / "p", ignore=shutil.ignore_patterns("export")))
    mark_stage(root / "out" / "model-init", _config(root), "model-init")  # made for this copy's model.path
    _edit(root / "out" / "model-init" / "config.json", lambda c: c.update(vocab_size=500))
    with pytest.raises(RetokError, match="fails `retok check`.*vocab size"):
        run_stage(_config(root), "export")
    assert not (root / "out" / "export").exists()  # nothing half-written is left behind


def test_parse_size_and_plan():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("20KB") == 20_000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("big")
    with pytest.raises(RetokError, match="export.max_shard_size: .*not a size"):
        _config(Path("x"), max_shard_size="big")


def test_plan_shards_counts_cast_bytes(exported: Path):
    total = lambda plan: sum(size for shard in plan for _, _, size in shard)  # noqa: E731
    assert total(plan_shards(exported, 10**9, "bfloat16")) * 2 == total(plan_shards(exported, 10**9, "keep"))
    assert len(plan_shards(exported, 10**9)) == 1


# --------------------------------------------------------------------------------------------- check


def test_check_passes_on_export(exported: Path):
    results = check_folder(exported)
    assert [r.name for r in results if not r.ok] == []


def test_check_wrong_eos_in_generation_config(broken: Path):
    _edit(broken / "generation_config.json", lambda g: g.update(eos_token_id=7))
    res = _by_name(check_folder(broken))
    assert not res["special tokens"].ok
    assert "generation_config.json eos_token_id=7" in res["special tokens"].detail
    assert "'<|im_end|>' (2)" in res["special tokens"].detail
    assert sum(not r.ok for r in res.values()) == 1


def test_check_vocab_size_smaller_than_tokenizer(broken: Path):
    n = len(AutoTokenizer.from_pretrained(broken))
    _edit(broken / "config.json", lambda c: c.update(vocab_size=n - 40))
    res = _by_name(check_folder(broken))
    assert not res["vocab size"].ok
    assert (
        f"config.json vocab_size ({n - 40}) is smaller than the tokenizer ({n} tokens)"
        in res["vocab size"].detail
    )
    assert not res["model loads"].ok  # transformers cannot put 640 rows into 600


def test_check_untied_flag_on_tied_weights(broken: Path):
    _edit(broken / "config.json", lambda c: c.update(tie_word_embeddings=False))
    res = _by_name(check_folder(broken))
    assert not res["tied weights"].ok
    assert "tie_word_embeddings is false but the files hold no LM head" in res["tied weights"].detail
    assert not res["model loads"].ok and "lm_head.weight" in res["model loads"].detail


def test_check_tied_flag_on_a_separate_head(make_model_dir):
    folder = make_model_dir("llama_untied")
    _edit(folder / "config.json", lambda c: c.update(tie_word_embeddings=True))
    res = _by_name(check_folder(folder))
    assert not res["tied weights"].ok and "differs from" in res["tied weights"].detail


def test_check_missing_special_token(broken: Path):
    # The new tokenizer.json lost <|im_end|> as a special added token: transformers re-adds it from
    # tokenizer_config.json, but llama.cpp, TGI and plain `tokenizers` split it into pieces.
    _edit(
        broken / "tokenizer.json",
        lambda t: t.update(added_tokens=[a for a in t["added_tokens"] if a["content"] != "<|im_end|>"]),
    )
    res = _by_name(check_folder(broken))
    assert not res["special tokens"].ok
    assert "'<|im_end|>' is not a special added token in tokenizer.json" in res["special tokens"].detail


def test_check_special_token_missing_from_the_vocabulary(broken: Path):
    def drop(t):
        t["added_tokens"] = [a for a in t["added_tokens"] if a["content"] != "<|im_start|>"]
        del t["model"]["vocab"]["<|im_start|>"]

    _edit(broken / "tokenizer.json", drop)
    res = _by_name(check_folder(broken))
    assert not res["special tokens"].ok
    assert "bos_token '<|im_start|>' is missing from tokenizer.json" in res["special tokens"].detail


def _set_head(folder: Path, fn) -> int:
    tok = AutoTokenizer.from_pretrained(folder)
    (f,) = sorted(folder.glob("*.safetensors"))
    with safe_open(str(f), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    fn(tensors["lm_head.weight"], len(tok))
    save_file(tensors, str(f), metadata={"format": "pt"})
    return len(tok)


def test_check_padded_rows_that_win_greedy(make_model_dir):
    folder = make_model_dir("qwen2")  # 37 embedding rows more than tokens, untied head

    def zero_padding(head, n):
        head[n:] = 0.0

    _set_head(folder, zero_padding)
    res = _by_name(check_folder(folder))
    assert res["vocab size"].ok and "37 padding rows" in res["vocab size"].detail
    assert res["greedy generation"].ok, res["greedy generation"].detail

    def winning_padding(head, n):
        # +w and -w: for any hidden state one of the two scores far above every (shrunk) real row.
        w = head[5].clone()
        head[:n] *= 0.01
        head[n + 3], head[n + 5] = 1e3 * w, -1e3 * w

    n = _set_head(folder, winning_padding)
    res = _by_name(check_folder(folder))
    assert not res["greedy generation"].ok
    ids = {int(i) for i in re.search(r"\[([\d, ]+)\]", res["greedy generation"].detail).group(1).split(",")}
    assert ids and ids <= {n + 3, n + 5}


@pytest.mark.parametrize(
    "kind,family", [("gemma", "sentencepiece"), ("qwen2", "byte_level"), ("llama_untied", "sentencepiece")]
)
def test_check_passes_on_other_families(make_model_dir, kind, family):
    results = check_folder(make_model_dir(kind, family, sharded=True))
    bad = {r.name: r.detail for r in results if not r.ok}
    # random padding rows of the raw qwen2 fixture may win greedy decoding; that is the one allowed finding
    bad.pop("greedy generation", None) if kind == "qwen2" else None
    assert bad == {}


def test_check_bad_input(tmp_path: Path):
    with pytest.raises(RetokError, match="is not a folder"):
        check_folder(tmp_path / "nope")
    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(bert)
    with pytest.raises(RetokError, match="'bert' model saved as BertModel, not a causal language model"):
        check_folder(bert)


def test_cli_check_exit_codes(exported: Path, broken: Path, tmp_path: Path, monkeypatch, capsys):
    from retok.cli import main

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["retok", *args])
        try:
            main()
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    assert run("check", str(exported)) == 0
    assert "all checks pass" in capsys.readouterr().out
    _edit(broken / "generation_config.json", lambda g: g.update(eos_token_id=7))
    assert run("check", str(broken)) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 check(s) failed" in out
    assert run("check", str(tmp_path / "missing")) == 2
    assert capsys.readouterr().err.startswith("error: check:")


# ------------------------------------------------------------------------------------------- llama.cpp


def test_chkhsh_is_llamacpp_hash_of_probe_ids():
    from hashlib import sha256

    tok = byte_level_tokenizer()
    assert chkhsh(tok) == sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    assert CHKTXT.startswith("\n \n\n \n\n\n \t \t\t \t\n") and CHKTXT.endswith("We'Ve a'lL")


def test_gguf_advice_cases():
    from tokenizers import pre_tokenizers

    old = byte_level_tokenizer()
    new = byte_level_tokenizer(extra_text=ZH_EXTRA, vocab_size=640)
    same = gguf_advice(old, new, "smollm", "byte_level")
    assert same["pre_tokenizer_unchanged"] is True and same["pre_name"] == "smollm"
    assert same["old_chkhsh"] == chkhsh(old) != same["new_chkhsh"] == chkhsh(new)
    # No name given and the tiny tokenizer's hash is not a known one: no name is invented.
    assert gguf_advice(old, new, None, "byte_level")["pre_name"] is None
    changed = byte_level_tokenizer(extra_text=ZH_EXTRA, vocab_size=640)
    changed.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False
    )  # digits no longer split
    diff = gguf_advice(old, changed, "smollm", "byte_level")
    assert diff["pre_tokenizer_unchanged"] is False
    assert "smollm" in KNOWN_HASHES.values()


def test_check_round_trip_fails_on_a_lossy_tokenizer(broken: Path):
    # A normaliser that lowercases: encode/decode no longer gives the text back, and check says where.
    _edit(broken / "tokenizer.json", lambda t: t.update(normalizer={"type": "Lowercase"}))
    res = _by_name(check_folder(broken))
    assert not res["round trip"].ok and "from character 0" in res["round trip"].detail


# ------------------------------------------------------------------------------ check: broken files


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json"])
def test_check_reports_a_file_that_is_not_json(broken: Path, name: str):
    (broken / name).write_text("{ this is not json")
    res = _by_name(check_folder(broken))  # no traceback: FAIL rows
    assert not res["files"].ok and f"{name} is not valid JSON" in res["files"].detail
    assert not any(r.internal for r in res.values())
    if name == "tokenizer.json":
        assert not res["tokenizer loads"].ok and "not run" in res["special tokens"].detail


def test_check_reports_a_truncated_weights_file(broken: Path):
    f = sorted(broken.glob("*.safetensors"))[0]  # the first of the shards
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    res = _by_name(check_folder(broken))
    assert not res["files"].ok and "truncated" in res["files"].detail
    assert not res["model loads"].ok


def test_check_fails_an_export_whose_chat_template_was_deleted(broken: Path):
    assert json.loads((broken / "retok_export.json").read_text())["chat_template"] is True
    for f in broken.glob("chat_template*"):
        f.unlink()
    _edit(broken / "tokenizer_config.json", lambda c: c.pop("chat_template", None))
    res = _by_name(check_folder(broken))
    assert not res["chat template"].ok and "retok export wrote a chat template" in res["chat template"].detail


def test_a_crashing_check_is_retok_s_error_not_the_folder_s(exported: Path, monkeypatch, capsys):
    import retok.export.check as check_mod
    from retok.cli import main

    def boom(ctx):
        raise KeyError("a bug in retok")

    monkeypatch.setattr(check_mod, "_check_round_trip", boom)
    res = _by_name(check_folder(exported))
    assert (
        res["round trip"].internal and "bug in retok, not a verdict on the folder" in res["round trip"].detail
    )
    monkeypatch.setattr(sys, "argv", ["retok", "check", str(exported)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 3 and "ERROR" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ real


@pytest.mark.real
def test_real_smollm2_check_and_chkhsh(assets):
    GGUF = assets.gguf
    assets.need(GGUF)
    from retok.core.sources import read_gguf_metadata, resolve_model

    folder = resolve_model(str(GGUF))
    tok = AutoTokenizer.from_pretrained(folder)
    # Our probe string is llama.cpp's: SmolLM2 hashes to the entry its GGUF names ("smollm").
    assert read_gguf_metadata(GGUF)["tokenizer.ggml.pre"] == "smollm"
    assert KNOWN_HASHES[chkhsh(tok)] == "smollm"
    results = check_folder(folder)
    assert [r.name for r in results if not r.ok] == []
