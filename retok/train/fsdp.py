"""train-io under PyTorch FSDP2 (``fully_shard``): for bodies that do not fit one device.

    accelerate launch --multi_gpu --num_processes 8 -m retok.cli train-io -c run.yaml   # train.distributed: fsdp
    torchrun --nproc_per_node 8 -m retok.cli train-io -c run.yaml                        # the same

Layout: every decoder layer is its own FSDP unit (sharded over the processes; gathered one layer at a time in
forward and backward), and :class:`ShardedObjective`, the module that computes the loss and holds the model, is
the root unit: it owns what is left (the embedding, the final norm, the LM head), gathered while a step runs.
The body stays frozen in the io phase (its layers are sharded, never given gradients); in the joint phase
everything learns, with gradients and AdamW states sharded like the weights.

Parts of train-io that meet sharded (DTensor) parameters live here: the row masks of the embedding/head (the
hooks DDP uses never see FSDP's gradients, so gradients are masked after backward instead), sharded
checkpoints (torch.distributed.checkpoint: each process writes its shard) and the final model folder, written
tensor by tensor from the shards (one tensor gathered at a time, never the whole model on one process).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retok.core.errors import RetokError
from retok.core.safetensors_io import OutTensor, load_tensor, tensor_bytes, tensor_table, write_shard
from retok.core.sources import check_model_folder
from retok.train.params import activation_checkpointing
from retok.train.state import CKPT, TrainState, swap_in

DCP_DIR = "dcp"  # inside the checkpoint folder: torch.distributed.checkpoint's files


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


class ShardedObjective(nn.Module):
    """The FSDP root: holds the model (so the root unit owns the embedding, norm and head) and computes the
    loss of the current phase (``loss``: an IOLoss or DistillLoss, kept outside the module tree)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "loss", None)

    def use(self, loss: nn.Module) -> None:
        """The loss of the phase that starts (not registered as a submodule: it holds the same model)."""
        object.__setattr__(self, "loss", loss)

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss(batch)

    @property
    def last_parts(self) -> dict[str, float]:
        return getattr(self.loss, "last_parts", {})


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise RetokError(
            f"train.distributed fsdp: {type(model).__name__} has no decoder `layers` to shard; "
            "use train.distributed: ddp"
        )
    return layers


def load_sharded(
    folder: Path,
    mixed_precision: str,
    device: torch.device,
    *,
    checkpointing: bool,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, ShardedObjective]:
    """model-init as a sharded model, read tensor by tensor: the model is built without weights (meta device),
    sharded, and each process copies ITS rows of each tensor from the safetensors files (memory-mapped), so no
    process ever holds the whole model: what it holds is its shards plus one tensor being read."""
    from accelerate import init_empty_weights
    from torch.distributed.tensor import distribute_tensor
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_folder(folder, allow_pickle=False)
    conf = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed for real
        model = AutoModelForCausalLM.from_config(
            conf, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    model.tie_weights()  # what from_pretrained does: a tied head IS the embedding
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    aliases = _aliases(model)
    if checkpointing:
        activation_checkpointing(model, True)
    root = shard(model, mixed_precision, device, init=False)
    model.to_empty(device=device)
    for alias, first in aliases.items():  # to_empty gives each module its own tensor: tie them again
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(first))
    table = tensor_table(folder)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for name, p in model.named_parameters():
            info = table.get(name)
            if info is None:
                raise RetokError(
                    f"train.distributed fsdp: {folder} has no tensor {name}; rerun `retok init-embeddings --overwrite`"
                )
            full = load_tensor(info).to(torch.float32)
            if list(full.shape) != list(p.shape):
                raise RetokError(
                    f"{folder}: {name} has shape {list(full.shape)}, the config says {list(p.shape)}"
                )
            part = (
                distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                if is_sharded(p)
                else full
            )
            local(p).copy_(local(part))
            del full, part
    root._get_fsdp_state()._lazy_init()
    model.config.use_cache = False
    return model, root


def _aliases(model: nn.Module) -> dict[str, str]:
    """name -> first name, for every parameter listed under a second name (a tied head)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def shard(
    model: nn.Module, mixed_precision: str, device: torch.device, *, init: bool = True
) -> ShardedObjective:
    """fully_shard every decoder layer, then the root; bf16 compute with fp32 gradient reduction when asked."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif mixed_precision == "fp16":
        raise RetokError("train.mixed_precision fp16 with train.distributed fsdp: use bf16 (or no)")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    root = ShardedObjective(model)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    if init:
        # FSDP settles which unit is the root at its first forward; do it now, so that a first forward through
        # the HF model itself (the loss check, held-out BPB) does not make each layer a root of its own.
        root._get_fsdp_state()._lazy_init()
    return root


