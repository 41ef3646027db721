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
- the head fit after the steps (fit.after_train, main process): the trained model (under FSDP the consolidated
  folder loaded whole), the cached states (fit.bytes over the new tokenizer's bytes per token, capped by
  fit.max_memory_mb) and a batch of the fit's logits (the demo: planned 3.26 GB, measured 3.11);
- on CPU, the process itself (Python, torch, transformers, the tokenizers and the shuffle buffer), because there
  the device's memory is the process's resident memory.

Time: from the tokens/s a previous run of this output_dir measured (model-trained/train_report.json or the
train-state log), when there is one.

The package: shape.py (the model's shape from its config), phases.py (the memory of each phase on one device),
planner.py (the plan of a launch, its verdict and train-io's check).
"""

from retok.plan.phases import GB, device_capacity, fit_states
from retok.plan.planner import Plan, advice, check_plan, ddp_fits, plan, resolve
from retok.plan.shape import Shape, model_shape

__all__ = [
    "GB",
    "Plan",
    "Shape",
    "advice",
    "check_plan",
    "ddp_fits",
    "device_capacity",
    "fit_states",
    "model_shape",
    "plan",
    "resolve",
]
