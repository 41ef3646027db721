"""Models in: a local Hugging Face folder, a hub id, or a .gguf file (de-quantised once, cached as safetensors).

Every stage calls :func:`resolve_model` to get a local folder, then :func:`load_tokenizer` /
:func:`load_model`. Remote code runs only when the config asks for it, and pickled checkpoints are refused
unless ``allow_pickle`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from retok.core.config import ModelConfig, default_cache, expand
from retok.core.errors import RetokError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
GGUF_CONVERSION_VERSION = "2"  # bump when the conversion below changes, so caches are rebuilt


# --------------------------------------------------------------------------------------- resolution


def resolve_model(model: ModelConfig | str, cache: Path | None = None) -> Path:
    """A local folder holding config.json, tokenizer files and weights for ``model``."""
    cfg = model if isinstance(model, ModelConfig) else ModelConfig(path=model)
    cache = cache or default_cache()
    raw = expand(cfg.path)
    p = Path(raw)
    if raw.lower().endswith(".gguf"):
        if not p.is_file():
            raise RetokError(
                f"model.path: GGUF file {p} not found; check the path (scripts/fetch_assets.py fetches the demo model)"
            )
        return gguf_to_folder(p, cache)
    if p.exists():
        if not p.is_dir():
            raise RetokError(f"model.path: {p} is neither a model folder nor a .gguf file")
        check_model_folder(p, allow_pickle=cfg.allow_pickle)
        return p
    if looks_like_hub_id(raw):
        return _hub_snapshot(raw, cfg)
    raise RetokError(f"model.path: {raw} not found (not a folder, a .gguf file, or a hub id like org/name)")


def check_local_model_path(model: ModelConfig) -> str:
    """What ``model.path`` names, checked without converting or downloading anything (for `retok validate`)."""
    raw = expand(model.path)
    p = Path(raw)
    if raw.lower().endswith(".gguf"):
        if not p.is_file():
            raise RetokError(f"model.path: GGUF file {p} not found; check the path")
        return f"model.path: GGUF file {p} ({p.stat().st_size / 1e6:.0f} MB)"
    if p.exists():
        if not p.is_dir():
            raise RetokError(f"model.path: {p} is neither a model folder nor a .gguf file")
        check_model_folder(p, allow_pickle=model.allow_pickle)
        if any(p.glob("*.safetensors")):
            from retok.core.safetensors_io import read_checkpoint

            infos, files, _ = read_checkpoint(p)  # every shard there, readable, its header sound
            return f"model.path: model folder {p} ({len(infos)} tensors in {len(files)} safetensors file(s))"
        return f"model.path: model folder {p}"
    if looks_like_hub_id(raw):
        return f"model.path: hub id {raw} (downloaded when a stage first needs it)"
    raise RetokError(f"model.path: {raw} not found (not a folder, a .gguf file, or a hub id like org/name)")


def looks_like_hub_id(s: str) -> bool:
    """org/name: two parts, not a path (no leading . / ~) and not a GGUF file name."""
    parts = s.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not s.startswith((".", "/", "~"))
        and not s.lower().endswith(".gguf")
    )


def check_model_folder(folder: Path, *, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise RetokError(
            f"model.path: {folder} has no config.json; give a Hugging Face model folder or a .gguf file"
        )
    names = [f.name for f in folder.iterdir()]
    has_safe = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith(PICKLE_SUFFIXES) and not n.startswith("training_args") for n in names)
    if not has_safe and has_pickle and not allow_pickle:
        raise RetokError(
            f"model.path: {folder} holds only pickled weights, which can run code when loaded; "
            "convert them to safetensors or set model.allow_pickle: true if you trust the source"
        )
    if not has_safe and not has_pickle:
        raise RetokError(f"model.path: {folder} holds no weights (*.safetensors)")


def _hub_snapshot(repo_id: str, cfg: ModelConfig) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise RetokError(f"model.path {repo_id}: huggingface_hub is missing ({e})") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    if cfg.allow_pickle:
        patterns += ["*.bin"]
    try:
        path = Path(snapshot_download(repo_id, revision=cfg.revision, allow_patterns=patterns))
    except Exception as e:  # network errors, gated or missing repos, offline mode
        raise RetokError(f"model.path {repo_id}: {hub_error(e, repo_id)}") from None
    check_model_folder(path, allow_pickle=cfg.allow_pickle)
    return path


def hub_error(e: Exception, repo_id: str) -> str:
    """What went wrong fetching from the hub, and what to do: gated, not found and offline read differently."""
    name = type(e).__name__
    first = " ".join(str(e).split())[:160]
    if name == "GatedRepoError":
        return (
            "the repository is gated; accept its licence on huggingface.co and log in (`hf auth login`), "
            f"or give a local folder ({first})"
        )
    if name == "RepositoryNotFoundError":
        return f"no such repository on the hub (check the spelling; a private one needs `hf auth login`) ({first})"
    if name == "RevisionNotFoundError":
        return f"model.revision does not exist in {repo_id} ({first})"
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "offline" in first.lower():
        return (
            "the hub cannot be reached (offline, or HF_HUB_OFFLINE is set) and the model is not in the local "
            f"cache; give a local folder or a .gguf file ({name})"
        )
    return f"could not get it from the Hugging Face Hub ({name}: {first}); check the id and your network"


# --------------------------------------------------------------------------------------------- GGUF


def _file_key(p: Path) -> str:
    """A cheap content key: size + hashes of the first and last 8 MiB (full hashing a 40 GB file is slow)."""
    h = hashlib.sha256()
    size = p.stat().st_size
    h.update(str(size).encode())
    with p.open("rb") as f:
        h.update(f.read(8 << 20))
        if size > 16 << 20:
            f.seek(size - (8 << 20))
            h.update(f.read())
    h.update(GGUF_CONVERSION_VERSION.encode())
    return h.hexdigest()[:16]


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar metadata of a GGUF file (tokenizer ids, flags, context length); no tensors are read."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as e:
        raise RetokError(
            f"model.path: {path} is not a readable GGUF file ({e.__class__.__name__}: {e})"
        ) from None
    meta: dict[str, Any] = {}
    skip = {
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.scores",
    }
    for key, field in reader.fields.items():
        if key in skip:
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # exotic field types are not needed here
            continue
    return meta


def gguf_to_folder(path: Path, cache: Path) -> Path:
    """De-quantise a GGUF once through transformers and cache it as a plain safetensors folder."""
    folder = cache / "models" / f"{path.stem}-{_file_key(path)}"
    if (folder / "retok_gguf.json").is_file():
        return folder
    meta = read_gguf_metadata(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=folder.parent))
    try:
        _convert_gguf(path, meta, tmp)
        (tmp / "retok_gguf.json").write_text(
            json.dumps(
                {"source": str(path.resolve()), "key": folder.name, "version": GGUF_CONVERSION_VERSION},
                indent=2,
            )
        )
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _convert_gguf(path: Path, meta: dict[str, Any], out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"retok: converting {path.name} to a safetensors folder (once; cached in {out.parent})", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        quant = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except Exception as e:
        raise RetokError(
            f"model.path: transformers cannot load {path.name} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
            "use a GGUF of an architecture transformers supports, or an HF folder"
        ) from None
    # A GGUF-loaded model refuses save_pretrained; its weights are already plain fp32, so copy them into a
    # plain model of the same config.
    config = quant.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quant.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    fix_gguf_tokenizer(tok, meta)
    _fix_gguf_ids(plain, tok)
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    del quant, plain


def fix_gguf_tokenizer(tok: Any, meta: dict[str, Any]) -> list[str]:
    """Make the transformers tokenizer agree with what the GGUF says; returns what was changed."""
    changes: list[str] = []
    arch = meta.get("general.architecture", "")
    ctx = meta.get(f"{arch}.context_length")
    if ctx and (tok.model_max_length is None or tok.model_max_length > 10**9):
        tok.model_max_length = int(ctx)
        changes.append(f"model_max_length={ctx}")
    vocab = tok.convert_ids_to_tokens
    for role, key in (
        ("bos", "tokenizer.ggml.bos_token_id"),
        ("eos", "tokenizer.ggml.eos_token_id"),
        ("pad", "tokenizer.ggml.padding_token_id"),
    ):
        if key in meta:
            want = vocab(int(meta[key]))
            if getattr(tok, f"{role}_token") != want:
                setattr(tok, f"{role}_token", want)
                changes.append(f"{role}={want}")
    if "tokenizer.ggml.add_bos_token" in meta and hasattr(tok, "add_bos_token"):
        want_bos = bool(meta["tokenizer.ggml.add_bos_token"])
        if bool(getattr(tok, "add_bos_token", False)) != want_bos:
            tok.add_bos_token = want_bos
            changes.append(f"add_bos_token={want_bos}")
    pre = meta.get("tokenizer.ggml.pre")
    if pre in _DIGIT_SPLIT_PRES and _restore_digit_split(tok):
        changes.append("pre-tokenizer: individual digits restored")
    return changes


# llama.cpp pre-tokenizer names whose original tokenizers split numbers into single digits before ByteLevel.
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact"}


def _restore_digit_split(tok: Any) -> bool:
    from tokenizers import pre_tokenizers

    backend = tok.backend_tokenizer
    current = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    if "Digits" in json.dumps(current):
        return False
    if current.get("type") != "ByteLevel":
        return False
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=bool(current.get("add_prefix_space")), use_regex=True),
        ]
    )
    return True


def _fix_gguf_ids(model: Any, tok: Any) -> None:
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = tok.bos_token_id
        cfg.eos_token_id = tok.eos_token_id
        if tok.pad_token_id is not None:
            cfg.pad_token_id = tok.pad_token_id


# --------------------------------------------------------------------------------------------- loading


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False) -> Any:
    """A fast (tokenizers-backed) tokenizer; slow/Python tokenizers are not supported."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RetokError(
            f"cannot load a tokenizer from {folder} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise RetokError(
            f"the tokenizer in {folder} has no fast (tokenizers) backend; retok needs tokenizer.json"
        )
    # retok tokenizes whole documents and cuts them into windows itself: transformers' once-per-tokenizer "longer
    # than the maximum sequence length ... will result in indexing errors" would only alarm (nothing is saved).
    tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cpu" or name == "mps" or name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise RetokError(f"device {name}: no CUDA GPU is visible; use device: cpu or auto")
        return name
    raise RetokError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")


