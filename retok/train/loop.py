"""The training loop of train-io: optimizer steps of each phase with held-out BPB, checkpoints, Ctrl-C and
NaN checks, and the progress bar.

    retok train-io --config run.yaml                          # CPU or one GPU (bf16 when it supports it)
    accelerate launch --multi_gpu --num_processes 4 -m retok.cli train-io --config run.yaml    # many GPUs

Under ``accelerate launch`` every process runs the loop on its own slice of the data; evaluation runs on the
main process while the others wait at a barrier.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retok.core.config import RetokConfig
from retok.core.errors import RetokError
from retok.core.metrics import bits_per_byte
from retok.core.sources import load_model, resolve_model
from retok.teacher.body import OriginalLM, load_teacher
from retok.train.distill import DistillLoss, distill_layers
from retok.train.fsdp import (
    gathered,
    grad_norm_clip,
    load_sharded_optimizer,
    local_masks,
    mask_grads,
    save_sharded,
)
from retok.train.loss import IOLoss
from retok.train.params import (
    IOParams,
    Phase,
    apply_decay,
    decay_masks,
    freeze,
    lr_factor,
    make_optimizer,
    row_masks,
)
from retok.train.rows import CompactRows
from retok.train.state import METRICS, TrainState, load_optimizer, read_state, save_checkpoint

# A seam for tests: called with the step number after every optimizer step (e.g. to send SIGINT).
_on_step: Callable[[int], None] | None = None


@dataclass
class Run:
    """What the loop needs, made once by :func:`train_io`."""

    cfg: RetokConfig
    acc: Any
    tok: Any
    model: nn.Module
    io: IOParams
    state_dir: Path
    eval_docs: dict[str, list[str]]
    eval_starts: dict[str, list[int]]  # where scoring starts in each eval document (same for both models)
    old_tok: Any  # the original model's tokenizer
    tokens_per_step: int
    teacher: Any = None  # retok.teacher.body.Teacher for the distillation objectives
    piece_map: Any = None  # retok.train.piecemap.PieceMap of the io phase (train.piece_map), or None
    strategy: str = "single"  # single, ddp or fsdp
    root: Any = (
        None  # train.distributed fsdp: the sharded root (retok.train.fsdp.ShardedObjective), else None
    )
    wall_start: float = 0.0  # time.time() when this invocation started
    stop: list[bool] = field(default_factory=lambda: [False])  # set by the Ctrl-C handler
    shown: dict = field(default_factory=dict)  # latest loss / BPB / tokens/s for the progress bar


# ---------------------------------------------------------------------------------- held-out BPB


def held_out_bpb(run: Run, model: nn.Module, tok: Any, label: str) -> dict[str, float]:
    """BPB per data.eval domain (call on the main process)."""

    out = {}
    with run.acc.autocast():
        for name, docs in run.eval_docs.items():
            out[name] = bits_per_byte(
                model,
                tok,
                docs,
                starts=run.eval_starts[name],
                window=run.cfg.eval.window,
                stride=run.cfg.eval.stride,
                device=run.acc.device,
                desc=f"bpb {name} ({label})" if run.acc.is_main_process else None,
            )["bpb"]
    return out


def evaluate(run: Run, model: nn.Module, label: str) -> dict[str, float]:
    """BPB of the model being trained, on the main process; the others wait. Under FSDP every process runs
    the (sharded, collective) forward and the main process keeps the figures."""
    if run.root is not None:
        if not run.eval_docs:
            return {}
        with gathered(run.root), torch.no_grad():
            out = held_out_bpb(run, model, run.tok, label)
        model.train()
        return out if run.acc.is_main_process else {}
    out = held_out_bpb(run, model, run.tok, label) if run.acc.is_main_process and run.eval_docs else {}
    run.acc.wait_for_everyone()
    return out


def original_bpb(run: Run) -> dict[str, float]:
    """BPB of the original model with its ORIGINAL tokenizer on the same held-out text (main process)."""

    out: dict[str, float] = {}
    if (
        run.root is not None and run.eval_docs
    ):  # FSDP: the shared sharded body with the old embedding and head
        m = run.cfg.model
        teacher = run.teacher or load_teacher(
            run.model, resolve_model(m, run.cfg.cache), trust_remote_code=m.trust_remote_code
        )
        with gathered(run.root):
            out = held_out_bpb(run, OriginalLM(teacher), run.old_tok, "original")
        run.model.train()
        return out if run.acc.is_main_process else {}
    if run.acc.is_main_process and run.eval_docs:
        m = run.cfg.model
        folder = resolve_model(m, run.cfg.cache)
        model = load_model(
            folder,
            dtype="float32",
            device="cpu" if run.acc.device.type == "cpu" else str(run.acc.device),
            trust_remote_code=m.trust_remote_code,
            allow_pickle=m.allow_pickle,
        )
        out = held_out_bpb(run, model, run.old_tok, "original")
        del model
    run.acc.wait_for_everyone()
    return out


# ------------------------------------------------------------------------------------------ the loop


def objective(run: Run, phase: Phase) -> nn.Module:
    """What a phase minimises: the next-token loss, or (io phase, train.objective) distillation from the
    original model with or without it. The joint phase trains the body, which the shared-body teacher IS, so
    it always uses the next-token loss."""
    t = run.cfg.train
    if phase == "all" or t.objective == "lm" or run.teacher is None:
        return IOLoss(run.model, t.loss_chunk_tokens)

    return DistillLoss(
        run.model,
        run.teacher,
        distill_layers(run.cfg, run.model),
        lm_weight=1.0 if t.objective == "lm+distill" else 0.0,
        distill_weight=t.distill_weight,
        chunk_tokens=t.loss_chunk_tokens,
    )


class MetricsLog:
    """metrics.jsonl in the state folder (copied into model-trained at the end), plus Accelerate's trackers."""

    def __init__(self, run: Run, keep_until: int | None):
        self.run = run
        self.path = run.state_dir / METRICS
        if run.acc.is_main_process:
            kept = []
            if keep_until is not None and self.path.is_file():
                # Steps after the checkpoint are done again on resume: drop their lines.
                kept = [
                    ln
                    for ln in self.path.read_text().splitlines()
                    if ln and json.loads(ln)["step"] <= keep_until
                ]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, rec: dict) -> None:
        if not self.run.acc.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.run.cfg.train.log_with:
            flat = {k: v for k, v in rec.items() if isinstance(v, int | float) and k != "step"}
            flat.update({f"bpb/{d}": v for d, v in (rec.get("bpb") or {}).items()})
            self.run.acc.log(flat, step=rec["step"])


