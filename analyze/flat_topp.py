"""The authors' diffusion top-p (``top-p-flat``): one budget per sample over its flattened tokens.

docs/paper-notes.md §1.7; the authors' ``sparsified_llada/scripts/llada_top_p_at_diff_int.py``
(``_topp_sparsify_with_mask``): per sample, |a| over all its tokens and features is flattened, sorted descending,
cumulatively summed, divided by the total when it is > 0, and the sorted entries with ``cumsum <= p`` are kept
(a prefix, as the running sum never decreases), at least the largest one. So the kept L1 mass is at most p, and
the tokens of a sample share one budget, where the per-token ``top-p`` of ``analyze.rules`` keeps at least p
of every token's mass. The authors give p in percent; actsparse takes the fraction ``p / 100`` like every other
rule value. An all-zero sample keeps everything (its running sum is never divided). Entries tied at the cut
are kept in index order (a stable sort; the authors' GPU sort leaves that order unspecified). The authors
accumulate in the tensor's dtype (bf16 in their runs), which rounds the running sum of ~10^6 entries coarsely:
the default here is float64, and ``cumsum_dtype=None`` reproduces theirs.

Two paths give the same masks (tested against the authors' loop): 16-bit blocks (bf16, f16; what a store
holds) count each sample's magnitude bit patterns (32,768 at most, ordered like the values) and walk them from
the largest down, adding every entry to a float64 running sum in the sorted order (so the sums are those of
``torch.cumsum`` in float64, bit for bit), without a sort; any other block sorts (numpy's integer sort of the
bit patterns, ~15x faster than ``torch.sort`` on one thread) and searches the cut.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from actsparse.analyze.bitstats import FORMATS
from actsparse.analyze.rules import check_block
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import FLAT_TOPP

# Non-negative floats order like their bit patterns read as signed integers of the same width.
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}
_FORMAT = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_flat_value(p: float) -> float:
    """``p`` as a float if it is in [0, 1].

    Raises:
        ActsparseError: anything else (the authors' percent is ``100 * p``).
    """
    try:
        v = float(p)
    except (TypeError, ValueError):
        raise ActsparseError(f"{FLAT_TOPP} value must be a number, got {p!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ActsparseError(f"{FLAT_TOPP} value is the kept mass fraction p in [0, 1] (the authors' percent / 100), "
                             f"got {p!r}")
    return v


def flat_topp_mask(a: torch.Tensor, p: float, *, cumsum_dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Keep mask of the flattened top-p: one budget per sample, a sample being each index of the leading dims.

    Args:
        a: [..., tokens, width] (a 2-D [tokens, width] is one sample), any float dtype.
        p: kept mass fraction in [0, 1].
        cumsum_dtype: the running sum's dtype; None = ``a``'s dtype, as the authors' code.

    Returns:
        bool of ``a``'s shape.

    Raises:
        ActsparseError: fewer than 2 dimensions, not floating point, or p outside [0, 1].
    """
    check_block(a)
    if a.ndim < 2:
        raise ActsparseError(f"{FLAT_TOPP} needs [..., tokens, width], got shape {tuple(a.shape)}")
    rows = a.detach().reshape(-1, a.shape[-1])
    per = a.shape[-2]
    starts = np.arange(0, rows.shape[0], per, dtype=np.int64) if per else np.zeros(0, np.int64)
    return flat_topp_segments(rows, starts, starts + per, p, cumsum_dtype=cumsum_dtype).reshape(a.shape)


def flat_topp_segments(rows: torch.Tensor, starts: np.ndarray, stops: np.ndarray, p: float, *,
                       cumsum_dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """:func:`flat_topp_mask` over ragged samples: rows ``[starts[i], stops[i])`` of ``rows`` [N, width] are sample
    i (rows outside every segment are dropped: False).

    Raises:
        ActsparseError: ``rows`` not a 2-D float tensor, or p outside [0, 1].
    """
    check_block(rows, ndim=2)
    q = check_flat_value(p)
    starts, stops = np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64)
    keep = torch.zeros(rows.shape, dtype=torch.bool)
    if rows.device.type == "cpu" and rows.dtype in _FORMAT and cumsum_dtype == torch.float64:
        bits = rows.contiguous().view(torch.int16).numpy()
        values, ulps, inf_bits = _pattern_values(_FORMAT[rows.dtype])
        out = keep.numpy()
        unresolved = np.zeros(len(starts), dtype=np.bool_)
        _flat_kernel(bits, starts, stops, values, ulps, inf_bits, q, out, unresolved)
        todo = np.flatnonzero(unresolved)  # samples holding NaN or inf: the sort path defines them
    else:
        todo = np.arange(len(starts))
    for i in todo:
        lo, hi = int(starts[i]), int(stops[i])
        keep[lo:hi] = _sorted_mask(rows[lo:hi].reshape(1, -1), q, cumsum_dtype).reshape(hi - lo, -1)
    return keep


def _pattern_values(fmt: str) -> tuple[np.ndarray, np.ndarray, int]:
    """float64 value and ulp (the value of its last significand bit) of every magnitude bit pattern of a 16-bit
    format, and the pattern of +inf (patterns from it on are inf and NaN; their values are not used)."""
    mant, bias, inf_bits = FORMATS[fmt]
    patterns = np.arange(0x8000, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        if fmt == "bfloat16":
            values = (patterns << 16).view(np.float32).astype(np.float64)
        else:
            values = patterns.astype(np.uint16).view(np.float16).astype(np.float64)
    exponent = np.maximum(patterns >> mant, 1).astype(np.float64)
    return values, np.exp2(exponent - bias - mant), inf_bits


@numba.njit(nogil=True, cache=True)
def _running_sums_exact(cnt, values, ulps, minb, maxb):  # pragma: no cover - compiled
    """Whether every partial sum of the sample's magnitudes, in any order, is a float64 without rounding: all
    are multiples of the smallest ulp present, so they are exact while the total stays below 2^52 ulps."""
    unit = ulps[minb] if minb > 0 else ulps[1]
    approx = 0.0
    for b in range(maxb, minb - 1, -1):
        approx += cnt[b] * values[b]
    return approx / unit < 2.0 ** 52


@numba.njit(nogil=True, cache=True)
def _kept_in_pattern(run, v, n, total, q):  # pragma: no cover - compiled
    """The largest j in [0, n] with ``(run + j * v) / total <= q`` (monotone in j; binary search)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (run + mid * v) / total <= q:
            lo = mid
        else:
            hi = mid - 1
    return lo


@numba.njit(nogil=True, cache=True)
def _cut(cnt, values, ulps, minb, maxb, q):  # pragma: no cover - compiled
    """``(threshold pattern, entries to keep at it)`` of one sample from its pattern counts (module docstring).

    The running sum is the one ``torch.cumsum`` computes in float64 over the sorted entries: pattern by pattern
    (``count * value`` is exact) where no partial sum rounds, else entry by entry.
    """
    exact = _running_sums_exact(cnt, values, ulps, minb, maxb)
    total = 0.0
    for b in range(maxb, minb - 1, -1):
        if exact:
            total += cnt[b] * values[b]
        else:
            for _ in range(cnt[b]):
                total += values[b]
    if total == 0:  # an all-zero sample keeps everything
        return minb, cnt[minb]
    run = 0.0
    for b in range(maxb, minb - 1, -1):
        v = values[b]
        n = cnt[b]
        if n == 0:
            continue
        if exact:
            if (run + n * v) / total <= q:
                run += n * v
                continue
            j = _kept_in_pattern(run, v, n, total, q)
        else:
            j = 0
            while j < n:
                if (run + v) / total > q:
                    break
                run += v
                j += 1
            if j == n:
                continue
        if j > 0:
            return b, j
        # the first entry of this pattern is over the budget: the cut is the last entry of the previous pattern
        for c in range(b + 1, maxb + 1):
            if cnt[c] > 0:
                return c, cnt[c]
        return maxb, 1  # no entry within the budget: the largest one alone
    return minb, cnt[minb]


@numba.njit(nogil=True, cache=True)
def _flat_kernel(bits, starts, stops, values, ulps, inf_bits, q, keep, unresolved):  # pragma: no cover - compiled
    """Fill ``keep`` bool [N, W] for the samples ``[starts[i], stops[i])`` of ``bits`` int16 [N, W] (module
    docstring); a sample holding inf or NaN is left to the caller (``unresolved[i]``)."""
    cnt = np.zeros(0x8000, np.int64)
    width = bits.shape[1]
    for i in range(starts.shape[0]):
        lo, hi = starts[i], stops[i]
        if hi <= lo:
            continue
        minb, maxb = 0x7FFF, 0
        for r in range(lo, hi):
            for j in range(width):
                b = bits[r, j] & 0x7FFF
                cnt[b] += 1
                minb = min(minb, b)
                maxb = max(maxb, b)
        if maxb >= inf_bits:
            unresolved[i] = True
        else:
            thr, need = _cut(cnt, values, ulps, minb, maxb, q)
            if need == cnt[thr]:  # every entry at the threshold is kept
                for r in range(lo, hi):
                    for j in range(width):
                        keep[r, j] = (bits[r, j] & 0x7FFF) >= thr
            else:
                taken = 0
                for r in range(lo, hi):
                    for j in range(width):
                        b = bits[r, j] & 0x7FFF
                        if b > thr or (b == thr and taken < need):
                            keep[r, j] = True
                            taken += b == thr
        cnt[minb:maxb + 1] = 0


def _sorted_descending(flat: torch.Tensor) -> torch.Tensor:
    """Rows of the non-negative 2-D ``flat`` sorted descending (values only), through numpy's integer sort of the
    bit patterns where the dtype has an integer view of its width."""
    if flat.device.type != "cpu" or flat.dtype not in _INT_VIEW:
        return flat.sort(dim=-1, descending=True).values
    bits = np.sort(flat.contiguous().view(_INT_VIEW[flat.dtype]).numpy(), axis=-1)[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(bits)).view(flat.dtype)


def _sorted_mask(flat: torch.Tensor, q: float, cumsum_dtype: torch.dtype | None) -> torch.Tensor:
    """Keep mask of samples ``flat`` [S, n] from one sort each: k = the kept count, thr = the k-th largest value,
    keep every entry > thr and the first ``k - #(> thr)`` entries equal to thr."""
    a = flat.abs()
    srt = _sorted_descending(a)
    cum = srt.cumsum(dim=-1, dtype=cumsum_dtype)
    k = _kept_count(cum, q).clamp(min=1)
    thr = srt.gather(1, k - 1)
    above = a > thr
    tied = a == thr
    need = k - above.sum(dim=-1, keepdim=True)  # tied entries to keep, in index order
    return above | (tied & (tied.cumsum(dim=-1) <= need))


def _kept_count(cum: torch.Tensor, q: float) -> torch.Tensor:
    """Per row of the non-decreasing ``cum`` [R, n]: #entries with ``cum / cum[-1] <= q``, int64 [R, 1] (every
    entry when ``cum[-1]`` is 0, which is then not divided by).

    In float64 a binary search for ``q * total`` finds the cut, and the authors' predicate, evaluated on the two
    entries around it, moves the cut where the rounding of ``cum / total`` and of ``q * total`` disagree. In a
    coarser dtype (the authors' own) the predicate is counted over the whole row.
    """
    n = cum.shape[-1]
    total = cum[:, -1:]
    live = total > 0
    if cum.dtype != torch.float64:
        return torch.where(live, (cum / torch.where(live, total, 1) <= q).sum(dim=-1, keepdim=True), n)
    k = torch.searchsorted(cum, (total * q).to(cum.dtype), right=True)

    def within(idx: torch.Tensor) -> torch.Tensor:
        return cum.gather(1, idx.clamp(0, n - 1)) / torch.where(live, total, 1) <= q

    while True:
        grow = live & (k < n) & within(k)
        shrink = live & (k > 0) & ~within(k - 1)
        if not bool((grow | shrink).any()):
            break
        k = k + grow.long() - shrink.long()
    return torch.where(live, k, n)