def pick_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return (
            torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def not_causal_lm(conf: Any) -> str | None:
    """Why a loaded model config is not a causal LM (None when it is): its model type needs an
    AutoModelForCausalLM class and the architecture it was saved as must be one of them (a BertModel folder
    is not, although BertLMHeadModel exists). Remote-code configs count when their auto_map names one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "AutoModelForCausalLM" in (getattr(conf, "auto_map", None) or {}):
        return None
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(conf.model_type)
    names = {causal} if isinstance(causal, str) else set(causal or ())
    archs = list(getattr(conf, "architectures", None) or [])
    if not names or (archs and not any(a in names or a.endswith("ForCausalLM") for a in archs)):
        saved = f" saved as {', '.join(archs)}" if archs else ""
        return f"a {conf.model_type!r} model{saved}, not a causal language model (AutoModelForCausalLM)"
    return None


def load_model(
    folder: str | Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Any:
    """A causal LM from a local folder, in eval mode, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    check_model_folder(folder, allow_pickle=allow_pickle)
    dev = pick_device(device)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise RetokError(
            f"{folder}/config.json cannot be read ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    problem = not_causal_lm(config)
    if problem:
        raise RetokError(f"{folder} is {problem}; give a decoder LM folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=pick_dtype(dtype, dev),
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not support" in str(e):
            raise RetokError(
                f"{folder} is not a causal language model ({type(config).__name__}); retok needs an AutoModelForCausalLM"
            ) from None
        raise RetokError(
            f"cannot load the model in {folder} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    except OSError as e:
        raise RetokError(f"cannot load the model in {folder} ({str(e).splitlines()[0][:200]})") from None
    return model.to(dev).eval()


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def require_causal_lm(folder: Path, who: str) -> None:
    """RetokError unless ``folder`` holds a causal LM: its model type has an AutoModelForCausalLM class and the
    architecture it was saved as is one of them (a BertModel folder is not, although BertLMHeadModel exists)."""
    from transformers import AutoConfig

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


def _max_id(tok: Any) -> int:
    ids = list(tok.get_vocab().values()) + list(getattr(tok, "added_tokens_decoder", {}) or {})
    return max(ids) if ids else -1


def check_config_rows(folder: Path, tok: Any, who: str) -> None:
    """RetokError when the tokenizer of ``folder`` has ids past the model's vocab_size (config.json), before
    any weight is loaded: such ids would index past the embedding."""
    try:
        conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # require_causal_lm reports unreadable configs
    rows = (conf.get("text_config") or {}).get("vocab_size") or conf.get("vocab_size")
    top = _max_id(tok)
    if isinstance(rows, int) and top >= rows:
        raise RetokError(
            f"{who}: the tokenizer in {folder} has id {top} but the model has {rows} embedding rows; the tokenizer "
            "was made for another model (rerun `retok init-embeddings`, or give the matching tokenizer)"
        )


def check_rows_cover_tokenizer(model: Any, tok: Any, who: str) -> None:
    """RetokError unless the loaded model's embedding and head have a row for every token id."""
    rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    top = _max_id(tok)
    if top >= rows:
        raise RetokError(
            f"{who}: the tokenizer has id {top} but the model has {rows} embedding rows; it was made for another "
            "tokenizer (rerun `retok init-embeddings --overwrite`)"
        )
    if head is None or head.weight.shape[0] != rows:
        raise RetokError(
            f"{who}: the LM head does not have the embedding's {rows} rows; rerun init-embeddings"
        )
