"""Text in: documents per domain from local files (.txt/.jsonl/.json/.parquet, folders, globs) or hub datasets.

Every source is read lazily, so corpora larger than RAM stream through: JSON Lines and text files line by
line with the standard library (about 100x faster than ``datasets`` for local JSON Lines), JSON arrays,
parquet and hub datasets through ``datasets`` in streaming mode (nothing written to a datasets cache). Each
source has an optional byte budget (``max_bytes``).
"""

from __future__ import annotations

import codecs
import glob
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from retok.core.config import DataSource, expand
from retok.core.errors import RetokError

SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def source_files(src: DataSource, key: str) -> list[Path]:
    """The files a local source names: a file, a folder (recursively) or a glob."""
    assert src.path is not None
    raw = expand(src.path)
    p = Path(raw)
    if any(c in raw for c in "*?["):
        files = [Path(f) for f in sorted(glob.glob(raw, recursive=True)) if Path(f).is_file()]
        if not files:
            raise RetokError(f"{key}.path: the glob {raw} matches no file")
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise RetokError(f"{key}.path: the folder {p} holds no .txt/.jsonl/.json/.parquet file")
    elif p.is_file():
        files = [p]
    else:
        raise RetokError(
            f"{key}.path: {p} not found; check the path (scripts/fetch_assets.py fetches the demo corpora)"
        )
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise RetokError(
            f"{key}.path: {unreadable[0]} cannot be read (permission denied); make it readable or leave it out"
        )
    bad = [f for f in files if f.suffix.lower() not in SUFFIXES]
    if bad:
        raise RetokError(f"{key}.path: {bad[0]} is not .txt, .jsonl, .json or .parquet")
    kinds = {SUFFIXES[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise RetokError(
            f"{key}.path: mixes file types ({', '.join(sorted(kinds))}); use one source per type"
        )
    return files


def check_utf8(path: Path) -> None:
    """Fail with the file and byte offset of the first invalid UTF-8 byte (text formats only)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                dec.decode(chunk)
            except UnicodeDecodeError as e:
                raise RetokError(
                    f"{path} is not UTF-8 text: invalid byte at offset {offset + e.start}; convert it to UTF-8"
                ) from None
            offset += len(chunk)
        try:
            dec.decode(b"", final=True)
        except UnicodeDecodeError:
            raise RetokError(
                f"{path} is not UTF-8 text: it ends inside a multi-byte character (offset {offset})"
            ) from None


def _rows(src: DataSource, key: str) -> Iterator[str]:
    from datasets import load_dataset

    if src.hub is not None:
        try:
            ds = load_dataset(src.hub, src.hub_config, split=src.split, streaming=True)
        except Exception as e:
            raise RetokError(
                f"{key}.hub: cannot open the hub dataset {src.hub} ({e.__class__.__name__}); "
                "check the id and your network, or use a local `path`"
            ) from None
        yield from _texts(ds, src.text_field, f"{key}.hub {src.hub}")
        return
    files = source_files(src, key)
    kind = SUFFIXES[files[0].suffix.lower()]
    for f in files:
        try:
            if kind != "parquet":
                check_utf8(f)
            if kind == "text":
                yield from _txt_docs(f, src.txt_unit)
                continue
            if f.suffix.lower() == ".jsonl":
                yield from _texts(_jsonl_rows(f), src.text_field, str(f))
                continue
        except OSError as e:
            raise RetokError(
                f"{key}.path: {f} cannot be read ({e.strerror or e.__class__.__name__}); make it readable or "
                f"leave it out of {key}.path"
            ) from None
        try:
            ds = load_dataset(kind, data_files=[str(f)], split="train", streaming=True)
            yield from _texts(ds, src.text_field, str(f))
        except RetokError:
            raise
        except Exception as e:
            raise RetokError(
                f"{f}: cannot be read as {kind} ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})"
            ) from None


def _jsonl_rows(path: Path) -> Iterator[dict]:
    """The objects of a JSON Lines file, one line at a time (blank lines skipped)."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise RetokError(
                    f"{path}: line {number} is not valid JSON ({e.msg}); fix or remove it"
                ) from None
            if not isinstance(row, dict):
                raise RetokError(
                    f"{path}: line {number} holds a JSON {type(row).__name__}, not an object with a text field"
                )
            yield row


def _txt_docs(path: Path, unit: str) -> Iterator[str]:
    """Documents of a text file: the whole file, blank-line separated paragraphs, or non-empty lines."""
    if unit == "document":
        yield path.read_text(encoding="utf-8")
        return
    with path.open(encoding="utf-8", newline=None) as f:
        if unit == "line":
            yield from (line.rstrip("\n") for line in f if line.strip())
            return
        para: list[str] = []
        for line in f:
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para).rstrip("\n")
                para = []
        if para:
            yield "".join(para).rstrip("\n")


def _texts(rows: Iterable[dict], field: str, where: str) -> Iterator[str]:
    for row in rows:
        if field not in row:
            fields = ", ".join(sorted(row)) or "none"
            raise RetokError(f"{where}: rows have no field {field!r} (fields: {fields}); set text_field")
        value = row[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise RetokError(
                f"{where}: field {field!r} holds {type(value).__name__}, not text; set text_field"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can spell an unpaired surrogate (\ud800), which is not text
            raise RetokError(
                f"{where}: a document holds {value[e.start]!r}, an unpaired surrogate that is not text "
                "(a \\ud800-\\udfff escape in the JSON); fix or remove that row"
            ) from None
        yield value


def truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` with at most ``max_bytes`` UTF-8 bytes (never half a character)."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def iter_source(src: DataSource, key: str, max_bytes: int | None = None) -> Iterator[str]:
    """Documents of one source, within the smaller of its own and the caller's byte budget."""
    budgets = [b for b in (src.max_bytes, max_bytes) if b is not None]
    budget = min(budgets) if budgets else None
    used = 0
    produced = False
    for doc in _rows(src, key):
        if not doc:
            continue
        n = len(doc.encode("utf-8"))
        if budget is not None and used + n > budget:
            rest = truncate_utf8(doc, budget - used)
            if rest:
                produced = True
                yield rest
            break
        used += n
        produced = True
        yield doc
        if budget is not None and used >= budget:
            break
    if not produced:
        where = src.path if src.path is not None else src.hub
        raise RetokError(f"{key} ({src.name}): no text in {where}; point it at non-empty files")


def iter_domain(
    sources: list[DataSource], name: str, section: str, max_bytes: int | None = None
) -> Iterator[str]:
    """Documents of every source of one domain, in config order."""
    for i, src in enumerate(sources):
        if src.name == name:
            yield from iter_source(src, f"{section}.{i}", max_bytes)


def domains(sources: list[DataSource]) -> list[str]:
    """Domain names in first-seen order."""
    return list(dict.fromkeys(s.name for s in sources))


def load_domains(
    sources: list[DataSource], section: str, max_bytes: int | None = None, only: list[str] | None = None
) -> dict[str, list[str]]:
    """Every domain's documents in memory (for held-out text, which is small). ``max_bytes`` caps each domain."""
    out: dict[str, list[str]] = {}
    for name in domains(sources):
        if only is not None and name not in only:
            continue
        docs: list[str] = []
        used = 0
        for doc in iter_domain(sources, name, section, max_bytes):
            if max_bytes is not None:
                doc = truncate_utf8(doc, max_bytes - used)
                if not doc:
                    break
            docs.append(doc)
            used += len(doc.encode("utf-8"))
            if max_bytes is not None and used >= max_bytes:
                break
        out[name] = docs
    return out
