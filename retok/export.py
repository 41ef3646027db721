"""export and check: the final Hugging Face folder, and a checker for any model folder.

    retok export --config configs/demo.yaml
    retok check runs/demo/export

``export`` streams the weights of the latest model stage (safetensors in, safetensors out, one output shard
in memory at a time, optional dtype cast), writes config.json, generation_config.json and the tokenizer with
every special-token id agreeing, a model card (README.md) with the resolved config, the eval table and the
llama.cpp conversion line, then runs ``check`` on its own output and fails if anything is wrong.

``check`` needs nothing from retok to pass: it loads the folder with plain transformers and asks what a user
or a server would run into (head rows, tied flag, special tokens, chat template, round trip, greedy decoding).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retok.config import RetokConfig, to_yaml
from retok.errors import RetokError
from retok.safetensors_io import DTYPE_BYTES, INDEX_FILE, TensorInfo, tensor_table

REPORT_JSON = "retok_export.json"

# A string that exercises every script family retok users care about, whitespace runs and digits.
ROUND_TRIP_TEXT = (
    "Hello, world! Tokenizers split 3.14159 and 2024-12-31 into pieces.\n"
    "机器学习是人工智能的一个分支，语言模型预测下一个词元。\n"
    "Русский текст, Ελληνικά, العربية, हिन्दी, 日本語のテキスト, 한국어 문장 🙂🚀\n"
    "def f(x):\n\treturn x ** 2  # two  spaces\n"
)


# ----------------------------------------------------------------------------------------- safetensors


def parse_size(value: str | int, key: str = "export.max_shard_size") -> int:
    """'2GB' -> 2e9, '500MB', '1GiB' -> 2**30, an int stays an int (bytes)."""
    if isinstance(value, int):
        if value <= 0:
            raise RetokError(f"{key}: must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise RetokError(f"{key}: {value!r} is not a size; write e.g. 500MB, 2GB or 1GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}.get(unit) or {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }.get(unit)
    if scale is None:
        raise RetokError(f"{key}: unknown unit in {value!r}; use KB, MB, GB (or KiB, MiB, GiB)")
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise RetokError(f"{key}: must be positive, got {value!r}")
    return size


_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it (sharded with an index, or single files)."""
    return {name: info.file for name, info in tensor_table(folder).items()}


def plan_shards(folder: Path, max_bytes: int, dtype: str = "keep") -> list[list[tuple[str, Path, int]]]:
    """Group tensors, in name order, into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    table = tensor_table(folder)
    if not table:
        raise RetokError(f"{folder} holds no *.safetensors weights to export")
    shards: list[list[tuple[str, Path, int]]] = [[]]
    used = 0
    for name in sorted(table):
        info = table[name]
        size = info.end - info.start
        if dtype in _ST_DTYPE and _is_float(info.dtype):
            size = size // DTYPE_BYTES[info.dtype] * DTYPE_BYTES[_ST_DTYPE[dtype]]
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, info.file, size))
        used += size
    return shards


def _is_float(st_dtype: str) -> bool:
    return st_dtype in ("F64", "F32", "F16", "BF16")


def stream_weights(src: Path, out: Path, max_bytes: int, dtype: str = "keep") -> dict[str, Any]:
    """Copy every tensor of ``src`` into shards in ``out``, one output shard in memory at a time."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    target = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    shards = plan_shards(src, max_bytes, dtype)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    handles: dict[Path, Any] = {}
    try:
        for shard, fname in tqdm(list(zip(shards, names, strict=True)), desc="export shards", unit="shard"):
            tensors = {}
            for name, path, _ in shard:
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt")
                t = handles[path].get_tensor(name)
                if target is not None and t.is_floating_point():
                    t = t.to(target)
                tensors[name] = t.contiguous()
                total += t.numel() * t.element_size()
                weight_map[name] = fname
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            del tensors
    finally:
        handles.clear()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {"files": names, "tensors": len(weight_map), "total_bytes": total}


