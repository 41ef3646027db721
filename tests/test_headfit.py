"""fit.at_init: the head rows of new tokens fitted on the new model's own states (retok.headfit).

- fit_rows lowers its own loss and the held-out loss, touches only the rows that may learn, and the teacher
  term pulls the first-piece marginal towards the teacher's distribution;
- through init-embeddings on a tiny project: input rows stay piece means, old head rows stay bit for bit,
  new head rows move, the held-out CE of the fit drops, the folder passes `retok check`;
- a tied head without untie_head is refused with the key to change.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from retok.core.config import validate_dict
from retok.core.errors import RetokError
from retok.core.stages import stage_dir
from retok.export.check import check_folder
from retok.headfit.fit import first_pieces, fit_rows
from retok.headfit.objective import kl_to_teacher
from retok.headfit.run import forward_copy, forward_dtype
from retok.headfit.states import States
from retok.pipeline import run_stage
from tests.tiny import byte_level_tokenizer, tiny_llama, tiny_project


def _synthetic(n: int = 6000, hidden: int = 16, old: int = 30, new: int = 10, seed: int = 0):
    """States drawn from a known softmax head: the fixed (old) rows are the truth, the new rows start off."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(old + new, hidden, generator=g)
    H = torch.randn(n, hidden, generator=g)
    Y = torch.multinomial(torch.softmax(H @ truth.T, -1), 1, generator=g)[:, 0]
    states = States(
        hidden=H.half(),
        target=Y,
        held_out=torch.arange(n) % 10 == 9,
        domain=torch.zeros(n, dtype=torch.long),
        domains=["x"],
    )
    start = truth.clone()
    start[old:] = torch.randn(new, hidden, generator=g) * 0.1
    learn = torch.zeros(old + new, dtype=torch.bool)
    learn[old:] = True
    return states, truth, start, learn


def _ce(states: States, head: torch.Tensor, which: torch.Tensor) -> float:
    logits = states.hidden[which].float() @ head.T
    return float(torch.nn.functional.cross_entropy(logits, states.target[which]))


def test_fit_rows_lowers_train_and_held_out_loss_and_keeps_fixed_rows():
    states, truth, start, learn = _synthetic()
    res = fit_rows(states, start, learn, lr=5e-2, max_epochs=30, batch=256)
    train, held = ~states.held_out, states.held_out
    assert _ce(states, res.head, train) < _ce(states, start, train) - 0.1
    assert res.held_out_ce < res.held_out_ce_start - 0.1
    assert res.held_out_ce == pytest.approx(_ce(states, res.head, held), rel=1e-3)
    assert _ce(states, res.head, held) < _ce(states, truth, held) + 0.05  # close to the truth's loss
    assert torch.equal(res.head[~learn], start[~learn])  # fixed rows bit for bit


def test_teacher_term_pulls_the_first_piece_marginal():
    states, truth, start, learn = _synthetic(n=3000)
    old = int((~learn).sum())
    # every new token t starts with old token t - old (a made-up decomposition)
    first = first_pieces(
        len(truth), {old + k: [k] for k in range(int(learn.sum()))}, {i: i for i in range(old)}
    )
    assert first[old + 3] == 3 and first[5] == 5
    # the teacher: the truth's distribution marginalised onto first pieces, top 8
    with torch.no_grad():
        probs = torch.softmax(states.hidden.float() @ truth.T, -1)
        marg = torch.zeros(len(probs), old).index_add(1, first, probs)
        top = marg.topk(8, dim=-1)
    states.teacher_p, states.teacher_i = top.values, top.indices

    def kl(head: torch.Tensor) -> float:
        logits = states.hidden.float() @ head.T
        lse = torch.logsumexp(logits, 1)
        fixed_at_top = logits[:, :old].gather(1, states.teacher_i)
        return float(
            kl_to_teacher(
                lse, fixed_at_top, logits[:, old:], first[old:], old, states.teacher_p, states.teacher_i
            ).mean()
        )

    res = fit_rows(states, start, learn, first_piece=first, kl_weight=1.0, lr=5e-2, max_epochs=20, batch=256)
    assert kl(res.head) < kl(start) * 0.7
    assert kl(truth) < kl(start)  # the term measures the right thing: the truth is closer than the start


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("headfit")
    data = tiny_project(
        root, init={"eval_max_bytes": 300}, fit={"bytes": 6000, "window": 64, "at_init": True}
    )
    cfg = validate_dict(data)
    run_stage(cfg, "tokenizer")
    out = run_stage(cfg, "model-init")
    return cfg, out


