"""export: the final Hugging Face folder of the latest model stage.

    retok export --config configs/demo.yaml

Streams the weights (safetensors in, safetensors out, shards.py), writes config.json, generation_config.json
and the tokenizer with every special-token id agreeing, a model card (card.py) with the resolved config and
the eval table, then runs ``retok check`` (check.py) on its own output and fails if anything is wrong. With
``export.gguf`` set it also writes ``<name>-<type>.gguf`` for llama.cpp (gguf_out.py) and checks it against
the folder (check_gguf.py); a GGUF that cannot be made for this model leaves the checked folder in place and
exits 2 with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from retok.core.config import RetokConfig, expand, parse_size
from retok.core.errors import PartialOutput, RetokError
from retok.core.freshness import stage_status
from retok.core.sources import load_tokenizer, read_gguf_metadata, resolve_model
from retok.core.stages import model_source, require_stage, stage_dir
from retok.core.tokens import detect_family
from retok.export.card import model_card
from retok.export.check import check_folder, ids_list, print_checks
from retok.export.check_gguf import check_gguf
from retok.export.gguf_out import write_gguf
from retok.export.llamacpp import gguf_advice
from retok.export.shards import stream_weights

REPORT_JSON = "retok_export.json"


# --------------------------------------------------------------------------------------------- export


def export_source(cfg: RetokConfig) -> Path:
    """The stage folder to export: export.source, or (auto) model-trained, else model-init; checked to be made
    by this config."""
    key = model_source(cfg, "export")
    if key is None:
        raise RetokError(
            f"export needs a model: neither {stage_dir(cfg, 'model-trained')} nor {stage_dir(cfg, 'model-init')} "
            "exists; run `retok init-embeddings` (and `retok train-io`) first"
        )
    return require_stage(cfg, key, "export")


def eval_table(cfg: RetokConfig, src: Path) -> str | None:
    """eval-speed's table for the model being exported, or None (with a note) when there is none that fits."""
    folder = stage_dir(cfg, "eval")
    if not folder.is_dir():
        return None
    if stage_status(cfg, "eval") != "same":
        print(
            f"retok: export: {folder} was made by another config; the model card leaves its table out",
            flush=True,
        )
        return None
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        measured = Path(report["candidate"]["folder"]).resolve()
        table = (folder / "table.md").read_text(encoding="utf-8")
    except (OSError, ValueError, KeyError, TypeError):
        print(
            f"retok: export: {folder} has no readable report.json/table.md; the card leaves the table out",
            flush=True,
        )
        return None
    if measured != src.resolve():
        print(
            f"retok: export: eval-speed measured {measured}, not {src}; the card leaves its table out",
            flush=True,
        )
        return None
    return table


def sync_special_ids(conf: dict[str, Any], tok: Any, where: str) -> list[str]:
    """Make bos/eos/pad ids of a config dict agree with the tokenizer's roles; returns what changed.

    The tokenizer is the truth (its roles name tokens by content). An eos LIST is kept when it contains the
    tokenizer's eos and every id in it is a special token (Gemma lists <eos> and <end_of_turn>).
    """
    changes = []
    special_ids = set(tok.all_special_ids)
    for role in ("bos", "eos", "pad"):
        key = f"{role}_token_id"
        want = getattr(tok, key)
        have = conf.get(key)
        if want is None or have is None:
            continue
        have_ids = ids_list(have)
        if role == "eos" and isinstance(have, list) and want in have_ids and set(have_ids) <= special_ids:
            continue
        if have_ids != [want]:
            conf[key] = want
            changes.append(f"{where} {key}: {have} -> {want}")
    return changes


def _model_name(cfg: RetokConfig) -> str:
    """export.model_name, or one made from model.path's last part that is a plain file name too."""
    if cfg.export.model_name:
        return cfg.export.model_name
    stem = Path(cfg.model.path.rstrip("/")).name
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    stem = re.sub(r"[^A-Za-z0-9._+\-]+", "-", stem).strip(".-")[:80] or "model"
    return f"{stem}-retok"


def _source_gguf(cfg: RetokConfig) -> Path | None:
    """model.path when it is a GGUF file (its metadata is carried into the exported GGUF), else None."""

    path = Path(expand(cfg.model.path))
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def _old_pre_name(cfg: RetokConfig) -> str | None:

    if cfg.export.gguf_pre:
        return cfg.export.gguf_pre
    path = _source_gguf(cfg)
    if path is not None:
        pre = read_gguf_metadata(path).get("tokenizer.ggml.pre")
        return str(pre) if pre else None
    return None


def gguf_pre_name(cfg: RetokConfig, llama: dict[str, Any], family: str | None) -> str | None:
    """tokenizer.ggml.pre for the new GGUF, or RetokError saying what to set.

    An explicit export.gguf_pre wins. SentencePiece-style vocabularies have none (llama.cpp's "default").
    Otherwise the new tokenizer may keep the original's name only when it splits text the same way.
    """
    if cfg.export.gguf_pre:
        return cfg.export.gguf_pre
    if family == "sentencepiece":
        return None
    if not llama["pre_tokenizer_unchanged"]:
        raise RetokError(
            "export.gguf: the new tokenizer splits text differently from the original (a trained pre-tokenizer), "
            "so it cannot claim the original's llama.cpp pre-tokenizer; set export.gguf_pre to a llama.cpp "
            "pre-tokenizer that splits text like it, or export.gguf: off"
        )
    if not llama.get("pre_name"):
        raise RetokError(
            f"export.gguf: the original tokenizer's llama.cpp pre-tokenizer is unknown (hash "
            f"{llama['old_chkhsh'][:16]}...); set export.gguf_pre to its name (tokenizer.ggml.pre in a GGUF "
            "of the original model, e.g. llama-bpe, qwen2, smollm)"
        )
    return str(llama["pre_name"])


