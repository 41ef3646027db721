"""build-tokenizer's report: compression per held-out domain, lossless round trip, reachability, digits.

``compression.json`` (machine-readable), ``compression.md`` (for people) and ``compression.png`` (bytes per
token per domain, old vs new). Bytes per token = UTF-8 bytes of the text / tokens, without special tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from retok.core.errors import RetokError
from retok.core.tokens import detect_family, token_to_bytes
from retok.tokenizer.extend import unreachable

NUMBER = re.compile(r"\d+(?:[.,:/-]\d+)*")
NUMBER_PROBES = [
    "0",
    "7",
    "42",
    "2024",
    "3.14159",
    "1000000",
    "12/05/2025",
    "555-0199",
    "10:30",
    "v2.3.1",
    "1,234",
]


# ----------------------------------------------------------------------------------------------- measures


def domain_compression(old: Tokenizer, new: Tokenizer, docs: list[str]) -> dict[str, Any]:
    """Bytes/characters per token of both tokenizers on ``docs``, and the new tokenizer's round trip."""
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_chars = sum(len(d) for d in docs)
    old_enc = old.encode_batch(docs, add_special_tokens=False)
    new_enc = new.encode_batch(docs, add_special_tokens=False)
    old_tokens = sum(len(e.ids) for e in old_enc)
    new_tokens = sum(len(e.ids) for e in new_enc)
    new_back = new.decode_batch([e.ids for e in new_enc], skip_special_tokens=False)
    old_back = old.decode_batch([e.ids for e in old_enc], skip_special_tokens=False)
    new_fail = [i for i, (d, b) in enumerate(zip(docs, new_back, strict=True)) if d != b]
    old_fail = [i for i, (d, b) in enumerate(zip(docs, old_back, strict=True)) if d != b]

    def per(x: int, n: int) -> float:
        return x / n if n else 0.0

    old_bpt, new_bpt = per(n_bytes, old_tokens), per(n_bytes, new_tokens)
    return {
        "docs": len(docs),
        "bytes": n_bytes,
        "chars": n_chars,
        "old_tokens": old_tokens,
        "new_tokens": new_tokens,
        "old_bytes_per_token": old_bpt,
        "new_bytes_per_token": new_bpt,
        "old_chars_per_token": per(n_chars, old_tokens),
        "new_chars_per_token": per(n_chars, new_tokens),
        "ratio": per(new_bpt, old_bpt) if old_bpt else 0.0,
        "roundtrip_ok": not new_fail,
        "roundtrip_failures": len(new_fail),
        "old_roundtrip_ok": not old_fail,
        "_new_fail": new_fail,
        "_old_fail": old_fail,
    }


def check_roundtrip(domains: dict[str, dict[str, Any]], docs: dict[str, list[str]]) -> list[str]:
    """Raise when the new tokenizer loses text the old one kept; return warnings for documents that neither
    tokenizer can round-trip (a lossy normaliser in the old pipeline, which retok keeps on purpose)."""
    warnings = []
    for name, r in domains.items():
        new_fail, old_fail = set(r.pop("_new_fail")), set(r.pop("_old_fail"))
        ours = sorted(new_fail - old_fail)
        if ours:
            i = ours[0]
            doc = docs[name][i]
            raise RetokError(
                f"the new tokenizer does not round-trip held-out text: decode(encode(x)) != x for {len(ours)} "
                f"document(s) of data.eval domain {name!r} (first: document {i}, {doc[:60]!r}); this is a bug in "
                "retok, please report it with the tokenizer and text"
            )
        if new_fail:
            warnings.append(
                f"{len(new_fail)} document(s) of data.eval domain {name!r} do not round-trip with the OLD tokenizer "
                "either (its normaliser is lossy); the new tokenizer keeps the old pipeline"
            )
    return warnings


def reachable_share(tok: Tokenizer, ids: list[int]) -> tuple[float, list[str]]:
    """Share of ``ids`` whose own string, given alone to the BPE model, comes out as exactly that token."""
    if not ids:
        return 1.0, []
    tokens = [(tok.id_to_token(i), i) for i in ids]
    bad = unreachable(tok, tokens)
    return 1.0 - len(bad) / len(ids), bad


def digit_check(
    old: Tokenizer, new: Tokenizer, docs: dict[str, list[str]], limit: int = 400
) -> dict[str, Any]:
    """Do both tokenizers cut numbers at the same places? Numbers from the held-out text and a few probes,
    alone and after a space; compared as the byte strings of their tokens."""
    found: dict[str, None] = dict.fromkeys(NUMBER_PROBES)
    for ds in docs.values():
        for d in ds:
            for m in NUMBER.finditer(d):
                found.setdefault(m.group(0))
                if len(found) >= limit:
                    break
    probes = [p for n in found for p in (n, " " + n)]
    fam_old, fam_new = detect_family(old), detect_family(new)

    def pieces(tok: Tokenizer, fam: str, text: str) -> list[bytes]:
        out = []
        for t in tok.encode(text, add_special_tokens=False).tokens:
            out.append(token_to_bytes(fam, t) if tok.token_to_id(t) is not None else t.encode())
        return out

    diffs = []
    for p in probes:
        a, b = pieces(old, fam_old, p), pieces(new, fam_new, p)
        if a != b:
            diffs.append(
                {
                    "text": p,
                    "old": [x.decode("utf-8", "replace") for x in a],
                    "new": [x.decode("utf-8", "replace") for x in b],
                }
            )
    return {"probes": len(probes), "same": not diffs, "differences": len(diffs), "examples": diffs[:5]}


