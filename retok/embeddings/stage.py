"""init-embeddings: the original model + ``output_dir/tokenizer/`` -> ``output_dir/model-init/``.

    retok init-embeddings --config configs/smollm2-zh.yaml

Reads and writes safetensors shards tensor by tensor (checkpoint.py): only the input embedding and the LM
head are held in memory. The rows of the new matrices come from the TokenMap (retok.core.tokenmap), the pure
functions of methods.py and rows.py. The folder it writes loads with plain ``AutoModelForCausalLM`` /
``AutoTokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retok.core.config import RetokConfig
from retok.core.errors import RetokError
from retok.core.model_io import IoNames, find_io_names
from retok.core.safetensors_io import TensorInfo, load_tensor, read_checkpoint
from retok.core.sources import load_tokenizer, resolve_model
from retok.core.stages import read_tokenizer_meta, require_stage
from retok.core.tokenmap import build_token_map, pick_pad_donor
from retok.embeddings.checkpoint import write_model
from retok.embeddings.folder import copy_tokenizer_files, verify_folder, write_configs
from retok.embeddings.headshift import fit_head_shift
from retok.embeddings.report import examples, measure_bpb, pieces_histogram, write_report
from retok.embeddings.rows import Plan, build_matrix
from retok.headfit.run import fit_at_init


def _check_init_config(cfg: RetokConfig, names: IoNames) -> None:
    init = cfg.init
    if names.tied and not names.separate:
        if init.head_method is not None and init.head_method != init.method:
            raise RetokError(
                "init.head_method: the model ties its LM head to the input embedding, so head rows ARE input rows; "
                "set init.untie_head: true to give the head its own rows, or drop init.head_method"
            )
        if cfg.fit.at_init:
            raise RetokError(
                "fit.at_init: the model ties its LM head to the input embedding, so fitting head rows would move "
                "input rows too; set init.untie_head: true (the default), or fit.at_init: false"
            )
        if init.head_shift or init.head_shift_outside:
            raise RetokError(
                "init.head_shift: the model ties its LM head to the input embedding, so shifting head rows would "
                "shift input rows too; set init.untie_head: true"
            )


@dataclass
class Inputs:
    """What init-embeddings reads: the original model's folder and tokenizer, and the new tokenizer."""

    model_dir: Path
    tok_dir: Path
    meta: dict[str, Any]  # retok_tokenizer.json
    old_hf: Any
    new_hf: Any

    @classmethod
    def load(cls, cfg: RetokConfig) -> Inputs:

        model_dir = resolve_model(cfg.model, cfg.cache)
        tok_dir = require_stage(cfg, "tokenizer", "init-embeddings")
        return cls(
            model_dir,
            tok_dir,
            read_tokenizer_meta(tok_dir),
            load_tokenizer(model_dir, trust_remote_code=cfg.model.trust_remote_code),
            load_tokenizer(tok_dir),
        )


@dataclass
class Layout:
    """The old checkpoint: its tensors and shards, and which tensors are the embedding and the head."""

    infos: dict[str, TensorInfo]
    files: list[str]
    index_meta: dict[str, Any] | None
    names: IoNames

    @property
    def embed(self) -> TensorInfo:
        return self.infos[self.names.embed]


def read_layout(cfg: RetokConfig, model_dir: Path) -> Layout:
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
            f"{names.head} has shape {infos[names.head].shape} but {names.embed} has {emb.shape}; "
            "cannot rebuild them together"
        )
    return Layout(infos, files, index_meta, names)


