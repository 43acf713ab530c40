"""The error of a linear target on a mixture-of-experts layer, for a whole grid of rule values in one pass.

For the linear targets (``intermediate``, ``gate``, ``up``) a routed row (token t, slot j) that drops the entries
``D`` of its h changes the block output by ``w_tj · W_d[e_tj] (h_tj * D)`` (docs/paper-notes.md §8), and the
block output error of token t is the norm of the sum of those changes over its k slots (and the shared expert,
scaled by its gate). As in ``analyze.linear_errors``, a row's kept sets over the grid are nested prefixes of one
rank order, so its grid values cut that order into P + 1 segments; one ``embedding_bag`` per expert (rows of
``W_d[e]^T`` weighted by h in rank order, one bag per segment) gives every segment's output vector, and prefix
sums over the segments give every grid value's dropped output. Here the segments of a token's rows are scaled
by their routing weights and added before the prefix sums, which needs the segments of every row in one grid
order: the grid is ordered from the value keeping most to the one keeping least (the rules are monotone in
their value), and every row's counts are checked to shrink along that order. The same pass gives each row's
own expert-output error (the prefix norms of its own segments).

Numerics as ``analyze.linear_errors.linear_target_errors``: h and W_d in float32, segment outputs and their
prefix sums float32 per feature chunk, squared norms summed in float64 across chunks; the tests hold the result
to the per-value recomputation (``analyze.moe.targets``) within 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from actsparse.analyze.linear_errors import feature_chunks, gathered_f32, segment_norms
from actsparse.core.errors import ActsparseError

# The rules whose kept set grows with their value (the others, max-p and threshold, shrink).
_GROWING = ("top-p", "top-k")


def grid_order(rule: str, values: Sequence[float]) -> torch.Tensor:
    """int64 [P]: the grid's indices from the value keeping the most entries to the one keeping the fewest
    (stable for equal values)."""
    key = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return torch.argsort(key, descending=rule in _GROWING, stable=True)


@dataclass(frozen=True)
class UnitRows:
    """The rows of one kind of expert in a block: routed rows (token, slot), the shared expert's or a dense
    layer's (one per token).

    h: [R, W] the down projection's input per row (any float dtype; bf16 as stored); ascending: int [R, W] entry
    indices from the lowest rank up (``curves.targets.rank_block``); counts: int [R, P] kept counts per grid
    value; token: int64 [R] the token of each row; expert: int64 [R] its expert (0 for a shared expert or dense
    layer); weight: [R] its scale in the block output (routing weight, shared gate, 1); down: [E, d_model, W].
    """

    h: torch.Tensor
    ascending: torch.Tensor
    counts: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    down: torch.Tensor


def _norms(dropped_sq: np.ndarray, kept_sq: np.ndarray, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """rel_err, cos and dropped_norm float64 [N, P] in the caller's grid order from squared prefix norms in
    ``perm`` order (``dropped_sq`` [N, P + 1] with ||y||² last, ``kept_sq`` [N, P]); as the tail of
    ``linear_target_errors``: rel_err 0 when y and the dropped part are 0, inf when only y is; cos by
    polarization, 1 when y and y' are 0, 0 when one is."""
    n_p = kept_sq.shape[1]
    d_sorted, k_sorted = torch.from_numpy(dropped_sq), torch.from_numpy(kept_sq)
    y_sq = d_sorted[:, n_p]
    dropped, kept = torch.empty_like(k_sorted), torch.empty_like(k_sorted)
    dropped[:, perm], kept[:, perm] = d_sorted[:, :n_p], k_sorted
    y_dot_kept = 0.5 * (y_sq[:, None] + kept - dropped)
    dropped_norm, kept_norm = dropped.sqrt(), kept.sqrt()
    y_norm = y_sq.sqrt()[:, None].expand_as(dropped)
    y_zero = y_norm == 0
    rel_err = torch.where(y_zero, torch.where(dropped_norm == 0, 0.0, math.inf),
                          dropped_norm / torch.where(y_zero, 1.0, y_norm))
    denom = y_norm * kept_norm
    cos = torch.where(denom > 0, y_dot_kept / torch.where(denom > 0, denom, 1.0), 0.0).clamp_(-1.0, 1.0)
    cos = torch.where(y_zero & (kept_norm == 0), 1.0, cos)
    return {"rel_err": rel_err, "cos": cos, "dropped_norm": dropped_norm}


