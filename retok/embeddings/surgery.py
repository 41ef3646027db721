"""init-embeddings: the original model + ``output_dir/tokenizer/`` -> ``output_dir/model-init/``.

    retok init-embeddings --config configs/smollm2-zh.yaml

Reads and writes safetensors shards tensor by tensor: only the input embedding and the LM head are ever
held in memory (one at a time), every other tensor is copied byte for byte from the old shard into the new
one, so peak memory grows with vocab x hidden, not with the number of layers (an 8B model needs ~2 GB, not
32). The rows of the new matrices come from the TokenMap (mapping.py) and the pure functions of
methods.py. The folder it writes loads with plain ``AutoModelForCausalLM`` / ``AutoTokenizer``.

Sections: finding the embedding and head -> writing the matrices -> configs and
tokenizer files -> the stage entry point.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm

from retok.config import RetokConfig
from retok.embeddings import methods
from retok.embeddings.mapping import (
    COPY,
    FALLBACK,
    PADDING,
    TokenMap,
    build_token_map,
    pick_pad_donor,
)
from retok.errors import RetokError
from retok.safetensors_io import (
    DTYPES,
    INDEX_FILE,
    OutTensor,
    TensorInfo,
    copy_range,
    load_tensor,
    read_checkpoint,
    read_header,
    tensor_bytes,
    write_all,
    write_shard,
)

TESTED_ARCHITECTURES = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM"
TOKENIZER_META = "retok_tokenizer.json"

# ============================================================================ finding the embedding and head


@dataclass
class IoNames:
    """Checkpoint keys of the input embedding and LM head."""

    embed: str
    head: str | None  # None: tied model without a head tensor in the checkpoint
    head_to_write: str | None  # key of the head tensor in the new checkpoint (None: tied, no head tensor)
    tied: bool  # the old model ties them
    separate: bool  # the new model has its own head rows (untied, or a tied model untied by init.untie_head)


def _match_key(name: str, keys: set[str]) -> str | None:
    """The checkpoint key of a module weight: exact, else the one key that ends with it (a wrapper prefix
    such as ``language_model.``), else the one key it ends with (a prefix the checkpoint dropped)."""
    if name in keys:
        return name
    longer = [k for k in keys if k.endswith("." + name)]
    if len(longer) == 1:
        return longer[0]
    shorter = [k for k in keys if name.endswith("." + k)]
    if len(shorter) == 1:
        return shorter[0]
    return None


def find_io_names(
    model_dir: Path, keys: set[str], *, untie: bool, trust_remote_code: bool = False
) -> IoNames:
    """Instantiate the architecture on the meta device (no memory, no weights) and ask it which modules are
    the input embedding and the LM head; match their weight names to the checkpoint's keys."""
    from transformers import AutoConfig, AutoModelForCausalLM

    unknown = (
        f"retok cannot find the input embedding / LM head of the model in {model_dir}; it finds them through "
        f"transformers' get_input_embeddings()/get_output_embeddings() and is tested on {TESTED_ARCHITECTURES}"
    )
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RetokError(f"{unknown} (loading its architecture failed: {e.__class__.__name__})") from None
    names = {id(m): n for n, m in model.named_modules()}
    emb_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    if emb_mod is None or id(emb_mod) not in names or not hasattr(emb_mod, "weight"):
        raise RetokError(unknown)
    embed = _match_key(names[id(emb_mod)] + ".weight", keys)
    if embed is None:
        raise RetokError(f"{unknown} (no checkpoint key matches {names[id(emb_mod)]}.weight)")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_name = names[id(head_mod)] + ".weight" if head_mod is not None and id(head_mod) in names else None
    head = _match_key(head_name, keys) if head_name else None
    if not tied and head is None:
        raise RetokError(
            f"{unknown} (the model is untied but no checkpoint key matches its LM head {head_name})"
        )
    if head == embed:
        head = None
    if tied and not untie:
        return IoNames(embed, head, head, True, False)
    if head is None:
        # Untying a tied model without a head tensor: name it as the architecture does, with the same
        # wrapper prefix the checkpoint puts in front of the embedding.
        if head_name is None:
            raise RetokError(f"{unknown} (the architecture has no separate LM head, so it cannot be untied)")
        emb_module_name = names[id(emb_mod)] + ".weight"
        prefix = embed[: -len(emb_module_name)] if embed.endswith(emb_module_name) else ""
        return IoNames(embed, None, prefix + head_name, tied, True)
    return IoNames(embed, head, head, tied, True)


# ============================================================================ the new matrices


@dataclass
class Plan:
    """Everything that decides the new rows of both matrices."""

    tmap: TokenMap
    method: methods.Method
    head_method: methods.Method
    decay: float
    seed: int
    head_shift: torch.Tensor | None = None  # subtracted from new tokens' head rows (methods.shift_vector)