# ------------------------------------------------------------------------------------------------ writing


def write_reports(out: Path, report: dict[str, Any]) -> None:
    """compression.json, compression.md and compression.png in ``out``."""
    (out / "compression.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "compression.md").write_text(markdown(report), encoding="utf-8")
    if report["domains"]:
        plot(report, out / "compression.png")


def markdown(r: dict[str, Any]) -> str:
    c = r["counts"]
    lines = [
        "# retok build-tokenizer",
        "",
        f"Mode **{r['mode']}** ({r['family']} BPE) from `{r['old_model']}`: {c['old_vocab_size']:,} -> "
        f"{c['new_vocab_size']:,} tokens"
        + (
            f", {c['new_tokens']:,} new (ids {c['first_new_id']:,}-{c['first_new_id'] + c['new_tokens'] - 1:,})."
            if r["mode"] == "extend" and c["new_tokens"]
            else "."
        ),
        "",
        "## Compression on held-out text (data.eval)",
        "",
        "| domain | docs | bytes | old tokens | new tokens | old bytes/token | new bytes/token | new/old | old chars/token | new chars/token | round trip |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, d in r["domains"].items():
        lines.append(
            f"| {name} | {d['docs']} | {d['bytes']:,} | {d['old_tokens']:,} | {d['new_tokens']:,} | "
            f"{d['old_bytes_per_token']:.3f} | {d['new_bytes_per_token']:.3f} | **{d['ratio']:.3f}x** | "
            f"{d['old_chars_per_token']:.3f} | {d['new_chars_per_token']:.3f} | {'ok' if d['roundtrip_ok'] else 'FAILED'} |"
        )
    if not r["domains"]:
        lines.append("| (no data.eval domains: nothing measured) | | | | | | | | | | |")
    dg = r["digits"]
    lines += [
        "",
        "## Checks",
        "",
        f"- Reachable new tokens (the token's string alone encodes to exactly that token): "
        f"**{r['reachable_share'] * 100:.2f}%** of {c['reachable_checked']:,}.",
        f"- Numbers split the same way as the old tokenizer: **{'yes' if dg['same'] else 'NO'}** "
        f"({dg['differences']} of {dg['probes']} probes differ).",
        f"- Special tokens kept as single ids: **{'yes' if r['checks']['specials_single_ids'] else 'NO'}**; "
        f"chat template renders them as single ids: **{r['checks']['chat_template']}**.",
    ]
    if r["mode"] == "extend":
        lines.append(
            f"- Old tokens at their old ids: **{'all' if r['checks']['old_ids_kept'] else 'NOT ALL'}**; "
            f"{c['merges_added']:,} merges appended ({c['merges_to_existing']} produce an existing token)"
            + (
                f"; {c['char_tokens']:,} single characters added for byte-fallback text"
                if c.get("char_tokens")
                else ""
            )
            + "."
        )
    for e in dg["examples"][:3]:
        lines.append(f"  - `{e['text']}`: old {e['old']} -> new {e['new']}")
    pr = r.get("protection")
    if pr:
        cost = ", ".join(
            f"{d} {pr['ratio_without'][d]:.3f}x -> {pr['ratio_with'][d]:.3f}x" for d in pr["ratio_with"]
        )
        lines.append(
            f"- Protected domains ({', '.join(pr['domains'])}): {pr['dropped']:,} learned tokens fired in their text "
            f"and were replaced by the next merges (e.g. {', '.join(f'`{x}`' for x in pr['examples'][:8])}); "
            f"held-out compression without that protection -> with it: {cost}."
        )
    lines += [
        "",
        f"Training text: {r['training']['bytes']:,} bytes from {', '.join(r['training']['sources'])}; "
        f"built in {r['seconds']:.1f} s.",
        "",
    ]
    if r["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["domains"])
    old = [r["domains"][n]["old_bytes_per_token"] for n in names]
    new = [r["domains"][n]["new_bytes_per_token"] for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6))
    w = 0.38
    ax.bar([i - w / 2 for i in x], old, w, label="old tokenizer", color="#9aa5b1")
    bars = ax.bar([i + w / 2 for i in x], new, w, label=f"new ({r['mode']})", color="#2f7ed8")
    for b, n in zip(bars, names, strict=True):
        ax.annotate(
            f"{r['domains'][n]['ratio']:.2f}x",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), names)
    ax.set_ylabel("UTF-8 bytes per token")
    ax.set_title("Held-out compression (higher is better)")
    ax.set_ylim(0, max(old + new) * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
