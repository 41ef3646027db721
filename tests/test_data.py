"""Data loading: files, folders, globs, formats, budgets, and the errors for bad input."""

from __future__ import annotations

import json

import pytest

from retok.core.config import DataSource
from retok.core.data import iter_source, load_domains, truncate_utf8
from retok.core.errors import RetokError


def src(path, **kw) -> DataSource:
    return DataSource(name=kw.pop("name", "d"), path=str(path), **kw)


def test_jsonl_txt_parquet_folder_and_glob(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "x": 1}) for t in ["一二三", "four"]) + "\n"
    )
    assert list(iter_source(src(tmp_path / "a.jsonl"), "data.train.0")) == ["一二三", "four"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "custom"}) + "\n")
    assert list(iter_source(src(tmp_path / "b.jsonl", text_field="body"), "k")) == ["custom"]
    txt = tmp_path / "t" / "p.txt"
    txt.parent.mkdir()
    txt.write_text("para one\nline2\n\npara two\n")
    assert list(iter_source(src(txt), "k")) == ["para one\nline2\n\npara two\n"]
    assert list(iter_source(src(txt, txt_unit="paragraph"), "k")) == ["para one\nline2", "para two"]
    assert list(iter_source(src(txt, txt_unit="line"), "k")) == ["para one", "line2", "para two"]
    assert list(iter_source(src(tmp_path / "t"), "k")) == ["para one\nline2\n\npara two\n"]
    assert list(iter_source(src(str(tmp_path / "a*.jsonl"), text_field="text"), "k"))[:2] == [
        "一二三",
        "four",
    ]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "x.parquet")
    assert list(iter_source(src(tmp_path / "x.parquet"), "k")) == ["p1", "p2"]


def test_byte_budget_never_splits_a_character(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["中文中文", "abc"]) + "\n")
    docs = list(iter_source(src(tmp_path / "a.jsonl", max_bytes=7), "k"))
    assert docs == ["中文"]  # 6 bytes; the third character would need 9
    assert truncate_utf8("中文", 4) == "中"
    dom = load_domains([src(tmp_path / "a.jsonl", name="zh")], "data.eval", max_bytes=13)
    assert dom == {"zh": ["中文中文", "a"]}


def test_non_utf8_names_file_and_offset(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes("好的".encode() + b"\xff\xfe rest")
    with pytest.raises(RetokError, match=r"bad\.txt is not UTF-8 text: invalid byte at offset 6"):
        list(iter_source(src(f), "data.train.0"))


def test_missing_field_empty_source_missing_path(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(RetokError, match=r"no field 'text' \(fields: content\); set text_field"):
        list(iter_source(src(tmp_path / "a.jsonl"), "k"))
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(RetokError, match=r"data.train.3 \(d\): no text in"):
        list(iter_source(src(tmp_path / "e.txt"), "data.train.3"))
    with pytest.raises(RetokError, match=r"k.path: .*nope.txt not found"):
        list(iter_source(src(tmp_path / "nope.txt"), "k"))
    with pytest.raises(RetokError, match=r"matches no file"):
        list(iter_source(src(tmp_path / "*.zzz"), "k"))
    (tmp_path / "j.jsonl").write_text(json.dumps({"text": "ok"}) + "\n\n{broken\n")
    with pytest.raises(RetokError, match=r"j\.jsonl: line 3 is not valid JSON"):
        list(iter_source(src(tmp_path / "j.jsonl"), "k"))
    (tmp_path / "l.jsonl").write_text('["a list"]\n')
    with pytest.raises(RetokError, match=r"l\.jsonl: line 1 holds a JSON list, not an object"):
        list(iter_source(src(tmp_path / "l.jsonl"), "k"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.txt").write_text("x")
    (tmp_path / "m" / "b.jsonl").write_text(json.dumps({"text": "y"}))
    with pytest.raises(RetokError, match="mixes file types"):
        list(iter_source(src(tmp_path / "m"), "k"))
