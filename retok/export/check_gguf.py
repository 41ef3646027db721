"""`retok check`'s GGUF section: a .gguf next to a Hugging Face folder must be the same model.

Read with the ``gguf`` package's reader, independently of how retok wrote it:
- vocab: one token per embedding row; rows beyond the tokenizer are unused ``[PADn]`` tokens;
- tokens: every token's text equals the Hugging Face tokenizer's, special tokens are control tokens, and the
  merges (byte-level BPE) equal tokenizer.json's in order;
- special ids: bos/eos/unk/pad ids and the add-bos/add-eos flags agree with how the tokenizer behaves;
- weights: the embedding and LM head equal the folder's tensors stored at the GGUF's type, byte for byte
  (bit-exact at f32; f16/bf16/q8_0 are compared with the folder's tensor converted to that type).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from retok.core.model_io import find_io_names
from retok.core.safetensors_io import load_tensor, tensor_table
from retok.export.gguf_out import encode_like
from retok.export.verdict import Check


class _Gguf:
    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        self.reader = GGUFReader(str(path))
        self.fields = self.reader.fields
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str) -> Any:
        f = self.fields.get(key)
        return None if f is None else f.contents()


def _check_vocab(g: _Gguf, tok: Any) -> Check:
    tokens = g.get("tokenizer.ggml.tokens") or []
    types = g.get("tokenizer.ggml.token_type") or []
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        return Check("gguf vocab", False, "no token_embd.weight tensor")
    rows = int(emb.shape[-1])  # GGUF shapes are innermost-first: [n_embd, n_vocab]
    if len(tokens) != rows or len(types) != rows:
        return Check(
            "gguf vocab", False, f"{len(tokens)} tokens and {len(types)} types for {rows} embedding rows"
        )
    n = len(tok)
    pads = [i for i in range(n, rows) if not (tokens[i].startswith("[PAD") and types[i] == 5)]
    if n > rows or pads:
        return Check(
            "gguf vocab", False, f"tokenizer has {n} tokens; rows {pads[:5]} are not unused [PAD] tokens"
        )
    vocab_size = g.get(f"{g.get('general.architecture')}.vocab_size")
    if vocab_size is not None and int(vocab_size) != rows:
        return Check("gguf vocab", False, f"vocab_size {vocab_size} but {rows} embedding rows")
    return Check("gguf vocab", True, f"{rows} tokens = embedding rows ({rows - n} unused padding rows)")


def _check_tokens(g: _Gguf, tok: Any, folder: Path) -> Check:
    tokens = g.get("tokenizer.ggml.tokens") or []
    types = g.get("tokenizer.ggml.token_type") or []
    model = g.get("tokenizer.ggml.model")
    added = tok.added_tokens_decoder
    # Every added token marked special is a control token to llama.cpp (not only those with a role).
    special = {i for i, t in added.items() if t.special}
    for i, text in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        have = tokens[i]
        if model == "llama" and i in added and not added[i].special:
            text = text.replace("\u2581", " ")
        if have != text:
            return Check(
                "gguf tokens", False, f"token {i} is {have!r} in the GGUF but {text!r} in the tokenizer"
            )
        if (i in special) != (types[i] == 3):
            return Check(
                "gguf tokens", False, f"token {i} ({text!r}) special={i in special} but GGUF type {types[i]}"
            )
    detail = f"{len(tok)} token texts equal the tokenizer's"
    if model == "gpt2":
        tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        want = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
        have_merges = g.get("tokenizer.ggml.merges") or []
        if have_merges != want:
            first = next(
                (k for k, (a, b) in enumerate(zip(have_merges, want, strict=False)) if a != b),
                min(len(want), len(have_merges)),
            )
            return Check(
                "gguf tokens",
                False,
                f"merges differ from tokenizer.json at #{first} ({len(have_merges)} vs {len(want)})",
            )
        detail += f", {len(want)} merges in order"
    return Check("gguf tokens", True, detail)


def _check_special(g: _Gguf, tok: Any) -> Check:
    wrong = []
    for role in ("bos", "eos", "unk", "pad"):
        want = getattr(tok, f"{role}_token_id", None)
        have = g.get(
            f"tokenizer.ggml.{'unknown' if role == 'unk' else 'padding' if role == 'pad' else role}_token_id"
        )
        if want is not None and have is not None and int(have) != int(want):
            wrong.append(f"{role} {have} (tokenizer: {want})")
        if want is not None and have is None and role in ("bos", "eos"):
            wrong.append(f"{role} missing (tokenizer: {want})")
    full, plain = tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
    adds_bos = len(full) > len(plain) and full[0] == tok.bos_token_id
    adds_eos = len(full) > len(plain) and full[-1] == tok.eos_token_id
    for key, want in (("add_bos_token", adds_bos), ("add_eos_token", adds_eos)):
        have = g.get(f"tokenizer.ggml.{key}")
        if have is not None and bool(have) != want:
            wrong.append(f"{key} {bool(have)} (tokenizer: {want})")
    if wrong:
        return Check("gguf special tokens", False, "; ".join(wrong))
    return Check("gguf special tokens", True, f"ids and flags agree (add_bos={adds_bos}, add_eos={adds_eos})")


def _check_weights(g: _Gguf, folder: Path) -> Check:

    table = tensor_table(folder)
    names = find_io_names(folder, set(table), untie=False)
    pairs = [("token_embd.weight", names.embed)]
    if "output.weight" in g.tensors:
        if names.head is None or names.head == names.embed:
            return Check("gguf weights", False, "the GGUF has an output.weight but the folder's head is tied")
        pairs.append(("output.weight", names.head))
    elif names.head is not None and names.head != names.embed:
        return Check(
            "gguf weights", False, f"the folder has a separate head ({names.head}) but the GGUF has none"
        )
    done = []
    for gname, hf in pairs:
        t = g.tensors[gname]
        want = encode_like(load_tensor(table[hf]).float().numpy(), t.tensor_type)
        have = np.asarray(t.data)
        if have.tobytes() != np.ascontiguousarray(want).tobytes():
            return Check("gguf weights", False, f"{gname} differs from {hf} stored as {t.tensor_type.name}")
        done.append(f"{gname}={hf} ({t.tensor_type.name})")
    return Check("gguf weights", True, "byte-identical: " + ", ".join(done))


def check_gguf(folder: Path, path: Path, tok: Any) -> list[Check]:
    """The GGUF section for one file; a file the reader cannot open fails every check with the reason."""
    name = path.name
    try:
        g = _Gguf(path)
    except Exception as e:  # a damaged file is a verdict on the file
        return [Check(f"gguf {name}", False, f"unreadable GGUF ({e.__class__.__name__}: {str(e)[:120]})")]
    out = []
    for fn in (
        lambda: _check_vocab(g, tok),
        lambda: _check_tokens(g, tok, folder),
        lambda: _check_special(g, tok),
        lambda: _check_weights(g, folder),
    ):
        try:
            out.append(fn())
        except Exception as e:
            out.append(
                Check(
                    f"gguf {name}",
                    False,
                    f"internal error in retok's check ({e.__class__.__name__}: {str(e)[:160]}); please report it",
                    internal=True,
                )
            )
    return out
