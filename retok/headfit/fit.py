"""The head fit itself: Adam over the learning rows (each its start + features @ a shared map + its own
residual), stopped on held-out states."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from retok.headfit.objective import RowObjective
from retok.headfit.states import States

FIT_BATCH = 1024  # states per Adam step of the fit


@dataclass
class FitResult:
    head: torch.Tensor  # the whole head matrix, fitted rows replaced
    held_out_ce: float  # nats/token on the held-out states, best
    held_out_ce_start: float
    epochs: float  # where the best was reached
    steps: int
    seconds: float
    history: list[tuple[int, float]]


def fit_rows(
    states: States,
    head: torch.Tensor,
    learn: torch.Tensor,
    *,
    first_piece: torch.Tensor | None = None,
    pieces: dict[int, Sequence[int]] | None = None,
    kl_weight: float = 0.0,
    features: torch.Tensor | None = None,
    map_lr: float = 5e-4,
    lr: float = 1e-3,
    max_epochs: float = 8.0,
    batch: int = FIT_BATCH,
    patience: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Fit the rows of ``head`` marked in ``learn`` (bool per row); every other row stays as it is.

    ``first_piece[t]``: the old token new token t starts with (needed for ``kl_weight`` > 0, where the
    learning rows must all be new tokens). ``pieces[t]``: new token t's old pieces, for the tree terms (when
    ``states`` carries them; each is weighted like the first-piece KL). ``features`` (one row per learning row,
    in row order; see :func:`piece_features`): the rows become start + features @ map + residual, the map shared
    by all of them and learned at ``map_lr``, the residuals at ``lr``; without, each row is free. Adam (0.9,
    0.95), cosine decay to 10%, evaluation on the held-out states every half epoch, the best rows kept.
    """
    t0 = time.perf_counter()
    use_kl = kl_weight > 0 and states.teacher_p is not None
    train_idx = torch.nonzero(~states.held_out).squeeze(1)
    val_idx = torch.nonzero(states.held_out).squeeze(1)
    obj = RowObjective(states, head, learn, first_piece, use_kl, device, pieces, features)
    groups = [{"params": [obj.residual], "lr": lr}]
    if obj.map is not None:
        groups.append({"params": [obj.map], "lr": map_lr})
    base_lr = [g["lr"] for g in groups]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    per_epoch = max(1, math.ceil(len(train_idx) / batch))
    total = max(1, int(max_epochs * per_epoch))
    best = start = obj.mean_ce(val_idx)
    with torch.no_grad():
        best_rows, best_step, worse = obj.rows().clone(), 0, 0
    history = [(0, start)]
    order = torch.empty(0, dtype=torch.long)
    step = 0
    while step < total:
        if len(order) < batch:
            order = torch.cat([order, train_idx[torch.randperm(len(train_idx), generator=gen)]])
        idx, order = order[:batch], order[batch:]
        for g, g_lr in zip(opt.param_groups, base_lr, strict=True):
            g["lr"] = g_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        ll = obj.logits(obj._rows(idx))
        _, _, grad = obj.loss_and_grad(idx, ll.detach(), kl_weight if use_kl else 0.0)
        opt.zero_grad(set_to_none=True)
        ll.backward(grad)
        opt.step()
        step += 1
        if step % max(1, per_epoch // 2) and step != total:
            continue
        # every half epoch: keep the best rows on the held-out states, stop when they stop improving
        v = obj.mean_ce(val_idx)
        history.append((step, v))
        if log:
            log(f"head fit: epoch {step / per_epoch:.1f}, held-out CE {v:.4f} (start {start:.4f})")
        if not len(val_idx) or v < best - 1e-4:
            with torch.no_grad():
                best, best_rows, best_step, worse = v, obj.rows().clone(), step, 0
        else:
            worse += 1
            if worse >= patience:
                break
    out = head.clone()
    out[obj.learn_ids] = best_rows.to("cpu", head.dtype)
    return FitResult(
        head=out,
        held_out_ce=best,
        held_out_ce_start=start,
        epochs=best_step / per_epoch,
        steps=step,
        seconds=time.perf_counter() - t0,
        history=history,
    )


def first_pieces(n_rows: int, pieces: dict[int, Sequence[int]], copy_source: dict[int, int]) -> torch.Tensor:
    """first_piece[t] for every row: an old token is its own first piece; a new token the first of its old
    pieces; rows with neither get 0 (they never carry mass: padding)."""
    out = torch.zeros(n_rows, dtype=torch.long)
    for new_id, old_id in copy_source.items():
        out[new_id] = old_id
    for new_id, ps in pieces.items():
        if ps:
            out[new_id] = ps[0]
    return out


def piece_features(
    old_head: torch.Tensor,
    pieces: dict[int, Sequence[int]],
    ids: torch.Tensor,
    input_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """(len(ids), 2H) float32 per new token: the original head row of its first piece, and the mean of the rows
    of its other pieces (zeros for a one-piece token or one without pieces). The map the fit learns on them
    says, for every new token at once, how its row should differ from the start given what it is spelled
    with. ``input_rows`` (the model's whole input embedding): a third block of H, the token's own input row,
    so the map can also read what the input side learned about the token (after train-io's distillation, what
    it means in context; on the demo zh 1.113x -> 1.095x of the original's BPB at 2 epochs)."""
    H = old_head.shape[1]
    out = torch.zeros(len(ids), (2 if input_rows is None else 3) * H)
    if input_rows is not None:
        out[:, 2 * H :] = input_rows[ids.to(input_rows.device)].float().cpu()
    for j, t in enumerate(ids.tolist()):
        ps = list(pieces.get(int(t)) or ())
        if not ps:
            continue
        out[j, :H] = old_head[ps[0]].float()
        if len(ps) > 1:
            out[j, H : 2 * H] = old_head[ps[1:]].float().mean(0)
    return out
