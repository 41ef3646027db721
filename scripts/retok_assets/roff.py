"""roff (man pages) to plain text."""

from __future__ import annotations

import re

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
