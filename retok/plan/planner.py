"""The plan of a launch: its strategy (single, DDP or FSDP), every phase's memory against the device's, the
time from a measured tokens/s, what to change when it does not fit, and train-io's check before loading."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retok.core.config import RetokConfig
from retok.core.errors import RetokError
from retok.core.stages import stage_dir
from retok.plan.phases import GB, PhasePlan, bpb_phase, device_capacity, fit_phase, plan_device, train_phase
from retok.plan.shape import Shape, model_shape


@dataclass
class Plan:
    model: str
    device: str
    strategy: str
    processes: int
    capacity: int | None  # bytes one device has (None: unknown)
    capacity_source: str
    phases: list[PhasePlan]
    tokens_per_step: int
    steps: dict[str, int]
    tokens_per_second: float | None = None
    minutes: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(p.total for p in self.phases)

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= self.capacity

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak"] = self.peak
        d["fits"] = self.fits if self.capacity is not None else None  # null: the device's memory is unknown
        for p, src in zip(d["phases"], self.phases, strict=True):
            p["total"] = src.total
        return d

    def lines(self) -> list[str]:
        cap = f"{self.capacity / GB:.1f} GB ({self.capacity_source})" if self.capacity else "unknown"
        out = [
            f"retok plan: {self.model} on {self.device}, {self.processes} process(es), {self.strategy}; "
            f"{self.tokens_per_step:,} tokens per step",
            f"  per-device memory available: {cap}",
        ]
        for p in self.phases:
            out.append(f"  {p.phase:<4} {p.what}: {p.total / GB:.2f} GB")
            for i in p.items:
                if i.bytes:
                    out.append(f"       {i.name:<22} {i.bytes / GB:>8.2f} GB  {i.note}")
        if self.capacity is None:
            verdict = (
                f"cannot tell whether it fits ({self.capacity_source}); set compute.memory_gb to the GB one "
                "device has (e.g. --set compute.memory_gb=80) to check against it"
            )
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
        out.append(f"  peak {self.peak / GB:.2f} GB per device: {verdict}")
        if self.minutes is not None:
            out.append(
                f"  time: {self.minutes:.1f} min for {sum(self.steps.values())} steps at the measured "
                f"{self.tokens_per_second:,.0f} tokens/s"
            )
        else:
            out.append("  time: no tokens/s measured for this output_dir yet (a few train-io steps give one)")
        out += [f"  note: {n}" for n in self.notes]
        return out


def _measured_tps(cfg: RetokConfig) -> float | None:

    rep = stage_dir(cfg, "model-trained") / "train_report.json"
    if rep.is_file():
        try:
            r = json.loads(rep.read_text())
            if r.get("tokens_per_second"):
                return float(r["tokens_per_second"])
        except (ValueError, TypeError, KeyError):
            pass
    log = cfg.out / "train-state" / "metrics.jsonl"
    if log.is_file():
        rates = []
        for ln in log.read_text().splitlines():
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if rec.get("tokens_per_second"):
                rates.append(rec["tokens_per_second"])
        if len(rates) > 1:
            rates = sorted(rates[1:])  # the first step pays one-off costs
            return rates[len(rates) // 2]
    return None


def resolve(cfg: RetokConfig, processes: int, strategy: str | None, s: Shape, device: str) -> str:
    """The strategy a launch of ``processes`` processes uses: single, ddp or fsdp."""
    want = strategy or cfg.train.distributed
    if processes == 1:
        return "single"
    if want != "auto":
        return want
    ddp = plan(cfg, processes, "ddp", shape=s, device=device)
    return "ddp" if ddp.fits else "fsdp"


def plan(
    cfg: RetokConfig,
    processes: int = 1,
    strategy: str | None = None,
    *,
    shape: Shape | None = None,
    device: str | None = None,
    model_config: Path | None = None,
    local_processes: int | None = None,
) -> Plan:
    s = shape or model_shape(cfg, model_config)
    device = device or plan_device(cfg)
    strategy = resolve(cfg, processes, strategy, s, device)
    t = cfg.train
    phases = [train_phase(cfg, s, "io", strategy, processes, device)]
    if t.full.steps:
        phases.append(train_phase(cfg, s, "all", strategy, processes, device))
    if cfg.data.eval:
        phases.append(bpb_phase(cfg, s, strategy, processes, device))
    if cfg.fit.after_train and not s.new_tied and cfg.data.train:
        phases.append(fit_phase(cfg, s, strategy, processes, device))
    cap, source = device_capacity(cfg, device, local_processes or (processes if device == "cpu" else 1))
    per_step = t.grad_accum * t.batch_size * t.seq_len * processes
    steps = {"io": t.max_steps, **({"all": t.full.steps} if t.full.steps else {})}
    p = Plan(s.name, device, strategy, processes, cap, source, phases, per_step, steps)
    tps = _measured_tps(cfg)
    if tps:
        p.tokens_per_second = tps
        p.minutes = sum(steps.values()) * per_step / tps / 60
    if strategy == "fsdp" and not t.gradient_checkpointing:
        p.notes.append("train.gradient_checkpointing: true keeps one layer's activations instead of all")
    return p


def advice(p: Plan, cfg: RetokConfig) -> str:
    """What to change when a plan does not fit."""
    worst = max(p.phases, key=lambda ph: ph.total)
    if worst.phase == "bpb":
        return "set data.eval to fewer/smaller documents or run on a device with more memory"
    big = max(worst.items, key=lambda i: i.bytes)
    if p.strategy in ("ddp", "single") and big.name in ("weights", "gradients", "optimizer"):
        if p.processes > 1:
            return "set train.distributed: fsdp (shards weights, gradients and optimizer states)"
        return "launch several processes with train.distributed: fsdp, or use a device with more memory"
    if big.name == "activations" and not cfg.train.gradient_checkpointing:
        return "set train.gradient_checkpointing: true, or lower train.batch_size / train.seq_len"
    if big.name == "activations":
        return "lower train.batch_size or train.seq_len (raise train.grad_accum to keep the tokens per step)"
    if big.name == "loss chunk":
        return "lower train.loss_chunk_tokens"
    return "use more processes (train.distributed: fsdp) or devices with more memory"


def ddp_fits(cfg: RetokConfig, processes: int) -> bool:
    """train.distributed auto: does every device hold the whole model under DDP?"""
    return plan(cfg, processes, "ddp", local_processes=_local_processes(processes)).fits


def _local_processes(processes: int) -> int:
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", processes))


def check_plan(cfg: RetokConfig, processes: int, strategy: str) -> Plan:
    """train-io's check before anything is loaded: refuse a run whose plan does not fit the device."""
    p = plan(cfg, processes, strategy, local_processes=_local_processes(processes))
    if not p.fits:
        worst = max(p.phases, key=lambda ph: ph.total)
        raise RetokError(
            f"train-io: the {worst.phase} phase needs {worst.total / GB:.1f} GB per device under {p.strategy} "
            f"(`retok plan` shows the parts) but {p.device} has {p.capacity / GB:.1f} GB ({p.capacity_source}); "
            f"{advice(p, cfg)}; compute.memory_gb overrides what is detected"
        )
    return p
