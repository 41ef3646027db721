"""train-io: train the input embedding and LM head of ``output_dir/model-init`` with the body frozen.

    retok train-io --config run.yaml                          # CPU or one GPU (bf16 when it supports it)
    accelerate launch --multi_gpu --num_processes 4 -m retok.cli train-io --config run.yaml    # many GPUs
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 -m retok.cli train-io -c run.yaml
                                                              # 2 CPU processes (gloo); `--cpu` alone
                                                              # starts several only through mpirun
    retok train-io --config run.yaml --resume                 # continue after Ctrl-C or a crash

Reads ``output_dir/model-init`` (the re-initialised model) and ``output_dir/tokenizer`` (the new tokenizer),
trains on ``data.train`` tokenized with the new tokenizer (packing.py), and writes ``output_dir/model-trained``:
a Hugging Face folder (tied heads stay tied), ``metrics.jsonl`` and ``train_report.{json,md}`` +
``train_curve.png`` (report.py). Resumable state (state.py) lives apart, in ``output_dir/train-state``.

The modules: loss.py (the objective), params.py (what learns in each phase, optimizer, schedule), state.py
(TrainState and checkpoints), loop.py (the steps of a phase), packing.py (training blocks), report.py.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retok.core.config import RetokConfig
from retok.core.data import load_domains
from retok.core.errors import RetokError
from retok.core.metrics import score_starts
from retok.core.sources import (
    check_rows_cover_tokenizer,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from retok.core.stages import TOKENIZER_FILES, fingerprint, new_token_ids, read_tokenizer_meta, require_stage
from retok.core.tokenmap import AVERAGED
from retok.headfit.run import check_refit, original_rows_and_map, refit_head
from retok.plan import check_plan, ddp_fits
from retok.teacher.alignment import ByteLengths, align
from retok.teacher.body import load_teacher
from retok.train.distill import distill_layers
from retok.train.fsdp import gathered, load_sharded, load_sharded_params, save_consolidated
from retok.train.loop import (
    HeapTrimmer,  # noqa: F401  (re-exported for tests)
    MetricsLog,
    Run,
    evaluate,
    held_out_bpb,
    original_bpb,
    phases,
    run_phase,
    sigint_handler,
)
from retok.train.loss import check_loss_matches
from retok.train.packing import check_sources, train_batches
from retok.train.params import activation_checkpointing, count_params, io_params
from retok.train.piecemap import PieceMap
from retok.train.report import write_report
from retok.train.state import CKPT, METRICS, STATE_DIR, TrainState, check_state, load_params, mark_finished

# ------------------------------------------------------------------------------------------- set-up

MAX_SHARD_BYTES = 5 * 10**9  # safetensors shards of the trained model (transformers' default size)


def _accelerator(cfg: RetokConfig, state_dir: Path) -> Any:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, is_tensorboard_available, is_wandb_available

    t = cfg.train
    # cpu=True also when no accelerator exists: that is what makes Accelerate set up gloo (MULTI_CPU) when
    # several processes are launched.
    cpu = pick_device(cfg.compute.device) == "cpu"
    mp = t.mixed_precision
    if mp == "auto":
        mp = "bf16" if (not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()) else "no"
    for name in t.log_with:
        if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]():
            raise RetokError(f"train.log_with: {name} is not installed; `pip install {name}` or remove it")
    # Evaluation runs on the main process only; the others wait at a barrier that must outlast it.
    return Accelerator(
        cpu=cpu,
        mixed_precision=mp,
        log_with=list(t.log_with) or None,
        project_dir=str(state_dir / "trackers"),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))],
    )


def training_sources(cfg: RetokConfig) -> list:
    """The data.train sources train-io reads: train.domains, or for objective distill tokenizer.domains (blocks
    without new tokens give the new rows no gradient), else all."""
    t = cfg.train
    wanted = (
        t.domains if t.domains is not None else cfg.tokenizer.domains if t.objective == "distill" else None
    )
    return [s for s in cfg.data.train if wanted is None or s.name in wanted]


def _teacher(cfg: RetokConfig, model: nn.Module, tok: Any, old_tok: Any) -> Any:
    """The original model for the distillation objectives: this model's body with the original checkpoint's
    embedding and head (read alone); refused when the layers or the tokenizers do not allow it."""

    t = cfg.train
    n_layers = model.config.get_text_config().num_hidden_layers

    layers = distill_layers(cfg, model)
    if max(layers) > n_layers:
        raise RetokError(f"train.distill_layers: {max(layers)} is past the model's {n_layers} decoder layers")
    # The two segmentations must meet often enough for the teacher to say anything.
    sample = next(iter(load_domains(training_sources(cfg)[:1], "data.train", 20_000).values()), [])
    lo, ln = ByteLengths(old_tok), ByteLengths(tok)
    pos = hit = 0
    for doc in sample:
        a = align(
            lo,
            ln,
            old_tok(doc, add_special_tokens=False)["input_ids"],
            tok(doc, add_special_tokens=False)["input_ids"],
        )
        pos, hit = pos + len(a.teacher), hit + int(a.matched.sum())
    if pos and hit / pos < 0.05:
        raise RetokError(
            f"train.objective {t.objective}: only {100 * hit / pos:.1f}% of the new tokenizer's positions end where an "
            "old token ends, so the original model has almost nothing to teach; use objective: lm"
        )
    return load_teacher(
        model, resolve_model(cfg.model, cfg.cache), trust_remote_code=cfg.model.trust_remote_code
    )


def _tokenizer(cfg: RetokConfig, tok_dir: Path, init_dir: Path) -> Any:
    """The new tokenizer; model-init's copy (which ships with the model) must have the same vocabulary."""

    tok = load_tokenizer(tok_dir, trust_remote_code=cfg.model.trust_remote_code)
    if not (init_dir / "tokenizer.json").is_file():
        return tok
    shipped = load_tokenizer(init_dir, trust_remote_code=cfg.model.trust_remote_code)
    if shipped.get_vocab() != tok.get_vocab():
        raise RetokError(
            f"{init_dir} holds a tokenizer with another vocabulary than {tok_dir} ({len(shipped)} vs "
            f"{len(tok)} tokens); rerun `retok init-embeddings --overwrite` after build-tokenizer"
        )
    return shipped