def grouped_target_errors(units: Sequence[UnitRows], n_tokens: int, perm: torch.Tensor
                          ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Block-output error of every token and each row's own output error, for every grid value at once.

    Args:
        units: the block's :class:`UnitRows` (routed rows, and the shared expert's), all with the same P.
        n_tokens: T, the tokens of the block (every row's ``token`` lies in ``[0, T)``).
        perm: :func:`grid_order` of the rule and grid.

    Returns:
        ``(block, own)``: ``block`` maps ``rel_err``, ``cos``, ``dropped_norm`` to float64 [T, P] (the block
        output y_t = Σ_rows weight · W_d[e] h against y_t minus the dropped parts); ``own[u]`` is float64
        [R_u, P], each row's ``||W_d[e] (h * D)|| / ||W_d[e] h||`` (0 where both are 0).

    Raises:
        ActsparseError: a row whose kept counts do not shrink along ``perm`` (the rule is not monotone in its
            value there), or shapes that do not fit.
    """
    d_model = units[0].down.shape[1]
    width = max(u.h.shape[1] for u in units)
    n_p = int(perm.numel())
    prepared = [_prepare(u, perm) for u in units]
    dropped = np.zeros((n_tokens, n_p + 1))
    kept = np.zeros((n_tokens, n_p))
    no_y = np.zeros((0, 1), np.float32)
    for j0, j1 in feature_chunks(width, d_model):
        acc = torch.zeros(n_tokens, n_p + 1, j1 - j0)
        for u, p in zip(units, prepared):
            for e, a, b in p.spans:
                wt = u.down[e, j0:j1].float().t().contiguous()  # [W, C]: rows of W_d[e]^T
                seg = F.embedding_bag(p.cols[a:b].reshape(-1), wt, p.offsets(a, b), mode="sum",
                                      per_sample_weights=p.values[a:b].reshape(-1)).view(b - a, n_p + 1, j1 - j0)
                segment_norms(seg.numpy(), no_y, p.dropped[a:b], p.kept[a:b])
                acc.index_add_(0, p.token[a:b], seg * p.weight[a:b, None, None])
        segment_norms(acc.numpy(), no_y, dropped, kept)
    own = []
    for p in prepared:
        rows = _norms(p.dropped, p.kept, perm)["rel_err"]
        rows = torch.where(torch.isinf(rows), 0.0, rows)  # an expert whose own output is 0 loses nothing
        out = torch.empty_like(rows)
        out[p.order] = rows
        own.append(out)
    return _norms(dropped, kept, perm), own


@dataclass
class _Prepared:
    """One unit's rows sorted by expert: gather columns and values in rank order, segment starts, the
    scale and token of each row, accumulators of its own prefix norms, and ``spans`` (expert, start, stop)."""

    order: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    starts: torch.Tensor
    token: torch.Tensor
    weight: torch.Tensor
    spans: list[tuple[int, int, int]]
    dropped: np.ndarray
    kept: np.ndarray
    width: int

    def offsets(self, a: int, b: int) -> torch.Tensor:
        """int32 bag offsets of rows [a, b) in their flattened gather columns."""
        return (self.starts[a:b] + torch.arange(b - a)[:, None] * self.width).reshape(-1).to(torch.int32)


def _prepare(u: UnitRows, perm: torch.Tensor) -> _Prepared:
    n_rows, width = u.ascending.shape
    if u.h.shape != (n_rows, width) or u.counts.shape != (n_rows, perm.numel()):
        raise ActsparseError(f"rows of shape {tuple(u.h.shape)} with order {tuple(u.ascending.shape)} and counts "
                             f"{tuple(u.counts.shape)} do not fit {perm.numel()} grid values")
    counts = u.counts.long()[:, perm]
    if bool((counts[:, 1:] > counts[:, :-1]).any()):
        raise ActsparseError("kept counts do not shrink along the grid: the rule is not monotone in its value")
    order = torch.argsort(u.expert, stable=True)
    experts = u.expert[order]
    bounds = torch.searchsorted(experts, torch.arange(int(u.down.shape[0]) + 1))
    spans = [(e, int(bounds[e]), int(bounds[e + 1])) for e in range(u.down.shape[0]) if bounds[e + 1] > bounds[e]]
    cols = u.ascending[order].to(torch.int32).contiguous()
    values = gathered_f32(u.h[order].contiguous(), cols)
    starts = torch.cat([torch.zeros(n_rows, 1, dtype=torch.int64), width - counts[order]], dim=1)
    n_p = perm.numel()
    return _Prepared(order, cols, values, starts, u.token[order], u.weight[order].float(), spans,
                     np.zeros((n_rows, n_p + 1)), np.zeros((n_rows, n_p)), width)
