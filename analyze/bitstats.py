"""Per-token statistics of 16-bit float blocks from histograms of their bit patterns (no sort).

A bfloat16 or float16 magnitude has at most 32,768 bit patterns, ordered like the values. One pass
over a token counts its entries per pattern and, per group of 16 neighbouring patterns, the count
and the sum of significands (exact integers, packed in one word), and adds up the squares (float64,
each square exact). Everything ``analyze.token_stats`` reports follows from these: L1 and L2 norms,
the maximum, counts under absolute thresholds, and the top-p kept counts, found by walking the
groups from the largest value down with a float64 running sum and resolving the crossing group
pattern by pattern. About 1.8 ns per entry on one core, against ~13 ns for the sort-based path
(BENCHMARKS.md).

Numerics: the top-p threshold is the authors' (docs/paper-notes.md §1.2: descending order, float64 running
sum, first value whose running sum reaches ``p * total``, ties at it kept). The running sums here add
whole groups of equal-exponent values at once; a float64 sum of bfloat16 values is exact until the
values added fall below ~2^-45 of the running sum, so the result equals ``analyze.rules.topp_mask``
except where float64 rounding of such a negligible tail moves ``p * total`` across a partial sum
(never observed on real activations; tested for equality on real and adversarial blocks).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

_GROUP_BITS = 4  # 16 patterns per group: few enough to scan, many enough that neighbours rarely collide
# A group's entry count and significand sum share one int64 (count << 40 | sum), so that the
# per-entry pass updates one group word instead of two: ~25% of the pass (BENCHMARKS.md). The sum
# stays below 2^40 for any width the count field holds (2^23 entries of significands < 2^11).
_COUNT_SHIFT = 40
_SUM_MASK = (1 << _COUNT_SHIFT) - 1
MAX_WIDTH = (1 << 23) - 1

# (mantissa bits, exponent bias, bit pattern of +inf) per 16-bit format
FORMATS = {"bfloat16": (7, 127, 0x7F80), "float16": (10, 15, 0x7C00)}


@numba.njit(nogil=True, cache=True)
def _tables(mant):  # pragma: no cover - compiled
    """Per-pattern integer significand (value = sig * scale[exponent]), the packed group increment
    ``1 << 40 | sig`` and empty histograms (pattern counts, packed group words)."""
    sig = np.empty(0x8000, np.int64)
    for b in range(0x8000):
        sig[b] = (b & ((1 << mant) - 1)) + ((1 << mant) if (b >> mant) > 0 else 0)
    packed = sig + (np.int64(1) << _COUNT_SHIFT)
    return sig, packed, np.zeros(0x8000, np.int32), np.zeros(0x8000 >> _GROUP_BITS, np.int64)


@numba.njit(nogil=True, cache=True)
def _squares(sig, scale, mant):  # pragma: no cover - compiled
    """float64 square of every pattern's magnitude (exact: at most 22 significant bits)."""
    sq = np.empty(0x8000)
    for b in range(0x8000):
        v = sig[b] * scale[b >> mant]
        sq[b] = v * v
    return sq


@numba.njit(nogil=True, cache=True, inline="always")
def _histogram(row, packed, cnt, gcs, sqv, squares):  # pragma: no cover - compiled
    """Count one token's magnitude patterns and group words; returns ``(smallest, largest)``
    pattern seen and, with ``squares``, the float64 sum of squared magnitudes (entry order)."""
    maxb = 0
    minb = 0x7FFF
    sq = 0.0
    for j in range(row.shape[0]):
        b = row[j] & 0x7FFF
        cnt[b] += 1
        gcs[b >> _GROUP_BITS] += packed[b]
        if squares:
            sq += sqv[b]
        maxb = max(maxb, b)
        minb = min(minb, b)
    return minb, maxb, sq


@numba.njit(nogil=True, cache=True, inline="always")
def _clear(cnt, gcs, minb, maxb):  # pragma: no cover - compiled
    cnt[minb:maxb + 1] = 0
    gcs[minb >> _GROUP_BITS:(maxb >> _GROUP_BITS) + 1] = 0


@numba.njit(nogil=True, cache=True)
def _total(gcs, scale, gshift, minb, maxb):  # pragma: no cover - compiled
    """float64 L1 mass, groups added from the largest down (the sorted order's running sum)."""
    total = 0.0
    for g in range(maxb >> _GROUP_BITS, (minb >> _GROUP_BITS) - 1, -1):  # empty groups add an exact 0.0
        total += (gcs[g] & _SUM_MASK) * scale[g >> gshift]  # exact: an integer below 2^53 times a power of two
    return total


