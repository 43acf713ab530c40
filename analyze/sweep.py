"""Whole-grid sweeps: one sort (or histogram) per token serves every rule value of a grid.

For every rule in ``analyze.rules`` the kept set of a token is a prefix of its entries
sorted by descending magnitude, closed under ties (an entry is kept iff its magnitude is
``>=`` a threshold). So one ``sort_block`` per chunk of stored activations gives, for a
whole grid of values (e.g. the paper's 26 top-p points, docs/paper-notes.md §3.3):

* the kept counts (``kept_counts``; sparsity = 1 - count / width), via
  ``torch.searchsorted`` into the sorted row, bit-identical to the mask functions;
* the kept L1 fraction (``kept_l1``);
* the rank order the output error of a linear target needs (``actsparse.analyze.linear_errors``:
  every grid value's error for the multiply-adds of one dense matmul).

For plain top-p on 16-bit data, ``topp_histogram`` gives the same counts without a sort
(``analyze.bitstats``), and with them the rank order at the grain the errors need (a counting
partition by the thresholds found); ``sort_order`` gives a full rank order (radix argsort for
16-bit data).

All functions are pure and vectorised over tokens; the only Python loops run over grid
values or fixed-size blocks of tokens / output features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actsparse.analyze.rules import check_block, check_rule_value, magnitude, threshold_in_dtype, topk_k
from actsparse.core.errors import ActsparseError


@dataclass(frozen=True, eq=False)
class SortedBlock:
    """One block's magnitudes sorted per token, shared by every grid value.

    values: [T, W] ``|a|**power`` sorted descending, in a's dtype (the authors' sorted
        activations, so thresholds read from it are a's-dtype thresholds).
    order: [T, W] int64, ``values[t, j] = magnitude(a)[t, order[t, j]]``; None when sorted
        with ``with_order=False`` (enough for counts and kept L1, not for errors).
    cum: [T, W] float64 cumulative sum of ``values`` (authors' top-p cumsum).
    total: [T] float64, ``cum[:, -1]``.
    power: the top-p power q used for ``values`` (1.0: plain |a|).
    l1_cum: [T, W] float64 cumulative sum of ``|a|`` in ``order`` when power != 1 (the
        L1 mass ``kept_l1`` reports), else None because ``cum`` already is that.
    """

    values: torch.Tensor
    order: torch.Tensor | None
    cum: torch.Tensor
    total: torch.Tensor
    power: float = 1.0
    l1_cum: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """W, the number of features per token."""
        return self.values.shape[1]


def _radix_key(arr: torch.Tensor) -> np.ndarray | None:
    """uint16 keys ordered like the non-negative values of ``arr``, or None when they do not exist.

    16-bit floats sort as their bit patterns (non-negative floats, and NaN above inf, order like
    their bits); float32 widened from bfloat16 (zero low halves, as stored blocks decode) sorts as its
    high halves. numpy radix-sorts 16-bit keys: ~4 ns per entry against ~20 for float32 argsort.
    """
    if arr.dtype in (torch.bfloat16, torch.float16):
        return arr.view(torch.int16).numpy().view(np.uint16)
    if arr.dtype == torch.float32 and arr.numel():
        bits = arr.numpy().view(np.uint32)
        if not (bits & np.uint32(0xFFFF)).any():
            return (bits >> 16).astype(np.uint16)
    return None


def _sorted_desc(s: torch.Tensor, with_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of non-negative ``s`` [T, W] sorted descending (values in s's dtype) and, if asked, the
    int64 permutation.

    numpy's sorts are 3-8x faster than torch.sort on CPU: radix sorts of 16-bit keys
    (``_radix_key``), numpy's vectorised quicksort/argsort otherwise. Ties may come out in any
    order: every rule keeps all entries >= a threshold, so nothing depends on the order among
    equal values.
    """
    arr = s.detach().cpu().contiguous()
    key = _radix_key(arr)
    if with_order:
        order = sort_order(arr, key)
        return arr.gather(1, order), order
    if key is None:
        return torch.from_numpy(np.sort(arr.numpy(), axis=1)[:, ::-1].copy()), None  # copy(): positive strides
    srt = np.sort(key, axis=1)[:, ::-1]
    if arr.dtype == torch.float32:
        return torch.from_numpy((srt.astype(np.uint32) << 16).view(np.float32)), None
    return torch.from_numpy(srt.copy().view(np.int16)).view(arr.dtype), None


def sort_order(a: torch.Tensor, key: np.ndarray | None = None, *, descending: bool = True) -> torch.Tensor:
    """int64 [T, W]: per token, the indices of ``a`` [T, W] by descending (or ascending) value; ties
    in any order.

    ``a`` holds magnitudes (non-negative); ``key`` is its ``_radix_key`` when already computed.
    """
    arr = a.detach().cpu().contiguous()
    key = _radix_key(arr) if key is None else key
    order = np.argsort(arr.numpy(), axis=1) if key is None else np.argsort(key, axis=1, kind="stable")
    return torch.from_numpy(order[:, ::-1].copy() if descending else order)


def sort_block(a: torch.Tensor, power: float = 1.0, *, with_order: bool = True) -> SortedBlock:
    """Sort one block [tokens, width] by descending ``|a|**power`` per token.

    a: [T, W], any float dtype. Returns a SortedBlock (fields documented there); with
    ``with_order=False`` its ``order`` is None (counts and kept L1 need only the sorted values;
    errors need the order). The sorted values, the float64 cumsum and the power equal those of the
    authors' sparsification_manager.get_topp_mask, so counts derived from it match
    ``analyze.rules`` bit for bit. Rows containing NaN raise ActsparseError (the authors' code
    keeps nothing there and the prefix structure breaks); ``inf`` is handled exactly. Memory:
    about 26 bytes per entry (values, int64 order, float64 cum; +8 more when power != 1).
    """
    check_block(a, ndim=2)
    check_rule_value("top-p", 0.0, power)
    s = magnitude(a, power)
    values, order = _sorted_desc(s, with_order or power != 1.0)
    cum = values.cumsum(dim=-1, dtype=torch.float64)
    total = cum[:, -1]
    # Magnitudes are >= 0, so the total is NaN exactly when the row holds a NaN.
    bad = torch.isnan(total)
    if bad.any():
        raise ActsparseError(f"{int(bad.sum())} of {a.shape[0]} tokens contain NaN activations")
    l1_cum = None if power == 1.0 else a.abs().gather(1, order).cumsum(dim=-1, dtype=torch.float64)
    return SortedBlock(values=values, order=order if with_order else None, cum=cum, total=total,
                       power=float(power), l1_cum=l1_cum)


def _count_at_least(sb: SortedBlock, thr: torch.Tensor) -> torch.Tensor:
    """Per token and grid value, the number of entries with ``values >= thr``.

    thr: [T, P] in the values' dtype; returns int64 [T, P]. Equivalent to
    ``(magnitude >= thr).sum(-1)`` of the mask functions; a NaN threshold keeps nothing.
    """
    # searchsorted needs ascending rows; negation is exact, so -v <= -thr iff v >= thr.
    counts = torch.searchsorted(sb.values.neg(), thr.neg().contiguous(), right=True)
    return counts.masked_fill_(torch.isnan(thr), 0)


def _grid(values, rule: str, power: float = 1.0) -> list[float]:
    """The grid as a list of Python floats, each validated for ``rule``."""
    grid = [float(v) for v in torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist()]
    for v in grid:
        check_rule_value(rule, v, power)
    return grid


def topp_kept_counts(sb: SortedBlock, p_values) -> torch.Tensor:
    """Kept entries per token for every top-p value: int64 [T, P].

    sb: SortedBlock of a [T, W]; p_values: P values in [0, 1]. Equals
    ``rules.topp_mask(a, p, sb.power).sum(-1)`` for each p (tested): the same float64
    target ``total * p``, idx = first index with cum >= target found by searchsorted
    (valid because a float64 cumsum of non-negative terms is non-decreasing), 0 when
    none qualifies (NaN or out-of-range target, as the authors' fallback), threshold
    ``values[idx]`` in a's dtype, and all ties at the threshold counted.
    """
    grid = _grid(p_values, "top-p", sb.power)
    width = sb.width
    target = sb.total[:, None] * torch.tensor(grid, dtype=torch.float64)
    idx = torch.searchsorted(sb.cum, target)
    idx.masked_fill_((idx >= width) | torch.isnan(target), 0)
    return _count_at_least(sb, sb.values.gather(1, idx))


def topp_histogram(a: torch.Tensor, p_values, *, with_order: bool = False) -> tuple | None:
    """Top-p (power 1) kept counts and kept L1 fractions without a sort, when ``a`` is 16-bit.

    a: [T, W] bfloat16 or float16, or float32 holding bfloat16 values (as stored blocks decode).
    Returns ``(counts int64 [T, P], kept_l1 float64 [T, P])``: the counts of ``topp_kept_counts``
    of ``sort_block(a)`` and its ``kept_l1`` up to float64 rounding (the mass is summed by groups
    of equal-exponent values; see ``analyze.bitstats``), ~5x faster; or None for other data,
    which needs the sort. With ``with_order``, a third item: int32 [T, W] entry indices from the
    smallest |a| up, in any order within the segments the counts cut: what
    ``linear_target_errors`` needs, from a counting partition instead of a sort.

    Raises:
        ActsparseError: a grid value outside [0, 1], or a token holding NaN.
    """
    from actsparse.analyze.bitstats import topp_sweep

    check_block(a, ndim=2)
    grid = _grid(p_values, "top-p")
    arr = a.detach().cpu().contiguous()
    if arr.dtype in (torch.bfloat16, torch.float16):
        bits, dtype = arr.view(torch.int16).numpy(), str(arr.dtype).removeprefix("torch.")
    elif (key := _radix_key(arr)) is not None:
        bits, dtype = key, "bfloat16"
    else:
        return None
    return tuple(torch.from_numpy(x) for x in topp_sweep(bits, dtype, grid, with_order=with_order))


def kept_counts(rule: str, sb: SortedBlock, values) -> torch.Tensor:
    """Kept entries per token for every value of ``rule``'s grid: int64 [T, P].

    Equals ``rules.rule_mask(rule, a, v).sum(-1)`` for each v (tested), with the same
    thresholds in a's dtype:
      * "top-p": see ``topp_kept_counts``;
      * "top-k": thr = the k-th largest, k = rules.topk_k(W, fraction) (authors' int());
      * "max-p": thr = max|a| * p, the same torch scalar multiply as rules.maxp_mask;
      * "threshold": thr = tau rounded to a's dtype (rules.threshold_in_dtype).
    Rules other than top-p need a block sorted with power 1.
    """
    if rule == "top-p":
        return topp_kept_counts(sb, values)
    grid = _grid(values, rule)
    if sb.power != 1.0:
        raise ActsparseError(f"{rule} needs a block sorted with power 1, got power {sb.power}")
    n_tok = sb.values.shape[0]
    if rule == "top-k":
        idx = torch.tensor([topk_k(sb.width, f) - 1 for f in grid], dtype=torch.int64)
        thr = sb.values[:, idx]
    elif rule == "max-p":
        # One scalar multiply per value: a Python-scalar product rounds exactly like
        # maxp_mask's, which a float64 grid tensor would not.
        top = sb.values[:, 0]
        thr = torch.stack([top * p for p in grid], dim=1) if grid else sb.values[:, :0]
    else:
        taus = [threshold_in_dtype(tau, sb.values.dtype) for tau in grid]
        thr = (torch.stack(taus) if taus else sb.values.new_empty(0)).expand(n_tok, len(grid))
    return _count_at_least(sb, thr)


def check_counts(counts: torch.Tensor, n_tok: int, width: int) -> None:
    """Raise ActsparseError unless counts is an integer [n_tok, P] tensor within [0, width]."""
    if counts.dtype not in (torch.int64, torch.int32) or counts.ndim != 2 or counts.shape[0] != n_tok:
        raise ActsparseError(f"counts must be integer [tokens={n_tok}, P], got {counts.dtype} {tuple(counts.shape)}")
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > width):
        raise ActsparseError(f"counts must lie in [0, {width}]")


def kept_l1(sb: SortedBlock, counts: torch.Tensor) -> torch.Tensor:
    """Fraction of each token's L1 mass ``sum |a|`` held by its kept entries: float64 [T, P].

    counts: [T, P] kept counts from ``kept_counts`` (a tie-closed prefix of the sorted
    order, so the kept sum is well defined whatever the order among ties). Always the
    power-1 mass of |a|, also for a block sorted with power q != 1 (its ranking, |a|'s
    mass); the weight-free error bound of docs/paper-notes.md §8 is dropped mass <= (1 - p) ||h||_1.
    An all-zero token has kept fraction 1 (nothing can be lost); a token with an
    infinite entry gives NaN.
    """
    check_counts(counts, sb.values.shape[0], sb.width)
    cum = sb.cum if sb.l1_cum is None else sb.l1_cum
    total = cum[:, -1:]
    kept = cum.gather(1, (counts.long() - 1).clamp_(min=0))
    kept = torch.where(counts > 0, kept, torch.zeros_like(kept))
    return torch.where(total > 0, kept / total, torch.ones_like(kept))
