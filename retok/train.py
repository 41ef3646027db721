"""train-io: train the input embedding and LM head of ``output_dir/model-init`` with the body frozen.

    retok train-io --config run.yaml                          # CPU or one GPU (bf16 when it supports it)
    accelerate launch --multi_gpu --num_processes 4 -m retok.cli train-io --config run.yaml    # many GPUs
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 -m retok.cli train-io -c run.yaml
                                                              # 2 CPU processes (gloo); `--cpu` alone
                                                              # starts several only through mpirun
    retok train-io --config run.yaml --resume                 # continue after Ctrl-C or a crash

Reads ``output_dir/model-init`` (the re-initialised model) and ``output_dir/tokenizer`` (the new tokenizer),
trains on ``data.train`` tokenized with the new tokenizer (retok.packing), and writes
``output_dir/model-trained``: a Hugging Face folder (tied heads stay tied), ``metrics.jsonl`` and
``train_report.{json,md}`` + ``train_curve.png`` (retok.train_report). Resumable state (trainable tensors,
optimizer, data position, config fingerprint) lives apart, in ``output_dir/train-state``.

Only the embedding and the head get gradients: the body's parameters have ``requires_grad=False``, so
autograd computes no weight gradient for them and the optimizer never sees them (they are bit-identical
after training). The loss never holds the fp32 logits of the whole batch: :func:`chunked_lm_loss` runs the
head and cross-entropy over chunks of ``train.loss_chunk_tokens`` tokens and computes each chunk's gradient
on the spot, so a chunk's logits are freed before the next one is made.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retok.config import RetokConfig, fingerprint
from retok.embeddings.surgery import TOKENIZER_FILES
from retok.errors import RetokError

STATE_DIR = "train-state"
CKPT = "checkpoint"
STATE_FILE = "state.json"
METRICS = "metrics.jsonl"
ADAM_BETAS = (0.9, 0.95)  # the usual LLM-training betas; 0.999 reacts too slowly for a short run

# A seam for tests: called with the step number after every optimizer step (e.g. to send SIGINT).
_on_step: Callable[[int], None] | None = None


# =========================================================================================== the loss


class _ChunkedHeadLoss(torch.autograd.Function):
    """Mean next-token NLL over ``hidden @ weight.T (+ bias)``, chunk by chunk, gradients computed in forward.

    Working chunk by chunk and turning each chunk's softmax straight into its gradient (softmax - one-hot)
    means at most one chunk of fp32 logits exists at a time, and nothing vocabulary-sized is kept for
    backward except the weight's gradient itself. Three matmuls per chunk, one fewer than recomputing the
    chunk's logits in backward with torch.utils.checkpoint. The 1/N of the mean is folded into the small
    operands (alpha of addmm), so backward has nothing vocabulary-sized to scale when grad_out is 1.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, softcap: float | None):  # type: ignore[override]
        dev = hidden.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        scale = 1.0 / targets.numel()
        with torch.autocast(dev, enabled=False):
            w = weight.to(cd)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(cd)
                t = targets[s : s + chunk]
                logits = (h @ w.T).float()
                if bias is not None:
                    logits += bias.float()
                if softcap is not None:
                    capped = logits.div_(softcap).tanh_()
                    logits = capped * softcap
                # Softmax in place (torch.logsumexp would allocate a second vocabulary-sized buffer).
                picked = logits.gather(1, t[:, None]).squeeze(1)
                top = logits.amax(dim=-1, keepdim=True)
                g = logits.sub_(top).exp_()
                norm = g.sum(dim=-1, keepdim=True)
                total += (top.squeeze(1) + norm.log().squeeze(1) - picked).sum()
                if not (need_h or need_w or need_b):
                    continue
                g.div_(norm)  # softmax - one-hot = d(NLL)/d(logits)
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                if softcap is not None:
                    g *= 1.0 - capped * capped
                if need_b:
                    grad_b.add_(g.sum(0), alpha=scale)
                g = g.to(cd)
                if need_h:
                    grad_h[s : s + chunk] = (g @ w).mul_(scale).to(hidden.dtype)
                if need_w:
                    if cd == torch.float32:
                        grad_w.addmm_(g.T, h, alpha=scale)
                    else:
                        grad_w.add_(g.T @ h, alpha=scale)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grads = list(ctx.saved_tensors)
        if grad_out.item() != 1.0:  # gradient accumulation or a loss scaler
            grads = [g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in grads]
        return grads[0], grads[1], grads[2], None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_tokens: int,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden`` (N, H) against ``targets`` (N,) through the head ``weight``
    (V, H); never more than ``chunk_tokens`` rows of logits at once."""
    return _ChunkedHeadLoss.apply(hidden, weight, bias, targets, chunk_tokens, softcap)


class IOLoss(nn.Module):
    """The causal LM as a loss: body -> final hidden states -> chunked head + cross-entropy.

    Wrapping it in a module lets Accelerate/DDP wrap the whole computation (DDP syncs gradients of what its
    forward touched); the HF model stays reachable as ``.model`` for evaluation and saving.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        return chunked_lm_loss(
            h,
            head.weight,
            input_ids[:, 1:].reshape(-1),
            chunk_tokens=self.chunk_tokens,
            bias=getattr(head, "bias", None),
            softcap=self.softcap,
        )