def _load_init_model(cfg: RetokConfig, init_dir: Path, tok: Any, device: Any) -> nn.Module:

    # fp32 master weights; mixed precision (bf16 on GPUs) is autocast on top.
    model = load_model(
        init_dir,
        dtype="float32",
        device="cpu",
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
    )
    check_rows_cover_tokenizer(model, tok, f"train-io: {init_dir}")
    model.config.use_cache = False
    return model.to(device)


def _strategy(cfg: RetokConfig, acc: Any) -> str:
    """single (one process), ddp or fsdp: train.distributed resolved for this launch."""
    want, world = cfg.train.distributed, acc.num_processes
    if world == 1:
        if want == "fsdp":
            raise RetokError(
                "train.distributed fsdp shards the model over several processes, but this is one; launch with "
                "`accelerate launch --multi_gpu --num_processes N -m retok.cli train-io ...` (or torchrun), or set "
                "train.distributed: auto"
            )
        return "single"
    if want == "auto":
        return "ddp" if ddp_fits(cfg, world) else "fsdp"
    return want


def _saved_dtype(folder: Path) -> torch.dtype:
    """The dtype model-init's floating weights are stored in; the trained model is saved in it too."""
    from safetensors import safe_open

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                if (dt := sf.get_slice(k).get_dtype()) in names:
                    return names[dt]
    return torch.float32


# ------------------------------------------------------------------------------------- entry point


