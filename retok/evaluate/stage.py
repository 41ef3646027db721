"""eval-speed: the original model and the new one on the SAME held-out text, each with its own tokenizer.

    retok eval-speed --config configs/demo.yaml

Per ``data.eval`` domain: bytes per token, bits per byte (sliding window) and long-text decoding speed.
The headline speed figure is the time each model needs to emit the same reference continuation (see
speed.py for how the text is cut and fed); free greedy generation is a second figure when
``eval.generate_bytes`` > 0. Writes ``report.json`` (contract below), ``report.md`` and two PNG charts.

    {"domains": {"<name>": {"old": {"bytes_per_token", "bpb", "tokens_per_s", "bytes_per_s", "prefill_ms",
     "ms_per_token", ...}, "new": {...}, "speedup_bytes_per_s", "compression_ratio", ...}}, ...}

The models are any two: ``eval.baseline_model`` (default: model.path) and ``eval.candidate_model``
(default: the latest stage output, model-trained else model-init).
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retok.core.bpb_memo import bpb_key, read_memo, remembered
from retok.core.config import ModelConfig, RetokConfig
from retok.core.data import domains as domain_names
from retok.core.data import iter_domain, load_domains
from retok.core.errors import RetokError
from retok.core.metrics import bits_per_byte, bytes_per_token, score_starts
from retok.core.sources import (
    check_config_rows,
    check_rows_cover_tokenizer,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    require_causal_lm,
    resolve_model,
    set_threads,
)
from retok.core.stages import model_source, require_stage, stage_dir
from retok.core.tokens import token_bytes_table
from retok.evaluate.report import (
    charts,
    clean,
    compare,
    device_name,
    fmt,
    markdown_table,
    render_markdown,
    tasks_markdown,
)
from retok.evaluate.samples import Prompt, pair_samples, sample_prompts, write_samples
from retok.evaluate.speed import (
    cut_text,
    default_max_tokens,
    greedy_run,
    greedy_stats,
    nbytes,
    reference_run,
    reference_stats,
    run_rounds,
    split_tokens,
    spread_segments,
)
from retok.evaluate.tasks import Item, compare_tasks, continuation_items, load_questions, score_items, spread
from retok.teacher.alignment import new_token_costs

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TABLE_MD = "table.md"


# ------------------------------------------------------------------------------------- which models


def _model_cfg(cfg: RetokConfig, path: str) -> ModelConfig:
    # Another model given by path inherits the safety switches of the main model section.
    return ModelConfig(
        path=path, trust_remote_code=cfg.model.trust_remote_code, allow_pickle=cfg.model.allow_pickle
    )


def pick_models(cfg: RetokConfig) -> tuple[ModelConfig, ModelConfig]:
    """(baseline, candidate) model configs: eval.baseline_model / eval.candidate_model or their defaults."""
    base = _model_cfg(cfg, cfg.eval.baseline_model) if cfg.eval.baseline_model else cfg.model
    if cfg.eval.candidate_model:
        return base, _model_cfg(cfg, cfg.eval.candidate_model)
    key = model_source(cfg, "eval")
    if key is None:
        raise RetokError(
            f"eval-speed needs a new model: neither {stage_dir(cfg, 'model-trained')} nor "
            f"{stage_dir(cfg, 'model-init')} exists; run `retok init-embeddings` (and `retok train-io`) first, "
            "or set eval.candidate_model"
        )
    return base, _model_cfg(cfg, str(require_stage(cfg, key, "eval-speed")))


def _pick_domains(wanted: list[str] | None, available: list[str], key: str) -> list[str]:
    if wanted is None:
        return list(available)
    unknown = [d for d in wanted if d not in available]
    if unknown:
        raise RetokError(f"{key} names {unknown}, which is not among the eval domains {available}; fix {key}")
    return [d for d in available if d in wanted]


SPEED_TEXT_CAP = 4_000_000  # bytes of a domain's held-out text the speed pieces are spread over


def speed_pieces(cfg: RetokConfig, domain: str) -> list[str]:
    """``eval.speed_pieces`` pieces of ``domain``'s held-out text, evenly spread through it, each long enough
    for a prompt and its share of the continuation (fails with the key to change)."""

    ev = cfg.eval
    docs, total = [], 0
    for doc in iter_domain(cfg.data.eval, domain, "data.eval"):
        docs.append(doc)
        total += nbytes(doc) + 2
        if total >= SPEED_TEXT_CAP:
            break
    need = ev.prompt_bytes + piece_bytes(cfg)
    pieces = spread_segments("\n\n".join(docs), ev.speed_pieces, need)
    if not pieces:
        raise RetokError(
            f"data.eval domain {domain!r} has only {total} bytes of text, but eval.prompt_bytes + "
            f"eval.continuation_bytes / eval.speed_pieces = {need}; lower them or add held-out text"
        )
    return pieces


def piece_bytes(cfg: RetokConfig) -> int:
    """Continuation bytes of each speed piece."""
    return max(1, -(-cfg.eval.continuation_bytes // cfg.eval.speed_pieces))


# ------------------------------------------------------------------------------------- measurement


def _token_nbytes(tok: Any) -> dict[int, int]:
    """Byte length of every id that stands for text (specials excluded), for free-generation byte counts."""

    try:
        return {i: len(b) for i, b in token_bytes_table(tok.backend_tokenizer).items()}
    except RetokError:  # an unknown tokenizer family: fall back to decoding each id on its own
        specials = set(tok.all_special_ids)
        return {
            i: len(tok.decode([i]).encode("utf-8")) for i in tok.get_vocab().values() if i not in specials
        }


def _stop_ids(model: Any, tok: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


class _Loaded:
    """One model, its tokenizer and what the report says about it."""

    def __init__(self, cfg: RetokConfig, role: str, mcfg: ModelConfig, folder: Path, tok: Any) -> None:

        self.role = role
        self.extras: dict[str, Any] = {}
        self.tok = tok
        self.model = load_model(
            folder,
            dtype=cfg.compute.dtype,
            device=cfg.compute.device,
            trust_remote_code=mcfg.trust_remote_code,
            allow_pickle=mcfg.allow_pickle,
        )
        check_rows_cover_tokenizer(self.model, tok, f"eval-speed: {folder}")
        self.device = next(self.model.parameters()).device
        self.info = {
            "path": mcfg.path,
            "folder": str(folder),
            "tokenizer_len": len(self.tok),
            "embedding_rows": int(self.model.get_input_embeddings().weight.shape[0]),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
        print(f"retok: eval-speed {role}: {mcfg.path} ({len(self.tok)} tokens) on {self.device}", flush=True)

    def free(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _quality(
    m: _Loaded,
    cfg: RetokConfig,
    docs: dict[str, list[str]],
    starts: dict[str, list[int]],
    memo: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Bytes per token and sliding-window BPB of one model on every domain (scoring from ``starts``, which
    are the same for both models). ``memo``: figures an earlier stage measured (retok.core.bpb_memo); a domain whose
    key is there is not scored again."""

    ev = cfg.eval
    out: dict[str, dict[str, Any]] = {}
    for name, texts in docs.items():
        bpt = bytes_per_token(m.tok, texts)
        key = (
            bpb_key(
                Path(m.info["folder"]),
                m.tok,
                texts,
                starts[name],
                window=ev.window,
                stride=ev.stride,
                model=m.model,
            )
            if memo
            else ""
        )
        bpb, reused = remembered(
            memo or {},
            key,
            lambda texts=texts, name=name: bits_per_byte(
                m.model,
                m.tok,
                texts,
                window=ev.window,
                stride=ev.stride,
                device=m.device,
                desc=f"{m.role} {name} bpb",
                starts=starts[name],
                keep_tokens=True,
            ),
            need="token_nll",
        )
        out[name] = {
            "bytes_per_token": bpt["bytes_per_token"],
            "bpb": bpb["bpb"],
            "tokens": bpt["tokens"],
            "bytes": bpt["bytes"],
            "bpb_bytes": bpb["bytes"],
            "bpb_bos": bpb["bos"],
            "bits": bpb["nats"] / math.log(2),
            "token_nll": bpb["token_nll"],  # per position, for new_tokens_table; not written to the report
        }
        if reused:
            out[name]["bpb_measured_by"] = "init-embeddings"
        print(
            f"retok: {m.role} {name}: {bpt['bytes_per_token']:.3f} bytes/token, BPB {bpb['bpb']:.4f}"
            + (" (init-embeddings measured it on the same bytes)" if reused else ""),
            flush=True,
        )
    return out