@contextmanager
def gathered(root: nn.Module) -> Iterator[None]:
    """The root unit's parameters gathered (the layers gather themselves), e.g. to call the HF model directly
    for held-out BPB; every process must enter it, as every process runs the forward."""
    if not hasattr(root, "unshard"):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def local_masks(masks: dict[int, torch.Tensor], params: list[nn.Parameter]) -> dict[int, torch.Tensor]:
    """Row masks (rows, 1) cut to the rows each sharded parameter holds on this process (Shard(0))."""
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for p in params:
        m = masks.get(id(p))
        if m is None:
            continue
        out[id(p)] = distribute_tensor(m, p.device_mesh, p.placements).to_local() if is_sharded(p) else m
    return out


@torch.no_grad()
def mask_grads(params: list[nn.Parameter], masks: dict[int, torch.Tensor]) -> None:
    """Zero the gradient of rows that must not move (after FSDP reduced the gradients)."""
    for p in params:
        m = masks.get(id(p))
        if m is not None and p.grad is not None:
            local(p.grad).mul_(m.to(local(p.grad).dtype))


def grad_norm_clip(params: list[nn.Parameter], max_norm: float) -> float:
    n = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(n.full_tensor() if is_sharded(n) else n)


# ------------------------------------------------------------------------------------ sharded checkpoints


def _model_state(model: nn.Module, names: set[str] | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model)
    return {k: v for k, v in sd.items() if names is None or k in names}


def save_sharded(state_dir: Path, model: nn.Module, opt: Any, state: TrainState, rank: int) -> None:
    """Every process writes its shard of the trainable tensors and optimizer moments; the main process adds the
    position and swaps the new checkpoint in (a crash while saving keeps the previous one whole)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tmp = state_dir / f".{CKPT}-tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    dcp.save(
        {"model": _model_state(model, learning), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=str(tmp / DCP_DIR),
    )
    save_file({"rng.cpu": torch.get_rng_state()}, str(tmp / f"rng-{rank}.safetensors"))
    dist.barrier()
    if rank == 0:
        swap_in(state_dir, tmp, state)
    dist.barrier()


def _saved_keys(path: Path) -> set[str]:
    import torch.distributed.checkpoint as dcp

    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_sharded_params(state_dir: Path, model: nn.Module, rank: int) -> None:
    """The checkpoint's tensors into the sharded model (each process reads its shard), and this process's RNG."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = state_dir / CKPT / DCP_DIR
    saved = {k.split(".", 1)[1] for k in _saved_keys(path) if k.startswith("model.")}
    sd = _model_state(model, None)
    missing = saved - set(sd)
    if missing:
        raise RetokError(
            f"{state_dir / CKPT} does not fit model-init ({sorted(missing)[0]}); remove {state_dir} to start over"
        )
    sd = {k: v for k, v in sd.items() if k in saved}
    dcp.load({"model": sd}, checkpoint_id=str(path))
    set_model_state_dict(model, sd, options=StateDictOptions(strict=False))
    rng = state_dir / CKPT / f"rng-{rank}.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["rng.cpu"])


def load_sharded_optimizer(state_dir: Path, model: nn.Module, opt: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt)
    dcp.load({"optim": osd}, checkpoint_id=str(state_dir / CKPT / DCP_DIR))
    set_optimizer_state_dict(model, opt, osd)


# ------------------------------------------------------------------------------------ the final model folder


def _unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model's state dict with a tied matrix listed once (as save_pretrained does)."""
    alias = _aliases(model)
    return [(k, v) for k, v in model.state_dict().items() if k not in alias]


def save_consolidated(
    model: nn.Module, out: Path, dtype: torch.dtype, rank: int, max_shard_bytes: int
) -> None:
    """A plain Hugging Face folder from the sharded model: one tensor gathered at a time (every process takes
    part in each gather; the main process writes), shards of at most ``max_shard_bytes``."""

    items = _unique_state(model)
    st_dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if t.is_floating_point() else t.dtype

    def produce(t: torch.Tensor) -> Any:
        def write(f: Any, progress: Any) -> int:
            full = (t.full_tensor() if is_sharded(t) else t).detach().to("cpu", out_dtype(t)).contiguous()
            data = tensor_bytes(full)
            f.write(data)
            progress(len(data))
            return len(data)

        return write

    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:
        n = t.numel() * torch.empty((), dtype=out_dtype(t)).element_size()
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t))
        size += n
    files = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map = {}
    for fname, group in zip(files, groups, strict=True):
        if rank == 0:
            tensors = [
                OutTensor(name, st_dtype.get(out_dtype(t), str(out_dtype(t))), list(t.shape), produce(t))
                for name, t in group
            ]
            write_shard(out / fname, tensors, {"format": "pt"})
        else:
            for _, t in group:  # the same gathers, in the same order
                if is_sharded(t):
                    t.full_tensor()
        weight_map.update({name: fname for name, _ in group})
    if rank == 0:
        if len(files) > 1:
            total = sum(t.numel() * torch.empty((), dtype=out_dtype(t)).element_size() for _, t in items)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        model.config.dtype = dtype
        model.config.save_pretrained(str(out))
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(str(out))