def _check_loss_matches(model: nn.Module, block: torch.Tensor, chunk_tokens: int) -> None:
    """Guard against architectures that scale their logits in ways IOLoss does not know: compare once with the
    model's own loss on a short slice."""
    x = block[:1, : min(64, block.shape[1])].to(next(model.parameters()).device)
    with torch.no_grad():
        ours = float(IOLoss(model, min(chunk_tokens, 16))(x))
        theirs = float(model(input_ids=x, labels=x, use_cache=False).loss)
    if not abs(ours - theirs) <= 1e-3 * max(1.0, abs(theirs)):
        raise RetokError(
            f"train-io: the chunked LM-head loss ({ours:.5f}) disagrees with {type(model).__name__}'s own loss "
            f"({theirs:.5f}); this architecture transforms its logits in a way retok does not support yet"
        )


# ================================================================================ what is trainable


@dataclass
class IOParams:
    """The embedding and head of a model, and which of their rows may learn."""

    embed: nn.Parameter
    head: nn.Parameter | None  # None when tied (one matrix serves both)
    head_bias: nn.Parameter | None
    n_tokens: int  # len(tokenizer); rows at or past it are padding and stay inert
    learn_rows: torch.Tensor  # bool (rows,): rows that may change in the io stage

    @property
    def matrices(self) -> list[nn.Parameter]:
        return [self.embed] + ([self.head] if self.head is not None else [])


def io_params(model: nn.Module, n_tokens: int, new_ids: list[int] | None) -> IOParams:
    embed = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = None if head_mod.weight is embed else head_mod.weight
    rows = embed.shape[0]
    if new_ids is None:
        learn = torch.arange(rows) < n_tokens
    else:
        learn = torch.zeros(rows, dtype=torch.bool)
        learn[torch.as_tensor(new_ids, dtype=torch.long)] = True
    return IOParams(embed, head, getattr(head_mod, "bias", None), n_tokens, learn)