def matrix_chunks(
    old: torch.Tensor, plan: Plan, side: methods.Side, chunk_rows: int | None = None
) -> Iterator[torch.Tensor]:
    """The new matrix built from ``old`` for ``side`` ("input" or "head"), in row chunks, in order."""
    tmap = plan.tmap
    method = plan.method if side == "input" else plan.head_method
    if (tmap.source[tmap.ids(PADDING)] < 0).any():
        raise AssertionError("padding rows need a donor: call pick_pad_donor first")
    chunk_rows = chunk_rows or max(256, (1 << 24) // max(1, old.shape[1]))
    # Statistics over every old row cost a pass over the matrix: only when a row needs them.
    fallback = methods.row_mean(old) if len(tmap.ids(FALLBACK)) else None
    stats = (methods.row_mean(old), methods.row_std(old)) if method == "random" else None
    gen = torch.Generator().manual_seed(plan.seed + (0 if side == "input" else 1))
    shift = plan.head_shift if side == "head" else None
    for start in range(0, tmap.n_rows, chunk_rows):
        end = min(tmap.n_rows, start + chunk_rows)
        yield methods.rows_for_chunk(
            old,
            tmap.kind,
            tmap.source,
            tmap.pieces,
            start,
            end,
            method=method,
            side=side,
            decay=plan.decay,
            fallback=fallback,
            stats=stats,
            generator=gen,
            shift=shift,
        )


def build_matrix(old: torch.Tensor, plan: Plan, side: methods.Side) -> torch.Tensor:
    """The whole new matrix in memory (for in-process comparisons on small models)."""
    return torch.cat(list(matrix_chunks(old, plan, side)))


def write_model(
    model_dir: Path,
    out: Path,
    infos: dict[str, TensorInfo],
    files: list[str],
    index_meta: dict[str, Any] | None,
    names: IoNames,
    plan: Plan,
) -> dict[str, Any]:
    """Write every shard of the new checkpoint (same shard names) and the index. Returns counts of bytes."""
    n_rows = plan.tmap.n_rows
    embed_info = infos[names.embed]
    d = embed_info.shape[1]
    # What each rebuilt tensor is made of: (source key, side).
    rebuilt: dict[str, tuple[str, methods.Side]] = {names.embed: (names.embed, "input")}
    if names.head_to_write is not None:
        if names.separate:
            rebuilt[names.head_to_write] = (names.head or names.embed, "head")
        else:  # tied, with a (redundant) head tensor in the checkpoint: it IS the input matrix
            rebuilt[names.head_to_write] = (names.embed, "input")

    cache: dict[str, torch.Tensor] = {}

    def source(key: str) -> torch.Tensor:
        if key not in cache:
            cache.clear()  # at most one old matrix in memory at a time
            cache[key] = load_tensor(infos[key])
        return cache[key]

    def producer(key: str) -> Callable[[BinaryIO, Callable[[int], None]], int]:
        if key not in rebuilt:
            return lambda out, progress: copy_range(infos[key], out, progress)
        src, side = rebuilt[key]

        def write(out: BinaryIO, progress: Callable[[int], None]) -> int:
            n = 0
            for chunk in matrix_chunks(source(src), plan, side):
                data = tensor_bytes(chunk)
                write_all(out, data)
                n += data.nbytes
                progress(data.nbytes)
            return n

        return write

    # Shard contents: the old order, with the new head (untying a model that had none) after the embedding.
    per_file: dict[str, list[str]] = {f: [] for f in files}
    for key, info in sorted(infos.items(), key=lambda kv: (files.index(kv[1].file.name), kv[1].start)):
        per_file[info.file.name].append(key)
    extra_head = names.head_to_write is not None and names.head_to_write not in infos
    if extra_head:
        keys = per_file[embed_info.file.name]
        keys.insert(keys.index(names.embed) + 1, names.head_to_write)

    total = 0
    for keys in per_file.values():
        for key in keys:
            if key in rebuilt:
                total += n_rows * d * DTYPES[infos[rebuilt[key][0]].dtype].itemsize
            else:
                total += infos[key].end - infos[key].start
    weight_map: dict[str, str] = {}
    with tqdm(total=total, desc="write shards", unit="B", unit_scale=True, mininterval=1.0) as bar:
        for fname, keys in per_file.items():
            header, _ = read_header(model_dir / fname)
            shard_meta = header.get("__metadata__", {"format": "pt"})
            tensors = []
            for key in keys:
                if key in rebuilt:
                    src = rebuilt[key][0]
                    tensors.append(OutTensor(key, infos[src].dtype, [n_rows, d], producer(key)))
                else:
                    info = infos[key]
                    tensors.append(OutTensor(key, info.dtype, info.shape, producer(key)))
                weight_map[key] = fname
            write_shard(out / fname, tensors, shard_meta, bar)
            cache.clear()
    if index_meta is not None:
        meta = dict(index_meta)
        meta["total_size"] = total
        index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {"total_bytes": total, "shards": files, "rebuilt": sorted(rebuilt)}


# ============================================================================ configs and tokenizer files

# The HF tokenizer files of the tokenizer folder (not build-tokenizer's reports), plus its metadata.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    TOKENIZER_META,
)
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