def _speed(
    models: list[_Loaded], cfg: RetokConfig, speed_texts: dict[str, list[str]]
) -> dict[str, dict[str, dict]]:
    """Reference-continuation (and greedy) timings of the given models on every speed domain.

    Returns {role: {domain: figures}}.
    """
    res: dict[str, dict[str, dict]] = {m.role: {} for m in models}
    for name, pieces in speed_texts.items():
        texts = _piece_tokens(models, cfg, name, pieces)
        for m, ref in zip(models, _time_reference(models, texts, cfg), strict=True):
            figures = {k: ref.pop(k) for k in ("tokens_per_s", "bytes_per_s", "prefill_ms", "ms_per_token")}
            res[m.role][name] = {**figures, "speed": ref}
            print(
                f"retok: {m.role} {name}: {ref['pieces']} pieces, prefill {figures['prefill_ms']:.0f} ms "
                f"({ref['prompt_tokens']} tokens), {figures['ms_per_token']:.1f} ms/token, "
                f"{figures['tokens_per_s']:.1f} tokens/s, {figures['bytes_per_s']:.1f} bytes/s on "
                f"{ref['continuation_bytes']} bytes",
                flush=True,
            )
        if cfg.eval.generate_bytes:
            for m, gen in zip(models, _time_greedy(models, texts, cfg), strict=True):
                res[m.role][name]["greedy"] = gen
                print(
                    f"retok: {m.role} {name} greedy: {gen['generated_tokens']} tokens, "
                    f"{gen['bytes_per_s']:.1f} bytes/s",
                    flush=True,
                )
    return res