def export_gguf(
    cfg: RetokConfig, out: Path, tok: Any, conf: dict[str, Any], llama: dict[str, Any], name: str
):
    """Write ``out/<name>-<type>.gguf`` from the exported folder and check it; returns (report, checks)."""

    pre = gguf_pre_name(cfg, llama, llama.get("family"))
    path = out / f"{name}-{cfg.export.gguf}.gguf"
    print(f"retok: export: writing {path.name} ({cfg.export.gguf})", flush=True)
    info = write_gguf(
        out,
        path,
        ftype=cfg.export.gguf,
        tok=tok,
        conf=conf,
        pre=pre,
        name=name,
        source_gguf=_source_gguf(cfg),
        trust_remote_code=cfg.model.trust_remote_code,
    )
    return info, check_gguf(out, path, tok)


def _llamacpp(cfg: RetokConfig, new_tok: Any) -> dict[str, Any]:

    old_tok = load_tokenizer(
        resolve_model(cfg.model, cfg.cache), trust_remote_code=cfg.model.trust_remote_code
    )
    try:
        family: str | None = detect_family(new_tok.backend_tokenizer)
    except RetokError:
        family = None
    advice = gguf_advice(old_tok, new_tok, _old_pre_name(cfg), family)
    advice["old_tokenizer_len"] = len(old_tok)
    return advice


def export_model(cfg: RetokConfig, out: Path) -> dict[str, Any]:
    """Write the final folder into ``out`` and check it; RetokError if the check fails."""
    src = export_source(cfg)
    if not (src / "config.json").is_file():
        raise RetokError(f"{src} has no config.json; rerun the stage that made it")
    out.mkdir(parents=True, exist_ok=True)
    print(f"retok: export {src} -> {out}", flush=True)
    weights = stream_weights(src, out, parse_size(cfg.export.max_shard_size), cfg.export.dtype)
    tok, conf, changes = _write_configs(cfg, src, out)
    llama = _llamacpp(cfg, tok)
    checks = check_folder(out)
    _refuse_failed(checks, "the exported folder")
    name = _model_name(cfg)
    gguf, gguf_error = _gguf_part(cfg, out, tok, conf, llama, name, checks)
    (out / "README.md").write_text(
        model_card(cfg, src, name, tok, conf, llama, checks, eval_table(cfg, src), gguf), encoding="utf-8"
    )
    report = {
        "source": str(src),
        "model_name": name,
        "weights": weights,
        "dtype": cfg.export.dtype,
        "max_shard_size": cfg.export.max_shard_size,
        "id_changes": changes,
        # `retok check` fails a folder whose chat template went missing after export.
        "chat_template": bool(getattr(tok, "chat_template", None)),
        "llama_cpp": llama,
        "gguf": gguf,
        "checks": [asdict(c) for c in checks],
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_checks(checks)
    if gguf_error is not None:
        raise PartialOutput(f"{gguf_error} (the Hugging Face folder was written and passes its checks)")
    return report


def _write_configs(cfg: RetokConfig, src: Path, out: Path) -> tuple[Any, dict[str, Any], list[str]]:
    """config.json and generation_config.json with the special ids the tokenizer's roles say (and
    export.dtype), and the tokenizer files: (the tokenizer, config.json's dict, what changed)."""
    changes: list[str] = []
    tok = load_tokenizer(src, trust_remote_code=cfg.model.trust_remote_code)
    conf = json.loads((src / "config.json").read_text())
    if cfg.export.dtype != "keep":
        for key in ("dtype", "torch_dtype"):
            if key in conf or key == "dtype":
                conf[key] = cfg.export.dtype
    changes += sync_special_ids(conf, tok, "config.json")
    gen_path = src / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None and conf.get(key) is not None:
            gen[key] = conf[key]
    changes += sync_special_ids(gen, tok, "generation_config.json")
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(str(out))
    for line in changes:
        print(f"retok: export: {line}", flush=True)
    return tok, conf, changes


def _refuse_failed(checks: list, what: str) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        print_checks(checks)
        raise RetokError(
            f"export: {what} fails `retok check`: " + "; ".join(f"{c.name}: {c.detail}" for c in failed)
        )


def _gguf_part(
    cfg: RetokConfig,
    out: Path,
    tok: Any,
    conf: dict[str, Any],
    llama: dict[str, Any],
    name: str,
    checks: list,
) -> tuple[dict[str, Any], RetokError | None]:
    """export.gguf: the GGUF written and checked (its checks appended to ``checks``), or why it could not be
    made (the folder stays; the stage then ends as a partial output)."""
    if cfg.export.gguf == "off":
        return {"written": False, "reason": "export.gguf: off"}, None
    try:
        info, gguf_checks = export_gguf(cfg, out, tok, conf, llama, name)
    except RetokError as e:
        return {"written": False, "reason": str(e)}, e
    _refuse_failed(gguf_checks, "the GGUF")
    checks += gguf_checks
    return {"written": True, **info}, None