def sigint_handler(run: Run) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        if run.stop[0]:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now, without a checkpoint
        run.stop[0] = True
        print(
            "\ntrain-io: interrupted; saving a checkpoint after this step (Ctrl-C again quits at once)",
            flush=True,
        )

    return handler


def phases(cfg: RetokConfig) -> list[tuple[Phase, int, int]]:
    """(phase, first step, end step) of each phase; steps count on across phases."""
    out = [("io", 0, cfg.train.max_steps)]
    if cfg.train.full.steps:
        out.append(("all", cfg.train.max_steps, cfg.train.max_steps + cfg.train.full.steps))
    return out


def _checkpoint(run: Run, model: nn.Module, opt: Any, state: TrainState, phase: Phase) -> None:
    state.wall_seconds = state.wall_before + time.time() - run.wall_start
    if run.root is not None:
        state.phase = phase
        save_sharded(run.state_dir, model, getattr(opt, "optimizer", opt), state, run.acc.process_index)
        return
    if run.acc.is_main_process:
        state.phase = phase
        save_checkpoint(run.state_dir, model, getattr(opt, "optimizer", opt), state)
    run.acc.wait_for_everyone()


@dataclass
class _Phase:
    """One phase's optimizer, objective and masks (built after requires_grad is final for the phase)."""

    name: Phase
    first: int
    end: int
    warmup: int
    opt: Any
    loss_model: Any
    masks: dict  # weight-decay row masks by id(param) (this process's rows under FSDP)
    grad_masks: dict  # FSDP: gradient row masks applied after backward (DDP masks through hooks instead)
    trainable: list
    piece_map: Any  # the io phase's PieceMap, or None
    hooks: list
    trimmer: HeapTrimmer | None