def _piece_tokens(models: list[_Loaded], cfg: RetokConfig, name: str, pieces: list[str]) -> dict[str, list]:
    """Each model's prompt and continuation ids of every piece (retok.evaluate.speed.split_tokens)."""

    ev = cfg.eval
    texts: dict[str, list] = {m.role: [] for m in models}
    for piece in pieces:
        text, boundary, end = cut_text(piece, ev.prompt_bytes, piece_bytes(cfg))
        for m in models:
            st = split_tokens(m.tok, text, boundary, end)
            if not st.prompt_ids or not st.continuation_ids:
                raise RetokError(
                    f"data.eval domain {name!r}: the {m.role} tokenizer gives no whole token within "
                    f"{piece_bytes(cfg)} bytes of continuation; raise eval.continuation_bytes or lower "
                    "eval.speed_pieces"
                )
            texts[m.role].append(st)
    return texts


def _time_reference(models: list[_Loaded], texts: dict[str, list], cfg: RetokConfig) -> list[dict[str, Any]]:
    """Warm-up + timed rounds; in each timed round every piece is run once, the models' steps interleaved
    within a piece (speed.reference_run) and who prefills first alternating; a round's times are summed over
    the pieces. A warm-up round runs the first piece only: it is there to load code paths and allocate the
    caches once, which one piece does as well as all of them. Returns each model's medians
    (speed.reference_stats)."""

    ev = cfg.eval
    runs: dict[str, list[tuple[float, float]]] = {m.role: [] for m in models}
    n_pieces = len(texts[models[0].role])
    for r in range(ev.warmup + ev.repeats):
        order = models if r % 2 == 0 else models[::-1]
        sums = {m.role: [0.0, 0.0] for m in models}
        for j in range(n_pieces if r >= ev.warmup else 1):
            timings = reference_run([(m.model, texts[m.role][j], m.device) for m in order])
            for m, (pre, dec) in zip(order, timings, strict=True):
                sums[m.role][0] += pre
                sums[m.role][1] += dec
        if r >= ev.warmup:
            for m in models:
                runs[m.role].append((sums[m.role][0], sums[m.role][1]))
    return [reference_stats(texts[m.role], runs[m.role]) for m in models]


