"""``retok check``: a model folder checked the way its users will meet it.

It needs nothing from retok to pass: it loads the folder with plain transformers and asks what a user or a
server would run into (head rows, tied flag, special tokens, chat template, round trip, greedy decoding).
Every check runs; a failure says what to fix. A folder whose files cannot be read fails the check that reads
them; a bug in retok is never reported as a fault of the folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retok.core.config import validate_dict
from retok.core.errors import RetokError
from retok.core.freshness import judge
from retok.core.safetensors_io import TensorInfo, tensor_table
from retok.core.sources import require_causal_lm
from retok.core.stages import CONFIG_FILE, STAGE_FILE, STAGES, stage_dir
from retok.export.check_gguf import check_gguf
from retok.export.verdict import Check

# A string that exercises every script family retok users care about, whitespace runs and digits.
ROUND_TRIP_TEXT = (
    "Hello, world! Tokenizers split 3.14159 and 2024-12-31 into pieces.\n"
    "机器学习是人工智能的一个分支，语言模型预测下一个词元。\n"
    "Русский текст, Ελληνικά, العربية, हिन्दी, 日本語のテキスト, 한국어 문장 🙂🚀\n"
    "def f(x):\n\treturn x ** 2  # two  spaces\n"
)


def ids_list(value: Any) -> list[int]:
    """A token-id field of a config (an int, a list of ints, or None) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class _Ctx:
    """What the checks share: the folder, its JSON files, the tokenizer and model once loaded."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.unreadable: list[str] = []  # files that exist but cannot be read: each fails the "files" check
        self.config = self._json("config.json") or {}
        self.gen = self._json("generation_config.json")
        self.tokenizer_json = self._json("tokenizer.json")
        self.export_meta = self._json("retok_export.json")  # present in folders written by `retok export`
        try:
            self.table: dict[str, TensorInfo] = tensor_table(folder)
        except RetokError as e:
            self.table = {}
            self.unreadable.append(str(e))
        self.tok: Any = None
        self.model: Any = None

    def _json(self, name: str) -> Any:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            self.unreadable.append(f"{name} is not valid JSON ({e.__class__.__name__})")
            return None
        if not isinstance(data, dict):
            self.unreadable.append(f"{name} is not a JSON object")
            return None
        return data

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
    problems = list(ctx.unreadable)
    if not ctx.table and not ctx.unreadable:
        problems.append("no *.safetensors weights")
    if ctx.tokenizer_json is None and (ctx.folder / "tokenizer.json").is_file() is False:
        problems.append("no tokenizer.json (fast tokenizer)")
    if "auto_map" in ctx.config:
        problems.append("config.json has auto_map: loading needs trust_remote_code")
    if ctx.gen is None and not (ctx.folder / "generation_config.json").is_file():
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
            ids = ids_list(conf.get(key))
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
        if (ctx.export_meta or {}).get("chat_template"):
            return Check(
                "chat template",
                False,
                "retok export wrote a chat template (retok_export.json) but the folder has none now; restore "
                "chat_template.jinja or export again",
            )
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
    """Run ``fn`` unless what it needs did not load. A check that crashes is reported as retok's own
    error (``internal``), never as a fault of the folder."""
    if need == "tok" and ctx.tok is None or need == "model" and (ctx.model is None or ctx.tok is None):
        return Check(
            name,
            False,
            "not run: the " + ("tokenizer" if need == "tok" else "model or tokenizer") + " did not load",
        )
    try:
        return fn(ctx)
    except Exception as e:
        return Check(
            name,
            False,
            f"internal error in retok's check ({e.__class__.__name__}: {' '.join(str(e).split())[:200]}); "
            "this is a bug in retok, not a verdict on the folder: please report it",
            internal=True,
        )


def check_up_to_date(folder: Path) -> Check | None:
    """For a stage folder of a retok run (it has retok_stage.json): is it still what its run folder says, by the
    config saved in it (the folders it read were not remade since, the model it read is still the one its stage
    would read, it is complete)? None for any other folder, or one moved out of its run folder."""
    import yaml

    try:
        meta = json.loads((folder / STAGE_FILE).read_text(encoding="utf-8"))
        key = meta["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if key not in STAGES or folder.name != key:
        return None
    try:
        saved = yaml.safe_load((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        cfg = validate_dict({**saved, "output_dir": str(folder.parent)}, str(folder / CONFIG_FILE))
    except (OSError, yaml.YAMLError, TypeError, RetokError) as e:
        return Check("up to date", False, f"its {CONFIG_FILE} cannot be read ({e.__class__.__name__})")
    if stage_dir(cfg, key).resolve() != folder.resolve():
        return None
    v = judge(cfg, key)
    if v.action == "skip":
        return Check("up to date", True, "the folders it read are as it read them, and it is complete")
    return Check("up to date", False, "; ".join(v.reasons) + " (`retok run` with its config remakes it)")


def check_folder(path: str | Path) -> list[Check]:
    """Check a model folder the way its users will meet it; every check runs, failures say what to fix.
    A .gguf file in the folder gets the GGUF section (check_gguf.py).

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
    fresh = check_up_to_date(folder)
    if fresh is not None:
        results.append(fresh)
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        for path in ggufs:
            if ctx.tok is None:
                results.append(Check(f"gguf {path.name}", False, "not run: the tokenizer did not load"))
            else:
                results += check_gguf(folder, path, ctx.tok)
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
        verdict = (
            "[green]PASS[/green]" if r.ok else "[magenta]ERROR[/magenta]" if r.internal else "[red]FAIL[/red]"
        )
        table.add_row(r.name, verdict, r.detail)
    console = Console()
    console.print(table)
    failed = sum(not r.ok for r in results)
    console.print("[green]all checks pass[/green]" if not failed else f"[red]{failed} check(s) failed[/red]")
