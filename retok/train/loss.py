"""The training objective of train-io: the causal LM loss through a chunked LM head.

The loss never holds the fp32 logits of the whole batch: :func:`chunked_lm_loss` runs the head and
cross-entropy over chunks of ``train.loss_chunk_tokens`` tokens and computes each chunk's gradient on the
spot, so a chunk's logits are freed before the next one is made.
"""

from __future__ import annotations

import torch
from torch import nn

from retok.core.errors import RetokError


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
        if not isinstance(input_ids, torch.Tensor):  # a PairBatch (a distillation run's joint phase)
            input_ids = input_ids.new
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


def check_loss_matches(model: nn.Module, block: torch.Tensor, chunk_tokens: int) -> None:
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