@numba.njit(nogil=True, cache=True)
def _topp_walk(sig, cnt, gcs, scale, gshift, minb, maxb, total, topp, kept_out, mass_out,
               thr_out):  # pragma: no cover - compiled
    """Top-p kept counts, kept L1 mass and threshold pattern (the smallest kept magnitude pattern) of
    one token for ascending ``topp`` (docs/paper-notes.md §1.2).

    Walks the groups from the largest value down with a float64 running sum; in a group where a
    target ``total * p`` is reached, pattern by pattern: the first pattern whose running sum reaches
    the target is the threshold, and every entry at it is kept (ties at the threshold).
    """
    n_p = topp.shape[0]
    run = 0.0
    kept = 0
    q = 0
    target = total * topp[0] if n_p else 0.0
    # Branch-free over empty groups and patterns, whose emptiness tests mispredicted: adding 0.0 is
    # exact, and below the largest pattern the running sum only reaches a target (> the running sum
    # at the loop's top, or 0 when every target is) right after a pattern that holds entries.
    for g in range(maxb >> _GROUP_BITS, (minb >> _GROUP_BITS) - 1, -1):
        if q == n_p:
            break
        w = gcs[g]
        sc = scale[g >> gshift]
        mass = (w & _SUM_MASK) * sc
        if run + mass >= target:
            for b in range(min(maxb, ((g + 1) << _GROUP_BITS) - 1), (g << _GROUP_BITS) - 1, -1):
                n = cnt[b]
                run += n * sig[b] * sc
                kept += n
                while q < n_p and run >= target:
                    kept_out[q] = kept
                    mass_out[q] = run
                    thr_out[q] = b
                    q += 1
                    if q < n_p:
                        target = total * topp[q]
        else:
            run += mass
            kept += w >> _COUNT_SHIFT
    while q < n_p:  # target never reached (rounding): the authors' fallback keeps the maximum and its ties
        kept_out[q] = cnt[maxb]
        mass_out[q] = cnt[maxb] * sig[maxb] * scale[(maxb >> _GROUP_BITS) >> gshift]
        thr_out[q] = maxb
        q += 1


@numba.njit(nogil=True, cache=True)
def _stats_kernel(bits, mant, inf_bits, scale, below_bits, topp, out):  # pragma: no cover - compiled
    """Fill ``out`` [T, 4 + len(below_bits) + len(topp)] float64 for ``bits`` [T, W] uint16.

    Columns: l1, l2, max_abs, top1_share, the fraction of entries under each ``below_bits``
    pattern, and ``1 - kept / W`` for each ascending top-p value. A row holding a NaN is all NaN.
    """
    T, W = bits.shape
    gshift = mant - _GROUP_BITS
    sig, packed, cnt, gcs = _tables(mant)
    sqv = _squares(sig, scale, mant)
    n_below = below_bits.shape[0]
    n_p = topp.shape[0]
    kept = np.empty(n_p, np.int64)
    mass = np.empty(n_p)
    thr = np.empty(n_p, np.int32)
    for i in range(T):
        minb, maxb, sq = _histogram(bits[i], packed, cnt, gcs, sqv, True)
        gmin = minb >> _GROUP_BITS
        gmax = maxb >> _GROUP_BITS
        if maxb > inf_bits:  # a NaN pattern: every statistic of the token is undefined
            out[i, :] = np.nan
            _clear(cnt, gcs, minb, maxb)
            continue
        for t in range(n_below):
            cb = below_bits[t]
            n = 0
            for g in range(gmin, min(cb >> _GROUP_BITS, gmax + 1)):
                n += gcs[g] >> _COUNT_SHIFT
            for b in range(max(minb, (cb >> _GROUP_BITS) << _GROUP_BITS), min(cb, maxb + 1)):
                n += cnt[b]
            out[i, 4 + t] = 1.0 - (W - n) / W  # as 1 - kept / W of the threshold rule
        n_inf = cnt[inf_bits]
        if n_inf > 0:  # p * inf is inf (NaN for p = 0): the authors keep exactly the infinities
            out[i, 0] = np.inf
            out[i, 1] = np.inf
            out[i, 2] = np.inf
            out[i, 3] = np.nan
            for q in range(n_p):
                out[i, 4 + n_below + q] = 1.0 - n_inf / W
        else:
            total = _total(gcs, scale, gshift, minb, maxb)
            vmax = sig[maxb] * scale[maxb >> mant]
            out[i, 0] = total
            out[i, 1] = math.sqrt(sq)
            out[i, 2] = vmax
            out[i, 3] = vmax / total if total > 0 else np.nan
            _topp_walk(sig, cnt, gcs, scale, gshift, minb, maxb, total, topp, kept, mass, thr)
            for q in range(n_p):
                out[i, 4 + n_below + q] = 1.0 - kept[q] / W
        _clear(cnt, gcs, minb, maxb)


