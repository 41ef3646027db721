"""retok.train.rows: the io phase trains the new input rows as an (n x H) parameter of their own, and that is
exactly training those rows of the embedding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from retok.core.config import validate_dict
from retok.core.stages import new_token_ids, stage_dir
from retok.pipeline import run_all
from retok.train.rows import CompactRows, lookup_scale
from tests.tiny import tiny_project

_ATTACH = CompactRows.attach


class ScaledEmbedding(nn.Embedding):
    """Gemma's kind: the lookup times sqrt(H), the constant named embed_scale."""

    def __init__(self, n: int, h: int) -> None:
        super().__init__(n, h)
        self.register_buffer("embed_scale", torch.tensor(h**0.5), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class ShiftedEmbedding(nn.Embedding):
    """Not a lookup times a constant."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + 1.0


def test_the_scale_is_measured_and_a_module_that_is_not_a_lookup_is_left_alone():
    torch.manual_seed(0)
    assert lookup_scale(nn.Embedding(50, 8)) == 1.0
    assert lookup_scale(ScaledEmbedding(50, 16)) == float(torch.tensor(16**0.5))
    assert lookup_scale(ShiftedEmbedding(50, 8)) is None
    assert lookup_scale(nn.Embedding(50, 8, _weight=torch.zeros(50, 8))) is None


class _Model(nn.Module):
    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.emb = emb

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb


def test_the_hook_gives_the_module_output_and_gradients_of_training_those_rows():
    torch.manual_seed(0)
    dense = ScaledEmbedding(40, 8)
    compact = ScaledEmbedding(40, 8)
    compact.load_state_dict(dense.state_dict())
    learn = torch.zeros(40, dtype=torch.bool)
    learn[30:] = True
    rows = CompactRows.attach(_Model(compact), learn)
    assert rows is not None and rows.param.shape == (10, 8)
    compact.weight.requires_grad_(False)
    ids = torch.tensor([[1, 31, 5, 39, 31, 2]])
    target = torch.randn(1, 6, 8)

    out_d = dense(ids)
    out_c = compact(ids)
    assert torch.equal(out_d, out_c)  # bit for bit, the scale applied as the module applies it
    ((out_d - target) ** 2).sum().backward()
    ((out_c - target) ** 2).sum().backward()
    assert torch.allclose(rows.param.grad, dense.weight.grad[30:], atol=1e-6)
    assert torch.count_nonzero(rows.param.grad[[0, 2, 3, 4, 5, 6, 7, 8]]) == 0  # 31 and 39 only
    assert torch.count_nonzero(rows.param.grad[[1, 9]]) == 16

    # the teacher's call with the original rows is not touched
    old = torch.randn(40, 8)
    swapped = torch.func.functional_call(compact, {"weight": old}, (ids,))
    assert torch.equal(swapped, old[ids] * compact.embed_scale)

    with torch.no_grad():
        rows.param.add_(1.0)
    rows.close()
    assert torch.equal(compact.weight[30:], dense.weight[30:].detach() + 1.0)
    assert torch.equal(compact.weight[:30], dense.weight[:30].detach())
    assert torch.equal(compact(ids), compact.weight[ids] * compact.embed_scale)  # the hook is off


def _train(tmp: Path, compact: bool, monkeypatch, **train) -> tuple[dict, dict, list]:
    made = []

    def attach(model, learn_rows):
        r = _ATTACH(model, learn_rows) if compact else None
        made.append(r)
        return r

    monkeypatch.setattr(CompactRows, "attach", staticmethod(attach))
    cfg = validate_dict(
        tiny_project(
            tmp,
            train={
                "max_steps": 8,
                "eval_every": 8,
                "lr": 3e-3,
                "distill_layers": [1, 2],
                "trainable": "io_new_rows",
                **train,
            },
            fit={"after_train": False},
        )
    )
    run_all(cfg, only=["tokenizer", "model-init", "model-trained"])
    init = load_file(str(stage_dir(cfg, "model-init") / "model.safetensors"))
    out = stage_dir(cfg, "model-trained")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    trained = load_file(str(out / "model.safetensors"))
    new_ids = new_token_ids(stage_dir(cfg, "tokenizer"), trained["model.embed_tokens.weight"].shape[0])
    return init, trained, [made, rows, new_ids]


@pytest.mark.parametrize("objective", ["distill", "lm"])
def test_compact_rows_train_exactly_what_the_whole_embedding_trains(tmp_path, monkeypatch, objective):
    init, dense, (made_d, log_d, new_ids) = _train(
        tmp_path / "dense", False, monkeypatch, objective=objective
    )
    _, comp, (made_c, log_c, _) = _train(tmp_path / "compact", True, monkeypatch, objective=objective)
    assert made_d == [None] and isinstance(made_c[0], CompactRows)
    assert len(made_c[0].ids) == len(new_ids)  # the new rows only, not the vocabulary
    name = "model.embed_tokens.weight"
    old = torch.ones(dense[name].shape[0], dtype=torch.bool)
    old[new_ids] = False
    assert torch.equal(comp[name][old], init[name][old])  # old rows bit for bit
    moved = (comp[name][new_ids] - init[name][new_ids]).abs().max()
    assert moved > 1e-3  # they learned
    assert torch.allclose(comp[name], dense[name], atol=1e-5 * float(moved) + 1e-7)
    for key in dense:  # the body (and the head) as the whole-matrix run left them
        assert torch.allclose(comp[key], dense[key], atol=1e-5), key
    losses_d = [r["loss"] for r in log_d if "loss" in r]
    losses_c = [r["loss"] for r in log_c if "loss" in r]
    assert len(losses_c) == 8 and all(
        math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses_d, losses_c, strict=True)
    )


def test_the_plan_counts_the_moments_of_the_new_rows_only(tmp_path):
    from retok.plan.phases import train_phase
    from retok.plan.shape import Shape

    cfg = validate_dict(tiny_project(tmp_path, train={"objective": "distill", "piece_map": False}))
    s = Shape(
        name="m",
        hidden=64,
        layers=2,
        intermediate=128,
        kv_width=64,
        old_rows=1000,
        old_tied=False,
        new_rows=1280,
        new_tied=False,
        body=100_000,
        layer_params=50_000,
        old_vocab=1000,
        new_vocab=1250,
    )
    single = {i.name: i.bytes for i in train_phase(cfg, s, "io", "single", 1, "cpu").items}
    ddp = {i.name: i.bytes for i in train_phase(cfg, s, "io", "ddp", 2, "cpu").items}
    assert single["optimizer"] == 8 * 250 * 64  # the 250 new rows' moments
    assert ddp["optimizer"] == 8 * 1280 * 64  # DDP trains the whole embedding
