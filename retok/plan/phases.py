"""The memory of each phase of train-io on one device, item by item (weights, gradients, optimizer,
activations, loss chunk, teacher, held-out BPB, the head fit), and what one device offers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from retok.core.config import RetokConfig
from retok.core.data import domains
from retok.core.sources import pick_device
from retok.core.stages import stage_dir
from retok.headfit.fit import FIT_BATCH
from retok.headfit.run import fit_budgets, fit_cache_bytes, native_bf16
from retok.plan.shape import Shape

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


def plan_device(cfg: RetokConfig) -> str:

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


def _distill_depth(cfg: RetokConfig, s: Shape) -> int:
    return max(cfg.train.distill_layers) if cfg.train.distill_layers else s.layers // 4 + 1


def train_phase(cfg: RetokConfig, s: Shape, phase: str, strategy: str, n: int, device: str) -> PhasePlan:
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
    emb_learning = emb
    if (
        phase == "io"
        and strategy == "single"
        and t.trainable == "io_new_rows"
        and not (s.new_tied and head_learns)
    ):
        # retok.train.rows: the new input rows learn as an (n x H) parameter of their own
        emb_learning = max(0, s.new_vocab - s.old_vocab) * s.hidden
    learning = params if phase == "all" else (emb_learning + (head if head_learns else 0))
    if phase == "io" and not head_learns and s.new_tied:
        learning = emb_learning
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


def bpb_phase(cfg: RetokConfig, s: Shape, strategy: str, n: int, device: str) -> PhasePlan:
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
    """How many states the head fit after the steps caches: each domain's share of fit.bytes over the
    new tokenizer's bytes per token on it (the tokenizer's compression.json); at most one per byte before the
    tokenizer exists."""

    budgets = fit_budgets(domains(cfg.data.train), cfg.tokenizer.domains, cfg.fit.bytes)
    report = stage_dir(cfg, "tokenizer") / "compression.json"
    measured = json.loads(report.read_text()).get("domains", {}) if report.is_file() else {}
    n = 0
    for name, nbytes in budgets.items():
        per_token = (measured.get(name) or {}).get("new_bytes_per_token") or 1.0
        n += math.ceil(nbytes / per_token)
    how = "bytes/token of compression.json" if measured else "at most one per byte: no tokenizer built yet"
    return n, how


def _fit_forward_copy(cfg: RetokConfig, strategy: str, device: str) -> bool:
    """Does the head fit run its forward passes on a bfloat16 copy (fit.forward_dtype)? Only of a float32
    model: outside FSDP the trained model always is one, under FSDP the folder loads in compute.dtype. auto: where
    the device multiplies in bfloat16 natively (this CPU's flags; a CUDA device is counted, to be safe)."""
    import torch

    setting = cfg.fit.forward_dtype
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


def fit_phase(cfg: RetokConfig, s: Shape, strategy: str, n: int, device: str) -> PhasePlan:
    """The main process in fit.after_train, after the steps (the optimizer already released): the trained model
    (under FSDP the consolidated folder loaded whole beside this process's shards), the original's embedding
    and head with a float32 copy of the new head, the cached states (refused beyond fit.max_memory_mb),
    one batch of the fit's logits and one forward window's."""

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
        cfg.fit.max_memory_mb * 10**6,
    )
    window = cfg.fit.window * max(s.new_rows, s.old_rows) * 4 * 2
    copy = (
        [
            Item(
                "forward copy",
                2 * params,
                f"bfloat16 weights for the forward passes ({cfg.fit.forward_dtype})",
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
        Item("forward window", window, f"{cfg.fit.window}-token window's logits, fp32"),
        *_process_items(cfg, s, device),
    ]
    return PhasePlan("fit", "the head fit after the steps (main process)", items)