def train_io(cfg: RetokConfig, out: Path, *, resume: bool = False) -> dict:
    """Train embedding + head of output_dir/model-init on data.train; write model-trained into ``out``.

    Returns the report (train_report.json) on the main process, {} on the others.
    """
    wall0 = time.time()
    ready = _prepare(cfg, resume)  # every check that needs no model: fails before anything is written
    run = _build_run(cfg, ready, wall0)
    _announce(run)
    state = _steps(run, ready.state)
    acc = run.acc
    if run.root is not None:  # every process takes part in gathering the shards; the main one writes
        activation_checkpointing(run.model, False)
        save_consolidated(run.model, out, _saved_dtype(ready.init_dir), acc.process_index, MAX_SHARD_BYTES)
    head_fit = _fit_head(run, state, ready.tok_dir, out) if acc.is_main_process else None
    report = _finish(run, state, ready.init_dir, out, head_fit) if acc.is_main_process else {}
    acc.wait_for_everyone()
    _leave_if_not_main(acc)
    return report


@dataclass
class _Ready:
    """What train-io checked and read before loading the model."""

    acc: Any
    strategy: str
    state: TrainState | None
    tok_dir: Path
    init_dir: Path
    tok: Any
    old_tok: Any
    new_ids: list[int] | None
    first_block: torch.Tensor
    eval_docs: dict[str, list[str]]
    eval_starts: dict[str, Any]


def _prepare(cfg: RetokConfig, resume: bool) -> _Ready:
    """The input folders, the launch's strategy, the memory plan, the checkpoint to resume, the tokenizers, the
    first training block and the held-out text: everything that can be refused before a model is loaded."""
    t = cfg.train
    tok_dir = require_stage(cfg, "tokenizer", "train-io")
    init_dir = require_stage(cfg, "model-init", "train-io")
    state_dir = cfg.out / STATE_DIR
    acc = _accelerator(cfg, state_dir)
    strategy = _strategy(cfg, acc)
    if t.piece_map and strategy == "fsdp":
        why = (
            "train.distributed: fsdp"
            if t.distributed == "fsdp"
            else "train.distributed auto picked FSDP (ddp does not fit)"
        )
        raise RetokError(
            f"{why}, but train.piece_map (on by default) is not supported under FSDP yet; set train.piece_map: "
            "false for this config (another recipe, so the model never depends on how it was launched)"
        )
    check_plan(cfg, acc.num_processes, strategy)  # before anything is loaded: refuse what cannot fit
    state = check_state(
        state_dir, fingerprint(cfg, "model-trained"), resume, strategy=strategy, world=acc.num_processes
    )
    tok = _tokenizer(cfg, tok_dir, init_dir)
    new_ids = new_token_ids(tok_dir, len(tok)) if t.trainable == "io_new_rows" else None
    first_block = check_sources(training_sources(cfg), tok, t.seq_len, t.max_bytes_per_source)
    eval_docs = load_domains(cfg.data.eval, "data.eval", t.eval_max_bytes) if cfg.data.eval else {}
    old_tok = load_tokenizer(
        resolve_model(cfg.model, cfg.cache), trust_remote_code=cfg.model.trust_remote_code
    )
    eval_starts = {d: score_starts([old_tok, tok], texts) for d, texts in eval_docs.items()}
    if cfg.fit.after_train:
        check_refit(cfg, old_tok, tok, tok_dir, read_tokenizer_meta(tok_dir))
    return _Ready(
        acc, strategy, state, tok_dir, init_dir, tok, old_tok, new_ids, first_block, eval_docs, eval_starts
    )