def test_init_embeddings_fits_only_the_new_head_rows(fitted):
    from safetensors.torch import load_file

    cfg, out = fitted
    report = json.loads((out / "init_report.json").read_text())
    fit = report["calibration"]["head_fit"]
    assert fit["held_out_ce"]["fitted"] < fit["held_out_ce"]["start"]
    assert set(fit["states"]) == {"zh", "en"} and all(v > 50 for v in fit["states"].values())
    assert fit["tree_depth"] == 1  # the default
    assert fit["tokens"]["teacher"] > 0 and fit["rows_fitted"] == report["averaged"] + report["fallback"]

    new = load_file(str(out / "model.safetensors"))
    old = load_file(str(Path(cfg.model.path) / "model.safetensors"))
    n_old = old["model.embed_tokens.weight"].shape[0]
    head, emb = new["lm_head.weight"], new["model.embed_tokens.weight"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    # old rows: the old (tied) matrix, bit for bit, in the head and in the embedding
    assert torch.equal(head[:n_old], old["model.embed_tokens.weight"])
    assert torch.equal(emb[:n_old], old["model.embed_tokens.weight"])
    # new rows: the head moved away from the input rows' piece means
    new_ids = torch.arange(n_old, n_old + report["averaged"])
    assert not torch.allclose(head[new_ids], emb[new_ids])
    assert math.isfinite(report["bpb"]["zh"]["init"])


def test_fitted_model_init_passes_check(fitted):
    _, out = fitted
    assert [(r.name, r.detail) for r in check_folder(out) if not r.ok] == []


def test_a_tied_head_cannot_be_fitted_without_untie(tmp_path: Path):
    cfg = validate_dict(tiny_project(tmp_path, init={"untie_head": False}, fit={"at_init": True}))
    run_stage(cfg, "tokenizer")
    with pytest.raises(
        RetokError, match="fit.at_init: the model ties its LM head .* set init.untie_head: true"
    ):
        run_stage(cfg, "model-init")
    assert not stage_dir(cfg, "model-init").exists()


def test_fit_text_is_half_target_domains_half_the_rest():
    from retok.headfit.run import fit_budgets

    assert fit_budgets(["zh", "en", "code"], ["zh"], 200_000) == {"zh": 100_000, "en": 50_000, "code": 50_000}
    assert fit_budgets(["zh", "en"], None, 100_000) == {"zh": 50_000, "en": 50_000}  # one group: even
    assert fit_budgets(["zh"], ["zh"], 30_000) == {"zh": 30_000}


def test_states_that_would_not_fit_the_memory_cap_are_refused_up_front(tmp_path: Path):
    cfg = validate_dict(tiny_project(tmp_path, fit={"max_memory_mb": 1, "bytes": 6000, "at_init": True}))
    run_stage(cfg, "tokenizer")
    with pytest.raises(
        RetokError,
        match=r"fit.bytes: the head fit would cache [\d,]+ states .* over fit.max_memory_mb=1",
    ):
        run_stage(cfg, "model-init")
    assert not stage_dir(cfg, "model-init").exists()


def test_windows_the_teacher_reads_identically_reuse_the_students_states(fitted, monkeypatch):
    """Where a window's new ids are old ids with copied rows (English in extend mode), the teacher's forward
    pass is skipped: its top-k must equal what its own forward pass gives, and windows with new tokens still
    run the teacher."""
    import retok.headfit.states as hf
    from retok.core.sources import load_model, load_tokenizer
    from retok.teacher.body import Teacher

    cfg, out = fitted
    old_tok, new_tok = load_tokenizer(cfg.model.path), load_tokenizer(out)
    original = load_model(cfg.model.path, dtype="float32", device="cpu")
    old_w = original.get_input_embeddings().weight.detach().clone()
    student = load_model(out, dtype="float32", device="cpu")
    teacher = Teacher(student, old_w, old_w)
    en = [
        ln
        for x in Path(cfg.data.eval[1].path).read_text().splitlines()
        for ln in json.loads(x)["text"].split("\n")
    ]
    zh = [json.loads(x)["text"] for x in Path(cfg.data.eval[0].path).read_text().splitlines()][:2]
    # English lines the new tokenizer splits exactly as the old one (old ids only)
    lines = [t for t in en if len(t) > 20 and old_tok(t)["input_ids"] == new_tok(t)["input_ids"]][:4]
    assert len(lines) >= 2 and all(old_tok(t)["input_ids"] != new_tok(t)["input_ids"] for t in zh)
    docs = {"en": lines, "zh": zh}

    def collect():
        return hf.collect_states(
            student, new_tok, docs, window=32, teacher=teacher, old_tok=old_tok, top_k=8, tree_depth=2
        )

    fast = collect()
    monkeypatch.setattr(hf, "_same_window", lambda *a: False)
    slow = collect()
    assert fast.tokens["teacher_shared"] > 0 and "teacher_shared" not in slow.tokens
    assert 0 < fast.tokens["teacher"] < slow.tokens["teacher"]  # the zh windows still ran the teacher
    assert torch.allclose(fast.teacher_p, slow.teacher_p, atol=1e-5)
    # the tree's depth 1 is inside the student's window; depth 2 past a shared window's end is left out (-1)
    assert torch.equal(fast.tree_prefix[:, 0], slow.tree_prefix[:, 0])
    assert torch.allclose(fast.tree_p[:, 0], slow.tree_p[:, 0], atol=1e-5)
    both = (fast.tree_prefix[:, 1] >= 0) & (slow.tree_prefix[:, 1] >= 0)
    assert torch.equal(fast.tree_prefix[both, 1], slow.tree_prefix[both, 1])
    assert torch.allclose(fast.tree_p[both, 1], slow.tree_p[both, 1], atol=1e-5)
    assert torch.equal(fast.hidden, slow.hidden) and torch.equal(fast.target, slow.target)


def test_teacher_fraction_runs_the_teacher_on_that_share_of_the_windows_that_need_it(fitted):
    """teacher_fraction 0.5: every other window that needs a teacher pass gets one (the same top-k as with
    every window), the others keep zeros (no teacher target, no tree); the students' states are unchanged and
    windows the teacher reads as they are keep their free top-k."""
    from retok.core.sources import load_model, load_tokenizer
    from retok.headfit.states import collect_states
    from retok.teacher.body import Teacher

    cfg, out = fitted
    old_tok, new_tok = load_tokenizer(cfg.model.path), load_tokenizer(out)
    old_w = load_model(cfg.model.path, dtype="float32", device="cpu").get_input_embeddings().weight.detach()
    student = load_model(out, dtype="float32", device="cpu")
    zh = [json.loads(x)["text"] for x in Path(cfg.data.eval[0].path).read_text().splitlines()]

    def collect(fraction: float):
        return collect_states(
            student,
            new_tok,
            {"zh": zh},
            window=16,
            teacher=Teacher(student, old_w.clone(), old_w.clone()),
            old_tok=old_tok,
            top_k=6,
            tree_depth=1,
            teacher_fraction=fraction,
        )

    full, half = collect(1.0), collect(0.5)
    assert torch.equal(full.hidden, half.hidden) and torch.equal(full.target, half.target)
    has_full, has_half = full.teacher_p.sum(1) > 0, half.teacher_p.sum(1) > 0
    assert has_full.float().mean() > 0.9
    kept = has_half & has_full
    assert 0.35 < kept.sum() / has_full.sum() < 0.65  # about half of the windows
    assert torch.allclose(half.teacher_p[kept], full.teacher_p[kept], atol=1e-6)
    assert torch.equal(half.teacher_i[kept], full.teacher_i[kept])
    assert torch.equal(half.tree_p[~has_half], torch.zeros_like(half.tree_p[~has_half]))
    assert bool((half.tree_prefix[~has_half] == -1).all())
    assert 0.35 < half.tokens["teacher"] / full.tokens["teacher"] < 0.65


def test_tree_groups_name_the_new_tokens_spelled_with_the_realised_pieces():
    """Depth 1: teacher entry q after realised r1 -> the group of new tokens spelled (r1, q, ...); depth 2:
    (r1, r2, q, ...); entries no new token spells, and states without a realised prefix, map to -1."""
    from retok.headfit.objective import TreeTerms

    pieces = {10: [1, 2], 11: [1, 3, 4], 12: [2, 3], 13: [1, 3, 5]}
    learn_ids = torch.tensor([10, 11, 12, 13])
    states = States(
        hidden=torch.zeros(2, 4).half(),
        target=torch.zeros(2, dtype=torch.long),
        held_out=torch.zeros(2, dtype=torch.bool),
        domain=torch.zeros(2, dtype=torch.long),
        domains=["x"],
        tree_p=torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]], [[0.9, 0.1, 0.0], [0.0, 0.0, 0.0]]]),
        tree_i=torch.tensor([[[2, 3, 5], [4, 5, 2]], [[3, 2, 1], [0, 0, 0]]], dtype=torch.int32),
        tree_prefix=torch.tensor([[1, 3], [2, -1]]),
    )
    tree = TreeTerms(states, learn_ids, pieces)
    g1 = tree.gid[:, 0].tolist()
    grp1 = dict(zip(tree.members[0].tolist(), tree.group_of[0].tolist(), strict=True))  # learn pos -> group
    # state 0, r1 = 1: q=2 -> {10}; q=3 -> {11, 13} (one group: both spelled 1, 3, ...); q=5 -> none
    assert g1[0] == [grp1[0], grp1[1], -1] and grp1[1] == grp1[3] != grp1[0]
    # state 1, r1 = 2: q=3 -> {12}; q=2, q=1 -> none (and p = 0 never counts)
    assert g1[1] == [grp1[2], -1, -1]
    g2 = tree.gid[:, 1].tolist()
    grp2 = dict(zip(tree.members[1].tolist(), tree.group_of[1].tolist(), strict=True))
    assert set(grp2) == {1, 3} and grp2[1] != grp2[3]  # only the 3-piece tokens have a depth-2 group
    assert g2[0] == [grp2[1], grp2[3], -1]  # r1 r2 = 1 3: q=4 -> {11}, q=5 -> {13}
    assert g2[1] == [-1, -1, -1]  # no realised second piece


