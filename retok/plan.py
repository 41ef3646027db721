"""retok plan: the memory each device needs in each phase of train-io, and how long the run takes, before
anything is loaded.

    retok plan configs/llama3-8b-zh.yaml --processes 8                 # the strategy train.distributed picks
    retok plan configs/llama3-70b-zh.yaml --processes 8 --strategy fsdp --json

The model's shape comes from its config.json alone (the model is built on the meta device: exact parameter
counts, no weights read); the new vocabulary from the tokenizer stage when it exists, else from
tokenizer.new_tokens. Per device and phase (io: embedding/head learn, body frozen; all: the joint phase),
for one process, DDP or FSDP over N processes:

- weights: fp32 master weights (sharded 1/N under FSDP, plus what FSDP gathers: the root unit — embedding,
  head, final norm — for the whole step, and two decoder layers at a time);
- gradients of what learns (DDP adds its all-reduce buckets; FSDP shards them, and gathers the root's);
- AdamW's two moments (fp32, sharded under FSDP);
- activations kept for backward (all layers, or one layer's input each with train.gradient_checkpointing);
- the chunked LM-head loss (train.loss_chunk_tokens rows of fp32 logits), the teacher's old embedding and head
  (objective distill / lm+distill);
- held-out BPB on the main process: the original model is loaded beside the training one while it is measured;
- the head fit after the steps (train.fit_head, main process): the trained model (under FSDP the consolidated
  folder loaded whole), the cached states (init.fit_bytes over the new tokenizer's bytes per token, capped by
  init.fit_max_memory_mb) and a batch of the fit's logits (the demo: planned 3.26 GB, measured 3.11);
- on CPU, the process itself (Python, torch, transformers, the tokenizers and the shuffle buffer), because there
  the device's memory is the process's resident memory.

Time: from the tokens/s a previous run of this output_dir measured (model-trained/train_report.json or the
train-state log), when there is one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retok.config import RetokConfig
from retok.errors import RetokError

GB = 10**9
# Measured on this project's CPU machine (torch 2.13, transformers 5.24): resident memory of a process that has
# imported torch, transformers, accelerate and retok's training modules and read its config and data
# (the peak of a train-io run of a 40k-parameter model: 459 MiB alone, up to 571 MiB when started from a test
# run; the middle is taken).
CPU_RUNTIME_BYTES = 510 * 2**20
CUDA_RUNTIME_BYTES = 600 * 2**20  # CUDA context, kernels and the caching allocator's slack
TOKENIZER_BYTES_PER_TOKEN = 1500  # a loaded fast tokenizer, per vocabulary entry (Rust model + Python maps)
# Activations one decoder layer keeps for backward, per token, in units of the activation dtype's bytes:
# about 12 hidden-sized tensors (norm inputs/outputs in fp32, q, attention output, residuals), 4 of the key/value
# width (k, v and their rotated copies) and 4 of the MLP width (gate, up, activation, product).
ACT_HIDDEN, ACT_KV, ACT_MLP = 12, 4, 4


@dataclass
class Shape:
    """What the plan needs to know about the model (from its config.json, built on the meta device)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    kv_width: int  # key/value heads x head dim
    old_rows: int
    old_tied: bool
    new_rows: int  # embedding rows after init-embeddings (padded)
    new_tied: bool
    body: int  # parameters outside the embedding and head
    layer_params: int  # parameters of one decoder layer
    old_vocab: int  # tokens of the original tokenizer
    new_vocab: int  # tokens of the new tokenizer


@dataclass
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclass
class PhasePlan:
    phase: str  # io, all, bpb
    what: str
    items: list[Item]

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)


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


# ------------------------------------------------------------------------------------------ the model


