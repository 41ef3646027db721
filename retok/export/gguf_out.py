"""GGUF out: the exported model as one .gguf file that llama.cpp loads and runs unmodified.

Tensor names come from the ``gguf`` package's own name map (``gguf.get_tensor_name_map``) and every metadata
key from its writer's ``add_*`` methods, so the file follows llama.cpp's conventions rather than a table of
ours. What retok decides itself:

- which architectures it writes (``ARCHS``: those whose tensors it has checked against llama.cpp);
- the vocabulary: the token list, types, merges (byte-level BPE, ``gpt2``) or scores (SentencePiece-style with
  byte fallback, ``llama``) from the Hugging Face tokenizer, padded with unused ``[PADn]`` tokens up to the
  embedding's rows, as llama.cpp wants one token per row;
- ``tokenizer.ggml.pre``: in extend mode the text splitting is unchanged, so the ORIGINAL tokenizer's name
  (given by the caller, read from the source GGUF or recognised from its hash) is kept;
- a GGUF source model round-trips: every metadata key of the original that the new vocabulary does not touch
  is copied (name, license, context length, chat template when the tokenizer has none...).

Weights are read and written one tensor at a time (safetensors memory-map in, GGUF out), so the peak memory
is one tensor, whatever the model's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retok.core.errors import RetokError
from retok.core.safetensors_io import TensorInfo, load_tensor, tensor_table
from retok.core.tokens import detect_family

# export.gguf -> (tensor type of matrices, general.file_type); vectors (norms, biases) stay F32 as in llama.cpp.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")

# config.json model_type -> (llama.cpp architecture name, q/k rows reordered for llama.cpp's rope layout)
ARCHS = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),  # qwen2 plus per-head q/k RMS norms (attn_q_norm / attn_k_norm), no q/k/v bias
    "gemma2": ("gemma2", False),  # logit soft-capping in attention and on the output
    "gemma3_text": ("gemma3", False),  # Gemma3ForCausalLM; see check_gemma for what llama.cpp assumes
}
# Gemma's RMS norms scale by (1 + weight); llama.cpp's by the stored weight, so every norm is stored + 1 (as
# llama.cpp's convert_hf_to_gguf.py does). The sqrt(hidden) embedding scale llama.cpp applies in its graph.
NORM_SHIFT = {"gemma2": 1.0, "gemma3": 1.0}
# llama.cpp (src/llama-model.cpp): Gemma-2 alternates sliding-window and global layers (the first sliding),
# Gemma-3 makes every 6th layer global, its sliding ones with rope base 10,000; the attention scale is
# 1/sqrt(head_dim), 1/sqrt(hidden/heads) for the 27B models (Gemma-2: 46 layers, Gemma-3: 62).
GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3_text": 6}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}
GEMMA3_SWA_ROPE_BASE = 10000.0

_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; llama.cpp computes them
_BLOCK = 32  # Q8_0 block: a row length that is not a multiple falls back to F16, as in llama.cpp


def _gguf() -> Any:
    import gguf

    return gguf


def _types(ftype: str) -> tuple[Any, Any]:
    g = _gguf()
    q, f = g.GGMLQuantizationType, g.LlamaFileType
    return {
        "f32": (q.F32, f.ALL_F32),
        "f16": (q.F16, f.MOSTLY_F16),
        "bf16": (q.BF16, f.MOSTLY_BF16),
        "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
    }[ftype]


# --------------------------------------------------------------------------------------------- preflight


def gguf_architecture(conf: dict[str, Any], trust_remote_code: bool) -> tuple[str, bool]:
    """(llama.cpp architecture, permute q/k) for a config.json, or RetokError saying why not."""
    if trust_remote_code:
        raise RetokError(
            "export.gguf: the model runs remote code (model.trust_remote_code: true), so llama.cpp cannot know "
            "its architecture; set export.gguf: off (the Hugging Face folder is written either way)"
        )
    model_type = conf.get("model_type")
    if model_type not in ARCHS:
        raise RetokError(
            f"export.gguf: retok writes GGUF for model_type {', '.join(sorted(ARCHS))}, not {model_type!r}; "
            "set export.gguf: off and convert the exported folder with llama.cpp's convert_hf_to_gguf.py"
        )
    if model_type in GEMMA_SWA_PATTERN:
        check_gemma(conf)
    return ARCHS[model_type]


def check_gemma(conf: dict[str, Any]) -> None:
    """What llama.cpp's gemma2/gemma3 take for granted, checked against the config (RetokError saying which)."""
    kind = conf["model_type"]
    n, pattern = conf["num_hidden_layers"], GEMMA_SWA_PATTERN[kind]
    want = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    heads, head_dim = conf["num_attention_heads"], conf.get("head_dim") or 256
    scale = conf.get("query_pre_attn_scalar", head_dim)
    local = ((conf.get("rope_parameters") or {}).get("sliding_attention") or {}).get(
        "rope_theta", conf.get("rope_local_base_freq", GEMMA3_SWA_ROPE_BASE)
    )
    why = None
    if conf.get("layer_types") and list(conf["layer_types"]) != want:
        why = f"layer_types is not every {pattern}th layer global, which llama.cpp assumes"
    elif scale != (conf["hidden_size"] // heads if n == GEMMA_27B_LAYERS[kind] else head_dim):
        why = f"query_pre_attn_scalar {scale} is not the head_dim {head_dim} llama.cpp assumes"
    elif kind == "gemma3_text" and (
        conf.get("final_logit_softcapping") or conf.get("attn_logit_softcapping")
    ):
        why = "logit soft-capping is set, which llama.cpp's gemma3 does not apply"
    elif kind == "gemma3_text" and float(local) != GEMMA3_SWA_ROPE_BASE:
        why = f"the sliding layers' rope base is {local}, llama.cpp assumes {GEMMA3_SWA_ROPE_BASE:g}"
    if why:
        raise RetokError(
            f"export.gguf: this {kind} config differs from what llama.cpp runs ({why}); set export.gguf: off"
        )


def _rope(conf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and scaling, from transformers 5's rope_parameters or the older flat keys; for a model with
    rope parameters per layer type (Gemma-3), those of the full-attention layers."""
    params = dict(conf.get("rope_parameters") or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    scaling = conf.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    params.setdefault("rope_theta", conf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type") or "default")
    return params


def check_rope(conf: dict[str, Any]) -> None:
    kind = _rope(conf)["rope_type"]
    if kind not in ("default", "linear", "llama3"):
        raise RetokError(
            f"export.gguf: rope scaling {kind!r} is not one retok writes (default, linear, llama3); set "
            "export.gguf: off and convert the exported folder with llama.cpp's convert_hf_to_gguf.py"
        )


# --------------------------------------------------------------------------------------------- vocabulary


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) | llama (SentencePiece-style, byte fallback)
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    n_real: int = 0  # tokens of the tokenizer; the rest are [PADn] rows


def _merge_strings(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def gguf_vocab(tok: Any, rows: int) -> Vocab:
    """The GGUF vocabulary of a fast tokenizer, padded to ``rows`` embedding rows."""
    import json

    g = _gguf()
    tt = g.TokenType
    backend = tok.backend_tokenizer
    family = detect_family(backend)
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise RetokError(
            f"export.gguf: the tokenizer is a {model.get('type')} model; retok writes GGUF vocabularies for BPE "
            "(byte-level or SentencePiece-style with byte fallback); set export.gguf: off"
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    n = len(tok)
    if n > rows:
        raise RetokError(f"export.gguf: the tokenizer has {n} tokens but the embedding only {rows} rows")
    by_id = {i: s for s, i in vocab.items()}
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise RetokError(f"export.gguf: the tokenizer has no token for ids {missing[:5]}; its ids have holes")
    added = tok.added_tokens_decoder  # id -> AddedToken
    merges = _merge_strings(model)
    tokens, types = [], []
    for i in range(n):
        text = by_id[i]
        if i in added:
            kind = tt.CONTROL if added[i].special else tt.USER_DEFINED
            if family == "sentencepiece" and kind == tt.USER_DEFINED:
                text = text.replace("\u2581", " ")
        elif family == "sentencepiece" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = tt.BYTE
        elif text == model.get("unk_token"):
            kind = tt.UNKNOWN
        else:
            kind = tt.NORMAL
        tokens.append(text)
        types.append(int(kind))
    tokens += [f"[PAD{i}]" for i in range(n, rows)]
    types += [int(tt.UNUSED)] * (rows - n)
    if family == "byte_level":
        return Vocab("gpt2", tokens, types, merges=merges, n_real=n)
    if family != "sentencepiece":
        raise RetokError(f"export.gguf: tokenizer family {family!r} has no GGUF vocabulary in retok")
    # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged token scores highest; the
    # Hugging Face BPE merges the pair of lowest rank. Scoring each token by minus the rank of the first
    # merge that makes it gives the same order.
    first_rank: dict[str, int] = {}
    for rank, m in enumerate(merges):
        first_rank.setdefault(m.replace(" ", "", 1), rank)
    scores = [-1.0 - first_rank[t] if t in first_rank else 0.0 for t in tokens[:n]]
    scores += [-1000.0] * (rows - n)
    return Vocab("llama", tokens, types, scores=scores, n_real=n)


def _behaviour(tok: Any) -> dict[str, bool]:
    """add_bos / add_eos / add_space_prefix as the tokenizer behaves, not as its config files claim."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    out = {
        "add_bos": bool(full) and tok.bos_token_id is not None and full[0] == tok.bos_token_id != plain[:1],
        "add_eos": bool(full) and tok.eos_token_id is not None and full[-1] == tok.eos_token_id,
    }
    first = tok.convert_ids_to_tokens(plain[:1])
    out["add_space_prefix"] = bool(first) and str(first[0]).startswith("\u2581")
    return out


# --------------------------------------------------------------------------------------------- tensors


@dataclass
class _Tensor:
    name: str  # GGUF name
    info: TensorInfo | None
    qtype: Any
    shape: list[int]
    transform: Callable[[Any], Any] | None = None
    data: Any = None  # for computed tensors (rope_freqs)


def _permute(n_head: int) -> Callable[[Any], Any]:
    """HF's rotary layout (two halves) -> llama.cpp's (interleaved pairs), per head, on rows."""

    def f(w: Any) -> Any:
        rows = w.shape[0]
        return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return f


def _shifted(shift: float) -> Callable[[Any], Any]:
    def f(w: Any) -> Any:
        return w + shift

    return f


def _llama3_rope_freqs(conf: dict[str, Any]) -> Any:
    """The per-frequency factors llama.cpp reads from ``rope_freqs.weight`` for Llama-3.1-style scaling."""
    import numpy as np

    p = _rope(conf)
    dim = conf.get("head_dim") or conf["hidden_size"] // conf["num_attention_heads"]
    freqs = 1.0 / (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = p.get("factor", 8.0), p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_ctx = p.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def plan_tensors(folder: Path, conf: dict[str, Any], arch: Any, permute: bool, ftype: str) -> list[_Tensor]:
    """Every tensor of the folder with its GGUF name, type and transform, in llama.cpp's usual order."""
    g = _gguf()
    q = g.GGMLQuantizationType
    n_layers = conf["num_hidden_layers"]
    names = g.get_tensor_name_map(arch, n_layers)
    matrix_type = _types(ftype)[0]
    tied = bool(conf.get("tie_word_embeddings", False))
    n_head = conf["num_attention_heads"]
    n_kv = conf.get("num_key_value_heads") or n_head
    out: list[_Tensor] = []
    for hf_name, info in tensor_table(folder).items():
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RetokError(
                f"export.gguf: tensor {hf_name} has no llama.cpp name for architecture "
                f"{g.MODEL_ARCH_NAMES[arch]}; set export.gguf: off"
            )
        if name == "output.weight" and tied:
            continue  # llama.cpp reuses token_embd for a tied head
        qtype = q.F32
        if len(info.shape) == 2:
            qtype = matrix_type
            if qtype == q.Q8_0 and info.shape[-1] % _BLOCK:
                qtype = q.F16
        transform = None
        shift = NORM_SHIFT.get(g.MODEL_ARCH_NAMES[arch])
        if shift and hf_name.endswith("norm.weight"):
            transform = _shifted(shift)
        elif permute and ".attn_q." in name:
            transform = _permute(n_head)
        elif permute and ".attn_k." in name:
            transform = _permute(n_kv)
        out.append(_Tensor(name, info, qtype, list(info.shape), transform))
    if _rope(conf)["rope_type"] == "llama3":
        freqs = _llama3_rope_freqs(conf)
        out.append(
            _Tensor(
                g.TENSOR_NAMES[g.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, q.F32, [len(freqs)], data=freqs
            )
        )

    def order(t: _Tensor) -> tuple[int, int, str]:
        if t.name.startswith("blk."):
            return (1, int(t.name.split(".")[1]), t.name)
        return (0 if t.name.startswith(("token_embd", "rope_freqs")) else 2, 0, t.name)

    return sorted(out, key=order)


def _encode(t: _Tensor) -> Any:
    """The tensor's bytes as GGUF stores them (float32 source, transformed, converted)."""
    import numpy as np

    g = _gguf()
    if t.data is not None:
        data = t.data
    else:
        assert t.info is not None
        data = load_tensor(t.info).float().numpy()
    if t.transform is not None:
        data = t.transform(data)
    data = np.ascontiguousarray(data, dtype=np.float32)
    q = g.GGMLQuantizationType
    if t.qtype == q.F32:
        return data
    if t.qtype == q.F16:
        return data.astype(np.float16)
    return g.quants.quantize(data, t.qtype)


def encode_like(matrix: Any, qtype: Any) -> Any:
    """How a float32 matrix is stored at ``qtype`` (used by `retok check` to compare bytes)."""
    return _encode(_Tensor("", None, qtype, list(matrix.shape), data=matrix))


def _info_args(t: _Tensor) -> tuple[list[int], Any, int, Any]:
    import numpy as np

    g = _gguf()
    q = g.GGMLQuantizationType
    if t.qtype == q.F32:
        return t.shape, np.float32, 4 * math.prod(t.shape), None
    if t.qtype == q.F16:
        return t.shape, np.float16, 2 * math.prod(t.shape), None
    byte_shape = list(g.quants.quant_shape_to_byte_shape(tuple(t.shape), t.qtype))
    return byte_shape, np.uint8, math.prod(byte_shape), t.qtype


# --------------------------------------------------------------------------------------------- metadata


def source_metadata(path: Path) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, type, array item type) of every metadata key of a GGUF file, header fields excluded."""
    g = _gguf()
    reader = g.GGUFReader(str(path))
    out = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == g.GGUFValueType.ARRAY and len(f.types) > 1 else None
        out.append((key, f.contents(), vtype, sub))
    return out


def _hparams(w: Any, conf: dict[str, Any], rows: int, ftype: str, name: str) -> None:
    g = _gguf()
    n_head = conf["num_attention_heads"]
    head_dim = conf.get("head_dim") or conf["hidden_size"] // n_head
    w.add_name(name)
    w.add_context_length(conf.get("max_position_embeddings", 4096))
    w.add_embedding_length(conf["hidden_size"])
    w.add_block_count(conf["num_hidden_layers"])
    w.add_feed_forward_length(conf["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(conf.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(conf.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(rows)
    w.add_rope_dimension_count(head_dim)
    gemma = conf.get("model_type") in GEMMA_SWA_PATTERN
    if gemma:
        w.add_sliding_window(int(conf["sliding_window"]))
    if conf.get("model_type") == "gemma2":
        for key, add in (
            ("attn_logit_softcapping", w.add_attn_logit_softcapping),
            ("final_logit_softcapping", w.add_final_logit_softcapping),
        ):
            if conf.get(key):
                add(float(conf[key]))
    if head_dim * n_head != conf["hidden_size"] or gemma:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = _rope(conf)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_file_type(int(_types(ftype)[1]))
    w.add_quantization_version(g.GGML_QUANT_VERSION)


def _tokenizer_kv(w: Any, tok: Any, vocab: Vocab, pre: str | None) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{role}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{role}_token_id")(int(tid))
    flags = _behaviour(tok)
    w.add_add_bos_token(flags["add_bos"])
    w.add_add_eos_token(flags["add_eos"])
    if vocab.model == "llama":
        w.add_add_space_prefix(flags["add_space_prefix"])
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)


# --------------------------------------------------------------------------------------------- write


def write_gguf(
    folder: Path,
    out_file: Path,
    *,
    ftype: str,
    tok: Any,
    conf: dict[str, Any],
    pre: str | None,
    name: str,
    source_gguf: Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``folder`` (a Hugging Face model folder) as one GGUF file; returns what was written."""
    from tqdm.auto import tqdm

    g = _gguf()
    arch_name, permute = gguf_architecture(conf, trust_remote_code)
    check_rope(conf)
    arch = next(a for a, n in g.MODEL_ARCH_NAMES.items() if n == arch_name)
    tensors = plan_tensors(folder, conf, arch, permute, ftype)
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise RetokError(f"export.gguf: {folder} has no input embedding that llama.cpp can name")
    rows = embd.shape[0]
    vocab = gguf_vocab(tok, rows)

    w = g.GGUFWriter(path=None, arch=arch_name)
    _hparams(w, conf, rows, ftype, name)
    _tokenizer_kv(w, tok, vocab, pre)
    kept: list[str] = []
    if source_gguf is not None:
        ours = set(w.kv_data[0])
        for key, value, vtype, sub in source_metadata(source_gguf):
            if key in ours or key.startswith(
                ("tokenizer.ggml.token", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
            ):
                continue
            w.add_key_value(key, value, vtype, sub)
            kept.append(key)
    for t in tensors:
        w.add_tensor_info(t.name, *_info_args(t))
    total = sum(_info_args(t)[2] for t in tensors)
    tmp = out_file.with_name(f".{out_file.name}.part")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc="gguf", disable=not progress) as bar:
            for t in tensors:
                data = _encode(t)
                w.write_tensor_data(data)
                bar.update(data.nbytes)
        w.close()
        tmp.rename(out_file)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {
        "file": out_file.name,
        "bytes": out_file.stat().st_size,
        "type": ftype,
        "architecture": arch_name,
        "tokenizer_model": vocab.model,
        "pre": pre or "default",
        "tokens": vocab.n_real,
        "padding_tokens": rows - vocab.n_real,
        "tensors": len(tensors),
        "kept_from_source": kept,
    }