# --------------------------------------------------------------------------------------------- export


def export_source(cfg: RetokConfig) -> Path:
    """The stage folder to export: export.source, or (auto) model-trained, else model-init."""
    from retok.stage import require_stage

    if cfg.export.source != "auto":
        return require_stage(cfg, cfg.export.source, "export")
    for stage in ("model-trained", "model-init"):
        if cfg.stage_dir(stage).is_dir():
            return require_stage(cfg, stage, "export")
    raise RetokError(
        f"export needs a model: neither {cfg.stage_dir('model-trained')} nor {cfg.stage_dir('model-init')} exists; "
        "run `retok init-embeddings` (and `retok train-io`) first"
    )


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


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
        have_ids = _ids(have)
        if role == "eos" and isinstance(have, list) and want in have_ids and set(have_ids) <= special_ids:
            continue
        if have_ids != [want]:
            conf[key] = want
            changes.append(f"{where} {key}: {have} -> {want}")
    return changes


def _model_name(cfg: RetokConfig) -> str:
    if cfg.export.model_name:
        return cfg.export.model_name
    stem = Path(cfg.model.path.rstrip("/")).name
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    return f"{stem}-retok"


def _old_pre_name(cfg: RetokConfig) -> str | None:
    from retok.config import expand
    from retok.sources import read_gguf_metadata

    if cfg.export.gguf_pre:
        return cfg.export.gguf_pre
    path = Path(expand(cfg.model.path))
    if path.suffix.lower() == ".gguf" and path.is_file():
        pre = read_gguf_metadata(path).get("tokenizer.ggml.pre")
        return str(pre) if pre else None
    return None


def _llamacpp(cfg: RetokConfig, new_tok: Any) -> dict[str, Any]:
    from retok.llamacpp import gguf_advice
    from retok.sources import load_tokenizer, resolve_model
    from retok.tokens import detect_family

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


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~")) and not s.endswith(".gguf")


