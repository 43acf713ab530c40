"""Token windows: documents cut into the model inputs that collection and evaluation run.

Each document is tokenized whole and cut into consecutive windows that each start with BOS
(docs/pitfalls.md P4: Gemma needs BOS at the start of every window, and the BOS position is flagged in
``special`` so that statistics can drop it at query time). Windows are never padded (P3: no pad tokens to
mask, so pad == eos cannot hide real tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.corpora import Document


@dataclass(frozen=True, eq=False)
class Window:
    """One model input: a slice of one document, BOS first when the tokenizer has one.

    ``token_ids`` is int64 ``[n]`` with ``1 <= n <= seq_len``; ``special`` is bool ``[n]``, True at
    BOS and at any special token the tokenizer produced from the text (docs/pitfalls.md P4: kept so that
    filtering special positions is a query-time choice). ``doc_offset`` is the index, within the
    tokenized document, of the window's first document token.
    """

    sequence: int
    doc_id: int
    doc_offset: int
    token_ids: np.ndarray
    special: np.ndarray


def iter_windows(
    documents: Iterable[Document],
    tokenizer,
    seq_len: int,
    *,
    max_tokens: int | None = None,
    add_bos: bool = True,
) -> Iterator[Window]:
    """Cut documents into consecutive, unpadded token windows of at most ``seq_len`` tokens.

    Each document is tokenized whole (``add_special_tokens=False``) and cut into consecutive
    windows; with ``add_bos`` and a tokenizer that has a BOS, every window starts with
    ``bos_token_id`` followed by up to ``seq_len - 1`` document tokens (docs/pitfalls.md P4: BOS at every
    window start, flagged in ``Window.special``). A document's last window may be shorter; nothing
    is padded (docs/pitfalls.md P3). Documents are processed lazily in the given order, so the stream is
    deterministic. With ``max_tokens`` the stream stops after exactly ``max_tokens`` tokens in
    total (BOS included; the last window is truncated, possibly to BOS alone), or earlier when
    the documents run out.

    Yields :class:`Window` with int64 ``token_ids [n]`` and bool ``special [n]``, ``1 <= n <= seq_len``.
    Raises ActsparseError if ``seq_len < 2`` or ``max_tokens < 0``.
    """
    if seq_len < 2:
        raise ActsparseError(f"seq_len must be at least 2, got {seq_len}")
    if max_tokens is not None and max_tokens < 0:
        raise ActsparseError(f"max_tokens must be non-negative, got {max_tokens}")
    bos = tokenizer.bos_token_id if add_bos else None
    prefix = [] if bos is None else [bos]
    step = seq_len - len(prefix)
    special_ids = set(tokenizer.all_special_ids)
    budget = max_tokens
    sequence = 0
    for doc in documents:
        if budget == 0:
            return
        # verbose=False: whole documents exceed model_max_length by design; the warning would be noise.
        ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
        for offset in range(0, len(ids), step):
            window = prefix + ids[offset:offset + step]
            if budget is not None:
                window = window[:budget]
                budget -= len(window)
            token_ids = np.asarray(window, dtype=np.int64)
            special = np.fromiter((t in special_ids for t in window), dtype=bool, count=len(window))
            yield Window(sequence=sequence, doc_id=doc.doc_id, doc_offset=offset, token_ids=token_ids, special=special)
            sequence += 1
            if budget == 0:
                return


def batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive batches of ``batch_size`` windows (the last may be shorter); the composition is fixed by the
    window order, so a resumed run forms exactly the batches of an uninterrupted one."""
    for b in range(0, len(windows), batch_size):
        yield windows[b:b + batch_size]


def pad_batch(batch: list[Window], pad_id: int):
    """Right-padded ``(input_ids, attention_mask)`` of a batch, both int64 ``[batch, max_len]``; positions are
    told apart by the attention mask, never by comparing ids with ``pad_id`` (docs/pitfalls.md P3)."""
    import torch

    width = max(len(w.token_ids) for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, w in enumerate(batch):
        ids[i, : len(w.token_ids)] = torch.from_numpy(w.token_ids)
        mask[i, : len(w.token_ids)] = 1
    return ids, mask