def _mask_col(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.to(device=like.device, dtype=like.dtype)[:, None]


def freeze(model: nn.Module, io: IOParams, stage: str) -> list[Any]:
    """requires_grad on exactly what learns in ``stage`` ("io" or "all"); returns the gradient-mask hooks.

    Rows that must not move (padding always; old tokens in io_new_rows) get their gradient zeroed by a hook
    before it reaches .grad. With a zero gradient from the first step, AdamW's moments stay 0 and its update
    is exactly 0, so those rows stay bit-identical (weight decay is applied by :func:`_decay`, masked too).
    """
    for p in model.parameters():
        p.requires_grad_(stage == "all")
    for p in io.matrices + ([io.head_bias] if io.head_bias is not None else []):
        p.requires_grad_(True)
    rows = io.learn_rows if stage == "io" else torch.arange(io.embed.shape[0]) < io.n_tokens
    hooks = []
    if not bool(rows.all()):
        for p in io.matrices:
            col = _mask_col(rows, p)
            hooks.append(p.register_hook(lambda g, col=col: g * col))
    return hooks


def _decay_masks(io: IOParams, stage: str) -> dict[int, torch.Tensor]:
    rows = io.learn_rows if stage == "io" else torch.arange(io.embed.shape[0]) < io.n_tokens
    return {id(p): _mask_col(rows, p) for p in io.matrices}


def count_params(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


# ========================================================================== optimizer and schedule


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr for the update made at ``step`` (0-based): linear warm-up, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model: nn.Module, io: IOParams, cfg: RetokConfig, stage: str) -> torch.optim.AdamW:
    t = cfg.train
    if stage == "io":
        groups = [{"params": [io.embed], "lr": t.embed_lr or t.lr, "name": "embed"}]
        if io.head is not None:
            groups.append({"params": [io.head], "lr": t.head_lr or t.lr, "name": "head"})
        if io.head_bias is not None:
            groups.append({"params": [io.head_bias], "lr": t.head_lr or t.lr, "name": "head_bias"})
        decay = 0.0  # applied row-masked by _decay
    else:
        io_ids = {id(p) for p in io.matrices}
        body = [p for p in model.parameters() if id(p) not in io_ids]
        groups = [
            {"params": io.matrices, "lr": t.full.lr, "name": "io"},
            {"params": body, "lr": t.full.lr, "name": "body"},
        ]
        decay = t.weight_decay
    for g in groups:
        g["base_lr"] = g["lr"]
        g["weight_decay"] = decay if g["name"] == "body" else 0.0
    # fused: one kernel per step, no vocabulary-sized temporaries (foreach makes several).
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=1e-8, fused=fused)


@torch.no_grad()
def _decay(opt: torch.optim.Optimizer, masks: dict[int, torch.Tensor], weight_decay: float) -> None:
    """Decoupled weight decay (AdamW's p *= 1 - lr*wd) on the embedding/head rows that may learn only."""
    if weight_decay <= 0:
        return
    for g in opt.param_groups:
        for p in g["params"]:
            m = masks.get(id(p))
            if m is not None:
                p.mul_(1.0 - g["lr"] * weight_decay * m)


# ===================================================================================== checkpoints


