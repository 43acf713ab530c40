"""Sparsity of mixture-of-experts layers counted as the authors count it.

In the authors' harness (``sparsification_manager_moe.py``; docs/paper-notes.md §1.4, §2) every expert is a hook
that sees only the rows routed to it, as a 2-D ``[n_rows, width]`` tensor. Per hook, sparsity is
``Σ zeroed / Σ width`` over its rows; per layer and for the model (their ``"average"``), ``Σ_hooks Σ zeroed /
Σ_hooks Σ width``. So every routed (token, slot) row counts once with its width: a token contributes k rows to a
MoE layer, busier experts weigh more, routing weights play no part, the shared expert is one more hook that sees
every token (width d_shared), a dense layer of a mixed model is a hook that sees every token (width d_ff), and
for ``all-inputs`` the input hooks weigh d_model per row and the intermediate hooks d_moe per row.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch

from actsparse.core.errors import ActsparseError

UNITS = ("expert", "shared", "dense")  # a routed expert, the shared expert, a dense layer's FFN


@dataclass(frozen=True)
class HookTally:
    """What one hook saw: ``rows`` counted rows of ``width`` entries, ``zeroed`` of those entries dropped.

    ``unit`` is one of :data:`UNITS`; ``expert`` the routed expert's id (-1 for ``shared`` and ``dense``);
    ``site`` the hook site (``input``, ``gate`` = the activation output, ``up``, ``intermediate``).
    """

    layer: int
    unit: str
    expert: int
    site: str
    width: int
    rows: int
    zeroed: int

    @property
    def entries(self) -> int:
        return self.rows * self.width

    @property
    def sparsity(self) -> float:
        """``zeroed / (rows · width)``; NaN for a hook that saw no rows."""
        return self.zeroed / self.entries if self.entries else float("nan")


def _valid_rows(valid: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """valid bool [T] (None: all) broadcast to ``shape`` ([T] or [T, k]) as int64."""
    if valid is None:
        return torch.ones(shape, dtype=torch.int64)
    if valid.shape != shape[:1]:
        raise ActsparseError(f"valid mask {tuple(valid.shape)} does not match {shape[0]} tokens")
    return valid.to(torch.int64).reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


def expert_tallies(layer: int, site: str, zeroed: torch.Tensor, expert_ids: torch.Tensor, n_experts: int,
                   width: int, valid: torch.Tensor | None = None) -> list[HookTally]:
    """One :class:`HookTally` per expert ``0..n_experts-1`` from the entries zeroed per routed row, int [T, k],
    and the rows' expert ids, int [T, k], over the valid tokens (bool [T]; None: all)."""
    v = _valid_rows(valid, expert_ids.shape).reshape(-1)
    ids = expert_ids.reshape(-1).long()
    rows = torch.zeros(n_experts, dtype=torch.int64).index_add_(0, ids, v)
    dropped = torch.zeros(n_experts, dtype=torch.int64).index_add_(0, ids, zeroed.reshape(-1).long() * v)
    return [HookTally(layer, "expert", e, site, width, int(rows[e]), int(dropped[e])) for e in range(n_experts)]


def token_tally(layer: int, unit: str, site: str, zeroed: torch.Tensor, width: int,
                valid: torch.Tensor | None = None) -> HookTally:
    """The :class:`HookTally` of a hook that sees every token (``shared`` expert or ``dense`` FFN) from the
    entries zeroed per token, int [T], over the valid tokens (bool [T]; None: all)."""
    v = _valid_rows(valid, zeroed.shape)
    return HookTally(layer, unit, -1, site, width, int(v.sum()), int((zeroed.long() * v).sum()))


def merge_tallies(tallies: Iterable[HookTally]) -> list[HookTally]:
    """Sum the rows and zeroed entries of the same hook (layer, unit, expert, site), e.g. over blocks of tokens.

    Raises:
        ActsparseError: one hook reported with two widths.
    """
    merged: dict[tuple, HookTally] = {}
    for t in tallies:
        key = (t.layer, t.unit, t.expert, t.site)
        old = merged.get(key)
        if old is not None and old.width != t.width:
            raise ActsparseError(f"hook {key} has widths {old.width} and {t.width}")
        merged[key] = t if old is None else HookTally(*key, t.width, old.rows + t.rows, old.zeroed + t.zeroed)
    return list(merged.values())


def authors_sparsity(tallies: Iterable[HookTally]) -> float:
    """``Σ_hooks Σ zeroed / Σ_hooks Σ width`` (the authors' per-layer and model-level ``"average"``); NaN if empty."""
    zeroed = entries = 0
    for t in tallies:
        zeroed, entries = zeroed + t.zeroed, entries + t.entries
    return zeroed / entries if entries else float("nan")


def sparsity_by(tallies: Iterable[HookTally], key: Callable[[HookTally], Hashable]) -> dict:
    """:func:`authors_sparsity` per group, e.g. ``key=lambda t: t.layer`` (per layer) or
    ``lambda t: (t.layer, t.unit, t.expert)`` (per expert; both hook sites of all-inputs together)."""
    groups: dict = {}
    for t in tallies:
        groups.setdefault(key(t), []).append(t)
    return {k: authors_sparsity(v) for k, v in groups.items()}
