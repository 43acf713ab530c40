"""The output error of dropping entries before a linear map, for a whole grid of rule values in one pass.

For the linear targets (``intermediate``, ``gate``, ``up``: docs/paper-notes.md §8) dropping a set of entries of
h changes the FFN output by ``W_down @ (h * dropped)``. Kept sets of a grid are nested prefixes of one rank
order (``actsparse.analyze.sweep``), so every grid value's error comes from one gather-accumulate of h's
entries in rank order, segment by segment: the multiply-adds of one dense matmul for the whole grid.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
import torch.nn.functional as F

from actsparse.analyze.rules import check_block
from actsparse.analyze.sweep import check_counts
from actsparse.core.errors import ActsparseError

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


def feature_chunks(width: int, d_model: int) -> list[tuple[int, int]]:
    """Split the d_model output features into near-equal chunks with bounds on ``_LANES``
    multiples, whose W_down^T slice (width x chunk float32) fits ``_W_CHUNK_BYTES``."""
    max_c = max(_LANES, (_W_CHUNK_BYTES // (4 * width)) // _LANES * _LANES)
    n = math.ceil(d_model / max_c)
    bounds = sorted({min(d_model, round(d_model * i / n / _LANES) * _LANES) for i in range(n)} | {d_model})
    return list(zip(bounds[:-1], bounds[1:]))


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def segment_norms(seg, y, dropped_sq, kept_sq):  # pragma: no cover - compiled
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


def gathered_f32(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
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
    those positions; docs/paper-notes.md §8); counts: [T, P] kept counts (the top of that order);
    w_down: [d_model, W]; y: optional [T, d_model] dense output, default ``W_down @ h``
    computed in this same pass.

    With D_p = W_down @ (h * dropped_mask_p) (docs/paper-notes.md §8 ``dy``) and y' = y - D_p,
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
    feature chunk, ``segment_norms``). The work is tiled over feature chunks of W_down^T
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
    check_counts(counts, n_tok, width)
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
    chunks = [(j0, j1, wt[:, j0:j1].contiguous()) for j0, j1 in feature_chunks(width, d_model)]
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
        weights, cols = gathered_f32(h[t0:t1], cols).reshape(-1), cols.reshape(-1)
        offsets = (starts[t0:t1] + torch.arange(nb)[:, None] * width).reshape(-1).to(torch.int32)
        for j0, j1, wc in chunks:
            seg = F.embedding_bag(cols, wc, offsets, mode="sum", per_sample_weights=weights)
            yc = no_y if y is None else np.ascontiguousarray(y[t0:t1, j0:j1].float().numpy())
            segment_norms(seg.view(nb, n_p + 1, j1 - j0).numpy(), yc, dropped_sq[t0:t1], kept_sq[t0:t1])
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
