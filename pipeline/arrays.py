"""The activation arrays of a run: creating them (zarr v3, sharded) and writing whole shards into them.

One array per site, ``[layers, tokens, width]``, chunks ``(1, T, width)`` and shards ``(layers, T, width)``
(``actsparse.core.format.ArraySpec``); the mixture-of-experts arrays (``routed/gate``, …) the same, with
the dimensions after the token axis whole in every chunk. Shards are written whole, by one writer each
(docs/pitfalls.md P7), through ``actsparse.pipeline.shards.ShardWriter`` where the array has the layout it
reproduces.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from actsparse.core import format as fmt
from actsparse.core.checksums import crc32c_file
from actsparse.core.errors import ActsparseError

# write(k, block) -> {path of each file written, relative to the activations directory: (crc32c hex, size)}
ShardWrite = Callable[[int, np.ndarray], dict[str, tuple[str, int]]]


def compressor(typesize: int):
    """The codec of every stored array: blosc-lz4 with bit shuffle.

    The sign/exponent bits of activations compress, mantissa bits barely do. On real SmolLM2 bf16
    activations: 1.55 bytes/value at ~1.6 GB/s, against zstd-1 with byte shuffle at 1.58 bytes/value and
    ~0.5 GB/s (BENCHMARKS.md), so writing keeps up with the forward pass.
    """
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=typesize)


@contextlib.contextmanager
def single_threaded_blosc():
    """One blosc thread per encode while collecting, restored afterwards.

    zarr already encodes a shard's chunks concurrently; blosc's own threads on top of that, beside the
    forward pass's, cost 1.7x the CPU time per shard on 2 cores (BENCHMARKS.md).
    """
    from numcodecs import blosc

    n = blosc.get_nthreads()
    blosc.set_nthreads(1)
    try:
        yield
    finally:
        blosc.set_nthreads(n)


def create_arrays(act_dir: Path, specs: dict[str, fmt.ArraySpec]) -> dict:
    """Open (creating where missing) the zarr array of every site (or MoE array name) of ``specs`` under ``act_dir``.

    Returns ``{site: zarr array}`` configured to skip zarr's empty-chunk scan (activations are never all
    fill value; the scan costs ~2x the encode time).

    Raises:
        ActsparseError: an existing array whose shape is not the one the run needs (a corrupt run directory).
    """
    import zarr

    group = zarr.open_group(zarr.storage.LocalStore(act_dir), mode="a", zarr_format=3)
    arrays = {}
    for site, spec in specs.items():
        if site in group:
            arr = group[site]
            if arr.shape != spec.shape:
                raise ActsparseError(f"existing array {site} has shape {arr.shape}, expected {spec.shape}: "
                                     "the run directory is corrupt")
        else:
            arr = group.create_array(
                site, shape=spec.shape, dtype=spec.numpy_dtype, chunks=spec.chunks, shards=spec.shards,
                compressors=compressor(np.dtype(spec.numpy_dtype).itemsize), fill_value=0,
                dimension_names=fmt.dimension_names(site),
                attributes=dict(logical_dtype=spec.logical_dtype, site=site),
            )
        arrays[site] = arr.with_config({"write_empty_chunks": True})
    return arrays


def shard_writes(arrays: dict, act_dir: Path, chunk_tokens: int) -> dict[str, ShardWrite]:
    """``{site: write(k, block)}``: shard k of a site from ``block`` ``[layers, n, *inner]``, through
    ``actsparse.pipeline.shards.ShardWriter`` (the same bytes for about half zarr's CPU) where the array's
    layout is the one it reproduces, else through zarr (and the files' crc32c read back). Each write returns
    the crc32c and size of the files it wrote, by path relative to ``act_dir``."""
    from actsparse.pipeline.shards import ShardWriter

    def via_zarr(arr, site: str) -> ShardWrite:
        def write(k: int, block: np.ndarray) -> dict[str, tuple[str, int]]:
            start, stop = k * chunk_tokens, k * chunk_tokens + block.shape[1]
            arr[:, start:stop] = block
            # the storage keys (shards, or chunks of an unsharded array) the token range lies in
            outer = arr.metadata.chunk_grid.chunk_shape
            ranges = [range(-(-n // c)) for n, c in zip(arr.shape, outer)]
            ranges[1] = range(start // outer[1], (stop - 1) // outer[1] + 1)
            keys = [arr.metadata.encode_chunk_key(idx) for idx in itertools.product(*ranges)]
            return {f"{site}/{key}": crc32c_file(act_dir / site / key) for key in keys}
        return write

    def fast_path(writer: ShardWriter, site: str) -> ShardWrite:
        return lambda k, block: {f"{site}/{writer.key(k)}": writer.write(k, block)}

    writes = {}
    for site, arr in arrays.items():
        fast = ShardWriter.for_array(arr, act_dir / site)
        writes[site] = fast_path(fast, site) if fast is not None else via_zarr(arr, site)
    return writes
