"""Per-token statistics: one Parquet row per (token, layer) and site, beside the dense activations.

Dense activations stay in Zarr; these small summaries are what DuckDB and Polars query across a whole
store (``actsparse sql``, ``actsparse query``). Collection computes them for every shard between
forward passes and its writer thread writes them (:data:`TOKEN_STATS`, handed to collection as its
``statistics``); ``actsparse index`` adds
them to runs collected before them (:func:`index_store`). Stored 16-bit blocks go through the
histogram kernel of ``analyze.bitstats`` (~1.8 ns per entry, no sort). They land as::

    runs/<run_id>/token_stats/site=<site>/part-KKKKKK.parquet     (K: the shard, as tokens/part-K)

Columns (``actsparse.core.format.TOKEN_STATS_COLUMNS``): run_id, site, layer, token_index, sequence, position, token_id,
special, then per token ``l1`` (sum |a|), ``l2``, ``max_abs``, ``top1_share`` (max |a| / l1),
``frac_below_1e_3`` / ``_1e_2`` / ``_1e_1`` (fraction of entries with |a| under 0.001, 0.01, 0.1) and
``sparsity_p50`` ... ``sparsity_p99`` (fraction of entries the top-p rule drops at p = 0.5, 0.7, 0.8,
0.9, 0.95, 0.99, exactly as ``analyze.rules.topp_mask``). Statistics are float32; a value that is
undefined (``top1_share`` of an all-zero token, every statistic of a token holding NaN) is null.
Rows are ordered by layer, then token, so a filter on one layer reads few row groups.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from actsparse.core import format as fmt
from actsparse.core.checksums import update_checksums
from actsparse.core.codec import decode
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_parquet, disk_error, exclusive_lock
from actsparse.core.format import STAT_COLUMNS, THRESHOLD_COLUMNS, THRESHOLDS, TOPP_COLUMNS, TOPP_VALUES

# Entries per piece of work: the float32 path sorts ~20 bytes per entry (values, float64 cumsum), ~40 MB.
_BLOCK_ENTRIES = 2 * 1024 * 1024


# ---------------------------------------------------------------- statistics


def token_stats(block) -> dict[str, np.ndarray]:
    """Per-token statistics of one block of activations.

    Args:
        block: torch tensor [tokens, width], any float dtype. bfloat16 and float16 (as stored) go
            through ``analyze.bitstats`` (histograms of bit patterns, no sort); float32 through one
            sort per token (``analyze.sweep.sort_block``).

    Returns:
        ``{column: float32 array [tokens]}`` for every name of ``STAT_COLUMNS`` (see the module
        docstring). NaN marks an undefined value: ``top1_share`` of an all-zero token, and every
        statistic of a token that holds a NaN activation. The top-p sparsities are
        ``1 - kept / width`` with kept equal to ``analyze.rules.topp_mask(block, p).sum(-1)``;
        ``l1`` is that rule's float64 total.

    Raises:
        ActsparseError: ``block`` is not a 2-D floating-point tensor with a non-empty width.
    """
    import torch

    from actsparse.analyze.rules import check_block

    check_block(block, ndim=2)
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(block.dtype)
    if dtype is not None:
        from actsparse.analyze.bitstats import bit_stats

        out = bit_stats(block.contiguous().view(torch.int16).numpy(), dtype, THRESHOLDS, TOPP_VALUES)
        return {name: out[:, i].astype(np.float32) for i, name in enumerate(STAT_COLUMNS)}
    return _sorted_stats(block)


def _sorted_stats(block) -> dict[str, np.ndarray]:
    """``token_stats`` of a float32 (or wider) block from one sort per token."""
    import torch

    from actsparse.analyze.sweep import kept_counts, sort_block, topp_kept_counts

    bad = torch.isnan(block).any(dim=1).numpy()
    if bad.any():
        block = torch.where(torch.isnan(block), 0.0, block)  # computed as zeros, reported as NaN below
    # No statistic depends on which entry is which, so the sort skips the permutation.
    sb = sort_block(block, with_order=False)
    values = sb.values.numpy()
    width = values.shape[1]
    l1 = sb.total.numpy()
    max_abs = values[:, 0].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        top1 = max_abs / l1
    out = {
        "l1": l1,
        "l2": np.sqrt(np.einsum("ij,ij->i", values, values, dtype=np.float64)),
        "max_abs": max_abs,
        "top1_share": top1,
    }
    below = 1.0 - kept_counts("threshold", sb, THRESHOLDS).numpy() / width
    out.update(zip(THRESHOLD_COLUMNS, below.T))
    topp = 1.0 - topp_kept_counts(sb, TOPP_VALUES).numpy() / width
    out.update(zip(TOPP_COLUMNS, topp.T))
    result = {}
    for name in STAT_COLUMNS:
        col = np.asarray(out[name], dtype=np.float32)
        col[bad] = np.nan
        result[name] = col
    return result


@functools.lru_cache(maxsize=1)
def _pool():
    """Worker threads for statistics, one per core: the bfloat16/float16 kernel releases the GIL.

    Collection calls :func:`shard_stats` between forward passes, when the cores are otherwise idle.
    """
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="actsparse-stats")


def _column(rows: Mapping, name: str) -> np.ndarray:
    """One token-row column as numpy (rows hold pyarrow arrays, chunked arrays or lists)."""
    v = rows[name]
    return v.to_numpy(zero_copy_only=False) if hasattr(v, "to_numpy") else np.asarray(v)


def shard_stats(run_meta: fmt.Manifest, k: int, blocks: Mapping[str, np.ndarray], token_rows: Mapping):
    """Statistics tables of one shard: one pyarrow table per site, one row per (layer, token).

    Args:
        run_meta: the run's manifest (its run id and the logical dtype of each site are used).
        k: the shard index (for error messages).
        blocks: ``{site: stored numpy array [layers, T, width]}`` as written to Zarr (uint16 bfloat16
            bit patterns for a bfloat16 run).
        token_rows: the shard's token columns (``token_index``, ``sequence``, ``position``, ``token_id``,
            ``special``), each of length T.

    Returns:
        ``{site: pyarrow.Table}`` of ``TOKEN_STATS_COLUMNS``, rows ordered by layer, then token.

    Raises:
        ActsparseError: a block's token count differs from the token rows.
    """
    import pyarrow as pa

    keys = {c: _column(token_rows, c) for c in ("token_index", "sequence", "position", "token_id", "special")}
    n = len(keys["token_index"])
    for site, arr in blocks.items():
        if arr.shape[1] != n:
            raise ActsparseError(f"run {run_meta.run_id} shard {k} site {site}: {arr.shape[1]} tokens in the block, "
                                 f"{n} token rows")
    # every site's pieces in one map: no pool-wide barrier between sites
    pieces = []
    for site, arr in blocks.items():
        step = max(1, _BLOCK_ENTRIES // max(arr.shape[2], 1))
        pieces += [(site, layer, s, s + step) for layer in range(arr.shape[0]) for s in range(0, n, step)]
    dtypes = {site: run_meta.arrays[site].logical_dtype for site in blocks}

    def piece_stats(piece):
        site, layer, start, stop = piece
        return token_stats(decode(blocks[site][layer, start:stop], dtypes[site], to="native"))

    parts = dict(zip(pieces, _pool().map(piece_stats, pieces)))
    schema = fmt.arrow_schema(fmt.TOKEN_STATS_COLUMNS)
    tables = {}
    for site, arr in blocks.items():
        layers = arr.shape[0]
        cols = {
            "run_id": pa.repeat(pa.scalar(run_meta.run_id, pa.string()), layers * n),
            "site": pa.repeat(pa.scalar(site, pa.string()), layers * n),
            "layer": pa.array(np.repeat(np.arange(layers, dtype=np.int32), n)),
            **{c: pa.array(np.tile(v, layers), schema.field(c).type) for c, v in keys.items()},
        }
        mine = [v for piece, v in parts.items() if piece[0] == site]  # in (layer, token) order
        for name in STAT_COLUMNS:
            v = np.concatenate([p[name] for p in mine])
            cols[name] = pa.array(v, pa.float32(), mask=np.isnan(v))
        tables[site] = pa.table(cols, schema=schema)
    return tables


# ---------------------------------------------------------------- writing


def write_shard_stats(run_dir: Path, k: int, tables: Mapping) -> list[Path]:
    """Write shard ``k``'s tables (from :func:`shard_stats`) atomically; returns the paths written.

    Row groups of ``STATS_ROW_GROUP`` rows (DuckDB parallelises a scan by row group), dictionaries only on
    ``run_id`` and ``site`` (on the float columns they cost time and bytes).
    """
    written = []
    for site, table in tables.items():
        path = Path(run_dir) / fmt.stats_part(site, k)
        atomic_write_parquet(path, table, row_group_size=fmt.STATS_ROW_GROUP, use_dictionary=["run_id", "site"])
        written.append(path)
    return written


class TokenStatistics:
    """Collection's per-shard statistics (``actsparse.pipeline.collect.ShardStatistics``).

    The statistics of a shard are computed on collection's main thread between forward passes (so they may
    use every core) and the returned write runs on its writer thread before the shard's token part, so a
    shard whose token part exists also has its statistics, and a resumed run recomputes both.
    """

    def warm_up(self) -> None:
        """Import and compile (or load from numba's cache) the statistics kernel while the model loads."""
        import torch

        token_stats(torch.zeros((1, 2), dtype=torch.bfloat16))

    def for_run(self, run_dir: Path, manifest: fmt.Manifest) -> Callable[[int, dict, dict], Callable[[], list]]:
        def on_shard(k: int, blocks: dict, token_rows: dict) -> Callable[[], list]:
            tables = shard_stats(manifest, k, blocks, token_rows)
            return lambda: write_shard_stats(run_dir, k, tables)

        return on_shard


TOKEN_STATS = TokenStatistics()


def missing_parts(run_dir: Path, manifest: fmt.Manifest) -> dict[int, list[str]]:
    """``{shard: [sites]}`` of a run whose statistics parts do not exist yet."""
    missing = {}
    for k in range(manifest.n_parts):
        sites = [s for s in manifest.sites if not (Path(run_dir) / fmt.stats_part(s, k)).is_file()]
        if sites:
            missing[k] = sites
    return missing


# (run_id, shard, sites) -> the paths written; an executor maps it over many parts at once
Part = tuple[str, int, list[str]]


class PartMap(Protocol):
    """``map_parts(store, parts)``: :func:`index_part` of every part (wherever an executor runs them), the paths
    each wrote in the order of ``parts``."""

    def __call__(self, store: str, parts: list[Part]) -> list[list[str]]: ...


def index_store(store: str | Path, run_refs: Iterable[str] | None = None, *,
                log: Callable[[str], None] = print, map_parts: PartMap | None = None) -> dict[str, int]:
    """Compute the statistics parts that complete runs lack (runs collected before statistics existed).

    Idempotent: parts that exist are kept; each new part is written atomically, then the run's
    ``checksums.json`` is updated with the new files (``actsparse.core.checksums.update_checksums``). Holds the
    writer lock of every run it adds parts to, so it never races a collection or another ``index`` of the run.

    Args:
        store: a local store directory.
        run_refs: run ids or unique prefixes (default: every complete run).
        log: where one-line messages go.
        map_parts: computes the parts elsewhere (an executor's tasks, ``PartMap``); None computes them here,
            one after another. The parts written are the same either way.

    Returns:
        ``{run_id: number of parts written}``.

    Raises:
        ActsparseError: a remote store, an unknown or incomplete run, another writer holds a run, or a
            disk error (read-only filesystem, disk full).
    """
    from actsparse.pipeline.reader import StoreReader

    st = StoreReader(str(store))
    if not st.is_local:
        raise ActsparseError(f"index writes into the store; {store} is not a local directory")
    runs = [st.run(r) for r in run_refs] if run_refs else st.runs()
    root = Path(st.root)
    todo = {run.run_id: missing_parts(root / fmt.run_path(run.run_id), run.manifest) for run in runs}
    parts = [(run_id, k, sites) for run_id, missing in todo.items() for k, sites in missing.items()]
    written: dict[str, list[str]] = {run.run_id: [] for run in runs}
    where = "the store"
    try:
        with contextlib.ExitStack() as locks:
            # a complete store (possibly read-only) is left untouched: no lock file is even created
            for run_id in (r for r, missing in todo.items() if missing):
                where = f"run {run_id}"
                locks.enter_context(exclusive_lock(root / fmt.run_path(run_id, fmt.LOCK), f"run {run_id}"))
            if map_parts is not None:
                done = map_parts(str(root), parts)
            else:
                done = [index_part(st.run(run_id), root / fmt.run_path(run_id), k, sites) for run_id, k, sites in parts]
            for (run_id, _, _), paths in zip(parts, done):
                written[run_id] += paths
            for run_id, paths in written.items():
                where = f"run {run_id}"
                if paths and not update_checksums(root / fmt.run_path(run_id), paths):
                    log(f"run {run_id} has no checksums.json; `actsparse verify --add-checksums` adds one")
    except OSError as e:
        raise disk_error(e, f"writing token statistics of {where}") from e
    for run_id, paths in written.items():
        log(f"run {run_id}: {len(paths)} token_stats part(s) written" + ("" if paths else " (all present)"))
    return {run_id: len(paths) for run_id, paths in written.items()}


def index_part(run, run_dir: Path, k: int, sites: list[str]) -> list[str]:
    """Write the statistics parts of shard ``k`` of a run for ``sites``; returns their paths.

    Args:
        run: the run (``actsparse.pipeline.reader.Run``), complete.
        run_dir: its directory in a local store; the caller holds its writer lock.
        k: the shard; sites: the sites whose part of shard ``k`` is missing.
    """
    import pyarrow.parquet as pq

    written = []
    start, stop = fmt.shard_tokens(k, run.chunk_tokens, run.n_tokens)
    rows = pq.read_table(run_dir / fmt.token_part(k))
    for site in sites:  # one site at a time: one shard of one site in memory
        tables = shard_stats(run.manifest, k, {site: run.array(site)[:, start:stop]},
                             {c: rows.column(c) for c in rows.column_names})
        written += [str(p) for p in write_shard_stats(run_dir, k, tables)]
    return written
