"""Shared pytest fixtures: tiny tokenizers of both families and a factory of tiny HF model folders."""

from __future__ import annotations

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