def test_tree_term_pulls_the_second_piece_and_lowers_held_out_loss():
    """New tokens spelled (f, s): a teacher whose second-piece distribution comes from the truth's head; the fit
    with the tree terms moves the students' grouped mass towards it, much closer than the fit without."""
    from retok.headfit.objective import RowObjective

    states, truth, start, learn = _synthetic(n=3000, old=30, new=12)
    old = 30
    pieces = {old + j: [j % 3, 3 + j // 3] for j in range(12)}  # first piece 0..2, second 3..6
    first = first_pieces(len(truth), pieces, {i: i for i in range(old)})
    n = len(states.target)
    g = torch.Generator().manual_seed(1)
    r1 = torch.randint(0, 3, (n,), generator=g)
    with torch.no_grad():
        probs = torch.softmax(states.hidden.float() @ truth.T, -1)
        marg = torch.zeros(n, old).index_add(1, first, probs)
        top = marg.topk(8, dim=-1)
        # the teacher's next piece after r1: the truth's mass of (r1, q) tokens over q = 3..6, plus noise entries
        second = torch.zeros(n, 7)
        for j in range(12):
            f, q = pieces[old + j]
            second[:, q] += probs[:, old + j] * (r1 == f)
        second = second / second.sum(1, keepdim=True)
    states.teacher_p, states.teacher_i = top.values, top.indices
    states.tree_p = second[:, None, 3:]
    states.tree_i = torch.arange(3, 7, dtype=torch.int32).expand(n, 1, 4).clone()
    states.tree_prefix = r1[:, None]

    def tree_kl(head: torch.Tensor) -> float:
        obj = RowObjective(states, head, learn, first, True, "cpu", pieces)
        with torch.no_grad():
            ll = states.hidden.float() @ obj.rows().T
            return float(obj.tree.kl(torch.arange(n), ll))

    def fit(with_tree: bool):
        return fit_rows(
            states,
            start,
            learn,
            first_piece=first,
            pieces=pieces if with_tree else None,
            kl_weight=1.0,
            lr=5e-2,
            max_epochs=20,
            batch=256,
        )

    res, plain = fit(True), fit(False)
    assert tree_kl(truth) < tree_kl(start) * 0.01  # the term measures the right thing
    # the next-token loss alone gets part of the way (the states are sampled from the truth): the tree much further
    assert tree_kl(res.head) < tree_kl(plain.head) * 0.3
    assert res.held_out_ce < res.held_out_ce_start


def test_written_out_gradient_equals_autograd_of_the_loss():
    """The fit's step uses RowObjective.loss_and_grad (the gradient written out): it equals autograd's gradient
    of CE + w * (first-piece KL + tree terms) on states with and without a teacher, targets in fixed and in
    learning rows, rows with and without a depth-1 group, and its loss values equal the loss's."""
    from retok.headfit.objective import RowObjective

    states, truth, start, learn = _synthetic(n=400, old=30, new=12, seed=3)
    old, n = 30, 400
    pieces = {old + j: [j % 3, 3 + j // 3] + ([7] if j % 4 == 0 else []) for j in range(12)}
    pieces[old + 11] = [5]  # a one-piece token: no depth-1 group
    first = first_pieces(len(truth), pieces, {i: i for i in range(old)})
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(n, 6, generator=g) * 2, -1) * 0.9  # 10% left for the rest bucket
    p[::7] = 0.0  # states without a teacher (train-mode positions)
    states.teacher_p = p
    states.teacher_i = torch.stack([torch.randperm(old, generator=g)[:6] for _ in range(n)])
    states.tree_p = torch.softmax(torch.randn(n, 1, 4, generator=g), -1)
    states.tree_i = torch.randint(3, 8, (n, 1, 4), generator=g, dtype=torch.int32)
    states.tree_prefix = torch.randint(0, 3, (n, 1), generator=g)
    obj = RowObjective(states, start, learn, first, True, "cpu", pieces)
    assert (obj.tgt_learn >= 0).any() and (obj.tgt_learn < 0).any()
    idx = torch.randperm(n, generator=g)[:256]
    ll = (
        states.hidden[idx].float() @ (start[learn] + 0.3 * torch.randn(12, 16, generator=g)).T
    ).requires_grad_()
    lse = torch.logaddexp(obj.lse_fixed[idx], torch.logsumexp(ll, 1))
    tl = obj.tgt_learn[idx]
    ce = (lse - torch.where(tl >= 0, ll.gather(1, tl.clamp(min=0)[:, None])[:, 0], obj.tgt_fixed[idx])).mean()
    has = states.teacher_p[idx].sum(1) > 0
    kl = kl_to_teacher(
        lse[has],
        obj.top_fixed[idx][has],
        ll[has],
        obj.learn_group,
        obj.n_groups,
        states.teacher_p[idx][has],
        obj.group_at_top[idx][has].long(),
    ).mean()
    tree = obj.tree.kl(idx, ll)
    assert tree is not None and float(tree.detach()) > 0.01
    (ce + 0.7 * (kl + tree)).backward()
    ce2, kl2, grad = obj.loss_and_grad(idx, ll.detach(), 0.7)
    assert ce2 == pytest.approx(float(ce.detach()), rel=1e-5)
    assert kl2 == pytest.approx(float((kl + tree).detach()), rel=1e-5)
    assert float(ll.grad.abs().max()) > 1e-3
    assert torch.allclose(grad, ll.grad, atol=1e-7, rtol=1e-4)
    _, none, grad_ce = obj.loss_and_grad(idx, ll.detach(), 0.0)  # no teacher weight: the CE's gradient alone
    assert none is None and not torch.allclose(grad_ce, grad, atol=1e-6)


def test_tree_targets_are_the_original_models_next_pieces_after_the_realised_ones(fitted):
    """At depth d the state aligned with old position a carries the original model's (loaded on its own) top-k
    at old position a + d and the realised pieces old[a+1..a+d]."""
    from retok.core.metrics import bos_id
    from retok.core.sources import load_model, load_tokenizer
    from retok.headfit.states import collect_states
    from retok.teacher.alignment import ByteLengths, align
    from retok.teacher.body import Teacher

    cfg, out = fitted
    old_tok, new_tok = load_tokenizer(cfg.model.path), load_tokenizer(out)
    original = load_model(cfg.model.path, dtype="float32", device="cpu")
    old_w = original.get_input_embeddings().weight.detach().clone()
    student = load_model(out, dtype="float32", device="cpu")
    text = json.loads(Path(cfg.data.eval[0].path).read_text().splitlines()[0])["text"][:300]
    st = collect_states(
        student,
        new_tok,
        {"zh": [text]},
        window=4096,
        teacher=Teacher(student, old_w, old_w),
        old_tok=old_tok,
        top_k=5,
        tree_depth=2,
    )
    old_ids = old_tok(text, add_special_tokens=False)["input_ids"]
    new_ids = new_tok(text, add_special_tokens=False)["input_ids"]
    amap = align(ByteLengths(old_tok), ByteLengths(new_tok), old_ids, new_ids).teacher
    bos = bos_id(old_tok)
    off = 1 if bos is not None else 0
    with torch.no_grad():
        ref = torch.softmax(original(torch.tensor([([bos] if off else []) + old_ids])).logits[0].float(), -1)
    checked = 0
    for n in range(len(new_ids) - 1):
        a = int(amap[n])
        for d in (1, 2):
            if a + d >= len(old_ids):
                assert st.tree_prefix[n, d - 1] == -1
                continue
            assert st.tree_prefix[n, d - 1] == old_ids[a + d]
            top = ref[a + d + off - 1 + 1].topk(5)
            assert torch.allclose(st.tree_p[n, d - 1], top.values, atol=1e-4)
            assert st.tree_i[n, d - 1].tolist() == top.indices.tolist()
            checked += 1
    assert checked > 20


def test_piece_features_are_the_first_piece_row_and_the_mean_of_the_others():
    from retok.headfit.fit import piece_features

    old_head = torch.arange(12.0).reshape(6, 2)  # row r = (2r, 2r + 1)
    pieces = {10: [1, 2, 3], 11: [4], 12: [], 13: [5, 0]}
    f = piece_features(old_head, pieces, torch.tensor([13, 10, 11, 12]))
    assert f.tolist() == [
        [10.0, 11.0, 0.0, 1.0],  # 13: first 5, rest (0)
        [2.0, 3.0, 5.0, 6.0],  # 10: first 1, rest mean of 2 and 3
        [8.0, 9.0, 0.0, 0.0],  # 11: one piece
        [0.0, 0.0, 0.0, 0.0],  # 12: no pieces
    ]


def _seen_states(H: torch.Tensor, Y: torch.Tensor, fit_at: torch.Tensor) -> States:
    """The states of the targets in ``fit_at`` (every 10th held out): the others' tokens are never seen."""
    n = int(fit_at.sum())
    return States(
        hidden=H[fit_at].half(),
        target=Y[fit_at],
        held_out=torch.arange(n) % 10 == 9,
        domain=torch.zeros(n, dtype=torch.long),
        domains=["x"],
    )


def test_shared_map_carries_what_seen_tokens_teach_to_unseen_ones():
    """New tokens whose true rows are one linear function of their pieces' rows; half of them never occur as
    a target in the fitted states. With the shared map their rows come much closer to the truth (and the
    held-out loss on them drops); without it, they only get pushed down."""
    from retok.headfit.fit import piece_features

    g = torch.Generator().manual_seed(3)
    hidden, old, new, n = 16, 30, 120, 8000
    base = torch.randn(old, hidden, generator=g)
    pieces = {
        old + j: [int(a), int(b)] for j, (a, b) in enumerate(torch.randint(0, old, (new, 2), generator=g))
    }
    A = torch.eye(hidden) + 0.4 * torch.randn(hidden, hidden, generator=g)
    B = 0.6 * torch.randn(hidden, hidden, generator=g)
    truth = torch.cat([base, torch.stack([base[a] @ A + base[b] @ B for a, b in pieces.values()])])
    H = torch.randn(n, hidden, generator=g)
    Y = torch.multinomial(torch.softmax(H @ truth.T, -1), 1, generator=g)[:, 0]
    unseen = Y >= old + new // 2  # the second half of the new tokens: kept out of the fitted states
    fit_at = ~unseen
    states = _seen_states(H, Y, fit_at)
    start = truth.clone()
    start[old:] = torch.stack([(base[a] + base[b]) / 2 for a, b in pieces.values()])  # the mean init
    learn = torch.zeros(old + new, dtype=torch.bool)
    learn[old:] = True
    feats = piece_features(base, pieces, torch.arange(old, old + new))

    def fit(with_map: bool):
        return fit_rows(
            states,
            start,
            learn,
            features=feats if with_map else None,
            map_lr=5e-2,
            lr=5e-2,
            max_epochs=20,
            batch=256,
        ).head

    mapped, free = fit(True), fit(False)
    rare = torch.arange(old + new // 2, old + new)

    def err(head: torch.Tensor) -> float:
        return float((head[rare] - truth[rare]).norm() / truth[rare].norm())

    assert err(mapped) < 0.5 * err(free) and err(mapped) < 0.5 * err(start)
    on_unseen = torch.nonzero(unseen).squeeze(1)
    ce = lambda head: float(torch.nn.functional.cross_entropy(H[on_unseen] @ head.T, Y[on_unseen]))  # noqa: E731
    assert (
        ce(mapped) < ce(start) < ce(free)
    )  # measured 6.9 < 7.6 < 14.2: without the map they are pushed down


def test_logits_through_the_features_equal_the_built_rows_with_the_same_gradients():
    """The fit takes X @ rows.T in whichever order costs less; a one-state batch goes through the features, a
    large one builds the rows: both give the same logits and the same gradients of the map and residuals."""
    from retok.headfit.fit import piece_features
    from retok.headfit.objective import RowObjective

    states, truth, start, learn = _synthetic(n=600, hidden=16, old=30, new=40)
    pieces = {30 + j: [j % 30, (3 * j) % 30, (7 * j) % 30] for j in range(40)}
    feats = piece_features(truth[:30], pieces, torch.arange(30, 70))
    obj = RowObjective(states, start, learn, None, False, "cpu", None, feats)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        obj.map.copy_(torch.randn(obj.map.shape, generator=g) * 0.1)
        obj.residual.copy_(torch.randn(obj.residual.shape, generator=g) * 0.1)
    X = states.hidden[:1].float()
    n, f = feats.shape
    assert n * f * X.shape[1] > X.shape[0] * f * (X.shape[1] + n)  # this batch goes through the features

    def grads(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        obj.map.grad = obj.residual.grad = None
        (logits * torch.linspace(-1, 1, logits.shape[1])).sum().backward()
        return obj.map.grad.clone(), obj.residual.grad.clone()

    via_features = obj.logits(X)
    built = X @ obj.rows().T
    torch.testing.assert_close(via_features, built, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(obj.logits(X)), grads(X @ obj.rows().T), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    big = states.hidden[:512].float()  # a large batch builds the rows
    assert n * f * big.shape[1] <= big.shape[0] * f * (big.shape[1] + n)
    torch.testing.assert_close(obj.logits(big), big @ obj.rows().T)


def test_input_row_feature_is_the_tokens_own_row_and_carries_to_unseen_tokens():
    """piece_features(..., input_rows) appends each token's own input row. New tokens whose true head rows are
    a linear function of their INPUT rows (not of their pieces); half never occur as a target: with the input
    block the map brings the unseen rows far nearer the truth than the pieces alone can."""
    from retok.headfit.fit import piece_features

    old_head = torch.arange(12.0).reshape(6, 2)
    emb = torch.arange(100.0, 128.0).reshape(14, 2)
    f = piece_features(old_head, {10: [1, 2, 3], 11: [4]}, torch.tensor([11, 10]), input_rows=emb)
    assert f.tolist() == [[8.0, 9.0, 0.0, 0.0, 122.0, 123.0], [2.0, 3.0, 5.0, 6.0, 120.0, 121.0]]

    g = torch.Generator().manual_seed(5)
    hidden, old, new, n = 16, 30, 120, 8000
    base = torch.randn(old, hidden, generator=g)
    pieces = {
        old + j: [int(a), int(b)] for j, (a, b) in enumerate(torch.randint(0, old, (new, 2), generator=g))
    }
    inputs = torch.cat([base, torch.randn(new, hidden, generator=g)])
    A = torch.eye(hidden) + 0.4 * torch.randn(hidden, hidden, generator=g)
    truth = torch.cat([base, inputs[old:] @ A])
    H = torch.randn(n, hidden, generator=g)
    Y = torch.multinomial(torch.softmax(H @ truth.T, -1), 1, generator=g)[:, 0]
    fit_at = Y < old + new // 2
    states = _seen_states(H, Y, fit_at)
    start = truth.clone()
    start[old:] = torch.stack([(base[a] + base[b]) / 2 for a, b in pieces.values()])
    learn = torch.zeros(old + new, dtype=torch.bool)
    learn[old:] = True
    ids = torch.arange(old, old + new)

    def err(rows_from_input: bool) -> float:
        feats = piece_features(base, pieces, ids, input_rows=inputs if rows_from_input else None)
        head = fit_rows(
            states, start, learn, features=feats, map_lr=5e-2, lr=5e-2, max_epochs=20, batch=256
        ).head
        rare = torch.arange(old + new // 2, old + new)
        return float((head[rare] - truth[rare]).norm() / truth[rare].norm())

    with_input, pieces_only = err(True), err(False)
    # measured 0.63 vs 1.04: without the input block the unseen rows cannot be told apart from their pieces
    assert with_input < 0.7 * pieces_only, (with_input, pieces_only)


def test_forward_dtype_follows_the_setting_and_the_device(monkeypatch):
    import io

    import retok.headfit.run as hr

    cpu = torch.device("cpu")
    assert forward_dtype("model", torch.float32, cpu) == torch.float32
    assert forward_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16
    assert forward_dtype("bfloat16", torch.float16, cpu) == torch.float16  # only a float32 model gets a copy
    assert forward_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    for flags, native in [
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu amx_bf16 avx2", True),
        ("fpu avx2", False),
    ]:
        monkeypatch.setattr(
            "builtins.open", lambda *a, flags=flags, **k: io.StringIO(f"processor: 0\nflags\t: {flags}\n")
        )
        assert hr.native_bf16(cpu) is native
        assert forward_dtype("auto", torch.float32, cpu) == (torch.bfloat16 if native else torch.float32)
    monkeypatch.undo()
    assert hr.native_bf16(torch.device("meta")) is False


def test_forward_copy_is_a_bfloat16_twin_that_leaves_the_model_as_it_was():
    tok = byte_level_tokenizer()
    model = tiny_llama(tok, tied=True).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = forward_copy(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in twin.parameters())
    assert twin.get_input_embeddings().weight is twin.get_output_embeddings().weight  # tied stays tied
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    buffers = dict(model.named_buffers())
    assert buffers and all(b is buffers[n] for n, b in twin.named_buffers())  # shared, full precision
    x = torch.tensor([tok("机器学习是人工智能的一个分支 and a field of study")["input_ids"]])
    with torch.no_grad():
        h32 = model.model(input_ids=x).last_hidden_state
        h16 = twin.model(input_ids=x).last_hidden_state.float()
    assert 0 < float((h16 - h32).norm() / h32.norm()) < 0.03
