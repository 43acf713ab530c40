"""Effective rank of stored activations: Roy & Vetterli's entropy effective rank per run x site x layer.

docs/paper-notes.md §1.6: for the token x feature matrix A (dense, pre-sparsification, not mean-centred) with
singular values sigma, p_i = (sigma_i + eps) / sum_j (sigma_j + eps), erank = exp(-sum p_i log p_i), eps =
1e-10; reported raw and divided by the width. It is bounded by min(tokens, width), so runs compare only at
equal token counts: :func:`rank_run` computes it on fixed counts of the first non-special tokens of a run
(nested prefixes, the default ``DEFAULT_TOKEN_COUNTS``), which also shows how it grows with the count.

The singular values come from the eigenvalues of the smaller Gram matrix (A^T A [W, W] when tokens >= width,
else A A^T [T, T]; sigma = sqrt(max(lambda, 0))), formed and diagonalised in float32: the product is the
computation's FLOP floor (``make bench-rank`` compares the two), a full SVD of A costs several times more.
Eigenvalues below the float32 rounding of the product (~1e-7 lambda_max) come out as noise of that size, so
singular values below ~3e-4 sigma_max are not resolved; their share of the entropy is small (checked against
numpy's float64 SVD in the tests). :func:`rank_run` runs one (site, layer) per core with one torch thread
each: the symmetric eigensolver (tridiagonalisation, mostly matrix-vector work) scales badly over threads and
collapses when the cores are shared, while whole problems side by side keep every core busy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from actsparse.core.errors import ActsparseError

EPS = 1e-10  # docs/paper-notes.md §1.6
DEFAULT_TOKEN_COUNTS = (256, 1024, 4096)
RANK_VERSION = 1


def gram_singular_values(a: torch.Tensor) -> np.ndarray:
    """Singular values of a [T, W] (any float dtype), descending, float64 [min(T, W)], from the smaller Gram.

    Raises:
        ActsparseError: a is not 2-D, is empty, or holds NaN/inf.
    """
    if a.ndim != 2 or 0 in a.shape:
        raise ActsparseError(f"effective rank needs a non-empty [tokens, width] block, got {tuple(a.shape)}")
    x = a.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ActsparseError("effective rank: the block holds NaN or inf")
    g = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    lam = torch.linalg.eigvalsh(g).double().numpy()
    return np.sqrt(np.clip(lam[::-1], 0.0, None))


def effective_rank_of(sv: np.ndarray, eps: float = EPS) -> float:
    """Entropy effective rank of singular values ``sv`` (docs/paper-notes.md §1.6): exp(-sum p log p),
    p = (sv + eps) / sum(sv + eps)."""
    sv = np.asarray(sv, dtype=np.float64)
    p = (sv + eps) / (sv + eps).sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def effective_rank(a: torch.Tensor) -> float:
    """Entropy effective rank of a block a [T, W] (not centred), in [1, min(T, W)] (docs/paper-notes.md §1.6)."""
    return effective_rank_of(gram_singular_values(a))


def rank_run(run, sites: Sequence[str] | None = None, token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS, *,
             include_special: bool = False, layers: Sequence[int] | None = None,
             progress: Callable[[int], None] | None = None):
    """Effective rank of every stored site and layer of a run at each token count (a polars DataFrame with the
    columns of ``actsparse.core.format.EFFECTIVE_RANK``).

    run: an open ``pipeline.reader.Run``; sites: stored sites (default all); token_counts: numbers of the
    run's first tokens used (non-special ones unless ``include_special``); counts above what the run holds
    are dropped (a count equal to the run's tokens is kept), and each count is a prefix of the next;
    progress: ``advance(1)`` per site x layer.

    Raises:
        ActsparseError: an unknown site, no usable token count, or non-finite activations.
    """
    import polars as pl

    sites = tuple(sites or run.sites)
    for s in sites:
        if s not in run.sites:
            raise ActsparseError(f"run {run.run_id} has no site '{s}' (stored: {', '.join(run.sites)})")
    keep = np.ones(run.n_tokens, bool) if include_special else ~run.special_mask()
    rows_all = np.nonzero(keep)[0]
    counts = sorted({int(n) for n in token_counts})
    if any(n < 1 for n in counts):
        raise ActsparseError(f"token counts must be positive, got {token_counts}")
    usable = [n for n in counts if n <= len(rows_all)]
    if not usable:
        raise ActsparseError(f"run {run.run_id} has {len(rows_all)} counted tokens, fewer than every requested "
                             f"count ({', '.join(map(str, counts))})")
    n_max = usable[-1]
    rows = rows_all[:n_max]
    stop = int(rows[-1]) + 1
    layer_ids = list(range(run.n_layers)) if layers is None else list(layers)
    depth_den = max(run.n_layers - 1, 1)
    sel = torch.from_numpy(rows)

    def work(item: tuple[str, int]) -> list[dict]:
        site, layer = item
        a = run.read(site, layer, 0, stop, to="float32")[sel]
        width = a.shape[1]
        out = []
        for n in usable:
            er = effective_rank(a[:n])
            out.append(dict(run_id=run.run_id, site=site, layer=layer, depth=layer / depth_den, n_tokens=n,
                            width=width, max_rank=min(n, width), erank=er, erank_norm=er / width,
                            include_special=include_special, label="pre-sparsification"))
        return out

    items = [(site, layer) for site in sites for layer in layer_ids]
    out: list[dict] = []
    with one_thread_per_worker() as workers, ThreadPoolExecutor(workers) as ex:
        for rows_of in ex.map(work, items):
            out += rows_of
            if progress is not None:
                progress(1)
    return pl.DataFrame(out)


@contextmanager
def one_thread_per_worker():
    """Run torch single-threaded while as many workers as cores run side by side; yields the worker count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield max(1, os.cpu_count() or 1)
    finally:
        torch.set_num_threads(n)


def rank_ident(sites: Sequence[str], token_counts: Sequence[int], include_special: bool) -> dict:
    """What identifies an effective-rank result (its id is the content hash)."""
    return dict(kind="effective_rank", version=RANK_VERSION, sites=sorted(sites),
                token_counts=sorted({int(n) for n in token_counts}), include_special=include_special, eps=EPS)


def compute_rank(store, run_id: str | None = None, *, sites: Sequence[str] | None = None,
                 token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS, include_special: bool = False,
                 use_cache: bool = True, progress: Callable[[int], None] | None = None):
    """Effective rank of one run (:func:`rank_run`), cached in the store as the result kind ``effective_rank``.

    Raises:
        ActsparseError: as :func:`rank_run`, or an unknown run.
    """
    from actsparse.analyze.results import load_result, save_result
    from actsparse.core import format as fmt
    from actsparse.pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_id)
    chosen = tuple(sites or run.sites)
    ident = fmt.content_hash(rank_ident(chosen, token_counts, include_special))
    if use_cache:
        df = load_result(st, run.run_id, fmt.EFFECTIVE_RANK, ident)
        if df is not None:
            return df
    import polars as pl

    df = rank_run(run, chosen, token_counts, include_special=include_special, progress=progress)
    df = df.with_columns(analysis_id=pl.lit(ident))
    save_result(st, run.run_id, fmt.EFFECTIVE_RANK, ident, df)
    return df