def _time_greedy(models: list[_Loaded], texts: dict[str, list], cfg: RetokConfig) -> list[dict[str, Any]]:
    """Free greedy generation of eval.generate_bytes from the first piece's prompt, rounds alternated."""

    ev = cfg.eval
    cap = default_max_tokens(ev.generate_bytes)
    nbytes_of = {m.role: _token_nbytes(m.tok) for m in models}
    gruns = run_rounds(
        {
            m.role: (
                lambda m=m, st=texts[m.role][0]: greedy_run(
                    m.model, st.prompt_ids, nbytes_of[m.role], ev.generate_bytes, cap, m.device
                )
            )
            for m in models
        },
        repeats=ev.repeats,
        warmup=ev.warmup,
    )
    out = []
    for m in models:
        gen = greedy_stats(
            gruns[m.role],
            nbytes_of[m.role],
            valid_ids=set(m.tok.get_vocab().values()),
            stop_ids=_stop_ids(m.model, m.tok),
        )
        gen["sample"] = m.tok.decode(gen.pop("ids")[:64], skip_special_tokens=False)
        out.append(gen)
    return out


def _extras(m: _Loaded, cfg: RetokConfig, inp: Inputs) -> dict[str, Any]:
    """One model's task log-likelihoods ({task: per question, per choice}) and samples."""
    lls = {}
    for name, items in inp.tasks.items():
        lls[name] = score_items(m.model, m.tok, items, m.device, cfg.eval.window, f"{m.role} {name}")
        print(f"retok: {m.role} {name}: {len(items)} questions scored", flush=True)
    samples = write_samples(
        m.model,
        m.tok,
        inp.prompts,
        _token_nbytes(m.tok),
        _stop_ids(m.model, m.tok),
        cfg.eval.sample_bytes,
        m.device,
    )
    if samples:
        print(f"retok: {m.role}: {len(samples)} samples written", flush=True)
    return {"tasks": lls, "samples": samples}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) or sum(
        f.stat().st_size for f in folder.glob("*.bin")
    )


def _interleave(cfg: RetokConfig, folders: list[Path], device: str) -> bool:
    """Whether both models can stay loaded: eval.interleave, or (auto) both fit in half the free memory."""
    if cfg.eval.interleave != "auto":
        return bool(cfg.eval.interleave)
    import psutil
    import torch

    need = sum(_folder_bytes(f) for f in folders)
    dtype = cfg.compute.dtype
    if dtype in ("bfloat16", "float16") or (dtype == "auto" and device.startswith("cuda")):
        need = (
            need // 2 if need else need
        )  # a float32 checkpoint loaded in 16 bits (an upper bound otherwise)
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = psutil.virtual_memory().available
    return need * 2 < free


# -------------------------------------------------------------------------------------------- stage


@dataclass
class Inputs:
    """What eval-speed measures on, all read before any model is loaded."""

    domains: list[str]
    docs: dict[str, list[str]]  # held-out text per domain, for bytes/token and BPB
    speed_texts: dict[str, list[str]]  # the pieces timed per speed domain
    configs: tuple[ModelConfig, ModelConfig]  # baseline, candidate
    folders: tuple[Path, Path]
    toks: tuple[Any, Any]
    starts: dict[str, list[int]]  # where scoring starts in each document: the same bytes for both models
    tasks: dict[str, list[Item]]  # the questions of every eval.tasks entry
    prompts: list[Prompt]  # what both models write samples for


SAMPLE_PROMPT_BYTES = 240  # held-out text a sample continues: short enough to read in the report
CONTINUATION_TASK_ITEMS = 40  # questions of each domain's continuation task when eval.tasks is null