def make_plan(cfg: RetokConfig, inputs: Inputs, layout: Layout) -> tuple[Plan, dict[str, Any] | None]:
    """Which old rows each new row comes from and how they combine; the head shift when one is asked for.
    Returns (plan, calibration report or None)."""
    names = layout.names
    tmap = build_token_map(
        inputs.old_hf,
        inputs.new_hf,
        old_rows=layout.embed.shape[0],
        pad_to_multiple_of=cfg.init.pad_to_multiple_of,
        where=str(inputs.tok_dir),
        meta=inputs.meta,
        progress=True,
    )
    old_head = load_tensor(layout.infos[names.head or names.embed])
    pick_pad_donor(tmap, old_head)
    del old_head
    plan = Plan(
        tmap,
        cfg.init.method,
        (cfg.init.head_method or "mean") if names.separate else cfg.init.method,
        cfg.init.weighted_decay,
        cfg.seed,
    )
    calibration: dict[str, Any] = {}
    if (cfg.init.head_shift or cfg.init.head_shift_outside) and names.separate:
        plan.head_shift, calibration["head_shift"] = fit_head_shift(cfg, inputs.model_dir, inputs.old_hf)
    if cfg.fit.at_init and names.separate and not cfg.data.train:
        print(
            "retok: note: fit.at_init skipped: data.train is empty (the head keeps its initial rows)",
            flush=True,
        )
        calibration["head_fit"] = {"skipped": "data.train is empty"}
    elif cfg.fit.at_init and names.separate:
        old_embed = load_tensor(layout.infos[names.embed])
        old_head = load_tensor(layout.infos[names.head]) if names.head is not None else old_embed
        new_input, head0 = build_matrix(old_embed, plan, "input"), build_matrix(old_head, plan, "head")
        plan.head_rows, calibration["head_fit"] = fit_at_init(
            cfg,
            inputs.model_dir,
            inputs.old_hf,
            inputs.new_hf,
            plan.tmap,
            new_input,
            head0,
            old_embed,
            old_head,
        )
    return plan, calibration or None


def init_embeddings(cfg: RetokConfig, out: Path) -> dict[str, Any]:
    """Write ``out`` (a temporary folder that the caller renames to ``output_dir/model-init``): the model
    with the new tokenizer's embedding and LM head, its configs and tokenizer files, and the report.
    Returns the report (the JSON of init_report.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise RetokError(f"{out} is not empty; init-embeddings writes into a fresh folder")
    inputs = Inputs.load(cfg)
    layout = read_layout(cfg, inputs.model_dir)
    plan, calibration = make_plan(cfg, inputs, layout)

    # ---- shards, configs, tokenizer files
    names, tmap = layout.names, plan.tmap
    written = write_model(inputs.model_dir, out, layout.infos, layout.files, layout.index_meta, names, plan)
    ids = write_configs(inputs.model_dir, out, tmap, names)
    tok_files = copy_tokenizer_files(inputs.tok_dir, out, inputs.old_hf)
    checks = verify_folder(out, tmap)
    if not checks["ok"]:  # never publish a folder that fails its own checks (nothing is kept)
        raise RetokError(
            "init-embeddings: the new model folder fails its own checks ("
            + "; ".join(checks["problems"])
            + "); "
            "check that model.path's config.json and tokenizer agree on these ids, then run it again"
        )

    report = rows_report(cfg, inputs, layout, plan)
    report.update(
        calibration=calibration,
        tensors={"embed": names.embed, "head": names.head_to_write, **written},
        ids=ids,
        tokenizer_files=tok_files,
        checks=checks,
    )
    if cfg.init.eval_bpb and cfg.data.eval:
        report.update(measure_bpb(cfg, inputs.model_dir, out, inputs.old_hf, inputs.new_hf, plan, names))
    elif cfg.init.eval_bpb:
        report["eval_note"] = "No held-out BPB: data.eval is empty."
    write_report(out, report)
    counts = tmap.counts()
    print(
        f"retok: init-embeddings: {counts['copied']} copied, {counts['special']} special, {counts['averaged']} averaged, "
        f"{counts['fallback']} fallback, {counts['padding']} padding rows -> {tmap.n_rows} rows",
        flush=True,
    )
    return report


def rows_report(cfg: RetokConfig, inputs: Inputs, layout: Layout, plan: Plan) -> dict[str, Any]:
    """The part of init_report.json that says where every row came from."""
    tmap, names, emb = plan.tmap, layout.names, layout.embed
    return {
        **tmap.counts(),
        "model": str(inputs.model_dir),
        "tokenizer": str(inputs.tok_dir),
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
        "pieces_histogram": pieces_histogram(tmap),
        "examples": examples(tmap, inputs.old_hf.backend_tokenizer, inputs.new_hf.backend_tokenizer),
        "fallback_examples": {str(k): v for k, v in list(tmap.fallback_reason.items())[:5]},
    }
