"""The rest of the model folder init-embeddings writes: config.json and generation_config.json with the new
vocabulary size, ids and tie flag, the tokenizer files, and a check that plain transformers agrees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from retok.core.errors import RetokError
from retok.core.model_io import IoNames
from retok.core.stages import TOKENIZER_FILES
from retok.core.tokenmap import COPY, TokenMap

_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")


def old_to_new_ids(tmap: TokenMap) -> dict[int, int]:
    """old id -> new id for every old token that survives (specials by role/content, text by bytes)."""
    out: dict[int, int] = {}
    for new_id in tmap.ids(COPY):
        out.setdefault(int(tmap.source[new_id]), int(new_id))
    out.update(tmap.old_to_new_special)
    return out


def _map_ids(value: Any, mapping: dict[int, int], key: str, where: str) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_map_ids(v, mapping, key, where) for v in value]
    if not isinstance(value, int) or value < 0:
        return value
    if value not in mapping:
        raise RetokError(
            f"{where}: {key}={value} names an old token that the new tokenizer does not keep; "
            "rebuild the tokenizer with `retok build-tokenizer` (special tokens must survive)"
        )
    return mapping[value]


def write_configs(model_dir: Path, out: Path, tmap: TokenMap, names: IoNames) -> dict[str, Any]:
    """config.json and generation_config.json with the new vocabulary size, ids and tie flag."""
    mapping = old_to_new_ids(tmap)
    config = json.loads((model_dir / "config.json").read_text())
    targets = [config] + [config[k] for k in ("text_config",) if isinstance(config.get(k), dict)]
    for c in targets:
        if "vocab_size" in c or c is config:
            c["vocab_size"] = tmap.n_rows
        for key in _ID_KEYS:
            if key in c:
                c[key] = _map_ids(c[key], mapping, key, f"{model_dir}/config.json")
        if names.separate and c.get("tie_word_embeddings", c is config):
            c["tie_word_embeddings"] = False  # otherwise loading re-ties and throws the new head away
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    for key in _ID_KEYS:
        if key in gen:
            gen[key] = _map_ids(gen[key], mapping, key, str(gen_path))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in gen and config.get(key) is not None:
            gen[key] = config[key]
    suppress = [mapping[i] for i in gen.get("suppress_tokens") or [] if i in mapping]
    gen["suppress_tokens"] = sorted(set(suppress) | set(tmap.padding_ids)) or None
    if gen["suppress_tokens"] is None:
        del gen["suppress_tokens"]
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return {
        "config": {k: config.get(k) for k in (*_ID_KEYS, "vocab_size", "tie_word_embeddings") if k in config},
        "generation_config": {k: gen.get(k) for k in (*_ID_KEYS, "suppress_tokens") if k in gen},
    }


def copy_tokenizer_files(tok_dir: Path, out: Path, old_hf: Any) -> list[str]:
    """The new tokenizer's HF files; the old chat template when the new folder lost it."""
    copied = []
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise RetokError(
            f"{tok_dir} has no tokenizer.json; it is not a tokenizer folder from `retok build-tokenizer`"
        )
    old_template = getattr(old_hf, "chat_template", None)
    has_template = any(n.startswith("chat_template") for n in copied)
    cfg_path = out / "tokenizer_config.json"
    if old_template and not has_template:
        tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        if not tok_cfg.get("chat_template"):
            (out / "chat_template.jinja").write_text(
                old_template if isinstance(old_template, str) else json.dumps(old_template)
            )
            copied.append("chat_template.jinja (from the model)")
    return copied


def verify_folder(out: Path, tmap: TokenMap) -> dict[str, Any]:
    """Load the written folder with plain transformers and check that config, generation config and tokenizer
    agree; the chat template must render every special token it uses as one id."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(out))
    config = AutoConfig.from_pretrained(str(out))
    gen = GenerationConfig.from_pretrained(str(out))
    problems: list[str] = []
    vocab_size = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
    if vocab_size != tmap.n_rows:
        problems.append(f"config vocab_size {vocab_size} != {tmap.n_rows} rows")
    max_id = max(tok.get_vocab().values())
    if max_id >= tmap.n_rows:
        problems.append(f"tokenizer id {max_id} >= {tmap.n_rows} rows")
    for role in ("bos", "eos", "pad"):
        tid = getattr(tok, f"{role}_token_id", None)
        for where, c in (("config.json", config), ("generation_config.json", gen)):
            val = getattr(c, f"{role}_token_id", None)
            vals = val if isinstance(val, list) else [val]
            if tid is not None and val is not None and tid not in vals:
                problems.append(f"{where} {role}_token_id={val} but the tokenizer's {role} token is id {tid}")
    template_ok = None
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
            template_ok = True
            for tid, content in ((i, t.content) for i, t in tok.added_tokens_decoder.items() if t.special):
                if content and text.count(content) != ids.count(tid):
                    template_ok = False
                    problems.append(f"chat template: {content!r} does not render as the single id {tid}")
        except Exception as e:  # a template that needs extra variables: report, do not fail
            template_ok = None
            problems.append(f"chat template could not be rendered ({e.__class__.__name__})")
    return {"ok": not problems, "problems": problems, "chat_template_single_ids": template_ok}
