"""The Brown corpus (POS-tagged word/tag tokens) to plain text."""

from __future__ import annotations

import re
from collections.abc import Iterable

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", "'", ")", "]", "''", "n't", "'s"}
_NO_SPACE_AFTER = {"(", "[", "``", "`"}
_BROWN_QUOTES = {"``": '"', "''": '"'}


def detokenize(words: Iterable[str]) -> str:
    """Join tokens into a readable sentence: no blank before , . ; : ? ! ' ) and after ( and ``."""
    out: list[str] = []
    glue = True
    for w in words:
        if w == "." and out and out[-1].endswith("."):
            continue  # "Jr." + "." ends a sentence once
        if not (glue or w in _NO_SPACE_BEFORE):
            out.append(" ")
        out.append(_BROWN_QUOTES.get(w, w))
        glue = w in _NO_SPACE_AFTER
    return "".join(out)


def brown_untag(line: str) -> str:
    """``The/at Fulton/np-tl County/nn-tl ,/, said/vbd`` -> ``The Fulton County, said``."""
    words = []
    for tok in line.split():
        word, sep, _tag = tok.rpartition("/")
        words.append(word if sep and word else tok)
    return detokenize(words)


def brown_to_text(raw: str) -> str:
    """A Brown file (tab-indented tagged sentences, blank lines between) as one sentence-group a line."""
    paras = []
    for block in re.split(r"\n[ \t]*\n", raw):
        sents = [brown_untag(ln) for ln in block.splitlines() if ln.strip()]
        if sents:
            paras.append(" ".join(sents))
    return "\n".join(paras)