def _start_phase(run: Run, phase: Phase, first: int, end: int, resume_optimizer: bool) -> _Phase:
    acc, t, model = run.acc, run.cfg.train, run.model
    _compact_rows(run, phase)
    hooks = freeze(model, run.io, phase)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if run.io.compact is not None:
        trainable.append(run.io.compact.param)
    masks, grad_masks = decay_masks(run.io, phase), {}
    if run.root is not None:
        for h in hooks:  # FSDP's gradients never pass these hooks: masked after backward instead
            h.remove()
        hooks = []
        masks = local_masks(masks, trainable)
        grad_masks = local_masks(row_masks(run.io, phase), trainable)
    piece_map = run.piece_map if phase == "io" else None
    opt = make_optimizer(model, run.io, run.cfg, phase, piece_map)
    if resume_optimizer:
        if run.root is not None:
            load_sharded_optimizer(run.state_dir, model, opt)
        else:
            load_optimizer(run.state_dir, opt)
    warmup = t.warmup_steps if phase == "io" else min(t.warmup_steps, max(1, (end - first) // 10))
    if run.root is not None:
        run.root.use(objective(run, phase))
        loss_model = run.root
    else:
        # DDP (under accelerate launch) is built here, after requires_grad is final for this phase.
        loss_model, opt = acc.prepare(objective(run, phase), opt)
    return _Phase(
        name=phase,
        first=first,
        end=end,
        warmup=warmup,
        opt=opt,
        loss_model=loss_model,
        masks=masks,
        grad_masks=grad_masks,
        trainable=trainable,
        piece_map=piece_map,
        hooks=hooks,
        trimmer=HeapTrimmer() if acc.device.type == "cpu" else None,
    )


def _compact_rows(run: Run, phase: Phase) -> None:
    """The io phase on one process trains the learning input rows as a parameter of their own
    (retok.train.rows): no vocabulary-sized gradient or moments. The piece map then moves those rows."""
    io = run.io
    if phase != "io" or run.root is not None or run.acc.num_processes > 1 or not io.compact_ok():
        return
    io.compact = CompactRows.attach(run.model, io.learn_rows)
    if io.compact is not None and run.piece_map is not None:
        run.piece_map.bind(io.compact.param, io.compact.slot)


def _end_phase(run: Run, ph: _Phase) -> None:
    """The gradient hooks off; compact rows written back into the embedding and released."""
    for h in ph.hooks:
        h.remove()
    if run.io.compact is not None:
        run.io.compact.close()
        run.io.compact = None
        if run.piece_map is not None:
            run.piece_map.bind(run.io.embed)


def _optimizer_step(
    run: Run, ph: _Phase, batches: Iterator[Any], step: int
) -> tuple[float, dict[str, float], float | None, bool]:
    """grad_accum micro-batches and one optimizer step: (loss, loss parts, grad norm, Ctrl-C seen anywhere)."""
    acc, t = run.acc, run.cfg.train
    losses = []
    parts: dict[str, float] = {}
    for k in range(t.grad_accum):
        x = next(batches).to(acc.device)
        last = k == t.grad_accum - 1
        if run.root is not None:  # FSDP reduces gradients at the last micro-batch only
            run.root.set_requires_gradient_sync(last)
            sync = nullcontext()
        else:
            sync = acc.no_sync(ph.loss_model) if not last else nullcontext()
        with sync:
            loss = ph.loss_model(x)
            acc.backward(loss / t.grad_accum if t.grad_accum > 1 else loss)
        losses.append(loss.detach().float())
        for name, v in getattr(acc.unwrap_model(ph.loss_model), "last_parts", {}).items():
            parts[name] = parts.get(name, 0.0) + v / t.grad_accum
    # One all-reduce carries the loss and whether any process got Ctrl-C, so all stop together.
    flags = torch.stack([torch.stack(losses).mean(), torch.tensor(float(run.stop[0]), device=acc.device)])
    flags = acc.reduce(flags, "sum")
    loss_val = float(flags[0]) / acc.num_processes
    if not math.isfinite(loss_val):
        last = read_state(run.state_dir)
        kept = (
            f"the last good checkpoint (step {last.step}) is kept in {run.state_dir}"
            if last
            else "no checkpoint was saved yet"
        )
        raise RetokError(
            f"train-io: the loss became {loss_val} at step {step} (lr {ph.opt.param_groups[0]['lr']:.2e}); stopped "
            "without saving, "
            f"{kept}; lower train.lr (embed_lr, head_lr, full.lr) and start over"
        )
    if run.root is not None:
        mask_grads(ph.trainable, ph.grad_masks)
        grad_norm = grad_norm_clip(ph.trainable, t.max_grad_norm) if t.max_grad_norm else None
    else:
        grad_norm = float(acc.clip_grad_norm_(ph.trainable, t.max_grad_norm)) if t.max_grad_norm else None
    if ph.piece_map is not None:
        ph.piece_map.before_step()  # the map's gradient from the (clipped) rows' gradient
    apply_decay(ph.opt, ph.masks, t.weight_decay)
    ph.opt.step()
    if ph.piece_map is not None:
        ph.piece_map.after_step()  # the rows move by what the step did to the map
    if run.io.compact is not None:
        run.io.compact.push()  # the embedding holds the whole row at every moment
    ph.opt.zero_grad(set_to_none=True)
    if ph.trimmer is not None:
        ph.trimmer.after_step()
    return loss_val, parts, grad_norm, bool(flags[1] > 0)


def run_phase(
    run: Run,
    phase: Phase,
    first: int,
    end: int,
    state: TrainState,
    batches: Iterator[Any],
    log: MetricsLog,
    bar: Any,
    resume_optimizer: bool,
) -> None:
    """Optimizer steps state.step .. end of one phase, with evals, checkpoints, Ctrl-C and NaN checks."""
    acc, t = run.acc, run.cfg.train
    ph = _start_phase(run, phase, first, end, resume_optimizer)
    run.model.train()
    try:
        while state.step < end:
            step = state.step
            factor = lr_factor(step - first, ph.warmup, end - first, t.min_lr_ratio)
            for g in ph.opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            t0 = time.perf_counter()
            loss_val, parts, grad_norm, stopping = _optimizer_step(run, ph, batches, step + 1)
            secs = time.perf_counter() - t0
            state.step = step + 1
            state.consumed += t.grad_accum * acc.num_processes
            state.tokens_seen += run.tokens_per_step
            state.train_seconds += secs
            log.write(
                {
                    "step": step + 1,
                    "phase": phase,
                    "loss": loss_val,
                    **{f"loss_{name}": v for name, v in parts.items()},
                    "lr": ph.opt.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "tokens": state.tokens_seen,
                    "step_seconds": secs,
                    "tokens_per_second": run.tokens_per_step / secs,
                }
            )
            run.shown.update(loss=loss_val, tps=run.tokens_per_step / secs)
            _after_step(run, ph, state, log, bar, stopping)
    finally:
        _end_phase(run, ph)
        acc.free_memory()


def _after_step(run: Run, ph: _Phase, state: TrainState, log: MetricsLog, bar: Any, stopping: bool) -> None:
    """Held-out BPB, the progress bar, checkpoints; a Ctrl-C stops here, after a checkpoint."""
    acc, t, step = run.acc, run.cfg.train, state.step
    if step % t.eval_every == 0 or step == ph.end:
        bpb = evaluate(run, acc.unwrap_model(ph.loss_model).model, f"step {step}")
        if bpb:
            log.write({"step": step, "phase": ph.name, "bpb": bpb, "tokens": state.tokens_seen})
            run.shown["bpb"] = bpb
        run.model.train()
    bar.set_postfix(_postfix(run.shown), refresh=False)
    bar.update(1)
    if step % t.save_every == 0 or step == ph.end or stopping:
        _checkpoint(run, run.model, ph.opt, state, ph.name)
    if _on_step is not None:
        _on_step(step)
    if stopping:
        if acc.is_main_process:
            print(
                f"train-io: checkpoint at step {step} saved in {run.state_dir}; continue with `retok train-io --resume`",
                flush=True,
            )
        raise KeyboardInterrupt


class HeapTrimmer:
    """Give freed activations back to the OS when the heap has crept up (glibc only; CPU training).

    glibc keeps freed heap memory mapped, so later steps' activations land on a fragmented heap and peak RSS
    creeps up step after step (on SmolLM2-135M, seq 256, batch 4: ~230 MB over a few steps). malloc_trim
    fixes that, but every trim costs ~0.2 s because the next step faults the pages back in. So: remember the
    resident size after the first step, and trim only when a later step ends more than ``slack`` above it.
    """

    def __init__(self, slack_bytes: int = 64 << 20) -> None:
        self.slack = slack_bytes
        self.reference: int | None = None
        self.trims = 0
        self._trim: Any = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self._trim = None

    @staticmethod
    def resident_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def after_step(self) -> None:
        if self._trim is None:
            return
        rss = self.resident_bytes()
        if self.reference is None:
            self.reference = rss
        elif rss > self.reference + self.slack:
            self._trim(0)
            self.trims += 1


def _postfix(shown: dict) -> dict[str, str]:
    post = {}
    if "loss" in shown:
        post["loss"] = f"{shown['loss']:.3f}"
    if shown.get("bpb"):
        post["bpb"] = " ".join(f"{k}={v:.3f}" for k, v in shown["bpb"].items())
    if "tps" in shown:
        post["tok/s"] = f"{shown['tps']:.0f}"
    return post