def _build_run(cfg: RetokConfig, ready: _Ready, wall0: float) -> Run:
    """model-init loaded (whole, or each process its shards under FSDP), what learns, the piece map, the
    teacher: the Run the steps work on."""
    t, acc, tok = cfg.train, ready.acc, ready.tok
    root = None
    if (
        ready.strategy == "fsdp"
    ):  # each process reads only its shards of model-init (the parameters are DTensors)
        model, root = load_sharded(
            ready.init_dir,
            acc.mixed_precision,
            acc.device,
            checkpointing=t.gradient_checkpointing,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        check_rows_cover_tokenizer(model, tok, f"train-io: {ready.init_dir}")
    else:
        model = _load_init_model(cfg, ready.init_dir, tok, acc.device)
        if t.gradient_checkpointing:
            activation_checkpointing(model, True)
    io = io_params(model, len(tok), ready.new_ids)
    io.head_learns = t.objective != "distill"
    piece_map = _piece_map(cfg, io, ready.old_tok, tok, ready.tok_dir)
    with gathered(root) if root is not None else nullcontext():
        check_loss_matches(model, ready.first_block[None].long(), t.loss_chunk_tokens)
    teacher = _teacher(cfg, model, tok, ready.old_tok) if t.objective != "lm" else None
    return Run(
        cfg=cfg,
        acc=acc,
        tok=tok,
        model=model,
        io=io,
        state_dir=cfg.out / STATE_DIR,
        eval_docs=ready.eval_docs,
        eval_starts=ready.eval_starts,
        old_tok=ready.old_tok,
        teacher=teacher,
        piece_map=piece_map,
        root=root,
        strategy=ready.strategy,
        tokens_per_step=t.grad_accum * t.batch_size * t.seq_len * acc.num_processes,
        wall_start=wall0,
    )


def _steps(run: Run, state: TrainState | None) -> TrainState:
    """The optimizer steps of every phase (resumed where the checkpoint left off), Ctrl-C saving a checkpoint
    first; returns the final state."""
    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGINT, sigint_handler(run))
    except ValueError:  # not the main thread: Ctrl-C then stops without a checkpoint
        pass
    try:
        state, log = _start_or_resume(run, state)
        _train(run, state, log)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if run.cfg.train.log_with:
            run.acc.end_training()
    return state


def _piece_map(cfg: RetokConfig, io: Any, old_tok: Any, tok: Any, tok_dir: Path) -> Any:
    """train.piece_map: the map over the new rows that learn and have pieces (refused under FSDP earlier)."""
    if not cfg.train.piece_map_on():
        return None

    old_embed, _, tmap = original_rows_and_map(cfg, old_tok, tok, tok_dir, read_tokenizer_meta(tok_dir))
    pieces = {
        int(i): tmap.pieces[int(i)]
        for i in tmap.ids(AVERAGED)
        if bool(io.learn_rows[int(i)]) and tmap.pieces.get(int(i))
    }
    return PieceMap(io.embed, pieces, old_embed) if pieces else None


def _announce(run: Run) -> None:
    """The trainable-parameter count and the shape of the run, before the first step."""
    io, acc, t = run.io, run.acc, run.cfg.train
    n_train = count_params(io.trainable("io") + io.biases("io"))
    n_all = count_params(list(run.model.parameters()))
    n_rows = int(io.learn_rows.sum())
    total = t.max_steps + t.full.steps
    if not acc.is_main_process:
        return
    tied = "tied: one matrix serves embedding and head" if io.head is None else "untied embedding and head"
    print(
        f"train-io: trainable parameters {n_train:,} of {n_all:,} ({100 * n_train / n_all:.1f}%; {tied}); "
        f"{n_rows:,} of {io.embed.shape[0]:,} rows learn ({n_rows * io.embed.shape[1] * len(io.trainable('io')):,} values); "
        f"{total} steps of {run.tokens_per_step:,} tokens; {acc.num_processes} process(es) on {acc.device}, "
        f"mixed precision {acc.mixed_precision}",
        flush=True,
    )
    if io.head is None and t.head_lr is not None:
        print("train-io: note: the head is tied to the embedding, so train.head_lr is unused (embed_lr is)")
    if run.piece_map is not None:
        H = io.embed.shape[1]
        print(
            f"train-io: piece map: {run.piece_map.n_rows:,} new input rows share one ({3 * H:,} x {H:,}) map over "
            f"the original rows of their {len(run.piece_map.basis):,} distinct pieces (train.piece_map)",
            flush=True,
        )