def _model_config(cfg: RetokConfig, model_config: Path | None) -> tuple[Any, str]:
    """The ORIGINAL model's config: --model-config, or model.path's config.json (downloaded alone for a hub id)."""
    from transformers import AutoConfig

    rc = cfg.model.trust_remote_code
    if model_config is not None:
        path = model_config if model_config.is_file() else model_config / "config.json"
        if not path.is_file():
            raise RetokError(
                f"--model-config {model_config}: no config.json there; give the model's config.json"
            )
        where = f"--model-config {path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise RetokError(
                f"{where}: not a readable JSON file ({e.__class__.__name__}); give the model's config.json"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
            raise RetokError(f"{where}: no model_type in it; give the model's config.json")
        model_type = data.pop("model_type")
        try:
            conf = AutoConfig.for_model(model_type, **data)
        except (ValueError, KeyError):
            import transformers

            raise RetokError(
                f"{where}: model_type {model_type!r} is unknown to transformers {transformers.__version__}; check "
                "the file, or update transformers"
            ) from None
        return conf, str(model_config)
    from retok.sources import resolve_model

    try:
        folder = resolve_model(cfg.model, cfg.cache)
    except RetokError as e:
        raise RetokError(f"{e} (retok plan only needs its config.json: pass --model-config FILE)") from None
    return AutoConfig.from_pretrained(str(folder), trust_remote_code=rc), cfg.model.path