def _model_card(
    cfg: RetokConfig,
    src: Path,
    name: str,
    tok: Any,
    conf: dict[str, Any],
    llama: dict[str, Any],
    checks: list[Check],
) -> str:
    from retok.evaluate import markdown_table

    head = [
        "---",
        "library_name: transformers",
        "tags:",
        "- retok",
        "- tokenizer-extension",
    ]
    if _looks_like_hub_id(cfg.model.path):
        head.append(f"base_model: {cfg.model.path}")
    head.append("---")
    old_len = llama.get("old_tokenizer_len")
    parts = [
        *head,
        "",
        f"# {name}",
        "",
        f"`{cfg.model.path}` with its tokenizer replaced by [retok](https://arxiv.org/abs/2410.04335) (ReTok): "
        f"{old_len} -> {len(tok)} tokens, embedding and LM head re-initialised (`init.method: {cfg.init.method}`) "
        + (
            f"and trained with the body frozen (`train.max_steps: {cfg.train.max_steps}`). "
            if src.name == "model-trained"
            else "and not trained (exported from model-init). "
        )
        + f"tie_word_embeddings: {conf.get('tie_word_embeddings')}, vocab_size (rows): {conf.get('vocab_size')}.",
        "",
        "## Evaluation",
        "",
    ]
    report = cfg.stage_dir("eval") / "report.json"
    if report.is_file():
        try:
            ev = json.loads(report.read_text(encoding="utf-8"))
            env = ev.get("environment", {})
            parts += [
                "Old vs new model on the same held-out text (`retok eval-speed`): bytes per token, bits per byte, "
                "and decoding bytes/s on the same reference continuation "
                f"({env.get('device')}, {env.get('dtype')}, {env.get('threads')} threads; new = "
                f"`{ev.get('candidate', {}).get('path')}`).",
                "",
                markdown_table(ev),
            ]
        except (ValueError, KeyError, TypeError) as e:
            parts.append(f"(eval/report.json could not be read: {e.__class__.__name__})")
    else:
        parts.append("Not measured: run `retok eval-speed` before `retok export` to embed the table here.")
    parts += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "```",
        "",
        "## llama.cpp / GGUF",
        "",
        f"- chkhsh of the old tokenizer: `{llama['old_chkhsh']}`"
        + (f" (llama.cpp name `{llama['pre_name']}`)" if llama.get("pre_name") else ""),
        f"- chkhsh of the new tokenizer: `{llama['new_chkhsh']}`",
        f"- normalizer and pre-tokenizer unchanged: {llama['pre_tokenizer_unchanged']}",
        "",
        llama["explanation"],
    ]
    if llama.get("mapping_line"):
        parts += ["", "```python", llama["mapping_line"], "```"]
    parts += ["", "## Checks (`retok check`)", ""]
    parts += [f"- {'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in checks]
    parts += ["", "## retok config", "", "```yaml", to_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(parts)


def export_model(cfg: RetokConfig, out: Path) -> dict[str, Any]:
    """Write the final folder into ``out`` and check it; RetokError if the check fails."""
    from retok.sources import load_tokenizer

    src = export_source(cfg)
    max_bytes = parse_size(cfg.export.max_shard_size)
    if not (src / "config.json").is_file():
        raise RetokError(f"{src} has no config.json; rerun the stage that made it")
    out.mkdir(parents=True, exist_ok=True)
    print(f"retok: export {src} -> {out}", flush=True)

    weights = stream_weights(src, out, max_bytes, cfg.export.dtype)

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

    llama = _llamacpp(cfg, tok)
    checks = check_folder(out)
    failed = [c for c in checks if not c.ok]
    if failed:
        print_checks(checks)
        raise RetokError(
            "export: the exported folder fails `retok check`: "
            + "; ".join(f"{c.name}: {c.detail}" for c in failed)
        )
    name = _model_name(cfg)
    (out / "README.md").write_text(_model_card(cfg, src, name, tok, conf, llama, checks), encoding="utf-8")
    report = {
        "source": str(src),
        "model_name": name,
        "weights": weights,
        "dtype": cfg.export.dtype,
        "max_shard_size": cfg.export.max_shard_size,
        "id_changes": changes,
        "llama_cpp": llama,
        "checks": [asdict(c) for c in checks],
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_checks(checks)
    return report


# ---------------------------------------------------------------------------------------------- check


@dataclass
class Check:
    """One finding of ``retok check``."""

    name: str
    ok: bool
    detail: str


class _Ctx:
    """What the checks share: the folder, its JSON files, the tokenizer and model once loaded."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        gen = folder / "generation_config.json"
        self.gen = json.loads(gen.read_text()) if gen.is_file() else None
        tj = folder / "tokenizer.json"
        self.tokenizer_json = json.loads(tj.read_text(encoding="utf-8")) if tj.is_file() else None
        self.table: dict[str, TensorInfo] = tensor_table(folder)
        self.tok: Any = None
        self.model: Any = None

    def rows(self, name: str | None) -> int | None:
        info = self.table.get(name) if name else None
        return info.shape[0] if info is not None else None

    def tensor(self, name: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(self.table[name].file), framework="pt") as f:
            return f.get_tensor(name)

    def text_config(self) -> dict[str, Any]:
        # Multimodal configs keep the language model's vocab and ids in text_config.
        return self.config.get("text_config") or self.config


_EMBED_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")


def _embedding_keys(ctx: _Ctx) -> tuple[str | None, str | None]:
    """Checkpoint names of the input embedding and the LM head (from the loaded model when there is one)."""
    emb = head = None
    if ctx.model is not None:
        inp, outp = ctx.model.get_input_embeddings(), ctx.model.get_output_embeddings()
        for name, mod in ctx.model.named_modules():
            if mod is inp and emb is None:
                emb = f"{name}.weight"
            if mod is outp and head is None:
                head = f"{name}.weight"
    if emb not in ctx.table:
        emb = next((n for n in sorted(ctx.table) if n.endswith(_EMBED_SUFFIXES)), None)
    if head not in ctx.table:
        head = next((n for n in _HEAD_NAMES if n in ctx.table), head)
    return emb, head


def _check_files(ctx: _Ctx) -> Check:
    problems = []
    if not ctx.table:
        problems.append("no *.safetensors weights")
    if ctx.tokenizer_json is None:
        problems.append("no tokenizer.json (fast tokenizer)")
    if "auto_map" in ctx.config:
        problems.append("config.json has auto_map: loading needs trust_remote_code")
    if ctx.gen is None:
        problems.append("no generation_config.json")
    pickles = [p.name for p in ctx.folder.glob("*.bin")]
    if pickles and not ctx.table:
        problems.append(f"only pickled weights ({pickles[0]})")
    if problems:
        return Check("files", False, "; ".join(problems))
    n = len(set(i.file for i in ctx.table.values()))
    return Check(
        "files", True, f"config.json, generation_config.json, tokenizer.json, {n} safetensors file(s)"
    )


def _check_tokenizer_loads(ctx: _Ctx) -> Check:
    from transformers import AutoTokenizer

    try:
        ctx.tok = AutoTokenizer.from_pretrained(str(ctx.folder))
    except Exception as e:
        return Check(
            "tokenizer loads", False, f"AutoTokenizer failed: {e.__class__.__name__}: {str(e)[:200]}"
        )
    if getattr(ctx.tok, "backend_tokenizer", None) is None:
        return Check(
            "tokenizer loads", False, "AutoTokenizer gave a slow tokenizer (no tokenizer.json backend)"
        )
    return Check("tokenizer loads", True, f"{type(ctx.tok).__name__}, {len(ctx.tok)} tokens")


def _check_model_loads(ctx: _Ctx) -> Check:
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(ctx.folder), dtype="auto", output_loading_info=True, use_safetensors=True
        )
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        return Check("model loads", False, f"AutoModelForCausalLM failed: {e.__class__.__name__}: {msg}")
    ctx.model = model.eval()
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        what = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:4]))}" for k, v in bad.items())
        return Check(
            "model loads", False, f"{type(model).__name__} loaded with {what} (those weights are random)"
        )
    n = sum(p.numel() for p in model.parameters())
    return Check(
        "model loads", True, f"{type(model).__name__}, {n / 1e6:.1f}M parameters, every weight from the files"
    )


def _max_token_id(ctx: _Ctx) -> int:
    ids = list(ctx.tok.get_vocab().values()) + list(ctx.tok.added_tokens_decoder)
    return max(ids) if ids else -1


def _check_vocab(ctx: _Ctx) -> Check:
    conf = ctx.text_config()
    vocab = conf.get("vocab_size")
    emb, head = _embedding_keys(ctx)
    rows = ctx.rows(emb)
    head_rows = ctx.rows(head)
    n_tok = len(ctx.tok) if ctx.tok is not None else None
    problems = []
    if vocab is None:
        problems.append("config.json has no vocab_size")
    if rows is not None and vocab is not None and vocab != rows:
        problems.append(f"config.json vocab_size {vocab} but the embedding ({emb}) has {rows} rows")
    if head_rows is not None and rows is not None and head_rows != rows:
        problems.append(f"the LM head ({head}) has {head_rows} rows but the embedding has {rows}")
    if n_tok is not None:
        for what, value in (("config.json vocab_size", vocab), ("the embedding", rows)):
            if value is not None and value < n_tok:
                problems.append(
                    f"{what} ({value}) is smaller than the tokenizer ({n_tok} tokens): ids past it crash"
                )
        top = _max_token_id(ctx)
        limit = min(v for v in (vocab, rows) if v is not None) if (vocab or rows) else None
        if (
            limit is not None
            and top >= limit
            and not any("smaller than the tokenizer" in p for p in problems)
        ):
            problems.append(f"the tokenizer has id {top}, past the {limit} embedding rows")
    if problems:
        return Check("vocab size", False, "; ".join(problems))
    pad = (rows or 0) - (n_tok or 0)
    return Check(
        "vocab size",
        True,
        f"{rows} embedding rows >= {n_tok} tokens" + (f" ({pad} padding rows)" if pad else ""),
    )


def _check_tied(ctx: _Ctx) -> Check:
    import torch

    conf = ctx.text_config()
    if ctx.model is not None:
        flag = bool(getattr(ctx.model.config.get_text_config(), "tie_word_embeddings", False))
    else:
        flag = bool(conf.get("tie_word_embeddings", ctx.config.get("tie_word_embeddings", True)))
    emb, head = _embedding_keys(ctx)
    has_head = head is not None and head in ctx.table
    if flag and has_head and emb in ctx.table:
        if not torch.equal(ctx.tensor(head), ctx.tensor(emb)):
            return Check(
                "tied weights",
                False,
                f"tie_word_embeddings is true but {head} in the files differs from {emb}: loading ties them and "
                "throws the trained head away; set tie_word_embeddings: false",
            )
    if not flag and not has_head:
        return Check(
            "tied weights",
            False,
            "tie_word_embeddings is false but the files hold no LM head (the weights are tied): the head loads "
            "randomly initialised; set tie_word_embeddings: true",
        )
    if ctx.model is not None:
        inp, outp = ctx.model.get_input_embeddings(), ctx.model.get_output_embeddings()
        shared = outp is not None and outp.weight.data_ptr() == inp.weight.data_ptr()
        if shared != flag:
            return Check(
                "tied weights",
                False,
                f"tie_word_embeddings is {str(flag).lower()} but the loaded model's head is "
                f"{'shared with' if shared else 'separate from'} the embedding",
            )
    return Check("tied weights", True, "tied (one matrix)" if flag else f"untied (separate {head})")


def _raw_tokenizer(ctx: _Ctx) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(ctx.folder / "tokenizer.json"))


def _special_tokens(tok: Any) -> dict[str, int]:
    """content -> id of every special token: roles, extra specials and added tokens marked special."""
    out = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    for i, added in tok.added_tokens_decoder.items():
        if added.special:
            out[added.content] = i
    return out


def _post_processor_ids(node: dict[str, Any] | None) -> list[tuple[str, list[int]]]:
    """(token, ids) pairs a tokenizer.json post-processor inserts, to compare with the vocabulary."""
    if not node:
        return []
    kind = node.get("type")
    if kind == "Sequence":
        return [p for sub in node.get("processors", []) for p in _post_processor_ids(sub)]
    if kind == "TemplateProcessing":
        return [(k, list(v.get("ids", []))) for k, v in (node.get("special_tokens") or {}).items()]
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [(node[k][0], [node[k][1]]) for k in ("sep", "cls") if k in node]
    return []


def _check_special_tokens(ctx: _Ctx) -> Check:
    tok = ctx.tok
    problems: list[str] = []
    specials = _special_tokens(tok)
    raw = _raw_tokenizer(ctx)
    for content, i in sorted(specials.items(), key=lambda kv: kv[1] if kv[1] is not None else -1):
        ids = tok.encode(content, add_special_tokens=False)
        if ids != [i]:
            problems.append(f"{content!r} encodes to {ids[:6]} instead of its single id {i}")
            continue
        raw_ids = raw.encode(content, add_special_tokens=False).ids
        if raw_ids != [i]:
            problems.append(
                f"{content!r} is not a special added token in tokenizer.json (it encodes to {raw_ids[:6]} there): "
                "tools that read tokenizer.json directly split it"
            )
    for role in ("bos", "eos", "pad", "unk"):
        content = getattr(tok, f"{role}_token", None)
        if content is not None and raw.token_to_id(str(content)) is None:
            problems.append(f"the tokenizer's {role}_token {content!r} is missing from tokenizer.json")
    rows = ctx.text_config().get("vocab_size") or 0
    sources = [("config.json", ctx.text_config())] + (
        [("generation_config.json", ctx.gen)] if ctx.gen else []
    )
    for fname, conf in sources:
        for role in ("bos", "eos", "pad"):
            key = f"{role}_token_id"
            ids = _ids(conf.get(key))
            want = getattr(tok, key)
            for i in ids:
                if i < 0 or (rows and i >= rows):
                    problems.append(f"{fname} {key} {i} is outside the {rows} embedding rows")
                elif tok.convert_ids_to_tokens(i) is None:
                    problems.append(f"{fname} {key} {i} has no token")
            if not ids:
                if role == "eos" and want is not None and fname == "generation_config.json":
                    problems.append(
                        f"{fname} has no eos_token_id: generation never stops at {tok.eos_token!r}"
                    )
                continue
            if want is None:
                if role != "pad":
                    problems.append(f"{fname} {key}={conf.get(key)} but the tokenizer has no {role}_token")
                continue
            ok = want in ids if role == "eos" else ids == [want]
            if not ok:
                names = [tok.convert_ids_to_tokens(i) for i in ids]
                problems.append(
                    f"{fname} {key}={conf.get(key)} {names} but the tokenizer's {role}_token is "
                    f"{getattr(tok, f'{role}_token')!r} ({want})"
                )
    if ctx.tokenizer_json is not None:
        for content, ids in _post_processor_ids(ctx.tokenizer_json.get("post_processor")):
            if ids != [raw.token_to_id(content)]:
                problems.append(
                    f"tokenizer.json post-processor adds {content!r} as {ids} but its id is {raw.token_to_id(content)}"
                )
    if problems:
        return Check("special tokens", False, "; ".join(problems))
    roles = ", ".join(
        f"{r}={getattr(tok, f'{r}_token_id')}" for r in ("bos", "eos", "pad") if getattr(tok, f"{r}_token")
    )
    return Check(
        "special tokens", True, f"{len(specials)} special tokens, each a single id; {roles} agree everywhere"
    )


def _check_chat_template(ctx: _Ctx) -> Check:
    tok = ctx.tok
    if not getattr(tok, "chat_template", None):
        return Check("chat template", True, "no chat template (a base model)")
    messages = [
        {"role": "user", "content": "What is 2+2? 用中文回答。"},
        {"role": "assistant", "content": "四。"},
        {"role": "user", "content": "Thanks!"},
    ]
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        return Check("chat template", False, f"it does not render: {e.__class__.__name__}: {str(e)[:200]}")
    ids = tok.encode(text, add_special_tokens=False)
    specials = _special_tokens(tok)
    problems = []
    used = []
    for content, i in specials.items():
        n_text = text.count(content)
        if not n_text:
            continue
        used.append(content)
        n_ids = ids.count(i)
        if n_ids != n_text:
            problems.append(f"{content!r} appears {n_text}x in the rendered text but {n_ids}x as id {i}")
    if problems:
        return Check("chat template", False, "; ".join(problems))
    return Check("chat template", True, f"renders; {', '.join(used) or 'no special tokens'} as single ids")


def _check_round_trip(ctx: _Ctx) -> Check:
    tok = ctx.tok
    ids = tok.encode(ROUND_TRIP_TEXT, add_special_tokens=False)
    back = tok.decode(ids)
    if back != ROUND_TRIP_TEXT:
        at = next((i for i, (a, b) in enumerate(zip(back, ROUND_TRIP_TEXT, strict=False)) if a != b), None)
        at = at if at is not None else min(len(back), len(ROUND_TRIP_TEXT))
        return Check(
            "round trip",
            False,
            f"decode(encode(x)) != x from character {at}: {back[at : at + 20]!r} vs {ROUND_TRIP_TEXT[at : at + 20]!r}",
        )
    return Check(
        "round trip", True, f"decode(encode(x)) == x on {len(ROUND_TRIP_TEXT)} multilingual characters"
    )


def _check_generation(ctx: _Ctx) -> Check:
    import torch

    tok, model = ctx.tok, ctx.model
    valid = set(tok.get_vocab().values())
    prompts = ["The capital of France is", "机器学习是", "def fibonacci(n):"]
    bad: list[int] = []
    n_gen = 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([tok.encode(p)], device=device)
            # Greedy choices at every prompt position, then 12 freely generated tokens.
            bad += [int(i) for i in model(input_ids=x).logits[0].argmax(-1) if int(i) not in valid]
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
            new = [int(i) for i in out[0, x.shape[1] :]]
            n_gen += len(new)
            bad += [i for i in new if i not in valid]
    if bad:
        return Check(
            "greedy generation",
            False,
            f"greedy decoding picks ids with no token (padding rows): {sorted(set(bad))[:8]}; "
            "their LM-head rows must never win",
        )
    return Check(
        "greedy generation", True, f"{n_gen} tokens from {len(prompts)} prompts, every id a real token"
    )


def _gate(ctx: _Ctx, need: str, name: str, fn: Callable[[_Ctx], Check]) -> Check:
    """Run ``fn`` unless what it needs did not load; an unexpected error becomes a failed check."""
    if need == "tok" and ctx.tok is None or need == "model" and (ctx.model is None or ctx.tok is None):
        return Check(
            name,
            False,
            "not run: the " + ("tokenizer" if need == "tok" else "model or tokenizer") + " did not load",
        )
    try:
        return fn(ctx)
    except Exception as e:
        return Check(name, False, f"{e.__class__.__name__}: {' '.join(str(e).split())[:240]}")


def require_causal_lm(folder: Path, who: str) -> None:
    """RetokError unless ``folder`` holds a causal LM: its model type has an AutoModelForCausalLM class and the
    architecture it was saved as is one of them (a BertModel folder is not, although BertLMHeadModel exists)."""
    from transformers import AutoConfig

    from retok.sources import not_causal_lm

    if not (folder / "config.json").is_file():
        raise RetokError(f"{who}: {folder} has no config.json; give a Hugging Face model folder")
    try:
        conf = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise RetokError(
            f"{who}: {folder}/config.json cannot be read ({e.__class__.__name__}: {msg})"
        ) from None
    problem = not_causal_lm(conf)
    if problem:
        raise RetokError(f"{who}: {folder} is {problem}; give a decoder LM folder")


def check_folder(path: str | Path) -> list[Check]:
    """Check a model folder the way its users will meet it; every check runs, failures say what to fix.

    Raises RetokError (exit 2) only when ``path`` is not a model folder at all or not a causal LM.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise RetokError(f"check: {folder} is not a folder")
    require_causal_lm(folder, "check")
    ctx = _Ctx(folder)
    results = [_check_files(ctx), _check_tokenizer_loads(ctx), _check_model_loads(ctx)]
    results += [
        _gate(ctx, "tok", "vocab size", _check_vocab),
        _gate(ctx, "", "tied weights", _check_tied),
        _gate(ctx, "tok", "special tokens", _check_special_tokens),
        _gate(ctx, "tok", "chat template", _check_chat_template),
        _gate(ctx, "tok", "round trip", _check_round_trip),
        _gate(ctx, "model", "greedy generation", _check_generation),
    ]
    return results


def print_checks(results: list[Check]) -> None:
    """A table of the checks; the last line says whether the folder passes."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold", expand=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for r in results:
        table.add_row(r.name, "[green]PASS[/green]" if r.ok else "[red]FAIL[/red]", r.detail)
    console = Console()
    console.print(table)
    failed = sum(not r.ok for r in results)
    console.print("[green]all checks pass[/green]" if not failed else f"[red]{failed} check(s) failed[/red]")