def _start_or_resume(run: Run, state: TrainState | None) -> tuple[TrainState, MetricsLog]:
    """A checkpoint to continue from, or step 0 with the original and init BPB measured first."""
    acc, io = run.acc, run.io
    run.state_dir.mkdir(parents=True, exist_ok=True)
    if state is not None:
        if run.root is not None:
            load_sharded_params(run.state_dir, run.model, acc.process_index)
        else:
            load_params(run.state_dir, run.model)
        log = MetricsLog(run, keep_until=state.step)
        if acc.is_main_process:
            total = run.cfg.train.max_steps + run.cfg.train.full.steps
            print(f"train-io: resuming at step {state.step} of {total} from {run.state_dir}", flush=True)
    else:
        if acc.is_main_process:
            shutil.rmtree(run.state_dir / CKPT, ignore_errors=True)  # a finished earlier run: start over
        n_rows = int(io.learn_rows.sum())
        state = TrainState(
            fingerprint=fingerprint(run.cfg, "model-trained"),
            trainable_params=count_params(io.trainable("io") + io.biases("io")),
            learning_values=n_rows * io.embed.shape[1] * len(io.trainable("io")),
            strategy=run.strategy,
            world_size=acc.num_processes,
        )
        log = MetricsLog(run, keep_until=None)
        state.original = original_bpb(run)
        state.init = evaluate(run, run.model, "init")
        if state.init:
            log.write({"step": 0, "phase": "io", "bpb": state.init, "tokens": 0})
    run.shown["bpb"] = state.init or {}
    state.wall_before = state.wall_seconds  # minutes add up across interrupted runs
    return state, log


def _train(run: Run, state: TrainState, log: MetricsLog) -> None:
    """Every phase from where the state is, over one stream of training batches."""
    from tqdm.auto import tqdm

    cfg, acc, t = run.cfg, run.acc, run.cfg.train
    batches = train_batches(
        training_sources(cfg),
        run.tok,
        seq_len=t.seq_len,
        batch_size=t.batch_size,
        seed=cfg.seed,
        shuffle_buffer=t.shuffle_buffer,
        max_bytes=t.max_bytes_per_source,
        skip=state.consumed,
        rank=acc.process_index,
        world=acc.num_processes,
        old_tokenizer=run.old_tok if run.teacher is not None else None,
    )
    # Fill the shuffle buffer now, so that its one-off cost is not counted as the first step's time.
    primed = next(batches)
    batches = itertools.chain([primed], batches)
    if t.log_with:
        scalars = {k: v for k, v in t.model_dump().items() if isinstance(v, int | float | str | bool)}
        acc.init_trackers("retok-train-io", config=scalars)
    resumed_phase = state.phase  # the saved optimizer moments belong to this phase
    total = t.max_steps + t.full.steps
    with tqdm(
        total=total, initial=state.step, desc="train-io", unit="step", disable=not acc.is_main_process
    ) as bar:
        for phase, first, end in phases(cfg):
            if state.step < end:
                run_phase(
                    run, phase, first, end, state, batches, log, bar, resume_optimizer=resumed_phase == phase
                )
            resumed_phase = None