@numba.njit(nogil=True, cache=True)
def _topp_kernel(bits, mant, inf_bits, scale, topp, counts, kept_l1, thr):  # pragma: no cover - compiled
    """Fill ``counts`` int64, ``kept_l1`` float64 and ``thr`` int32 (threshold patterns) [T, len(topp)]
    for ``bits`` [T, W] uint16.

    Returns the index of the first token holding a NaN, or -1.
    """
    T = bits.shape[0]
    gshift = mant - _GROUP_BITS
    sig, packed, cnt, gcs = _tables(mant)
    no_squares = np.empty(0)  # never read: the sweep needs no L2
    n_p = topp.shape[0]
    for i in range(T):
        minb, maxb, _ = _histogram(bits[i], packed, cnt, gcs, no_squares, False)
        if maxb > inf_bits:
            _clear(cnt, gcs, minb, maxb)
            return i
        n_inf = cnt[inf_bits]
        if n_inf > 0:  # keep exactly the infinities; their share of an infinite mass is undefined
            for q in range(n_p):
                counts[i, q] = n_inf
                kept_l1[i, q] = np.nan
                thr[i, q] = inf_bits
        else:
            total = _total(gcs, scale, gshift, minb, maxb)
            _topp_walk(sig, cnt, gcs, scale, gshift, minb, maxb, total, topp, counts[i], kept_l1[i], thr[i])
            for q in range(n_p):  # kept mass -> kept fraction; an all-zero token loses nothing
                kept_l1[i, q] = kept_l1[i, q] / total if total > 0 else 1.0
        _clear(cnt, gcs, minb, maxb)
    return -1


@numba.njit(nogil=True, cache=True)
def _segment_kernel(bits, thr, counts, order):  # pragma: no cover - compiled
    """Fill ``order`` int32 [T, W]: per token, entry indices from the lowest magnitude up, grouped
    into the segments that the thresholds cut (a counting partition, no sort).

    ``thr`` int32 [T, P] and ``counts`` int64 [T, P] are threshold patterns and kept counts as
    ``_topp_kernel`` fills them: an entry with magnitude pattern b is kept at value q iff
    ``b >= thr[t, q]`` (``counts[t, q]`` such entries), so its segment is the number of thresholds
    <= b and the segments are the differences of the sorted kept counts (as
    ``actsparse.analyze.linear_errors.linear_target_errors`` cuts them).
    """
    T, W = bits.shape
    n_p = thr.shape[1]
    asc = np.empty(n_p, np.int32)
    cnt = np.empty(n_p, np.int64)
    mag = np.empty(W, np.int16)  # 16-bit lanes: twice the entries per vector compare
    seg = np.empty(W, np.int16)  # n_p < 2^15 (checked by the caller)
    pos = np.empty(n_p + 1, np.int64)
    for t in range(T):
        for q in range(n_p):  # insertion sort by threshold: those of ascending p descend, save where
            v, c = thr[t, n_p - 1 - q], counts[t, n_p - 1 - q]  # rounding fell back to the maximum
            k = q
            while k > 0 and asc[k - 1] > v:
                asc[k], cnt[k] = asc[k - 1], cnt[k - 1]
                k -= 1
            asc[k], cnt[k] = v, c
        pos[0] = 0
        for q in range(n_p):  # segment q + 1 starts after the W - count entries under threshold q
            pos[q + 1] = W - cnt[q]
        for j in range(W):
            mag[j] = bits[t, j] & 0x7FFF
            seg[j] = 0
        for q in range(n_p):  # segment = number of thresholds <= b: branch-free, vectorised over entries
            v = np.int16(asc[q])
            for j in range(W):
                seg[j] += mag[j] >= v
        for j in range(W):
            s = seg[j]
            order[t, pos[s]] = j
            pos[s] += 1


@functools.lru_cache(maxsize=8)
def _format_tables(dtype: str, thresholds: tuple[float, ...]) -> tuple[int, int, np.ndarray, np.ndarray]:
    """``(mantissa bits, inf pattern, scale per exponent, first pattern >= float32(t) per threshold)``."""
    import torch

    mant, bias, inf_bits = FORMATS[dtype]
    scale = np.array([2.0 ** (max(e, 1) - bias - mant) for e in range((0x7FFF >> mant) + 1)])
    # every finite magnitude pattern as float32 (exact), ascending with the pattern
    values = (torch.arange(inf_bits, dtype=torch.int32).to(torch.int16)
              .view(getattr(torch, dtype)).float().numpy())
    # |a| < t is compared in float32 (as the threshold rule does on widened blocks): count patterns below
    below = np.array([np.searchsorted(values, np.float32(t), side="left") for t in thresholds], np.int64)
    return mant, inf_bits, scale, below


