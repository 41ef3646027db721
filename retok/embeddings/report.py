"""The model-init report: what each new row was made from, and what it costs in held-out BPB.

``init_report.json`` (machine-readable; top level ``copied``/``special``/``averaged``/``fallback``/``padding``
counts, ``bpb`` {domain: {original, init}}, ``compare`` {method: {domain: bpb}}), ``init_report.md`` (the
same for people) and ``pieces_histogram.png`` (old pieces per averaged token).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from retok.core.bpb_memo import bpb_key, write_memo
from retok.core.data import load_domains
from retok.core.metrics import bits_per_byte, score_starts
from retok.core.sources import load_model
from retok.core.tokenmap import AVERAGED, TokenMap
from retok.core.tokens import token_to_bytes
from retok.embeddings.rows import build_matrix

PAPER = "paper_mean"  # compare key: ReTok's plain mean for input and head rows, no head shift


def pieces_histogram(tmap: TokenMap) -> dict[int, int]:
    """Number of averaged tokens per count of old pieces."""
    return dict(sorted(Counter(len(p) for p in tmap.pieces.values()).items()))


def _show(data: bytes) -> str:
    """Bytes as readable text; bytes that are not valid UTF-8 (half a character) as \\xNN."""
    return data.decode("utf-8", errors="backslashreplace")


def examples(tmap: TokenMap, old_tok: Any, new_tok: Any, k: int = 12) -> list[dict[str, Any]]:
    """``k`` averaged tokens spread evenly over the new ids, each with its old pieces (as bytes shown as text)."""
    ids = tmap.ids(AVERAGED)
    if len(ids) == 0:
        return []
    pick = ids[np.linspace(0, len(ids) - 1, min(k, len(ids))).round().astype(int)]
    out = []
    for i in dict.fromkeys(int(x) for x in pick):
        token = new_tok.id_to_token(i)
        out.append(
            {
                "id": i,
                "token": _show(token_to_bytes(tmap.new_family, token)) if token is not None else None,
                "pieces": [
                    _show(token_to_bytes(tmap.old_family, old_tok.id_to_token(p))) for p in tmap.pieces[i]
                ],
                "piece_ids": tmap.pieces[i],
            }
        )
    return out


def plot_histogram(hist: dict[int, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(k) for k in hist], list(hist.values()), color="#4C72B0")
    ax.set_xlabel("old pieces per new token")
    ax.set_ylabel("new tokens")
    ax.set_title("How many old tokens each new token replaces")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.2f}%" if old else "n/a"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """init_report.json, init_report.md and pieces_histogram.png in ``out``."""
    (out / "init_report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    hist = {int(k): v for k, v in report.get("pieces_histogram", {}).items()}
    if hist:
        plot_histogram(hist, out / "pieces_histogram.png")
    (out / "init_report.md").write_text(render_markdown(report), encoding="utf-8")


def render_markdown(r: dict[str, Any]) -> str:
    """init_report.md: what the rows got, the pieces, examples, held-out BPB, compared methods, checks."""
    lines = _md_rows(r) + _md_pieces(r) + _md_bpb(r) + _md_compare(r)
    if r.get("eval_note"):
        lines += [r["eval_note"], ""]
    checks = r.get("checks") or {}
    if checks:
        lines += [
            "## Checks",
            "",
            f"config, generation config and tokenizer agree: **{'yes' if checks.get('ok') else 'NO'}**",
        ]
        lines += [f"- {p}" for p in checks.get("problems", [])]
        lines.append("")
    return "\n".join(lines)


def _md_rows(r: dict[str, Any]) -> list[str]:
    init = r.get("init", {})
    return [
        "# init-embeddings report",
        "",
        f"Model: `{r.get('model')}`; tokenizer: `{r.get('tokenizer')}`.",
        f"Input rows: **{init.get('method')}**; head rows: **{init.get('head_method')}**"
        + (
            f", new tokens' head logits lowered by {init.get('head_shift', 0)} nats everywhere and "
            f"{init.get('head_shift_outside', 0)} more outside the target domains"
            if init.get("head_shift") or init.get("head_shift_outside")
            else ""
        )
        + f"; head {'separate' if init.get('separate_head') else 'tied to the embedding'}.",
        "",
        "## Rows",
        "",
        "| kind | rows | what it got |",
        "|---|---:|---|",
        f"| copied | {r['copied']} | the old row of the token with the same bytes, bit for bit |",
        f"| special | {r['special']} | the old row of the special token with the same role / content |",
        f"| averaged | {r['averaged']} | a combination of the old rows of its pieces (old tokenizer's split) |",
        f"| fallback | {r['fallback']} | the mean of all old rows (no usable decomposition) |",
        f"| padding | {r.get('padding', 0)} | "
        + (
            f"copies of donor id {r['pad_donor']}: equal logits, the donor wins every tie; suppressed in generate |"
            if r.get("pad_donor") is not None
            else "none needed |"
        ),
        "",
        f"Rows: {r.get('old_rows')} -> {r.get('new_rows')} (vocabulary {r.get('new_tokens')} tokens, padded to a multiple of {init.get('pad_to_multiple_of')}).",
        "",
    ]


def _md_pieces(r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    hist = r.get("pieces_histogram") or {}
    if hist:
        lines += [
            "## Old pieces per averaged token",
            "",
            "![histogram](pieces_histogram.png)",
            "",
            "| pieces | tokens |",
            "|---:|---:|",
        ]
        lines += [f"| {k} | {v} |" for k, v in hist.items()]
        lines.append("")
    if r.get("examples"):
        lines += ["## Examples", "", "| id | new token | old pieces |", "|---:|---|---|"]
        for e in r["examples"]:
            pieces = " + ".join(f"`{p}`" for p in e["pieces"])
            lines.append(f"| {e['id']} | `{e['token']}` | {pieces} |")
        lines.append("")
    if r.get("fallback_examples"):
        lines += [
            "Fallback tokens (first few): "
            + "; ".join(f"{k}: {v}" for k, v in r["fallback_examples"].items()),
            "",
        ]
    return lines


def _md_bpb(r: dict[str, Any]) -> list[str]:
    bpb = r.get("bpb") or {}
    if not bpb:
        return []
    lines = [
        "## Held-out bits per byte (lower is better)",
        "",
        "| domain | original | init | change |",
        "|---|---:|---:|---:|",
    ]
    for d, v in bpb.items():
        lines.append(f"| {d} | {v['original']:.4f} | {v['init']:.4f} | {_pct(v['init'], v['original'])} |")
    lines.append("")
    return lines


def _md_compare(r: dict[str, Any]) -> list[str]:
    comp, bpb, init = r.get("compare") or {}, r.get("bpb") or {}, r.get("init", {})
    if not comp:
        return []
    domains = list(next(iter(comp.values())).keys())
    lines = [
        "## Init methods compared (held-out BPB)",
        "",
        "Each line puts the method on both the input and the head rows, with this run's head settings "
        f"(separate head, shift); `{PAPER}` is ReTok's plain mean without any shift"
        + (
            " (the head rows equal the input rows, as in the tied original)."
            if init.get("tied_before")
            else "."
        ),
        "",
        "| method | " + " | ".join(domains) + " |",
        "|---|" + "---:|" * len(domains),
    ]
    for m, v in comp.items():
        cells = []
        for d in domains:
            orig = bpb.get(d, {}).get("original")
            cells.append(f"{v[d]:.4f}" + (f" ({_pct(v[d], orig)})" if orig else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def measure_bpb(
    cfg: Any, model_dir: Path, out: Path, old_hf: Any, new_hf: Any, plan: Any, names: Any
) -> dict[str, Any]:
    """Held-out BPB per domain of the original model and of the folder just written (loaded with plain
    transformers), and of every method in ``init.compare_methods`` (rows rebuilt in memory; the folder keeps
    the configured method). Returns {"bpb": ..., "compare": ...}."""
    docs = load_domains(cfg.data.eval, "data.eval", cfg.init.eval_max_bytes)
    print(
        f"retok: init report: BPB of the original and the new model on {cfg.init.eval_max_bytes:,} held-out bytes "
        f"of each of {', '.join(docs)} (init.eval_max_bytes; init.eval_bpb: false skips it)",
        flush=True,
    )
    scorer = _Scorer(cfg, docs, old_hf, new_hf)
    orig, old_emb, old_head = scorer.original(model_dir, out, names)
    model = load_model(out, **scorer.load)
    init = scorer.score(model, new_hf, "init")
    result: dict[str, Any] = {
        "bpb": {d: {"original": orig[d], "init": init[d]} for d in docs},
        "eval_settings": {
            "max_bytes": cfg.init.eval_max_bytes,
            "window": cfg.eval.window,
            "stride": cfg.eval.stride,
        },
    }
    compare = _compare_methods(cfg, scorer, model, new_hf, plan, names, old_emb, old_head)
    if compare:
        result["compare"] = compare
    del model
    return result


class _Scorer:
    """measure_bpb's scoring: both models on exactly the same bytes of each held-out document."""

    def __init__(self, cfg: Any, docs: dict[str, list[str]], old_hf: Any, new_hf: Any) -> None:
        self.cfg, self.docs = cfg, docs
        self.kw = {"window": cfg.eval.window, "stride": cfg.eval.stride}
        self.load = {
            "dtype": cfg.compute.dtype,
            "device": cfg.compute.device,
            "trust_remote_code": cfg.model.trust_remote_code,
        }
        self.old_hf = old_hf
        self.starts = {d: score_starts([old_hf, new_hf], texts) for d, texts in docs.items()}

    def figures(
        self, model: Any, tok: Any, label: str, keep_tokens: bool = False
    ) -> dict[str, dict[str, Any]]:
        return {
            d: bits_per_byte(
                model,
                tok,
                texts,
                desc=f"bpb {label} {d}",
                starts=self.starts[d],
                keep_tokens=keep_tokens,
                **self.kw,
            )
            for d, texts in self.docs.items()
        }

    def score(self, model: Any, tok: Any, label: str) -> dict[str, float]:
        return {d: round(f["bpb"], 5) for d, f in self.figures(model, tok, label).items()}

    def original(self, model_dir: Path, out: Path, names: Any) -> tuple[dict[str, float], Any, Any]:
        """The original model's BPB (left in ``out``'s memo, per-position costs too, for eval-speed), and its
        embedding and head rows (for the compared methods)."""
        original = load_model(model_dir, allow_pickle=self.cfg.model.allow_pickle, **self.load)
        figs = self.figures(original, self.old_hf, "original", keep_tokens=True)
        write_memo(
            out,
            {
                bpb_key(model_dir, self.old_hf, self.docs[d], self.starts[d], model=original, **self.kw): f
                for d, f in figs.items()
            },
        )
        old_emb = original.get_input_embeddings().weight.detach().cpu()
        old_head = (
            original.get_output_embeddings().weight.detach().cpu() if names.head is not None else old_emb
        )
        del original
        return {d: round(f["bpb"], 5) for d, f in figs.items()}, old_emb, old_head


