"""Token windows: documents cut into BOS-first, unpadded windows (docs/pitfalls.md P3, P4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.corpora import Document
from actsparse.pipeline.windows import iter_windows

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
