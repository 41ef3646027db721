"""The shared piece map of train-io (retok.train.piecemap): its features, its gradient-side steps against the
same model written with the map and the residuals as parameters, and what it does in a real train-io run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from retok.core.config import validate_dict
from retok.core.errors import RetokError
from retok.core.stages import new_token_ids, stage_dir
from retok.pipeline import run_all, run_stage
from retok.train.piecemap import PieceMap
from tests.tiny import tiny_project


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    V_old, n_new, H = 30, 12, 8
    orig = torch.randn(V_old, H, generator=g)
    embed = nn.Parameter(torch.cat([orig.clone(), torch.randn(n_new, H, generator=g) * 0.1]))
    pieces = {
        V_old + j: [int(p) for p in torch.randint(0, V_old, (1 + j % 4,), generator=g)] for j in range(n_new)
    }
    pieces[V_old + 3] = [5, 5, 7]  # a piece repeated inside one token
    return orig, embed, pieces


def test_features_are_last_first_and_mean_of_the_original_rows():
    orig, embed, pieces = _setup()
    pm = PieceMap(embed, pieces, orig)
    F = pm.features()
    for j, t in enumerate(pm.rows.tolist()):
        ps = pieces[t]
        want = torch.cat([orig[ps[-1]], orig[ps[0]], orig[ps].mean(0)])
        torch.testing.assert_close(F[j], want)
    g = torch.Generator().manual_seed(1)
    m = torch.randn(F.shape[1], orig.shape[1], generator=g)
    torch.testing.assert_close(pm.apply(m), F @ m, rtol=1e-5, atol=1e-5)
    rows_grad = torch.randn(len(pm.rows), orig.shape[1], generator=g)
    torch.testing.assert_close(pm.transpose_apply(rows_grad), F.T @ rows_grad, rtol=1e-5, atol=1e-5)


def test_gradient_side_steps_equal_training_the_map_and_residuals_as_parameters():
    """Adam on the embedding rows + the map's gradient F^T G + rows moved by F @ (map change) is exactly Adam on
    (residual, map) of rows = start + residual + F @ map; old rows (gradient masked) stay bit-identical."""
    orig, embed, pieces = _setup()
    V_old, H = orig.shape
    g = torch.Generator().manual_seed(2)
    A = torch.randn(H, 5, generator=g)
    target = torch.randn(64, 5, generator=g)
    batches = [torch.randint(0, embed.shape[0], (64,), generator=g) for _ in range(12)]
    learn = torch.arange(embed.shape[0]) >= V_old

    def loss_of(rows_all, ids, k):
        return ((rows_all[ids] @ A - target * (1 + k % 3)) ** 2).mean()

    # the gradient-side PieceMap, as train-io runs it
    pm = PieceMap(embed, pieces, orig)
    embed.register_hook(lambda grad: grad * learn[:, None])
    opt = torch.optim.AdamW(
        [{"params": [embed], "lr": 1e-2}, {"params": [pm.map], "lr": 3e-3}], betas=(0.9, 0.95), weight_decay=0
    )
    start_all = embed.detach().clone()
    for k, ids in enumerate(batches):
        loss_of(embed, ids, k).backward()
        pm.before_step()
        opt.step()
        pm.after_step()
        opt.zero_grad(set_to_none=True)

    # the reference: residual and map as parameters
    F = PieceMap(nn.Parameter(start_all.clone()), pieces, orig).features()
    rows = torch.tensor(sorted(pieces))
    residual = nn.Parameter(torch.zeros(len(rows), H))
    M = nn.Parameter(torch.zeros(3 * H, H))
    ref_opt = torch.optim.AdamW(
        [{"params": [residual], "lr": 1e-2}, {"params": [M], "lr": 3e-3}], betas=(0.9, 0.95), weight_decay=0
    )
    for k, ids in enumerate(batches):
        rows_all = start_all.index_put((rows,), start_all[rows] + residual + F @ M)
        loss_of(rows_all, ids, k).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        want = start_all.index_put((rows,), start_all[rows] + residual + F @ M)
    assert not torch.equal(embed.detach()[rows], start_all[rows])  # it learned
    torch.testing.assert_close(embed.detach(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(embed.detach()[:V_old], start_all[:V_old])


# ------------------------------------------------------------------------------- in train-io (tiny project)


def _train(tmp: Path, **train):
    cfg = validate_dict(
        tiny_project(
            tmp,
            train={
                "max_steps": 2,
                "eval_every": 2,
                "seq_len": 16,
                "batch_size": 1,
                "distill_layers": [1, 2],
                **train,
            },
            fit={"after_train": False},
        )
    )
    run_all(cfg, only=["tokenizer", "model-init", "model-trained"])
    init = load_file(str(stage_dir(cfg, "model-init") / "model.safetensors"))
    after = load_file(str(stage_dir(cfg, "model-trained") / "model.safetensors"))
    return cfg, init, after


def test_the_map_moves_new_rows_the_text_never_showed_and_nothing_old(tmp_path, capsys):
    """Without the map a new row that no batch contains keeps its initial row; with it (the default) every new
    row with pieces moves, while old rows and the body stay bit for bit."""
    cfg, init, plain = _train(tmp_path / "plain", piece_map=False)
    assert "piece map" not in capsys.readouterr().out
    _, _, mapped = _train(tmp_path / "map")  # train.piece_map null: on for one process
    assert "train-io: piece map:" in capsys.readouterr().out
    reports = [
        json.loads((tmp_path / k / "out" / "model-trained" / "train_report.json").read_text())["piece_map"]
        for k in ("plain", "map")
    ]
    assert reports[0] is None and reports[1]["rows"] > 0 and reports[1]["lr"] == cfg.train.piece_map_lr
    E0, E_plain, E_map = (m["model.embed_tokens.weight"] for m in (init, plain, mapped))
    new = new_token_ids(stage_dir(cfg, "tokenizer"), E0.shape[0])
    n_old = min(new)
    unseen = [i for i in new if torch.equal(E_plain[i], E0[i])]
    seen = [i for i in new if not torch.equal(E_plain[i], E0[i])]
    assert unseen and seen  # the text shows some new tokens and not others
    assert all(not torch.equal(E_map[i], E0[i]) for i in unseen)
    assert torch.equal(E_map[:n_old], E0[:n_old]) and torch.equal(E_plain[:n_old], E0[:n_old])
    for name, t in init.items():
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(t, mapped[name]), name


def test_the_map_under_fsdp_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import retok.train.stage as stage_mod

    cfg = validate_dict(tiny_project(tmp_path, train={"max_steps": 2}))  # the default: on
    run_all(cfg, only=["tokenizer", "model-init"])
    monkeypatch.setattr(stage_mod, "_strategy", lambda cfg, acc: "fsdp")
    with pytest.raises(RetokError, match=r"train.piece_map \(on by default\) is not supported under FSDP"):
        run_stage(cfg, "model-trained")
    assert not stage_dir(cfg, "model-trained").exists()
    assert not (cfg.out / "train-state").exists()
