"""Tiny, deterministic, in-process tokenizers and models of every family retok supports.

No network, no files to fetch: each builder trains or initialises in well under a second, so tests and
benchmarks can build real-shaped tokenizers and model folders on the fly.

    from tests.tiny import byte_level_tokenizer, tiny_llama, save_model_folder
    tok = byte_level_tokenizer()
    save_model_folder(tiny_llama(tok, tied=True), tok, tmp_path / "model", max_shard_size="20KB")

Two tokenizer families:

- ``byte_level_tokenizer``: shaped like SmolLM2's tokenizer.json (Digits + ByteLevel pre-tokenizer, specials
  at ids 0-2 inside the model vocab and registered as special added tokens, ChatML template, no BOS added).
- ``sentencepiece_tokenizer``: shaped like HF's Llama-2 conversion (``<unk> <s> </s>``, 256 ``<0xNN>``
  byte-fallback tokens, "▁" pieces, Prepend/Replace normaliser, no pre-tokenizer, ``<s>`` added by a
  TemplateProcessing post-processor) plus Gemma-like turn tokens added outside the model vocab.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into the forest.
Tokenizers turn text into tokens; a model turns tokens into predictions. The better the tokenizer compresses
the text, the fewer tokens the model has to read and to write, and the faster it decodes long documents.
In 2024 the team measured 3.75 bytes per token on English prose and 2.13 bytes per token on Chinese text.
Call 555-0199 before 10:30 on 12/05/2025, or write to support@example.com for help with order #48213.
机器学习是人工智能的一个分支。语言模型把文本切分成词元，再预测下一个词元。
分词器的压缩率越高，模型处理同样的文本所需的词元就越少，解码速度也就越快。
我们在中文技术文档上训练新的词元，然后用旧词元的平均值初始化新的嵌入向量。
今天天气很好，我们去公园散步。学习中文需要时间和耐心。

def encode(text: str, vocab: dict[str, int]) -> list[int]:
    # Greedy longest-match encoding, for illustration only.
    ids = []
    i = 0
    while i < len(text):
        for j in range(len(text), i, -1):
            if text[i:j] in vocab:
                ids.append(vocab[text[i:j]])
                i = j
                break
        else:
            raise ValueError(f"unknown character {text[i]!r}")
    return ids

for (int i = 0; i < n; i++) { total += values[i] * 2; }
if __name__ == "__main__":
    print(encode("hello world", {"hello": 1, " ": 2, "world": 3}))
The model reads the prompt, then writes the answer one token at a time. Each new token costs one forward pass.
Numbers like 3.14159, 2718, 1000000 and 42 are split into single digits before the merges are applied.
"""


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>"]
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def byte_level_tokenizer(extra_text: str | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A SmolLM2-shaped byte-level BPE trained on ``SAMPLE_TEXT`` (+ ``extra_text``), ~``vocab_size`` tokens.

    Ids 0-2 are ``<|endoftext|> <|im_start|> <|im_end|>``, both model tokens and special added tokens (as
    in SmolLM2's tokenizer.json); then the full 256-byte alphabet, so any text is encodable; then merges.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in BYTE_LEVEL_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = SAMPLE_TEXT + ("\n" + extra_text if extra_text else "")
    # Whole text in one item so newlines and indentation become tokens, as in code-trained tokenizers.
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _train_spiece_merges(lines: Iterable[str], vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn "▁"-prefixed pieces and their merges the way SentencePiece does: within words only."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    trainer_tok.train_from_iterator(lines, trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return pieces, merges


def sentencepiece_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A Llama-2-shaped SentencePiece BPE with byte fallback, ~``vocab_size`` learned pieces after the 259
    fixed ones, plus ``<start_of_turn>``/``<end_of_turn>`` as special added tokens (ids after the vocab).

    Trained line by line, so "\\n" has no piece and goes through ``<0x0A>`` as in Llama-2; characters that
    never occur in ``SAMPLE_TEXT`` (e.g. most Chinese) go through byte fallback too.
    """
    pieces, merges = _train_spiece_merges(_lines(SAMPLE_TEXT), vocab_size)
    fixed = SENTENCEPIECE_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {t: i for i, t in enumerate(fixed)}
    for p in pieces:
        vocab.setdefault(p, len(vocab))

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SENTENCEPIECE_SPECIALS])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in TURN_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens=TURN_TOKENS,
        chat_template=GEMMA_LIKE_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int | None]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _seeded(build, seed: int):
    # fork_rng so building a fixture never shifts the global RNG stream other tests rely on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    model.eval()
    return model


_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny_llama(tokenizer: PreTrainedTokenizerFast, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32) with one embedding row per token, tied or untied head."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        **_SMALL,
        **_special_ids(tokenizer),
    )
    return _seeded(lambda: LlamaForCausalLM(config), seed)


def tiny_mistral(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> MistralForCausalLM:
    """A 2-layer Mistral (grouped-query attention), untied head."""
    config = MistralConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **_SMALL,
        **_special_ids(tokenizer),
    )
    return _seeded(lambda: MistralForCausalLM(config), seed)


def tiny_qwen2(tokenizer: PreTrainedTokenizerFast, extra_rows: int = 37, seed: int = 0) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 whose embedding has ``extra_rows`` more rows than the tokenizer has tokens (as
    Qwen2.5: 152,064 rows for 151,665 tokens), untied head."""
    config = Qwen2Config(
        vocab_size=len(tokenizer) + extra_rows,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        use_sliding_window=False,
        **_SMALL,
        **_special_ids(tokenizer),
    )
    return _seeded(lambda: Qwen2ForCausalLM(config), seed)


def tiny_gemma(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    """A 2-layer text-only Gemma-3 (``Gemma3ForCausalLM`` + ``Gemma3TextConfig``), tied head; ``overrides``
    go to the config."""
    config = Gemma3TextConfig(
        **{
            "vocab_size": len(tokenizer),
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 512,
            "sliding_window": 16,
            "tie_word_embeddings": True,
            **_SMALL,
            **_special_ids(tokenizer),
            **overrides,
        }
    )
    return _seeded(lambda: Gemma3ForCausalLM(config), seed)


def tiny_gemma2(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Gemma2ForCausalLM:
    """A 2-layer Gemma-2 (sliding-window and global layers alternating, logit soft-capping in attention and on
    the output), tied head; head_dim 256 = query_pre_attn_scalar, as in Gemma-2-2B/9B."""
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=512,
        sliding_window=16,
        tie_word_embeddings=True,
        **_SMALL,
        **_special_ids(tokenizer),
    )
    return _seeded(lambda: Gemma2ForCausalLM(config), seed)


def tiny_qwen3(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen3ForCausalLM:
    """A 2-layer Qwen3 (q/k RMS norms; head_dim 128 as in every Qwen3, != hidden / heads here), untied head."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **_SMALL,
        **_special_ids(tokenizer),
    )
    return _seeded(lambda: Qwen3ForCausalLM(config), seed)


def save_model_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    path: str | Path,
    *,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write an HF model folder (safetensors, sharded with an index when ``max_shard_size`` is small,
    e.g. "20KB"), its tokenizer and a generation_config.json; returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(**_special_ids(tokenizer))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------ a whole project


def tiny_project(root: Path, **sections: dict) -> dict:
    """A config dict for a complete retok run that takes seconds: a tiny tied Llama with a byte-level tokenizer
    (``root/model``), zh/en training and held-out JSON Lines shuffled from SAMPLE_TEXT (``root/data``), and
    budgets small enough for every stage. ``sections`` are merged into the matching config sections."""
    import random

    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = _lines(SAMPLE_TEXT)
    zh = [ln for ln in lines if any("\u4e00" <= c <= "\u9fff" for c in ln)]
    rnd = random.Random(0)

    def write(name: str, pool: list[str], n: int, k: int, drop: list[str] = ()) -> str:
        path = data_dir / name
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(n):
                doc = "\n".join(ln for ln in rnd.sample(pool, min(k, len(pool))) if ln not in drop)
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        return str(path)

    model = root / "model"
    if not (model / "config.json").is_file():
        tok = byte_level_tokenizer()
        save_model_folder(tiny_llama(tok, tied=True), tok, model)
    cfg: dict = {
        "output_dir": str(root / "out"),
        "model": {"path": str(model)},
        "compute": {"device": "cpu", "dtype": "float32", "threads": 1},
        "data": {
            "train": [
                {"name": "zh", "path": write("zh_train.jsonl", zh, 60, 4)},
                # English and code lines only: the domain whose segmentation the zh tokens must keep
                # (tokenizer.protect_domains); drawn as before, so the other files stay as they were
                {"name": "en", "path": write("en_train.jsonl", lines, 40, 8, drop=zh)},
            ],
            "eval": [
                {"name": "zh", "path": write("zh_eval.jsonl", zh * 3, 3, 12)},
                {"name": "en", "path": write("en_eval.jsonl", lines, 3, 8)},
            ],
        },
        "tokenizer": {"new_tokens": 40, "domains": ["zh"]},
        "init": {"eval_max_bytes": 600},  # eval.max_bytes: the summary sets both side by side
        "train": {
            "max_steps": 4,
            "seq_len": 32,
            "batch_size": 2,
            "lr": 1e-3,
            "warmup_steps": 1,
            "eval_every": 2,
            "save_every": 2,
            "eval_max_bytes": 400,
            "shuffle_buffer": 8,
            "loss_chunk_tokens": 32,
        },
        "eval": {
            "max_bytes": 600,
            "window": 64,
            "stride": 32,
            "prompt_bytes": 120,
            "continuation_bytes": 40,
            "repeats": 1,
            "warmup": 0,
        },
        "export": {"max_shard_size": "200KB"},
    }
    for name, values in sections.items():
        if isinstance(cfg.get(name), dict) and isinstance(values, dict):
            cfg[name] = {**cfg[name], **values}
        else:
            cfg[name] = values
    return cfg