def _fit_head(run: Run, state: TrainState, tok_dir: Path, out: Path) -> dict | None:
    """Main process, after the steps (fit.after_train): the new tokens' head rows fitted on the states of the
    trained input rows (retok.headfit.run.refit_head), the held-out BPB measured again and logged. Under
    FSDP the consolidated folder is loaded whole, fitted and written again."""

    cfg = run.cfg
    if not cfg.fit.after_train:
        return None
    if run.root is None:
        model = run.acc.unwrap_model(run.model)
        activation_checkpointing(model, False)
    else:
        # the consolidated folder's own dtype (model-init's), not compute.dtype: the folder is written again
        # below and must keep its body as it was saved, as the path without FSDP does
        dev = run.acc.device
        stored = str(_saved_dtype(out)).removeprefix("torch.")
        model = load_model(out, dtype=stored, device="cpu" if dev.type == "cpu" else str(dev))
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is emb.weight:
        print("retok: note: fit.after_train skipped: the LM head is tied to the input embedding", flush=True)
        return {"skipped": "the LM head is tied to the input embedding (set init.untie_head: true)"}
    print(
        "retok: train-io: fitting the head rows of new tokens on the trained input rows' states", flush=True
    )
    t0 = time.time()
    report = refit_head(cfg, model, run.old_tok, run.tok, tok_dir, read_tokenizer_meta(tok_dir))
    report["stage_seconds"] = round(time.time() - t0, 1)
    if run.root is not None:
        model.save_pretrained(str(out), safe_serialization=True, max_shard_size=MAX_SHARD_BYTES)
    if run.eval_docs:
        with torch.no_grad():
            bpb = held_out_bpb(run, model, run.tok, "head fit")
        run.shown["bpb"] = bpb
        with (run.state_dir / METRICS).open("a") as f:
            f.write(
                json.dumps({"step": state.step, "phase": "head-fit", "bpb": bpb, "tokens": state.tokens_seen})
                + "\n"
            )
    return report


def _finish(run: Run, state: TrainState, init_dir: Path, out: Path, head_fit: dict | None = None) -> dict:
    """Main process: the trained model folder, the report, and the checkpoint marked finished."""

    acc = run.acc
    state.finished = True
    state.wall_seconds = state.wall_before + time.time() - run.wall_start
    if run.root is None:
        _save_model(run.model, init_dir, out)
    _copy_tokenizer(init_dir, out)
    shutil.copy2(run.state_dir / METRICS, out / METRICS)
    report = write_report(
        out,
        run.cfg,
        state,
        _last_bpb(out / METRICS),
        acc.num_processes,
        str(acc.device),
        acc.mixed_precision,
        head_fit=head_fit,
        piece_map=(
            {"rows": pm.n_rows, "pieces": len(pm.basis), "lr": run.cfg.train.piece_map_lr}
            if (pm := run.piece_map) is not None
            else None
        ),
    )
    mark_finished(run.state_dir, state)
    print(
        "train-io: "
        + "; ".join(
            f"{d} bpb {f['init']:.4f} -> {f['final']:.4f} (original {_fmt(f['original'])})"
            for d, f in report["bpb"].items()
            if f["init"] is not None and f["final"] is not None
        )
        + f"; {report['tokens_seen']:,} tokens in {report['minutes']:.1f} min",
        flush=True,
    )
    return report


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _last_bpb(metrics: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    for ln in metrics.read_text().splitlines():
        rec = json.loads(ln)
        if "bpb" in rec:
            last = rec["bpb"]
    return last


def _save_model(model: nn.Module, init_dir: Path, out: Path) -> None:
    """The trained model as a plain HF folder, in model-init's dtype, with model-init's tokenizer files.

    save_pretrained writes tie_word_embeddings from the config, so a tied model stays tied.
    """
    activation_checkpointing(model, False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = True
    model.to(device="cpu", dtype=_saved_dtype(init_dir)).eval()
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=MAX_SHARD_BYTES)


def _copy_tokenizer(init_dir: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (init_dir / name).is_file():
            shutil.copy2(init_dir / name, out / name)


def _leave_if_not_main(acc: Any) -> None:
    """Under `accelerate launch` every process runs the stage, but only the main one may publish the folder.

    The others leave here: SystemExit(0) through the caller's stage_output discards their temporary folders
    instead of racing the main process to rename them into place.
    """
    if not acc.is_main_process:
        sys.stdout.flush()
        raise SystemExit(0)