def _compare_methods(
    cfg: Any, scorer: _Scorer, model: Any, new_hf: Any, plan: Any, names: Any, old_emb: Any, old_head: Any
) -> dict[str, dict[str, float]]:
    """init.compare_methods: each method's plain rows (no fitted head) written into ``model`` and scored, and
    ReTok's plain mean as the reference line whenever this run's rows differ from it."""
    import dataclasses

    import torch

    compare: dict[str, dict[str, float]] = {}
    emb_param = model.get_input_embeddings().weight
    head_param = model.get_output_embeddings().weight
    variants = {
        m: dataclasses.replace(plan, method=m, head_method=m, head_rows=None)
        for m in cfg.init.compare_methods
    }
    changed = plan.head_shift is not None or plan.head_rows is not None or "mean" != plan.head_method
    if variants and (changed or plan.method != "mean"):
        # The paper's init as the reference every other line is read against: mean rows, no shift.
        variants[PAPER] = dataclasses.replace(
            plan, method="mean", head_method="mean", head_shift=None, head_rows=None
        )
    for m, p in variants.items():
        with torch.no_grad():
            emb_param.copy_(build_matrix(old_emb, p, "input").to(emb_param.dtype))
            if names.separate:
                head_param.copy_(build_matrix(old_head, p, "head").to(head_param.dtype))
        compare[m] = scorer.score(model, new_hf, m)
    return compare