def _as_bits(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype not in FORMATS:
        raise ValueError(f"16-bit histograms handle {', '.join(FORMATS)}, not {dtype}")
    bits = np.ascontiguousarray(bits).view(np.uint16)
    if bits.ndim != 2:
        raise ValueError(f"bits must be [tokens, width], got shape {bits.shape}")
    if bits.shape[1] > MAX_WIDTH:  # the packed group counts hold 23 bits
        raise ValueError(f"16-bit histograms handle widths up to {MAX_WIDTH}, got {bits.shape[1]}")
    return bits


def bit_stats(bits: np.ndarray, dtype: str, thresholds, topp) -> np.ndarray:
    """Per-token statistics of a block of 16-bit float bit patterns.

    Args:
        bits: uint16 (or int16) [tokens, width], the bit patterns of bfloat16 or float16 values.
        dtype: ``bfloat16`` or ``float16``.
        thresholds: absolute thresholds t (compared as ``|a| < float32(t)``).
        topp: top-p values in [0, 1], ascending.

    Returns:
        float64 [tokens, 4 + len(thresholds) + len(topp)]: l1 (sum |a|), l2, max |a|, max |a| / l1
        (NaN when l1 is 0 or inf), the fraction of entries under each threshold, and the top-p
        sparsity ``1 - kept / width`` per p (docs/paper-notes.md §1.2). A token holding NaN is NaN throughout;
        a token holding inf has l1 = l2 = max = inf and keeps exactly its infinities.

    Raises:
        ValueError: an unknown ``dtype``, a block that is not 2-D, or ``topp`` not ascending.
    """
    bits = _as_bits(bits, dtype)
    topp = np.asarray(topp, dtype=np.float64)
    if np.any(np.diff(topp) < 0):
        raise ValueError("topp values must be ascending")
    mant, inf_bits, scale, below = _format_tables(dtype, tuple(float(t) for t in thresholds))
    out = np.empty((bits.shape[0], 4 + len(below) + len(topp)))
    if bits.shape[1]:
        _stats_kernel(bits, mant, inf_bits, scale, below, topp, out)
    return out


def topp_sweep(bits: np.ndarray, dtype: str, p_values, *, with_order: bool = False):
    """Top-p kept counts and kept L1 fractions of a block of 16-bit float bit patterns, for a whole grid.

    The histogram counterpart of ``analyze.sweep.topp_kept_counts`` and ``kept_l1`` for power 1
    (same numerics, see the module docstring), without a sort: ~2 ns per entry for the paper's 26
    values against ~12 ns for sort, cumsum and search.

    Args:
        bits: uint16 (or int16) [tokens, width] bit patterns of bfloat16 or float16 values.
        dtype: ``bfloat16`` or ``float16``.
        p_values: P top-p values in [0, 1], any order.
        with_order: also return the rank order at the grain the errors need (a counting partition
            by the thresholds found, no sort).

    Returns:
        ``(counts int64 [tokens, P], kept_l1 float64 [tokens, P])`` in the order of ``p_values``;
        kept_l1 is the kept share of sum |a| (1 for an all-zero token, NaN for a token holding inf).
        With ``with_order``, a third item: int32 [tokens, width], per token the entry indices from
        the smallest magnitude up, in any order within each segment that the kept counts cut (as
        ``actsparse.analyze.linear_errors.linear_target_errors`` takes it).

    Raises:
        ValueError: an unknown ``dtype``, a block that is not 2-D, or 32,767 or more grid values
            with ``with_order``.
        ActsparseError: a token holds NaN (as ``analyze.sweep.sort_block``).
    """
    from actsparse.core.errors import ActsparseError

    bits = _as_bits(bits, dtype)
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    if with_order and len(p) >= 0x7FFF:  # the partition counts segments in 16 bits
        raise ValueError(f"a rank order needs fewer than {0x7FFF} grid values, got {len(p)}")
    order = np.argsort(p, kind="stable")
    mant, inf_bits, scale, _ = _format_tables(dtype, ())
    counts = np.zeros((bits.shape[0], len(p)), np.int64)
    kept = np.zeros((bits.shape[0], len(p)))
    thr = np.zeros((bits.shape[0], len(p)), np.int32)
    if bits.shape[1] and len(p):
        bad = _topp_kernel(bits, mant, inf_bits, scale, p[order], counts, kept, thr)
        if bad >= 0:
            raise ActsparseError(f"token {bad} of a block of {bits.shape[0]} contains NaN activations")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    if not with_order:
        return counts[:, inverse], kept[:, inverse]
    ranks = np.empty(bits.shape, np.int32)
    if bits.size:
        _segment_kernel(bits, thr, counts, ranks)
    return counts[:, inverse], kept[:, inverse], ranks
