"""Whole-grid sweeps: one sort (or histogram) per token serves every rule value of a grid.

For every rule in ``analyze.rules`` the kept set of a token is a prefix of its entries
sorted by descending magnitude, closed under ties (an entry is kept iff its magnitude is
``>=`` a threshold). So one ``sort_block`` per chunk of stored activations gives, for a
whole grid of values (e.g. the paper's 26 top-p points, paper.md §3.3):

* the kept counts (``kept_counts``; sparsity = 1 - count / width), via
  ``torch.searchsorted`` into the sorted row, bit-identical to the mask functions;
* the kept L1 fraction (``kept_l1``);
* the output error of a linear target (``linear_target_errors``, paper.md §8 proxies:
  ``||dy|| / ||y||`` and ``cos(y, y')`` with ``dy = W_down ((1 - m) * h)``) for all grid
  values with the multiply-adds of one dense matmul ``h @ W_down^T`` (run as a sparse
  gather-accumulate plus one compiled pass over per-segment outputs: ~3-4x the dense
  matmul's time on CPU, against ~26x for one matmul per grid value).

For plain top-p on 16-bit data, ``topp_histogram`` gives the same counts without a sort
(``analyze.bitstats``), and with them the rank order at the grain the errors need (a counting
partition by the thresholds found); ``sort_order`` gives a full rank order (radix argsort for
16-bit data).

All functions are pure and vectorised over tokens; the only Python loops run over grid
values or fixed-size blocks of tokens / output features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F

from actsparse.errors import ActsparseError
from analyze.rules import check_block, check_rule_value, magnitude, threshold_in_dtype, topk_k

# linear_target_errors works on blocks of W_down^T columns sized to stay in a core's
# L2 cache (the gather-accumulate is bound by where those rows come from: ~3x faster
# from L2 than from L3 on the 1 MiB-L2 machines this was measured on), and on blocks of
# tokens whose segment outputs (~2 MiB) stay in L2/L3 for the pass that follows. Measured
# on SmolLM2-135M (d_ff 1536): 64-wide chunks and ~300-token blocks are fastest, 20% ahead
# of 80-wide chunks and ~500-token blocks.
_W_CHUNK_BYTES = 384 * 1024
_Y_BLOCK_BYTES = 2 * 1024 * 1024
# FBGEMM's embedding-bag kernels are markedly faster for row widths that are multiples
# of 16 float32 lanes (AVX-512).
_LANES = 16
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
    from analyze.bitstats import topp_sweep

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


def _check_counts(counts: torch.Tensor, n_tok: int, width: int) -> None:
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
    mass); the weight-free error bound of paper.md §8 is dropped mass <= (1 - p) ||h||_1.
    An all-zero token has kept fraction 1 (nothing can be lost); a token with an
    infinite entry gives NaN.
    """
    _check_counts(counts, sb.values.shape[0], sb.width)
    cum = sb.cum if sb.l1_cum is None else sb.l1_cum
    total = cum[:, -1:]
    kept = cum.gather(1, (counts.long() - 1).clamp_(min=0))
    kept = torch.where(counts > 0, kept, torch.zeros_like(kept))
    return torch.where(total > 0, kept / total, torch.ones_like(kept))


