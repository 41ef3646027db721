"""Shared pytest fixtures: tiny tokenizers of both families and a factory of tiny HF model folders."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

# `from tests.tiny import ...` must work under a bare `pytest` too, which puts only tests/ on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.tiny import (  # noqa: E402
    byte_level_tokenizer,
    save_model_folder,
    sentencepiece_tokenizer,
    tiny_gemma,
    tiny_llama,
    tiny_qwen2,
)

ModelKind = Literal["llama_tied", "llama_untied", "qwen2", "gemma"]


class Assets:
    """The real model, corpora and vocabularies fetched by scripts/fetch_assets.py into $RETOK_CACHE/assets
    (default ~/.cache/retok/assets). ``need(*paths)`` skips the test when one is missing, or FAILS it under
    CI (RETOK_REQUIRE_REAL=1, set by .ci/run): a real-model test must not pass by skipping there."""

    def __init__(self) -> None:
        from retok.core.config import default_cache

        self.root = default_cache() / "assets"
        self.gguf = self.root / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        self.corpora = self.root / "corpora"
        self.vocabs = self.root / "vocabs"
        self.mmlu = self.root / "tasks" / "mmlu.jsonl"
        self.gemma3 = self.root / "models" / "gemma-3-270m-q4_k_m.gguf"  # fetch_assets.py --gemma3

    def corpus(self, domain: str, split: str) -> Path:
        return self.corpora / domain / f"{split}.jsonl"

    def vocab(self, name: str) -> Path:
        return self.vocabs / f"ggml-vocab-{name}.gguf"

    def need(self, *paths: Path) -> None:
        missing = [str(p) for p in paths if not p.exists()]
        if not missing:
            return
        msg = f"real assets missing ({', '.join(missing)}); run `python scripts/fetch_assets.py --vocabs`"
        if os.environ.get("RETOK_REQUIRE_REAL") == "1":
            pytest.fail(msg + " (RETOK_REQUIRE_REAL=1: missing assets fail instead of skipping)")
        pytest.skip(msg)

    def need_llamacpp(self) -> Path:
        """The bin folder of the llama.cpp built by scripts/build_llamacpp.py; skips (fails under CI) without it."""
        sys.path.insert(0, _ROOT + "/scripts")
        from build_llamacpp import find_bin

        found = find_bin()
        if found is not None:
            return found
        msg = "llama.cpp is not built; run `python scripts/build_llamacpp.py` (about 10 minutes, once)"
        if os.environ.get("RETOK_REQUIRE_REAL") == "1":
            pytest.fail(msg + " (RETOK_REQUIRE_REAL=1: a missing build fails instead of skipping)")
        pytest.skip(msg)


@pytest.fixture(scope="session")
def assets() -> Assets:
    return Assets()


TokenizerFamily = Literal["byte_level", "sentencepiece"]
MakeModelDir = Callable[..., Path]


@pytest.fixture(scope="session")
def bl_tokenizer():
    """SmolLM2-shaped byte-level BPE. Shared by the whole session: do not mutate it (call
    ``tests.tiny.byte_level_tokenizer()`` for a private copy, it takes milliseconds)."""
    return byte_level_tokenizer()


@pytest.fixture(scope="session")
def sp_tokenizer():
    """Llama-2/Gemma-shaped SentencePiece BPE with byte fallback. Shared: do not mutate it (call
    ``tests.tiny.sentencepiece_tokenizer()`` for a private copy)."""
    return sentencepiece_tokenizer()


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory: pytest.TempPathFactory) -> MakeModelDir:
    """Factory: ``make_model_dir(kind, family, sharded=False) -> Path`` writes a fresh HF model folder.

    kind: "llama_tied" | "llama_untied" | "qwen2" (embedding rows > tokenizer length, untied) | "gemma"
    (Gemma3ForCausalLM, tied). family: "byte_level" | "sentencepiece". ``sharded=True`` splits the
    safetensors into several shards with an index. Every call gets its own folder (building one takes
    ~50 ms), so a test may modify what it gets.
    """

    def make(kind: ModelKind, family: TokenizerFamily = "byte_level", sharded: bool = False) -> Path:
        builders = {"byte_level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer}
        if family not in builders:
            raise ValueError(f"unknown tokenizer family {family!r}; use one of {sorted(builders)}")
        tokenizer = builders[family]()
        models = {
            "llama_tied": lambda: tiny_llama(tokenizer, tied=True),
            "llama_untied": lambda: tiny_llama(tokenizer, tied=False),
            "qwen2": lambda: tiny_qwen2(tokenizer),
            "gemma": lambda: tiny_gemma(tokenizer),
        }
        if kind not in models:
            raise ValueError(f"unknown model kind {kind!r}; use one of {sorted(models)}")
        path = tmp_path_factory.mktemp(f"{kind}-{family}{'-sharded' if sharded else ''}")
        return save_model_folder(models[kind](), tokenizer, path, max_shard_size="20KB" if sharded else None)

    return make


def pytest_collection_modifyitems(config, items):
    """Real-model and llama.cpp tests are slow too: `pytest -m "not slow"` is the inner loop (a few minutes),
    `pytest` (what CI runs) everything."""
    for item in items:
        if item.get_closest_marker("real") or item.get_closest_marker("llamacpp"):
            item.add_marker(pytest.mark.slow)