def _save_checkpoint(state_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Trainable tensors + optimizer moments + RNG (safetensors) + position and history (JSON), swapped in
    atomically: a crash while saving leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    tmp = state_dir / f".{CKPT}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # named_parameters lists a tied matrix once
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params[name] = p.detach().cpu().contiguous()
    save_file(params, str(tmp / "params.safetensors"))
    sd = opt.state_dict()
    tensors = {
        f"{idx}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        for idx, st in sd["state"].items()
        for k, v in st.items()
    }
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    save_file(
        tensors, str(tmp / "optimizer.safetensors"), metadata={"param_groups": json.dumps(sd["param_groups"])}
    )
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    final, old = state_dir / CKPT, state_dir / f".{CKPT}-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_params(state_dir: Path, model: nn.Module) -> None:
    """Checkpointed tensors into the model, and the RNG states (dropout, if any, continues exactly)."""
    from safetensors.torch import load_file

    ckpt = state_dir / CKPT
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in load_file(str(ckpt / "params.safetensors")).items():
            if name not in named or named[name].shape != t.shape:
                raise RetokError(f"{ckpt} does not fit model-init ({name}); remove {state_dir} to start over")
            named[name].copy_(t)
    rng = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(rng["rng.cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"rng.cuda{i}"], i)


def _load_optimizer(state_dir: Path, opt: torch.optim.Optimizer) -> None:
    from safetensors import safe_open

    with safe_open(str(state_dir / CKPT / "optimizer.safetensors"), "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            if not key.startswith("rng."):
                idx, name = key.split(".", 1)
                state.setdefault(int(idx), {})[name] = f.get_tensor(key)
    opt.load_state_dict({"state": state, "param_groups": groups})


def read_state(state_dir: Path) -> dict | None:
    """The saved position of a previous run, or None when there is no checkpoint."""
    f = state_dir / CKPT / STATE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise RetokError(f"{f} is damaged; remove {state_dir} to start train-io over") from None


def _check_state(cfg: RetokConfig, state_dir: Path, resume: bool) -> dict | None:
    """What to do with an existing train-state: the state to resume, None to start over, or a refusal."""
    state = read_state(state_dir)
    fp = fingerprint(cfg, "model-trained")
    if resume:
        if state is None:
            print(
                f"train-io: --resume, but there is no checkpoint in {state_dir}; starting at step 0",
                flush=True,
            )
            return None
        if state.get("fingerprint") != fp:
            raise RetokError(
                f"--resume: {state_dir} was made by a different config (fingerprint {state.get('fingerprint')}, "
                f"this config {fp}); resume with the config that made it, or remove {state_dir} to start over"
            )
        return state
    if state is not None and not state.get("finished"):
        raise RetokError(
            f"{state_dir} holds an unfinished run (step {state.get('step')}); continue it with "
            f"`retok train-io --resume`, or remove {state_dir} to start over"
        )
    return None


# ========================================================================================== set-up


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
    tokens_per_step: int
    wall_start: float = 0.0  # time.time() when this invocation started
    stop: list[bool] = field(default_factory=lambda: [False])  # set by the Ctrl-C handler
    shown: dict = field(default_factory=dict)  # latest loss / BPB / tokens/s for the progress bar


def _accelerator(cfg: RetokConfig, state_dir: Path) -> Any:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, is_tensorboard_available, is_wandb_available

    from retok.sources import pick_device

    t = cfg.train
    # cpu=True also when no accelerator exists: that is what makes Accelerate set up gloo (MULTI_CPU) when
    # several processes are launched.
    cpu = pick_device(cfg.model.device) == "cpu"
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


def _load_new_ids(tok_dir: Path, n_tokens: int) -> list[int]:
    f = tok_dir / "retok_tokenizer.json"
    try:
        ids = [int(i) for i in json.loads(f.read_text())["new_ids"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise RetokError(
            f"train.trainable: io_new_rows needs the new token ids in {f} (key new_ids); "
            "rerun build-tokenizer or use trainable: io"
        ) from None
    bad = [i for i in ids if not 0 <= i < n_tokens]
    if bad:
        raise RetokError(
            f"{f}: new_ids holds {bad[0]}, outside the tokenizer's {n_tokens} ids; rerun build-tokenizer"
        )
    return ids


def _tokenizer(cfg: RetokConfig, tok_dir: Path, init_dir: Path) -> Any:
    """The new tokenizer; model-init's copy (which ships with the model) must have the same vocabulary."""
    from retok.sources import load_tokenizer

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


def _load_init_model(cfg: RetokConfig, init_dir: Path, n_tokens: int, device: Any) -> nn.Module:
    from retok.sources import load_model

    # fp32 master weights; mixed precision (bf16 on GPUs) is autocast on top.
    model = load_model(
        init_dir,
        dtype="float32",
        device="cpu",
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
    )
    rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    if rows < n_tokens:
        raise RetokError(
            f"{init_dir} has {rows} embedding rows but the new tokenizer has {n_tokens} tokens: it was made for "
            "another tokenizer; rerun `retok init-embeddings --overwrite`"
        )
    if head is None or head.weight.shape[0] != rows:
        raise RetokError(
            f"{init_dir}: the LM head does not have the embedding's {rows} rows; rerun init-embeddings"
        )
    model.config.use_cache = False
    return model.to(device)


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


# ====================================================================================== evaluation


def _bpb(run: Run, model: nn.Module, tok: Any, label: str) -> dict[str, float]:
    """BPB per data.eval domain (call on the main process)."""
    from retok.metrics import bits_per_byte

    out = {}
    with run.acc.autocast():
        for name, docs in run.eval_docs.items():
            out[name] = bits_per_byte(
                model,
                tok,
                docs,
                window=run.cfg.eval.window,
                stride=run.cfg.eval.stride,
                device=run.acc.device,
                desc=f"bpb {name} ({label})",
            )["bpb"]
    return out


def _evaluate(run: Run, model: nn.Module, label: str) -> dict[str, float]:
    """BPB of the model being trained, on the main process; the others wait."""
    out = _bpb(run, model, run.tok, label) if run.acc.is_main_process and run.eval_docs else {}
    run.acc.wait_for_everyone()
    return out


def _original_bpb(run: Run) -> dict[str, float]:
    """BPB of the original model with its ORIGINAL tokenizer on the same held-out text (main process)."""
    from retok.sources import load_model, load_tokenizer, resolve_model

    out: dict[str, float] = {}
    if run.acc.is_main_process and run.eval_docs:
        m = run.cfg.model
        folder = resolve_model(m, run.cfg.cache)
        tok = load_tokenizer(folder, trust_remote_code=m.trust_remote_code)
        model = load_model(
            folder,
            dtype="float32",
            device="cpu" if run.acc.device.type == "cpu" else str(run.acc.device),
            trust_remote_code=m.trust_remote_code,
            allow_pickle=m.allow_pickle,
        )
        out = _bpb(run, model, tok, "original")
        del model
    run.acc.wait_for_everyone()
    return out


# ========================================================================================= the loop


class _Log:
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


def _sigint_handler(run: Run) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        if run.stop[0]:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now, without a checkpoint
        run.stop[0] = True
        print(
            "\ntrain-io: interrupted; saving a checkpoint after this step (Ctrl-C again quits at once)",
            flush=True,
        )

    return handler


def _stages(cfg: RetokConfig) -> list[tuple[str, int, int]]:
    """(stage, first step, end step) of each stage; steps count on across stages."""
    out = [("io", 0, cfg.train.max_steps)]
    if cfg.train.full.steps:
        out.append(("all", cfg.train.max_steps, cfg.train.max_steps + cfg.train.full.steps))
    return out


def _checkpoint(run: Run, model: nn.Module, opt: Any, state: dict, stage: str) -> None:
    state["wall_seconds"] = state["wall_before"] + time.time() - run.wall_start
    if run.acc.is_main_process:
        meta = dict(state, stage=stage, saved=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _save_checkpoint(run.state_dir, model, getattr(opt, "optimizer", opt), meta)
    run.acc.wait_for_everyone()


def _run_stage(
    run: Run,
    stage: str,
    first: int,
    end: int,
    state: dict,
    batches: Iterator[torch.Tensor],
    log: _Log,
    bar: Any,
    load_optimizer: bool,
) -> None:
    """Optimizer steps state['step'] .. end of one stage, with evals, checkpoints, Ctrl-C and NaN checks."""
    acc, t, model = run.acc, run.cfg.train, run.model
    hooks = freeze(model, run.io, stage)
    opt = _optimizer(model, run.io, run.cfg, stage)
    if load_optimizer:
        _load_optimizer(run.state_dir, opt)
    masks = _decay_masks(run.io, stage)
    warmup = t.warmup_steps if stage == "io" else min(t.warmup_steps, max(1, (end - first) // 10))
    # DDP (under accelerate launch) is built here, after requires_grad is final for this stage.
    loss_model, opt = acc.prepare(IOLoss(model, t.loss_chunk_tokens), opt)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trimmer = _HeapTrimmer() if acc.device.type == "cpu" else None
    model.train()
    try:
        while state["step"] < end:
            step = state["step"]
            factor = lr_factor(step - first, warmup, end - first, t.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            t0 = time.perf_counter()
            losses = []
            for k in range(t.grad_accum):
                x = next(batches).to(acc.device)
                with acc.no_sync(loss_model) if k < t.grad_accum - 1 else nullcontext():
                    loss = loss_model(x)
                    acc.backward(loss / t.grad_accum if t.grad_accum > 1 else loss)
                losses.append(loss.detach().float())
            # One all-reduce carries the loss and whether any process got Ctrl-C, so all stop together.
            flags = torch.stack(
                [torch.stack(losses).mean(), torch.tensor(float(run.stop[0]), device=acc.device)]
            )
            flags = acc.reduce(flags, "sum")
            loss_val = float(flags[0]) / acc.num_processes
            if not math.isfinite(loss_val):
                last = read_state(run.state_dir)
                kept = (
                    f"the last good checkpoint (step {last['step']}) is kept in {run.state_dir}"
                    if last
                    else "no checkpoint was saved yet"
                )
                raise RetokError(
                    f"train-io: the loss became {loss_val} at step {step + 1} (lr {opt.param_groups[0]['lr']:.2e}); "
                    f"stopped without saving, {kept}; lower train.lr (embed_lr, head_lr, full.lr) and start over"
                )
            grad_norm = float(acc.clip_grad_norm_(trainable, t.max_grad_norm)) if t.max_grad_norm else None
            _decay(opt, masks, t.weight_decay)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if trimmer is not None:
                trimmer.after_step()
            secs = time.perf_counter() - t0
            state["step"] = step + 1
            state["consumed"] += t.grad_accum * acc.num_processes
            state["tokens_seen"] += run.tokens_per_step
            state["train_seconds"] += secs
            rec = {
                "step": step + 1,
                "stage": stage,
                "loss": loss_val,
                "lr": opt.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "tokens": state["tokens_seen"],
                "step_seconds": secs,
                "tokens_per_second": run.tokens_per_step / secs,
            }
            log.write(rec)
            run.shown.update(loss=loss_val, tps=rec["tokens_per_second"])
            if (step + 1) % t.eval_every == 0 or step + 1 == end:
                bpb = _evaluate(run, acc.unwrap_model(loss_model).model, f"step {step + 1}")
                if bpb:
                    log.write({"step": step + 1, "stage": stage, "bpb": bpb, "tokens": state["tokens_seen"]})
                    run.shown["bpb"] = bpb
                model.train()
            bar.set_postfix(_postfix(run.shown), refresh=False)
            bar.update(1)
            stopping = bool(flags[1] > 0)
            if (step + 1) % t.save_every == 0 or step + 1 == end or stopping:
                _checkpoint(run, model, opt, state, stage)
            if _on_step is not None:
                _on_step(step + 1)
            if stopping:
                if acc.is_main_process:
                    print(
                        f"train-io: checkpoint at step {step + 1} saved in {run.state_dir}; "
                        "continue with `retok train-io --resume`",
                        flush=True,
                    )
                raise KeyboardInterrupt
    finally:
        for h in hooks:
            h.remove()
        acc.free_memory()


class _HeapTrimmer:
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


# ===================================================================================== entry point


def train_io(cfg: RetokConfig, out: Path, *, resume: bool = False) -> dict:
    """Train embedding + head of output_dir/model-init on data.train; write model-trained into ``out``.

    Returns the report (train_report.json) on the main process, {} on the others.
    """
    from tqdm.auto import tqdm

    from retok.data import load_domains
    from retok.packing import check_sources, train_batches
    from retok.stage import require_stage
    from retok.train_report import write_report

    wall0 = time.time()
    t = cfg.train
    tok_dir = require_stage(cfg, "tokenizer", "train-io")
    init_dir = require_stage(cfg, "model-init", "train-io")
    state_dir = cfg.out / STATE_DIR

    # ---- checks that need no model: fail before anything is written
    acc = _accelerator(cfg, state_dir)
    state = _check_state(cfg, state_dir, resume)
    tok = _tokenizer(cfg, tok_dir, init_dir)
    new_ids = _load_new_ids(tok_dir, len(tok)) if t.trainable == "io_new_rows" else None
    first_block = check_sources(cfg.data.train, tok, t.seq_len, t.max_train_bytes)
    eval_docs = load_domains(cfg.data.eval, "data.eval", t.eval_max_bytes) if cfg.data.eval else {}

    # ---- the model
    model = _load_init_model(cfg, init_dir, len(tok), acc.device)
    io = io_params(model, len(tok), new_ids)
    _check_loss_matches(model, first_block[None].long(), t.loss_chunk_tokens)
    if t.gradient_checkpointing:
        _activation_checkpointing(model, True)
    run = Run(
        cfg=cfg,
        acc=acc,
        tok=tok,
        model=model,
        io=io,
        state_dir=state_dir,
        eval_docs=eval_docs,
        tokens_per_step=t.grad_accum * t.batch_size * t.seq_len * acc.num_processes,
        wall_start=wall0,
    )
    n_train = count_params(io.matrices + ([io.head_bias] if io.head_bias is not None else []))
    n_all = count_params(list(model.parameters()))
    n_rows = int(io.learn_rows.sum())
    n_values = n_rows * io.embed.shape[1] * len(io.matrices)
    total = t.max_steps + t.full.steps
    if acc.is_main_process:
        tied = (
            "tied: one matrix serves embedding and head" if io.head is None else "untied embedding and head"
        )
        print(
            f"train-io: trainable parameters {n_train:,} of {n_all:,} ({100 * n_train / n_all:.1f}%; {tied}); "
            f"{n_rows:,} of {io.embed.shape[0]:,} rows learn ({n_values:,} values); {total} steps of "
            f"{run.tokens_per_step:,} tokens; {acc.num_processes} process(es) on {acc.device}, "
            f"mixed precision {acc.mixed_precision}",
            flush=True,
        )
        if io.head is None and t.head_lr is not None:
            print(
                "train-io: note: the head is tied to the embedding, so train.head_lr is unused (embed_lr is)"
            )

    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGINT, _sigint_handler(run))
    except ValueError:  # not the main thread: Ctrl-C then stops without a checkpoint
        pass
    try:
        # ---- where to start: a checkpoint, or step 0 with the original and init BPB measured first
        state_dir.mkdir(parents=True, exist_ok=True)
        if state is not None:
            _load_params(state_dir, model)
            log = _Log(run, keep_until=state["step"])
            if acc.is_main_process:
                print(f"train-io: resuming at step {state['step']} of {total} from {state_dir}", flush=True)
        else:
            if acc.is_main_process:
                shutil.rmtree(state_dir / CKPT, ignore_errors=True)  # a finished earlier run: start over
            state = {
                "fingerprint": fingerprint(cfg, "model-trained"),
                "step": 0,
                "consumed": 0,
                "tokens_seen": 0,
                "train_seconds": 0.0,
                "wall_seconds": 0.0,
                "finished": False,
                "trainable_params": n_train,
                "learning_values": n_values,
            }
            log = _Log(run, keep_until=None)
            state["original"] = _original_bpb(run)
            state["init"] = _evaluate(run, model, "init")
            if state["init"]:
                log.write({"step": 0, "stage": "io", "bpb": state["init"], "tokens": 0})
        run.shown["bpb"] = state.get("init") or {}
        state["wall_before"] = state["wall_seconds"]  # minutes add up across interrupted runs

        batches = train_batches(
            cfg.data.train,
            tok,
            seq_len=t.seq_len,
            batch_size=t.batch_size,
            seed=cfg.seed,
            shuffle_buffer=t.shuffle_buffer,
            max_bytes=t.max_train_bytes,
            skip=state["consumed"],
            rank=acc.process_index,
            world=acc.num_processes,
        )
        # Fill the shuffle buffer now, so that its one-off cost is not counted as the first step's time.
        primed = next(batches)
        batches = itertools.chain([primed], batches)
        if t.log_with:
            scalars = {k: v for k, v in t.model_dump().items() if isinstance(v, int | float | str | bool)}
            acc.init_trackers("retok-train-io", config=scalars)
        resumed_stage = state.get("stage")  # the optimizer state belongs to this stage
        with tqdm(
            total=total, initial=state["step"], desc="train-io", unit="step", disable=not acc.is_main_process
        ) as bar:
            for stage, first, end in _stages(cfg):
                if state["step"] < end:
                    _run_stage(
                        run,
                        stage,
                        first,
                        end,
                        state,
                        batches,
                        log,
                        bar,
                        load_optimizer=resumed_stage == stage,
                    )
                resumed_stage = None
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if t.log_with:
            acc.end_training()

    report: dict = {}
    if acc.is_main_process:
        state["finished"] = True
        state["wall_seconds"] = state["wall_before"] + time.time() - wall0
        _save_model(model, init_dir, out)
        shutil.copy2(state_dir / METRICS, out / METRICS)
        report = write_report(
            out, cfg, state, _last_bpb(out / METRICS), acc.num_processes, str(acc.device), acc.mixed_precision
        )
        # Mark the checkpoint finished: a later run without --resume starts over instead of refusing.
        meta = read_state(state_dir) or {}
        meta.update(finished=True, wall_seconds=state["wall_seconds"])
        (state_dir / CKPT / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
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
    acc.wait_for_everyone()
    _leave_if_not_main(acc)
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
    _activation_checkpointing(model, False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = True
    model.to(device="cpu", dtype=_saved_dtype(init_dir)).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (init_dir / name).is_file():
            shutil.copy2(init_dir / name, out / name)


def _activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each layer's activations in backward (non-reentrant: works with a frozen body)."""
    if not on:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _leave_if_not_main(acc: Any) -> None:
    """Under `accelerate launch` every process runs the stage, but only the main one may publish the folder.

    The others leave here: SystemExit(0) through the caller's stage_output discards their temporary folders
    instead of racing the main process to rename them into place.
    """
    if not acc.is_main_process:
        sys.stdout.flush()
        raise SystemExit(0)