def _feature_chunks(width: int, d_model: int) -> list[tuple[int, int]]:
    """Split the d_model output features into near-equal chunks with bounds on ``_LANES``
    multiples, whose W_down^T slice (width x chunk float32) fits ``_W_CHUNK_BYTES``."""
    max_c = max(_LANES, (_W_CHUNK_BYTES // (4 * width)) // _LANES * _LANES)
    n = math.ceil(d_model / max_c)
    bounds = sorted({min(d_model, round(d_model * i / n / _LANES) * _LANES) for i in range(n)} | {d_model})
    return list(zip(bounds[:-1], bounds[1:]))


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _segment_norms(seg, y, dropped_sq, kept_sq):  # pragma: no cover - compiled
    """Accumulate squared norms of segment prefix sums for one feature chunk.

    seg: float32 [T, P + 1, C] segment outputs in ascending rank order; y: float32 [T, C] reference
    output, or [0, C] to use the sum of all segments. Adds ||prefix_i||^2 to ``dropped_sq[:, i]``
    (i <= P; i = P is ||y||^2) and ||prefix_i - y||^2 to ``kept_sq[:, i]`` (i < P), float64.
    Prefixes and the squared norm of one chunk (C <= ~100 terms) are float32, as the segments;
    the chunks' squares are summed in float64 by the caller's accumulation.
    """
    n_tok, n_seg, width = seg.shape
    has_y = y.shape[0] > 0
    acc = np.empty(width, np.float32)
    ref = np.empty(width, np.float32)
    for t in range(n_tok):
        acc[:] = 0.0
        for i in range(n_seg):
            sq = np.float32(0.0)
            for j in range(width):
                acc[j] += seg[t, i, j]
                sq += acc[j] * acc[j]
            if i < n_seg - 1:
                dropped_sq[t, i] += sq
        # acc now holds W_down @ h on this chunk
        ref[:] = y[t] if has_y else acc
        sq = np.float32(0.0)
        for j in range(width):
            sq += ref[j] * ref[j]
        dropped_sq[t, n_seg - 1] += sq
        acc[:] = 0.0
        for i in range(n_seg - 1):
            sq = np.float32(0.0)
            for j in range(width):
                acc[j] += seg[t, i, j]
                # D - y = -(y - D) per feature: ~eps * |y| error, where ||y||^2 - 2 y.D + ||D||^2 from
                # scalars would lose ~eps * ||y||^2 and swamp a small kept part (p near 0)
                d = acc[j] - ref[j]
                sq += d * d
            kept_sq[t, i] += sq


@numba.njit(nogil=True, cache=True)
def _take_rows(h, idx, out, shift):  # pragma: no cover - compiled
    """``out[t, r] = h[t, idx[t, r]] << shift`` on bit patterns, for int32 idx [T, W] (torch.gather
    wants int64): float32 into float32 (uint32, shift 0) or bfloat16 into float32 (uint16, shift 16)."""
    for t in range(h.shape[0]):
        for r in range(h.shape[1]):
            out[t, r] = h[t, idx[t, r]] << shift


def _gathered_f32(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """float32 [T, W] ``h[t, idx[t, r]]`` for int32 ``idx``; bfloat16 h is widened in the same pass."""
    out = torch.empty(idx.shape, dtype=torch.float32)
    if h.dtype == torch.bfloat16:
        bits, shift = h.contiguous().view(torch.int16).numpy().view(np.uint16), 16
    else:
        bits, shift = h.float().contiguous().numpy().view(np.uint32), 0
    _take_rows(bits, idx.numpy(), out.numpy().view(np.uint32), shift)
    return out


def linear_target_errors(
    h: torch.Tensor,
    ascending: torch.Tensor,
    counts: torch.Tensor,
    w_down: torch.Tensor,
    y: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Output error of dropping entries of h before a linear map, for every grid value.

    h: [T, W] values that feed the down projection (any float dtype); ascending: int64 or int32
    [T, W] entry indices from the lowest rank up (``SortedBlock.order`` flipped, or the order of
    ``topp_histogram``; within one segment of the counts any order) — ranks of h itself
    (intermediate target) or of another tensor (gate target: ranks by |g|, drops h = u*g at
    those positions; paper.md §8); counts: [T, P] kept counts (the top of that order);
    w_down: [d_model, W]; y: optional [T, d_model] dense output, default ``W_down @ h``
    computed in this same pass.

    With D_p = W_down @ (h * dropped_mask_p) (paper.md §8 ``dy``) and y' = y - D_p,
    returns float64 [T, P] tensors:
      * ``dropped_norm`` = ||D_p||, ``y_norm`` = ||y|| (repeated over P);
      * ``rel_err`` = ||D_p|| / ||y||; 0 when y = 0 and D_p = 0, inf when only y = 0;
      * ``cos`` = cos(y, y'); 1 when both are 0, 0 when exactly one is 0.

    Scheme (no matmul per grid value): per token, the P kept counts cut the sorted order
    into P + 1 disjoint rank segments. ``embedding_bag`` (FBGEMM's sparse
    gather-accumulate: rows of W_down^T weighted by h, one bag per segment) turns every
    segment into its output vector: T * W multiply-adds of width d_model in total, the
    work of one dense matmul. Segments run from the lowest ranks up, so prefix sums over
    them give every D_p, and the last prefix is y (one fused compiled pass per token and
    feature chunk, ``_segment_norms``). The work is tiled over feature chunks of W_down^T
    that stay in L2 and token blocks whose segment outputs stay in L3.

    A y given by the caller is the reference as is: y' = y - D_p, so any difference
    between y and W_down @ h (e.g. a bf16 module output) shows up in y' and in cos.

    Numerics: h and W_down are cast to float32 (exact from bf16); segment outputs, their
    prefix sums and y - D_p are float32 vectors (error ~eps32 * |y| per feature); squared
    norms are float32 within a feature chunk of <= ~100 terms and float64 across chunks; y.y'
    comes from the norms by polarization. Agreement with a float64 brute force: ~1e-6
    of ||y|| for ||D_p|| and ||y||, ~1e-6 * ||y|| / ||y'|| for cos; tests check 1e-4.
    """
    check_block(h, ndim=2)
    n_tok, width = ascending.shape
    if h.shape != (n_tok, width):
        raise ActsparseError(f"h must have the sorted block's shape {(n_tok, width)}, got {tuple(h.shape)}")
    _check_counts(counts, n_tok, width)
    if ascending.dtype not in (torch.int64, torch.int32):
        raise ActsparseError(f"ascending must be int64 or int32, got {ascending.dtype}")
    if ascending.numel() and (int(ascending.min()) < 0 or int(ascending.max()) >= width):
        raise ActsparseError(f"ascending must hold entry indices in [0, {width})")  # the compiled gather trusts them
    if w_down.ndim != 2 or w_down.shape[1] != width:
        raise ActsparseError(f"w_down must be [d_model, {width}], got {tuple(w_down.shape)}")
    d_model = w_down.shape[0]
    if y is not None and y.shape != (n_tok, d_model):
        raise ActsparseError(f"y must be [{n_tok}, {d_model}], got {tuple(y.shape)}")
    n_p = counts.shape[1]

    dropped_len, perm = (width - counts.long()).sort(dim=1)
    # Segment starts per token in ascending rank order, where the dropped set of count
    # c is the first W - c entries: [0, sorted dropped lengths] -> P + 1 segments.
    starts = torch.cat([torch.zeros(n_tok, 1, dtype=torch.int64), dropped_len], dim=1)
    wt = w_down.detach().float().t()
    chunks = [(j0, j1, wt[:, j0:j1].contiguous()) for j0, j1 in _feature_chunks(width, d_model)]
    max_c = max((j1 - j0 for j0, j1, _ in chunks), default=1)
    block = max(1, _Y_BLOCK_BYTES // (4 * (n_p + 1) * max_c))

    # Per token, sorted-grid order: ||D_i||^2, ||y - D_i||^2 and ||y||^2 (last column).
    dropped_sq = np.zeros((n_tok, n_p + 1))
    kept_sq = np.zeros((n_tok, n_p))
    no_y = np.zeros((0, 1), np.float32)
    for t0 in range(0, n_tok, block):
        t1 = min(n_tok, t0 + block)
        nb = t1 - t0
        # int32 indices: FBGEMM's embedding-bag is ~6% faster with them than with int64
        cols = ascending[t0:t1].to(torch.int32).contiguous()
        weights, cols = _gathered_f32(h[t0:t1], cols).reshape(-1), cols.reshape(-1)
        offsets = (starts[t0:t1] + torch.arange(nb)[:, None] * width).reshape(-1).to(torch.int32)
        for j0, j1, wc in chunks:
            seg = F.embedding_bag(cols, wc, offsets, mode="sum", per_sample_weights=weights)
            yc = no_y if y is None else np.ascontiguousarray(y[t0:t1, j0:j1].float().numpy())
            _segment_norms(seg.view(nb, n_p + 1, j1 - j0).numpy(), yc, dropped_sq[t0:t1], kept_sq[t0:t1])
    dropped_sq, kept_sq = torch.from_numpy(dropped_sq), torch.from_numpy(kept_sq)

    y_sq = dropped_sq[:, n_p]
    # Back from the per-token sorted order of the counts to the caller's grid order.
    dropped_sq = torch.empty_like(dropped_sq[:, :n_p]).scatter_(1, perm, dropped_sq[:, :n_p])
    kept_sq = torch.empty_like(kept_sq).scatter_(1, perm, kept_sq)
    # y.(y - D) by polarization (y = (y - D) + D): its error is ~eps * (||y||^2 + ...), so
    # cos(y, y') stays accurate to ~eps * ||y|| / ||y'|| like the kept output itself.
    y_dot_kept = 0.5 * (y_sq[:, None] + kept_sq - dropped_sq)

    dropped_norm = dropped_sq.sqrt()
    kept_norm = kept_sq.sqrt()
    y_norm = y_sq.sqrt()[:, None].expand(n_tok, n_p)
    y_zero = y_norm == 0
    rel_err = torch.where(
        y_zero,
        torch.where(dropped_norm == 0, 0.0, math.inf),
        dropped_norm / torch.where(y_zero, 1.0, y_norm),
    )
    denom = y_norm * kept_norm
    cos = torch.where(denom > 0, y_dot_kept / torch.where(denom > 0, denom, 1.0), 0.0).clamp_(-1.0, 1.0)
    cos = torch.where(y_zero & (kept_norm == 0), 1.0, cos)
    return {"rel_err": rel_err, "cos": cos, "dropped_norm": dropped_norm, "y_norm": y_norm.contiguous()}