def _counts(conf: Any) -> tuple[int, int, int, bool]:
    """(all parameters, embedding rows, parameters of one decoder layer, tied) of the model ``conf`` describes."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight is emb
    total = sum(p.numel() for p in model.parameters())
    layers = getattr(model.base_model, "layers", None)
    per_layer = sum(p.numel() for p in layers[0].parameters()) if layers else 0
    return total, emb.shape[0], per_layer, tied


def _new_vocab(cfg: RetokConfig, old_vocab: int) -> int:
    from retok.stages import stage_dir

    tok = stage_dir(cfg, "tokenizer") / "tokenizer.json"
    if tok.is_file():
        data = json.loads(tok.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab") or []
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in data.get("added_tokens", [])]
        if ids:
            return max(ids) + 1
    t = cfg.tokenizer
    if t.mode == "train" and t.vocab_size:
        return t.vocab_size
    return old_vocab + t.new_tokens


def model_shape(cfg: RetokConfig, model_config: Path | None = None) -> Shape:
    """The shape of the model train-io will train (model-init's config when it exists)."""
    from transformers import AutoConfig

    from retok.stages import stage_dir

    conf, name = _model_config(cfg, model_config)
    text = conf.get_text_config()
    total, old_rows, per_layer, old_tied = _counts(conf)
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    kv = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    old_vocab = old_rows
    new_vocab = _new_vocab(cfg, old_vocab)
    init = stage_dir(cfg, "model-init")
    if (
        init / "config.json"
    ).is_file() and model_config is None:  # the folder train-io reads: rows and tie final
        _, new_rows, _, new_tied = _counts(
            AutoConfig.from_pretrained(str(init), trust_remote_code=cfg.model.trust_remote_code)
        )
    else:
        k = cfg.init.pad_to_multiple_of or 1
        new_rows = max(old_rows, math.ceil(new_vocab / k) * k)
        new_tied = old_tied and not cfg.init.untie_head
    body = total - old_rows * hidden * (1 if old_tied else 2)
    return Shape(
        name=name,
        hidden=hidden,
        layers=text.num_hidden_layers,
        intermediate=getattr(text, "intermediate_size", 4 * hidden),
        kv_width=kv,
        old_rows=old_rows,
        old_tied=old_tied,
        new_rows=new_rows,
        new_tied=new_tied,
        body=body,
        layer_params=per_layer,
        old_vocab=old_vocab,
        new_vocab=new_vocab,
    )


# ------------------------------------------------------------------------------------------ the plan


def _device(cfg: RetokConfig) -> str:
    from retok.sources import pick_device

    asked = cfg.compute.device
    return asked if asked.startswith(("cuda", "mps")) else pick_device(asked)  # plan for a GPU from anywhere


def device_capacity(cfg: RetokConfig, device: str, local_processes: int) -> tuple[int | None, str]:
    """Bytes one device offers: compute.memory_gb, a GPU's total memory, or on CPU the RAM available now shared
    by the processes of this machine."""
    if cfg.compute.memory_gb:
        return int(cfg.compute.memory_gb * GB), "compute.memory_gb"
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            idx = int(device.split(":")[1]) if ":" in device else 0
            return torch.cuda.get_device_properties(idx).total_memory, f"{torch.cuda.get_device_name(idx)}"
        return None, "no GPU visible here"
    if device == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
            avail = info["MemAvailable"]
        except (OSError, KeyError, ValueError, IndexError):
            return None, "unknown RAM"
        return avail // max(1, local_processes), f"RAM available / {local_processes} process(es)"
    return None, f"unknown for {device}"


def _mixed(cfg: RetokConfig, device: str) -> bool:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        return device.startswith("cuda")
    return mp in ("bf16", "fp16")


def _measured_tps(cfg: RetokConfig) -> float | None:
    from retok.stages import stage_dir

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


def _distill_depth(cfg: RetokConfig, s: Shape) -> int:
    return max(cfg.train.distill_layers) if cfg.train.distill_layers else s.layers // 4 + 1


def _phase(cfg: RetokConfig, s: Shape, phase: str, strategy: str, n: int, device: str) -> PhasePlan:
    t = cfg.train
    fsdp, ddp = strategy == "fsdp", strategy == "ddp"
    a = 2 if _mixed(cfg, device) else 4  # bytes of an activation / a gathered FSDP parameter
    emb = s.new_rows * s.hidden
    head = 0 if s.new_tied else emb
    io_total = emb + head
    params = s.body + io_total
    distill = phase == "io" and t.objective != "lm"
    lm = phase == "all" or t.objective != "distill"
    head_learns = phase == "all" or t.objective != "distill"
    learning = params if phase == "all" else (emb + (head if head_learns else 0))
    if phase == "io" and not head_learns and s.new_tied:
        learning = emb
    items = []
    if fsdp:
        gathered = io_total * a + 2 * s.layer_params * a
        items.append(
            Item("weights", 4 * params // n + gathered, f"fp32 shards 1/{n} + gathered root and 2 layers")
        )
    else:
        items.append(Item("weights", 4 * params, "fp32 master weights"))
    if fsdp:
        root_grads = (io_total if phase == "all" else learning) * 4
        layer_grads = 2 * s.layer_params * 4 if phase == "all" else 0
        items.append(
            Item("gradients", 4 * learning // n + root_grads + layer_grads, "shards + unsharded in backward")
        )
    else:
        items.append(
            Item("gradients", 4 * learning * (2 if ddp else 1), "fp32" + (" + DDP buckets" if ddp else ""))
        )
    items.append(Item("optimizer", 8 * learning // (n if fsdp else 1), "AdamW moments, fp32"))
    if phase == "io" and t.piece_map_on():
        # retok.train.piecemap: a (3H x H) map with its gradient and moments, the pieces' original rows, and
        # one step's change of the new rows
        new = max(0, s.new_vocab - s.old_vocab)
        pieces = min(s.old_rows, new)  # distinct pieces: on the demo 16,000 new tokens have ~5,000
        items.append(
            Item(
                "piece map",
                4 * (4 * 3 * s.hidden * s.hidden + (pieces + 2 * new) * s.hidden),
                "(3H x H) map + grad + moments, pieces' rows",
            )
        )
    if fsdp:  # each all-gather and reduce-scatter goes through a buffer as large as what it carries
        root_learning = io_total if phase == "all" else learning
        buffers = io_total * a + root_learning * 4 + (2 * s.layer_params * (a + 4) if phase == "all" else 0)
        note = "all-gather of the root unit, reduce-scatter of its grads"
        if (
            device == "cpu"
        ):  # measured on gloo: about twice (SmolLM2 under FSDP x2 peaked 0.35-0.75 GB higher)
            buffers, note = 2 * buffers, note + " (x2 on gloo, measured)"
        items.append(Item("FSDP buffers", buffers, note))
    tokens = t.batch_size * t.seq_len
    per_layer = tokens * a * (ACT_HIDDEN * s.hidden + ACT_KV * s.kv_width + ACT_MLP * s.intermediate)
    depth = _distill_depth(cfg, s) if distill and not lm else s.layers
    if t.gradient_checkpointing:
        act = depth * tokens * s.hidden * a + per_layer
        note = f"{depth} layer inputs + one layer recomputed"
    else:
        act = depth * per_layer
        note = f"{depth} layers x {tokens:,} tokens"
    items.append(Item("activations", act, note))
    if lm:
        chunk = min(t.loss_chunk_tokens, tokens)
        items.append(
            Item(
                "loss chunk",
                chunk * s.new_rows * 4 * 2 + tokens * s.hidden * 4 * 2,
                f"{chunk} x {s.new_rows:,} fp32 logits",
            )
        )
    if distill:
        old = s.old_vocab * s.hidden * (1 if s.old_tied else 2) * 4
        kept = len(cfg.train.distill_layers or [1]) * tokens * s.hidden * 4 + per_layer // max(1, s.layers)
        items.append(Item("teacher", old + kept, "old embedding/head (fp32) + its distilled states"))
    items += _process_items(cfg, s, device)
    what = "embedding/head learn, body frozen" if phase == "io" else "every parameter learns"
    return PhasePlan(phase, what, items)


def _process_items(cfg: RetokConfig, s: Shape, device: str) -> list[Item]:
    if device.startswith("cuda"):
        return [Item("runtime", CUDA_RUNTIME_BYTES, "CUDA context and allocator slack")]
    t = cfg.train
    data = t.shuffle_buffer * t.seq_len * 8 * (2 if t.objective != "lm" else 1)
    toks = (s.old_vocab + s.new_vocab) * TOKENIZER_BYTES_PER_TOKEN
    return [
        Item("runtime", CPU_RUNTIME_BYTES, "Python, torch, transformers"),
        Item("data", data + toks, "shuffle buffer + the two tokenizers"),
    ]


def _bpb_phase(cfg: RetokConfig, s: Shape, strategy: str, n: int, device: str) -> PhasePlan:
    """The main process while it measures held-out BPB before step 1: the training model plus the original
    (loaded whole, fp32; under FSDP the shared sharded body runs with the old embedding and head instead)."""
    emb = s.new_rows * s.hidden
    params = s.body + emb + (0 if s.new_tied else emb)
    old_io = s.old_rows * s.hidden * (1 if s.old_tied else 2)
    if strategy == "fsdp":
        gathered = (params - s.body) * 4 + 2 * s.layer_params * 4
        items = [
            Item("weights", 4 * params // n + gathered, "shards + gathered root"),
            Item("old embedding/head", 4 * old_io, "the original's BPB through the shared body"),
        ]
    else:
        items = [
            Item("weights", 4 * params, "the model being trained"),
            Item("original model", 4 * (s.body + old_io), "loaded for the original's BPB"),
        ]
    window = cfg.eval.window
    items.append(Item("logits", window * max(s.new_rows, s.old_rows) * 4 * 3, f"{window}-token window, fp32"))
    items += _process_items(cfg, s, device)
    return PhasePlan("bpb", "held-out BPB on the main process (before training)", items)


def fit_states(cfg: RetokConfig) -> tuple[int, str]:
    """How many states the head fit after the steps caches: each domain's share of init.fit_bytes over the
    new tokenizer's bytes per token on it (the tokenizer's compression.json); at most one per byte before the
    tokenizer exists."""
    from retok.data import domains
    from retok.headfit_run import fit_budgets
    from retok.stages import stage_dir

    budgets = fit_budgets(domains(cfg.data.train), cfg.tokenizer.domains, cfg.init.fit_bytes)
    report = stage_dir(cfg, "tokenizer") / "compression.json"
    measured = json.loads(report.read_text()).get("domains", {}) if report.is_file() else {}
    n = 0
    for name, nbytes in budgets.items():
        per_token = (measured.get(name) or {}).get("new_bytes_per_token") or 1.0
        n += math.ceil(nbytes / per_token)
    how = "bytes/token of compression.json" if measured else "at most one per byte: no tokenizer built yet"
    return n, how


def _fit_forward_copy(cfg: RetokConfig, strategy: str, device: str) -> bool:
    """Does the head fit run its forward passes on a bfloat16 copy (init.fit_forward_dtype)? Only of a float32
    model: outside FSDP the trained model always is one, under FSDP the folder loads in compute.dtype. auto: where
    the device multiplies in bfloat16 natively (this CPU's flags; a CUDA device is counted, to be safe)."""
    import torch

    from retok.headfit_run import native_bf16

    setting = cfg.init.fit_forward_dtype
    fp32 = (
        strategy != "fsdp"
        or cfg.compute.dtype == "float32"
        or (cfg.compute.dtype == "auto" and device == "cpu")
    )
    if setting == "model" or not fp32:
        return False
    if setting == "bfloat16":
        return True
    return device.startswith("cuda") or (device == "cpu" and native_bf16(torch.device("cpu")))


def _fit_phase(cfg: RetokConfig, s: Shape, strategy: str, n: int, device: str) -> PhasePlan:
    """The main process in train.fit_head, after the steps (the optimizer already released): the trained model
    (under FSDP the consolidated folder loaded whole beside this process's shards), the original's embedding
    and head with a float32 copy of the new head, the cached states (refused beyond init.fit_max_memory_mb),
    one batch of the fit's logits and one forward window's."""
    from retok.headfit import FIT_BATCH
    from retok.headfit_run import fit_cache_bytes

    params = s.body + s.new_rows * s.hidden * 2
    if strategy == "fsdp":
        whole = {"float32": 4, "auto": 4}.get(cfg.compute.dtype, 2) * params
        weights = Item(
            "weights", 4 * params // n + whole, "fp32 shards + the consolidated model loaded whole"
        )
    else:
        weights = Item("weights", 4 * params, "the trained model")
    old_io = s.old_rows * s.hidden * (1 if s.old_tied else 2)
    rows = Item(
        "rows", 4 * (old_io + s.new_rows * s.hidden), "the original's embedding/head + the new head, fp32"
    )
    states, how = fit_states(cfg)
    cache = min(
        fit_cache_bytes(cfg, states, s.hidden, max(0, s.new_vocab - s.old_vocab)),
        cfg.init.fit_max_memory_mb * 10**6,
    )
    window = cfg.init.fit_window * max(s.new_rows, s.old_rows) * 4 * 2
    copy = (
        [
            Item(
                "forward copy",
                2 * params,
                f"bfloat16 weights for the forward passes ({cfg.init.fit_forward_dtype})",
            )
        ]
        if _fit_forward_copy(cfg, strategy, device)
        else []
    )
    items = [
        weights,
        *copy,
        rows,
        Item("cached states", cache, f"~{states:,} states ({how})"),
        Item(
            "fit logits", FIT_BATCH * s.new_rows * 4 * 3, f"{FIT_BATCH:,} states: logits, probabilities, grad"
        ),
        Item("forward window", window, f"{cfg.init.fit_window}-token window's logits, fp32"),
        *_process_items(cfg, s, device),
    ]
    return PhasePlan("fit", "the head fit after the steps (main process)", items)


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
    device = device or _device(cfg)
    strategy = resolve(cfg, processes, strategy, s, device)
    t = cfg.train
    phases = [_phase(cfg, s, "io", strategy, processes, device)]
    if t.full.steps:
        phases.append(_phase(cfg, s, "all", strategy, processes, device))
    if cfg.data.eval:
        phases.append(_bpb_phase(cfg, s, strategy, processes, device))
    if t.fit_head and not s.new_tied and cfg.data.train:
        phases.append(_fit_phase(cfg, s, strategy, processes, device))
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
