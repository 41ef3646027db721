"""GGUF out on tiny models: the file is the same model (transformers' own GGUF loader gives the same logits and
token ids), `retok check`'s GGUF section catches a wrong token, a wrong id and a wrong row, and bad input exits 2
with the checked Hugging Face folder kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from retok.core.config import validate_dict
from retok.core.errors import PartialOutput, RetokError
from retok.core.stages import mark_stage, stage_dir
from retok.export import gguf_out
from retok.export.check import check_folder
from retok.export.check_gguf import check_gguf
from retok.export.gguf_out import write_gguf
from retok.pipeline import run_stage
from tests.tiny import (
    byte_level_tokenizer,
    save_model_folder,
    sentencepiece_tokenizer,
    tiny_gemma,
    tiny_gemma2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    tiny_qwen3,
)

TEXT = "Hello world, the model 123 机器学习 def f(x): return x"
ZH_EXTRA = "机器学习是人工智能的一个分支。语言模型把文本切分成词元，再预测下一个词元。" * 8


def _folder(tmp_path: Path, kind: str, family: str) -> tuple[Path, object, object]:
    tok = byte_level_tokenizer() if family == "byte_level" else sentencepiece_tokenizer()
    build = {
        "llama_tied": lambda: tiny_llama(tok, tied=True),
        "llama_untied": lambda: tiny_llama(tok, tied=False),
        "qwen2": lambda: tiny_qwen2(tok),
        "mistral": lambda: tiny_mistral(tok),
        "qwen3": lambda: tiny_qwen3(tok),
        # head_dim 256 = query_pre_attn_scalar, as in Gemma-3-270M: llama.cpp scales attention by head_dim, and
        # transformers' GGUF loader (which has no key for it) assumes 256
        "gemma3": lambda: tiny_gemma(tok, head_dim=256),
        "gemma2": lambda: tiny_gemma2(tok),
    }[kind]
    model = build()
    with torch.no_grad():  # norms away from their init (Gemma's zeros, Qwen3's q/k ones): the shift must show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return save_model_folder(model, tok, tmp_path / kind), tok, model


def _write(folder: Path, tok, ftype: str = "f32", **kw) -> Path:
    conf = json.loads((folder / "config.json").read_text())
    out = folder / f"m-{ftype}.gguf"
    write_gguf(folder, out, ftype=ftype, tok=tok, conf=conf, pre="smollm", name="tiny", progress=False, **kw)
    return out


def _names(checks) -> dict:
    return {c.name: c for c in checks}


@pytest.mark.parametrize(
    "kind,family",
    [
        ("llama_tied", "byte_level"),
        ("llama_untied", "sentencepiece"),
        ("qwen2", "byte_level"),  # 37 padding rows beyond the tokenizer
        ("mistral", "byte_level"),
        ("qwen3", "byte_level"),  # q/k norms, head_dim != hidden / heads
        ("gemma3", "sentencepiece"),  # norms stored + 1, sliding window, tied
        ("gemma2", "sentencepiece"),  # the same, and logit soft-capping
    ],
)
def test_gguf_is_the_same_model_for_transformers(tmp_path: Path, kind: str, family: str):
    folder, tok, model = _folder(tmp_path, kind, family)
    path = _write(folder, tok)
    # transformers reads GGUF with its own loader (undoing llama.cpp's q/k order and Gemma's norm shift): the
    # same logits, bit for bit (Gemma: within float32 rounding of w + 1 - 1).
    back = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name, dtype=torch.float32)
    assert type(back).__name__ == ("LlamaForCausalLM" if kind == "mistral" else type(model).__name__)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        if kind in ("gemma2", "gemma3"):
            torch.testing.assert_close(model(ids).logits, back(ids).logits, rtol=0, atol=1e-5)
            norm = dict(back.named_parameters())["model.layers.0.post_feedforward_layernorm.weight"]
            want = model.model.layers[0].post_feedforward_layernorm.weight
            torch.testing.assert_close(norm, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(model(ids).logits, back(ids).logits)
    back_tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    plain = tok(TEXT, add_special_tokens=False).input_ids
    assert back_tok(TEXT, add_special_tokens=False).input_ids == plain and len(plain) > 10
    checks = check_gguf(folder, path, tok)
    assert [c.name for c in checks] == ["gguf vocab", "gguf tokens", "gguf special tokens", "gguf weights"]
    assert all(c.ok for c in checks), [c.detail for c in checks if not c.ok]
    rows = model.get_input_embeddings().weight.shape[0]
    assert f"{rows - len(tok)} unused padding rows" in checks[0].detail


def test_gguf_types_store_matrices_as_asked(tmp_path: Path):
    from gguf import GGUFReader

    folder, tok, _ = _folder(tmp_path, "llama_untied", "byte_level")
    sizes = {}
    for ftype, want in (("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")):
        path = _write(folder, tok, ftype)
        reader = GGUFReader(str(path))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["token_embd.weight"] == types["output.weight"] == types["blk.0.attn_q.weight"] == want
        assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"  # vectors stay f32
        assert all(c.ok for c in check_gguf(folder, path, tok)), ftype
        sizes[ftype] = path.stat().st_size
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]


def test_check_gguf_catches_a_wrong_token_id_and_row(tmp_path: Path, monkeypatch):
    folder, tok, _ = _folder(tmp_path, "llama_untied", "byte_level")
    good = _write(folder, tok)
    assert all(c.ok for c in check_folder(folder))  # `retok check` includes the GGUF section

    real_vocab = gguf_out.gguf_vocab

    def one_wrong_token(t, rows):
        v = real_vocab(t, rows)
        v.tokens[300] = "WRONG"
        return v

    monkeypatch.setattr(gguf_out, "gguf_vocab", one_wrong_token)
    bad = _write(folder, tok, "f16")
    monkeypatch.undo()
    tokens = _names(check_gguf(folder, bad, tok))["gguf tokens"]
    assert not tokens.ok and "token 300 is 'WRONG'" in tokens.detail

    real_kv = gguf_out._tokenizer_kv

    def wrong_eos(w, t, vocab, pre):
        real_kv(w, t, vocab, pre)
        w.add_eos_token_id(int(t.eos_token_id) + 1)

    monkeypatch.setattr(gguf_out, "_tokenizer_kv", wrong_eos)
    bad_ids = _write(folder, tok, "bf16")
    monkeypatch.undo()
    special = _names(check_gguf(folder, bad_ids, tok))["gguf special tokens"]
    assert not special.ok and f"eos {tok.eos_token_id + 1} (tokenizer: {tok.eos_token_id})" in special.detail

    # The folder's head changes after the GGUF was written: the GGUF no longer holds the same rows.
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"][5] += 1.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    rows = _names(check_gguf(folder, good, tok))["gguf weights"]
    assert not rows.ok and "output.weight differs from lm_head.weight" in rows.detail


def test_check_gguf_reports_a_damaged_file(tmp_path: Path):
    folder, tok, _ = _folder(tmp_path, "llama_tied", "byte_level")
    path = _write(folder, tok)
    path.write_bytes(path.read_bytes()[:5000])
    results = check_gguf(folder, path, tok)
    assert len(results) == 1 and not results[0].ok and "unreadable GGUF" in results[0].detail


def test_unsupported_architecture_and_rope_say_what_to_do():
    with pytest.raises(RetokError, match="not 'phi3'; set export.gguf: off"):
        gguf_out.gguf_architecture({"model_type": "phi3"}, False)
    with pytest.raises(RetokError, match="runs remote code"):
        gguf_out.gguf_architecture({"model_type": "llama"}, True)
    with pytest.raises(RetokError, match="rope scaling 'yarn'"):
        gguf_out.check_rope({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert gguf_out.gguf_architecture({"model_type": "mistral"}, False) == ("llama", True)


GEMMA3_270M = {  # Gemma-3-270M's config.json, the keys llama.cpp's gemma3 depends on
    "model_type": "gemma3_text",
    "num_hidden_layers": 18,
    "hidden_size": 640,
    "num_attention_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"layer_types": ["sliding_attention"] * 18}, "layer_types is not every 6th layer global"),
        ({"query_pre_attn_scalar": 128}, "query_pre_attn_scalar 128 is not the head_dim 256"),
        ({"final_logit_softcapping": 30.0}, "soft-capping"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_theta": 1e6},
                    "sliding_attention": {"rope_theta": 5e4},
                }
            },
            "sliding layers' rope base is 50000.0",
        ),
    ],
)
def test_gemma3_configs_llama_cpp_would_run_differently_are_refused(change, words):
    assert gguf_out.gguf_architecture(GEMMA3_270M, False) == ("gemma3", False)
    assert gguf_out._rope(GEMMA3_270M)["rope_theta"] == 1000000.0  # the global layers' base
    with pytest.raises(RetokError, match=words):
        gguf_out.gguf_architecture({**GEMMA3_270M, **change}, False)


def test_llama3_rope_freqs_follow_the_scaling_rule():
    conf = {
        "hidden_size": 64,
        "num_attention_heads": 2,
        "rope_parameters": {
            "rope_theta": 500000.0,
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    f = gguf_out._llama3_rope_freqs(conf)
    assert f.shape == (16,)
    assert f[0] == 1.0 and f[-1] == 8.0  # short wavelengths untouched, the longest divided by the factor
    assert all(1.0 <= x <= 8.0 for x in f) and list(f) == sorted(f)


# ------------------------------------------------------------------------------------------ export stage


def _config(root: Path, **export) -> object:
    return validate_dict(
        {
            "output_dir": str(root / "out"),
            "model": {"path": str(root / "base")},
            "export": {"max_shard_size": "20KB", **export},
        }
    )


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    old = byte_level_tokenizer()
    save_model_folder(tiny_llama(old, tied=True), old, tmp_path / "base")
    new = byte_level_tokenizer(extra_text=ZH_EXTRA, vocab_size=640)
    init = save_model_folder(tiny_llama(new, tied=False, seed=1), new, tmp_path / "out" / "model-init")
    mark_stage(init, _config(tmp_path), "model-init")
    return tmp_path


def test_export_writes_a_checked_gguf_and_the_card_says_how_to_run_it(project: Path):
    cfg = _config(project, gguf="q8_0", gguf_pre="smollm")
    out = run_stage(cfg, "export")
    path = out / "base-retok-q8_0.gguf"
    report = json.loads((out / "retok_export.json").read_text())
    assert report["gguf"]["written"] and report["gguf"]["file"] == path.name and path.is_file()
    assert report["gguf"]["pre"] == "smollm" and report["gguf"]["tokenizer_model"] == "gpt2"
    names = [c["name"] for c in report["checks"]]
    assert names[-4:] == ["gguf vocab", "gguf tokens", "gguf special tokens", "gguf weights"]
    assert all(c["ok"] for c in report["checks"])
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"llama-cli -m {path.name}" in card and "convert_hf_to_gguf" not in card


def test_yaml_off_means_no_gguf():
    import yaml

    cfg = validate_dict(yaml.safe_load("output_dir: o\nmodel: {path: x}\nexport: {gguf: off}\n"))
    assert cfg.export.gguf == "off"
    with pytest.raises(RetokError, match="export.gguf"):
        validate_dict({"output_dir": "o", "model": {"path": "x"}, "export": {"gguf": "q4_k"}})


def _assert_folder_kept(out: Path) -> None:
    assert (out / "config.json").is_file() and not list(out.glob("*.gguf"))
    assert not list(out.glob(".*.part"))
    checks = check_folder(out)
    assert all(c.ok for c in checks if c.name != "up to date")
    # the folder says it is incomplete (export.gguf asked for a GGUF it lacks), until a run makes the part
    fresh = [c for c in checks if c.name == "up to date"]
    assert (
        len(fresh) == 1 and not fresh[0].ok and "its last run left a part out (export.gguf" in fresh[0].detail
    )


def test_train_mode_tokenizer_without_a_pre_name_keeps_the_folder_and_exits_2(project: Path):
    from tokenizers import pre_tokenizers

    init = project / "out" / "model-init"
    tok = AutoTokenizer.from_pretrained(init)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save_pretrained(init)
    mark_stage(init, _config(project), "model-init")
    cfg = _config(project, gguf="f16")
    with pytest.raises(PartialOutput, match="splits text differently.*export.gguf_pre") as e:
        run_stage(cfg, "export")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    out = stage_dir(cfg, "export")
    _assert_folder_kept(out)
    report = json.loads((out / "retok_export.json").read_text())
    assert report["gguf"]["written"] is False and "splits text differently" in report["gguf"]["reason"]
    # Naming a llama.cpp pre-tokenizer explicitly is the way out.
    fixed = _config(project, gguf="f16", gguf_pre="gpt-2")
    out = run_stage(fixed, "export", overwrite=True)
    assert (out / "base-retok-f16.gguf").is_file()
    assert json.loads((out / "retok_stage.json").read_text())["complete"] is True
    assert [c.ok for c in check_folder(out) if c.name == "up to date"] == [True]


def test_unknown_original_pre_tokenizer_exits_2_with_the_folder(project: Path):
    with pytest.raises(PartialOutput, match="pre-tokenizer is unknown.*set export.gguf_pre"):
        run_stage(_config(project, gguf="f16"), "export")  # tiny tokenizer: no GGUF source, unknown hash
    _assert_folder_kept(stage_dir(_config(project), "export"))


def test_unsupported_architecture_keeps_the_folder(project: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(gguf_out, "ARCHS", {"qwen2": ("qwen2", False)})  # as if llama were not supported
    with pytest.raises(PartialOutput, match="model_type qwen2, not 'llama'"):
        run_stage(_config(project, gguf="f16", gguf_pre="smollm"), "export")
    _assert_folder_kept(stage_dir(_config(project), "export"))
    shutil.rmtree(stage_dir(_config(project), "export"))


def test_a_gguf_source_keeps_every_key_the_new_vocabulary_does_not_touch(tmp_path: Path):
    import gguf
    from gguf import GGUFReader

    folder, tok, _ = _folder(tmp_path, "llama_untied", "byte_level")
    src = tmp_path / "source.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_license("apache-2.0")
    w.add_organization("Someone")
    w.add_array("general.languages", ["en", "zh"])
    w.add_uint32("llama.context_length", 999)  # the folder's config says 512: the model's own value wins
    w.add_token_list(["old", "tokens"])  # the vocabulary is the new one
    w.add_uint32("tokenizer.ggml.padding_token_id", 7)  # the tokenizer's own pad id wins
    w.add_uint32(
        "tokenizer.ggml.seperator_token_id", 5
    )  # (llama.cpp's spelling) the tokenizer has none: kept
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    out = _write(folder, tok, "f16", source_gguf=src)
    fields = GGUFReader(str(out)).fields
    assert fields["general.license"].contents() == "apache-2.0"
    assert fields["general.organization"].contents() == "Someone"
    assert fields["general.languages"].contents() == ["en", "zh"]
    assert fields["tokenizer.ggml.padding_token_id"].contents() == tok.pad_token_id != 7
    assert fields["tokenizer.ggml.seperator_token_id"].contents() == 5
    assert fields["llama.context_length"].contents() == 512
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(tok)
    assert all(c.ok for c in check_gguf(folder, out, tok))


def test_added_special_tokens_without_a_role_are_control_tokens(tmp_path: Path):
    from gguf import GGUFReader
    from tokenizers import AddedToken

    tok = byte_level_tokenizer()
    tok.add_tokens([AddedToken("<repo_name>", special=True), AddedToken("<plain>", special=False)])
    folder = save_model_folder(tiny_llama(tok, tied=True), tok, tmp_path / "m")
    path = _write(folder, tok)
    fields = GGUFReader(str(path)).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    repo, plain = tok.convert_tokens_to_ids(["<repo_name>", "<plain>"])
    assert repo not in tok.all_special_ids  # no role: only its added-token flag says it is special
    assert (tokens[repo], types[repo]) == ("<repo_name>", 3)  # CONTROL
    assert (tokens[plain], types[plain]) == ("<plain>", 4)  # USER_DEFINED
    assert all(c.ok for c in check_gguf(folder, path, tok))