def read_tasks(cfg: RetokConfig, chosen: list[str], toks: tuple[Any, ...]) -> dict[str, list[Item]]:
    """The questions of every task (eval.tasks; null: a continuation task on every eval domain), read and
    checked before any model is loaded; continuation tasks cut their text where both tokenizers end a token."""
    from retok.core.config import TaskConfig, expand

    tasks = cfg.eval.tasks
    if tasks is None:
        tasks = [
            TaskConfig(name=f"{d}-continuation", domain=d, max_items=CONTINUATION_TASK_ITEMS) for d in chosen
        ]
    out: dict[str, list[Item]] = {}
    for i, t in enumerate(tasks):
        key = f"eval.tasks.{i} ({t.name})"
        if t.name in out:
            raise RetokError(f"{key}: two tasks are named {t.name!r}; give each task its own name")
        if t.path is not None:
            items = spread(load_questions(Path(expand(t.path)), key, t.style), t.max_items)
        else:
            if t.domain not in domain_names(cfg.data.eval):
                raise RetokError(
                    f"{key}: domain {t.domain!r} is not among the data.eval domains "
                    f"{domain_names(cfg.data.eval)}; fix the task's domain"
                )
            docs, total = [], 0
            for doc in iter_domain(cfg.data.eval, t.domain, "data.eval"):
                docs.append(doc)
                total += nbytes(doc)  # a running total: re-summing every document would be quadratic
                if total >= SPEED_TEXT_CAP:
                    break
            try:
                items = continuation_items(
                    docs, t.max_items, t.prompt_bytes, t.continuation_bytes, t.choices, key, toks
                )
            except RetokError as e:
                if cfg.eval.tasks is not None:
                    raise
                print(f"retok: eval-speed: no {t.name} task: {e}", flush=True)  # the default asks for no more
                continue
        out[t.name] = items
    return out


def read_inputs(cfg: RetokConfig) -> Inputs:
    """Text, models and tokenizers, checked: bad input fails before minutes of model loading."""

    ev = cfg.eval
    if not cfg.data.eval:
        raise RetokError("eval-speed needs held-out text: add data.eval sources (name + path) to the config")
    chosen = _pick_domains(ev.domains, domain_names(cfg.data.eval), "eval.domains")
    speed_names = _pick_domains(ev.speed_domains, chosen, "eval.speed_domains")
    configs = pick_models(cfg)
    docs = load_domains(cfg.data.eval, "data.eval", ev.max_bytes, only=chosen)
    speed_texts = {name: speed_pieces(cfg, name) for name in speed_names}
    folders = tuple(resolve_model(m, cfg.cache) for m in configs)
    toks = []
    for folder, key, mcfg in zip(
        folders, ("eval.baseline_model", "eval.candidate_model"), configs, strict=True
    ):
        require_causal_lm(folder, f"eval-speed ({key})")
        tok = load_tokenizer(folder, trust_remote_code=mcfg.trust_remote_code)
        check_config_rows(folder, tok, f"eval-speed ({key})")
        toks.append(tok)
    starts = {name: score_starts(toks, texts) for name, texts in docs.items()}
    tasks = read_tasks(cfg, chosen, tuple(toks))
    prompts = sample_prompts(docs, ev.samples, SAMPLE_PROMPT_BYTES, ev.sample_prompts)
    return Inputs(chosen, docs, speed_texts, configs, folders, tuple(toks), starts, tasks, prompts)


@dataclass
class Measured:
    old: dict[str, Any]  # per domain: the original's figures
    new: dict[str, Any]
    infos: tuple[dict, dict]  # what each model is (path, tokens, rows)
    interleaved: bool
    extras: tuple[dict, dict]  # each model's task log-likelihoods and samples (_extras)


