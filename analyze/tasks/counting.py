"""Realized sparsity of an lm-eval run counted as the authors count it (docs/paper-notes.md §1.4).

* per token and hook, zeroed entries / width; per hook Σ zeroed / Σ width over the counted positions of every
  request of the task; model level dimension-weighted over all hooks;
* ``prefill`` = the first forward of a request batch (loglikelihood tasks have nothing else), ``generation`` =
  every later one-token forward of ``generate`` (KV cache); ``total`` = both;
* generation tokens of a request count up to and including the token that stops it (its first stop string or
  EOS); tokens that other rows of its batch make it generate afterwards do not count;
* which positions count, ``count_mode``:

  - ``real`` (default): real tokens only, i.e. neither padding nor special tokens (BOS, EOS, lm-eval's prefix
    token), as ``actsparse.analyze.evaluate`` counts the held-out windows (docs/pitfalls.md P3, P4);
  - ``authors``: the authors' fork. Loglikelihood batches count ``input_ids != tokenizer.pad_token_id``
    while lm-eval right-pads them with token id 0, so for a tokenizer whose pad id is not 0 (SmolLM2: 2)
    padding counts and real tokens equal to the pad id do not; BOS and other special tokens count;
    generation counts the attention mask (left padding excluded).

The sparsifier changes every position, padding included; only the counting is masked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from actsparse.analyze.sparsifier import HookPoint
from actsparse.core.errors import ActsparseError

COUNT_MODES = ("real", "authors")
PHASES = ("prefill", "generation")


@dataclass
class PhaseCounts:
    """Zeroed entries per hook (int64 [n_hooks]) and counted token positions of one phase."""

    zeroed: np.ndarray
    positions: int = 0

    def sparsity(self, widths: np.ndarray) -> tuple[np.ndarray, float]:
        """(per-hook sparsity float64 [n_hooks], model level): zeroed / (positions * width), the model level
        dimension-weighted (Σ zeroed / (positions * Σ width)); NaN where nothing was counted."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.zeroed / (self.positions * widths), float(self.zeroed.sum() / (self.positions * widths.sum()))


class SparsityCounter:
    """Per phase, zeroed entries per hook and counted positions (every hook sees the same positions)."""

    def __init__(self, points: Sequence[HookPoint]):
        self.points = tuple(points)
        self.widths = np.array([p.width for p in self.points], dtype=np.int64)
        self.phases = {ph: PhaseCounts(np.zeros(len(self.points), dtype=np.int64)) for ph in PHASES}

    def add(self, phase: str, counts: torch.Tensor, positions: int) -> None:
        """Add one forward's zeroed-entry counts int64 [n_hooks, batch] (summed over its counted positions)."""
        c = self.phases[phase]
        c.zeroed += counts.sum(dim=1).numpy().astype(np.int64)
        c.positions += int(positions)



def combined(phases: Iterable[PhaseCounts]) -> PhaseCounts:
    """Several phases' counts together (``total`` = prefill and generation)."""
    phases = list(phases)
    return PhaseCounts(sum(c.zeroed for c in phases), sum(c.positions for c in phases))


def count_mode(mode: str) -> str:
    """``mode`` if it is a count mode.

    Raises:
        ActsparseError: anything else.
    """
    if mode not in COUNT_MODES:
        raise ActsparseError(f"unknown count mode '{mode}' (choose {', '.join(COUNT_MODES)})")
    return mode


def loglikelihood_valid(inps: torch.Tensor, lengths: Sequence[int], mode: str, pad_token_id: int | None,
                        special_ids: torch.Tensor) -> torch.Tensor:
    """Counted positions bool [batch, seq] of a right-padded loglikelihood batch ``inps`` int64 [batch, seq].

    ``real``: position < the row's unpadded length and not a special token. ``authors``: ``inps !=
    pad_token_id`` (docs/paper-notes.md §1.4; lm-eval pads with id 0, so padding counts unless the pad id is 0);
    a tokenizer without a pad id counts every position.
    """
    if mode == "authors":
        return torch.ones_like(inps, dtype=torch.bool) if pad_token_id is None else inps != pad_token_id
    pos = torch.arange(inps.shape[1])[None, :]
    return (pos < torch.tensor(list(lengths))[:, None]) & ~torch.isin(inps, special_ids)


def generation_lengths(sequences: torch.Tensor, context_len: int, stop: Sequence[str], tokenizer,
                       eos_ids: Sequence[int], requirement: str) -> list[int]:
    """Tokens each row generated up to and including the one that stopped it.

    ``sequences`` int64 [batch, context_len + T] as ``generate`` returns them (left-padded context first). The
    stop rules are replayed step by step on the returned tokens: lm-eval's own stop-string criteria
    (``stop_sequences_criteria``: a row is done once a stop string appears in the decoded last
    ``len(encode(stop)) + 2`` generated tokens) and HF's EOS criterion (the new token is in ``eos_ids``). A row
    that never stops generated T tokens. These are the rules ``generate`` applied to the tokens it saw, so the
    result is each row's stopping step (lm-eval's ``MultiTokenEOSCriteria`` stops the batch only once every row
    is done, so rows that finished earlier keep generating).

    Raises:
        ActsparseError: lm-eval's criteria no longer expose their per-row state (naming ``requirement``).
    """
    from lm_eval.models.utils_hf import stop_sequences_criteria

    batch, total = sequences.shape
    steps = total - context_len
    criteria = stop_sequences_criteria(tokenizer, list(stop), context_len, batch)
    if not all(hasattr(c, "done_tracker") for c in criteria):
        raise ActsparseError(f"lm-eval's stop-sequence criteria changed (no done_tracker); actsparse supports "
                             f"{requirement}")
    eos = torch.tensor(sorted(set(eos_ids)), dtype=sequences.dtype)
    lengths = [steps] * batch
    done = [False] * batch
    for s in range(steps):
        ids = sequences[:, :context_len + s + 1]
        for c in criteria:
            c(ids, None)
        hit_eos = torch.isin(ids[:, -1], eos).tolist()
        for i in range(batch):
            if not done[i] and (hit_eos[i] or any(c.done_tracker[i] for c in criteria)):
                done[i], lengths[i] = True, s + 1
        if all(done):
            break
    return lengths
