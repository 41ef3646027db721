"""train-io's resumable state: where a run is (TrainState) and the checkpoint that lets it continue.

``output_dir/train-state/checkpoint/`` holds the trainable tensors (``params.safetensors``), the optimizer
moments and RNG states (``optimizer.safetensors``) and the position (``state.json``, a TrainState). A new
checkpoint is written beside the old one and swapped in, so a crash while saving keeps the previous one whole.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from retok.core.errors import RetokError
from retok.core.safetensors_io import read_header

STATE_DIR = "train-state"
CKPT = "checkpoint"
STATE_FILE = "state.json"
METRICS = "metrics.jsonl"


@dataclass
class TrainState:
    """Where a train-io run is; saved with every checkpoint as state.json."""

    fingerprint: str  # of the config that started the run: --resume refuses another one
    step: int = 0  # optimizer steps done; the phases count on (io steps, then all steps)
    consumed: int = 0  # micro-batches taken from the data stream, over every process
    tokens_seen: int = 0
    train_seconds: float = 0.0  # inside optimizer steps
    wall_seconds: float = 0.0  # the whole run, summed over interrupted invocations
    wall_before: float = 0.0  # wall_seconds when this invocation started
    finished: bool = False
    trainable_params: int = 0
    learning_values: int = 0  # values of the rows that may learn in the io phase
    original: dict[str, float] = field(default_factory=dict)  # held-out BPB of the original model
    init: dict[str, float] = field(default_factory=dict)  # held-out BPB before training
    phase: str | None = None  # the phase the saved optimizer moments belong to
    saved: str | None = None  # when the checkpoint was written
    strategy: str | None = (
        None  # single, ddp or fsdp (train.distributed as resolved): how the checkpoint is laid out
    )
    world_size: int = 1  # processes that trained (an fsdp checkpoint holds one shard per process)

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        """A TrainState from state.json; TypeError when a field has the wrong type (a damaged file)."""
        known = {f.name: f for f in fields(cls)}
        if "stage" in data and "phase" not in data:  # checkpoints of retok <= 0.1 named the phase "stage"
            data = {**data, "phase": data["stage"]}
        kept = {k: v for k, v in data.items() if k in known}
        for name, value in kept.items():
            typ = str(known[name].type)
            want = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}.get(
                typ.split(" ")[0].split("[")[0]
            )
            if value is None and "None" in typ:
                continue
            if want is not None and (
                not isinstance(value, want) or (want is int and isinstance(value, bool))
            ):
                raise TypeError(f"{name}: {value!r}")
        if not isinstance(kept.get("fingerprint"), str):
            raise TypeError("fingerprint")
        return cls(**kept)


def save_checkpoint(state_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, state: TrainState) -> None:
    """Trainable tensors (the input embedding always) + optimizer moments + RNG (safetensors) + position and history (JSON), swapped in
    atomically: a crash while saving leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    tmp = state_dir / f".{CKPT}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    # The input embedding learns through compact rows (retok.train.rows) with its weight frozen: saved too.
    embed = model.get_input_embeddings().weight
    for name, p in model.named_parameters():  # named_parameters lists a tied matrix once
        if (p.requires_grad or p is embed) and id(p) not in seen:
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
    swap_in(state_dir, tmp, state)


def swap_in(state_dir: Path, tmp: Path, state: TrainState) -> None:
    """Write the position into the finished temporary checkpoint ``tmp`` and make it THE checkpoint: the old one
    is renamed away first and removed last, so a crash at any point leaves one whole checkpoint."""
    state.saved = time.strftime("%Y-%m-%dT%H:%M:%S")
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
    final, old = state_dir / CKPT, state_dir / f".{CKPT}-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_params(state_dir: Path, model: nn.Module) -> None:
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


def load_optimizer(state_dir: Path, opt: torch.optim.Optimizer) -> None:
    from safetensors import safe_open

    with safe_open(str(state_dir / CKPT / "optimizer.safetensors"), "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            if not key.startswith("rng."):
                idx, name = key.split(".", 1)
                state.setdefault(int(idx), {})[name] = f.get_tensor(key)
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, moments in state.items():
        shape = moments.get("exp_avg", torch.empty(0)).shape
        if idx >= len(params) or (len(shape) and shape != params[idx].shape):
            raise RetokError(
                f"{state_dir / CKPT}: its optimizer state does not fit this run's parameters (a checkpoint "
                "of another retok version?); run train-io without --resume (or with --overwrite) to start over"
            )
    opt.load_state_dict({"state": state, "param_groups": groups})


def read_state(state_dir: Path) -> TrainState | None:
    """The saved position of a previous run, or None when there is no checkpoint."""
    f = state_dir / CKPT / STATE_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
        return TrainState.from_json(data)
    except (ValueError, TypeError):
        raise RetokError(f"{f} is damaged; remove {state_dir} to start train-io over") from None


def check_checkpoint_files(state_dir: Path, state: TrainState) -> None:
    """--resume: the checkpoint's tensor files are there and sound (their headers fit the files), so a damaged
    one is one line before anything is loaded, not a traceback from deep inside safetensors."""

    ckpt = state_dir / CKPT
    if state.strategy == "fsdp":
        return  # torch.distributed.checkpoint's own files (one shard per process), checked when read
    for name in ("params.safetensors", "optimizer.safetensors"):
        try:
            read_header(ckpt / name)
        except RetokError as e:
            raise RetokError(
                f"--resume: the checkpoint in {ckpt} is damaged ({e}); remove {state_dir} to start over"
            ) from None


def mark_finished(state_dir: Path, state: TrainState) -> None:
    """A finished checkpoint: a later run without --resume starts over instead of refusing."""
    saved = read_state(state_dir) or state
    saved.finished = True
    saved.wall_seconds = state.wall_seconds
    (state_dir / CKPT / STATE_FILE).write_text(json.dumps(asdict(saved), indent=2) + "\n")


def check_state(
    state_dir: Path, fingerprint: str, resume: bool, *, strategy: str = "single", world: int = 1
) -> TrainState | None:
    """What to do with an existing train-state: the state to resume, None to start over, or a refusal.

    A checkpoint continues only under the strategy and number of processes that wrote it: the data stream is
    split by process and an FSDP checkpoint holds one shard per process."""
    state = read_state(state_dir)
    if resume:
        if state is None:
            print(
                f"train-io: --resume, but there is no checkpoint in {state_dir}; starting at step 0",
                flush=True,
            )
            return None
        if state.fingerprint != fingerprint:
            raise RetokError(
                f"--resume: {state_dir} was made by a different config (fingerprint {state.fingerprint}, "
                f"this config {fingerprint}); resume with the config that made it, or remove {state_dir} to start over"
            )
        check_checkpoint_files(state_dir, state)
        saved = (state.strategy or "single", state.world_size)
        if state.strategy is not None and saved != (strategy, world):
            raise RetokError(
                f"--resume: {state_dir} was saved by {saved[1]} process(es) under {saved[0]}; this launch is {world} "
                f"under {strategy}; relaunch with --num_processes {saved[1]} and train.distributed: "
                f"{'auto' if saved[0] == 'single' else saved[0]}, or remove {state_dir} to start over"
            )
        return state
    if state is not None and not state.finished:
        raise RetokError(
            f"{state_dir} holds an unfinished run (step {state.step}); continue it with "
            f"`retok train-io --resume`, or remove {state_dir} to start over"
        )
    return None