# ============================================================================ head-shift calibration


def fit_head_shift(cfg: RetokConfig, model_dir: Path, old_hf: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The vector subtracted from new tokens' head rows (``init.head_shift`` / ``init.head_shift_outside``).

    Runs the ORIGINAL model once over ``init.calibration_bytes`` of data.train (split over its domains) and
    fits two directions of the final hidden space on those states (methods.fit_direction): ``b_all`` with
    ``h . b_all ~= 1`` everywhere, and ``b_out`` with ``h . b_out ~= 1`` in domains outside
    ``tokenizer.domains`` (the text the new tokens were learned for) and ``~= 0`` inside them. This is the
    only part of the stage that runs the whole model.
    """
    from retok.data import domains as domain_names
    from retok.data import load_domains
    from retok.sources import load_model

    init = cfg.init
    if not cfg.data.train:
        raise RetokError("init.head_shift / init.head_shift_outside need data.train text to fit the shift on")
    names = domain_names(cfg.data.train)
    target = set(cfg.tokenizer.domains or names)
    if init.head_shift_outside and not (set(names) - target and set(names) & target):
        raise RetokError(
            "init.head_shift_outside needs tokenizer.domains (the domains the new tokens are for) and at least one "
            f"other data.train domain to tell them apart (data.train has {names}); set both, or use init.head_shift"
        )
    docs = load_domains(cfg.data.train, "data.train", max(1000, init.calibration_bytes // len(names)))
    model = load_model(
        model_dir,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
    )
    device = next(model.parameters()).device
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    window = min(cfg.eval.window, 1024)
    states: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, texts in docs.items():
            parts = []
            for doc in tqdm(texts, desc=f"fit head shift on {name}", unit="doc", leave=False):
                ids = old_hf(doc, add_special_tokens=False)["input_ids"]
                for s in range(0, len(ids), window):
                    x = torch.tensor(ids[s : s + window], device=device)[None]
                    if x.shape[1] >= 2:
                        parts.append(body(input_ids=x).last_hidden_state[0].float().cpu())
            if parts:
                states[name] = torch.cat(parts)
    del model
    if not states:
        raise RetokError("init.head_shift: data.train gave no text to fit the shift on")
    hidden = torch.cat(list(states.values()))
    outside = torch.cat([torch.full((len(h),), float(n not in target)) for n, h in states.items()])
    b_all, mse_all = methods.fit_direction(hidden)
    directions = [(b_all, init.head_shift)]
    info: dict[str, Any] = {
        "positions": {n: int(len(h)) for n, h in states.items()},
        "target_domains": sorted(target),
        "fit_mse_all": round(mse_all, 5),
    }
    if init.head_shift_outside:
        b_out, mse_out = methods.fit_direction(hidden, outside)
        directions.append((b_out, init.head_shift_outside))
        info["fit_mse_outside"] = round(mse_out, 5)
    vec = methods.shift_vector(directions)
    # The logit drop each domain's text actually gets (mean over its calibration positions).
    info["logit_drop_nats"] = {n: round(float((h @ vec).mean()), 3) for n, h in states.items()}
    return vec, info


# ============================================================================ the stage


def read_tokenizer_meta(tok_dir: Path) -> dict[str, Any]:
    path = tok_dir / TOKENIZER_META
    if not path.is_file():
        raise RetokError(
            f"{tok_dir} has no {TOKENIZER_META}, so it was not made by `retok build-tokenizer`; run it with this config"
        )
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        raise RetokError(
            f"{path} is not valid JSON; rebuild the tokenizer with `retok build-tokenizer`"
        ) from None
    if not isinstance(meta, dict):
        raise RetokError(f"{path} is not a JSON object; rebuild the tokenizer with `retok build-tokenizer`")
    return meta


def _check_init_config(cfg: RetokConfig, names: IoNames) -> None:
    init = cfg.init
    if names.tied and not names.separate:
        if init.head_method is not None and init.head_method != init.method:
            raise RetokError(
                "init.head_method: the model ties its LM head to the input embedding, so head rows ARE input rows; "
                "set init.untie_head: true to give the head its own rows, or drop init.head_method"
            )
        if init.head_shift or init.head_shift_outside:
            raise RetokError(
                "init.head_shift: the model ties its LM head to the input embedding, so shifting head rows would "
                "shift input rows too; set init.untie_head: true"
            )


def init_embeddings(cfg: RetokConfig, out: Path) -> dict[str, Any]:
    """Write ``out`` (a temporary folder that the caller renames to ``output_dir/model-init``): the model
    with the new tokenizer's embedding and LM head, its configs and tokenizer files, and the report.
    Returns the report (the JSON of init_report.json)."""
    from retok.embeddings.report import examples, pieces_histogram, write_report
    from retok.sources import load_tokenizer, resolve_model
    from retok.stage import require_stage

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise RetokError(f"{out} is not empty; init-embeddings writes into a fresh folder")
    model_dir = resolve_model(cfg.model, cfg.cache)
    tok_dir = require_stage(cfg, "tokenizer", "init-embeddings")
    meta = read_tokenizer_meta(tok_dir)
    old_hf = load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    new_hf = load_tokenizer(tok_dir)

    # ---- where the two matrices are, and what each new row is made of
    infos, files, index_meta = read_checkpoint(model_dir)
    names = find_io_names(
        model_dir, set(infos), untie=cfg.init.untie_head, trust_remote_code=cfg.model.trust_remote_code
    )
    _check_init_config(cfg, names)
    emb = infos[names.embed]
    if len(emb.shape) != 2:
        raise RetokError(f"{emb.file.name}: {names.embed} has shape {emb.shape}, not [rows, hidden]")
    if names.head is not None and infos[names.head].shape != emb.shape:
        raise RetokError(
            f"{names.head} has shape {infos[names.head].shape} but {names.embed} has {emb.shape}; cannot rebuild them together"
        )
    tmap = build_token_map(
        old_hf,
        new_hf,
        old_rows=emb.shape[0],
        pad_to_multiple_of=cfg.init.pad_to_multiple_of,
        where=str(tok_dir),
        meta=meta,
        progress=True,
    )
    old_head = load_tensor(infos[names.head or names.embed])
    pick_pad_donor(tmap, old_head)
    del old_head

    plan = Plan(
        tmap,
        cfg.init.method,
        (cfg.init.head_method or cfg.init.method) if names.separate else cfg.init.method,
        cfg.init.weighted_decay,
        cfg.seed,
    )
    calibration = None
    if (cfg.init.head_shift or cfg.init.head_shift_outside) and names.separate:
        plan.head_shift, calibration = fit_head_shift(cfg, model_dir, old_hf)

    # ---- shards, configs, tokenizer files
    written = write_model(model_dir, out, infos, files, index_meta, names, plan)
    ids = write_configs(model_dir, out, tmap, names)
    tok_files = copy_tokenizer_files(tok_dir, out, old_hf)
    checks = verify_folder(out, tmap)
    if not checks["ok"]:
        print("retok: warning: " + "; ".join(checks["problems"]), flush=True)

    counts = tmap.counts()
    report: dict[str, Any] = {
        **counts,
        "model": str(model_dir),
        "tokenizer": str(tok_dir),
        "old_rows": emb.shape[0],
        "new_rows": tmap.n_rows,
        "new_tokens": tmap.n_tokens,
        "hidden": emb.shape[1],
        "dtype": emb.dtype,
        "pad_donor": tmap.pad_donor,
        "padding_ids": tmap.padding_ids,
        "init": {
            "method": plan.method,
            "head_method": plan.head_method,
            "weighted_decay": plan.decay,
            "separate_head": names.separate,
            "tied_before": names.tied,
            "head_shift": cfg.init.head_shift if names.separate else 0.0,
            "head_shift_outside": cfg.init.head_shift_outside if names.separate else 0.0,
            "pad_to_multiple_of": cfg.init.pad_to_multiple_of,
        },
        "calibration": calibration,
        "tensors": {"embed": names.embed, "head": names.head_to_write, **written},
        "ids": ids,
        "tokenizer_files": tok_files,
        "checks": checks,
        "pieces_histogram": pieces_histogram(tmap),
        "examples": examples(tmap, old_hf.backend_tokenizer, new_hf.backend_tokenizer),
        "fallback_examples": {str(k): v for k, v in list(tmap.fallback_reason.items())[:5]},
    }
    if cfg.init.eval_bpb and cfg.data.eval:
        from retok.embeddings.report import measure_bpb

        report.update(measure_bpb(cfg, model_dir, out, old_hf, new_hf, plan, names))
    elif cfg.init.eval_bpb:
        report["eval_note"] = "No held-out BPB: data.eval is empty."
    write_report(out, report)
    print(
        f"retok: init-embeddings: {counts['copied']} copied, {counts['special']} special, {counts['averaged']} averaged, "
        f"{counts['fallback']} fallback, {counts['padding']} padding rows -> {tmap.n_rows} rows",
        flush=True,
    )
    return report