def measure(cfg: RetokConfig, inp: Inputs, device: str) -> Measured:
    """Quality, tasks, samples and speed of both models."""
    both = _interleave(cfg, list(inp.folders), device)
    print(
        f"retok: eval-speed: timing the models {'alternately' if both else 'one after the other'}", flush=True
    )
    old_m = _Loaded(cfg, "old", inp.configs[0], inp.folders[0], inp.toks[0])
    # the original's BPB on these bytes, if init-embeddings measured it (the same folder, text and settings)
    init_dir = stage_dir(cfg, "model-init")
    old = _quality(old_m, cfg, inp.docs, inp.starts, read_memo(init_dir if init_dir.is_dir() else None))
    old_m.extras = _extras(old_m, cfg, inp)
    if not both:
        for name, figs in _speed([old_m], cfg, inp.speed_texts)["old"].items():
            old[name].update(figs)
        old_m.free()
    new_m = _Loaded(cfg, "new", inp.configs[1], inp.folders[1], inp.toks[1])
    new = _quality(new_m, cfg, inp.docs, inp.starts)
    new_m.extras = _extras(new_m, cfg, inp)
    timed = _speed([old_m, new_m] if both else [new_m], cfg, inp.speed_texts)
    for role, side in (("old", old), ("new", new)):
        for name, figs in timed.get(role, {}).items():
            side[name].update(figs)
    new_m.free()
    if both:
        old_m.free()
    return Measured(old, new, (old_m.info, new_m.info), both, (old_m.extras, new_m.extras))


def new_tokens_table(inp: Inputs, old: dict, new: dict) -> dict[str, dict[str, Any]]:
    """Per domain: how often the new tokens fire in the scored text (per KB) and the bits they take against
    the bits the original model spends on the same bytes' old pieces, in all and as a share of the domain's
    bits (negative: the new tokens help). The figure to read for a domain that is not a target: a cost there
    means new tokens fire where their rows never learned."""
    old_tok, new_tok = inp.toks
    old_vocab = old_tok.get_vocab()
    new_ids = {i for t, i in new_tok.get_vocab().items() if t not in old_vocab}
    table = {}
    for name in inp.domains:
        o, n = old[name], new[name]
        if "token_nll" not in o or "token_nll" not in n:
            continue
        c = new_token_costs(old_tok, new_tok, inp.docs[name], o["token_nll"], n["token_nll"], new_ids)
        kb = n["bpb_bytes"] / 1000 if n["bpb_bytes"] else float("nan")
        c["uses_per_kb"] = c["uses"] / kb
        c["change_share"] = c["bits_change"] / o["bits"] if o.get("bits") else None
        table[name] = c
    return table


def eval_speed(cfg: RetokConfig, out: Path) -> dict[str, Any]:
    """Measure old vs new on every eval domain; write report.json, report.md, table.md and charts into
    ``out``."""
    import torch
    import transformers

    device = pick_device(cfg.compute.device)  # an unknown device fails here, before anything is loaded
    set_threads(cfg.compute.threads)
    inp = read_inputs(cfg)
    got = measure(cfg, inp, device)
    old, new = got.old, got.new
    report: dict[str, Any] = {
        "baseline": got.infos[0],
        "candidate": got.infos[1],
        "environment": {
            "device": device,
            "device_name": device_name(device),
            "dtype": str(pick_dtype(cfg.compute.dtype, device)).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "interleaved": got.interleaved,
        },
        "settings": cfg.eval.model_dump(mode="json"),
        "domains": {name: compare(old[name], new[name]) for name in inp.domains},
    }
    for name, costs in new_tokens_table(inp, old, new).items():
        report["domains"][name]["new_tokens"] = costs
    xo, xn = got.extras
    report["tasks"] = {
        name: compare_tasks(items, xo["tasks"][name], xn["tasks"][name]) for name, items in inp.tasks.items()
    }
    report["samples"] = pair_samples(inp.prompts, xo["samples"], xn["samples"])
    for side in (old, new):
        for figs in side.values():
            figs.pop("token_nll", None)
    report = clean(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")
    table = "\n\n".join(t for t in (markdown_table(report), tasks_markdown(report)) if t)
    (out / TABLE_MD).write_text(table + "\n", encoding="utf-8")  # export embeds it
    report["charts"] = charts(report, out)
    for name, d in report["domains"].items():
        print(
            f"retok: {name}: bytes/token x{fmt(d['compression_ratio'], '.2f')}, BPB {fmt(d['old']['bpb'])} -> "
            f"{fmt(d['new']['bpb'])}, bytes/s x{fmt(d.get('speedup_bytes_per_s'), '.2f')}",
            flush=True,
        )
    return report
