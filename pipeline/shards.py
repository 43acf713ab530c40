"""Whole-shard writes of the activation arrays without zarr's write path (the same bytes, about half the CPU).

Collection writes every shard of an activation array whole (``[layers, T, *inner]``, e.g. ``[layers, T,
width]`` or a mixture-of-experts slot array's ``[layers, T, k, d_moe]``; docs/pitfalls.md P7). zarr's
own ``array[:, start:stop] = block`` spends more than the compression itself around it (chunk copies,
per-chunk tasks on its event loop, buffer assembly): on a 90 MiB SmolLM2-135M shard, 0.23-0.36 s in a
writer thread against 0.17 s here, of which 0.10 s is the compression (BENCHMARKS.md), CPU taken from
the forward pass it runs beside.

``ShardWriter`` encodes the shard file itself, following the Zarr v3 ``sharding_indexed`` codec
(zarr-specs, "Sharding codec"): the inner chunks ``[1, T, *inner]`` (one layer each) are encoded with
the array's inner codecs (little-endian bytes, then blosc) and laid end to end in Morton order (for
a chunk grid of ``(layers, 1, ..., 1)`` that is layer order), followed by the index: one ``(offset,
nbytes)`` uint64 little-endian pair per chunk, and the crc32c of that index (4 bytes, little-endian).
An edge shard's chunks are padded with the fill value to the full chunk shape, as zarr does.

It only takes arrays whose metadata is exactly that layout (``ShardWriter.for_array`` returns None
otherwise, and the caller writes through zarr); reading stays zarr's. ``tests/test_shards.py`` checks
the files are byte-identical to zarr's, edge shard included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from actsparse.core.checksums import crc32c_of

_BYTES_LE = {"name": "bytes", "configuration": {"endian": "little"}}
_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
_BLOSC_KEYS = {"cname", "clevel", "shuffle", "blocksize", "typesize"}


class ShardWriter:
    """Writes whole shards of one zarr v3 array stored in a local directory.

    Create with :meth:`for_array`. Thread-safe for distinct shards. Like zarr's local store it writes
    files in place: a shard counts as complete once collection has written its token part after it.
    """

    def __init__(self, directory: Path, key_of, shard_shape: tuple[int, ...], dtype: np.dtype, fill_value,
                 blosc_config: dict):
        import numcodecs

        self.directory, self._key_of = Path(directory), key_of
        self.shard_shape, self.dtype = shard_shape, dtype
        self.fill_value = fill_value
        self._blosc = numcodecs.Blosc(cname=blosc_config["cname"], clevel=blosc_config["clevel"],
                                      shuffle=_SHUFFLES[blosc_config["shuffle"]], blocksize=blosc_config["blocksize"],
                                      typesize=blosc_config["typesize"])

    @classmethod
    def for_array(cls, arr, directory: Path) -> ShardWriter | None:
        """A writer for ``arr`` (a zarr v3 array stored in the local ``directory``), or None when its layout is not
        the one this writer reproduces: shards ``[layers, T, *inner]`` spanning every layer and the whole of
        every dimension after the token axis, of ``[1, T, *inner]`` chunks, inner codecs bytes
        (little-endian) + blosc, index codecs bytes + crc32c at the end, default chunk keys."""
        try:  # the metadata as stored (JSON), not zarr's in-memory form of it
            meta = json.loads((Path(directory) / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("zarr_format") != 3 or len(meta.get("codecs", ())) != 1:
            return None
        shard = meta["codecs"][0]
        cfg = shard.get("configuration", {})
        grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        inner = cfg.get("codecs", [])
        if (shard.get("name") != "sharding_indexed" or cfg.get("index_location") != "end"
                or cfg.get("index_codecs") != [_BYTES_LE, {"name": "crc32c"}]
                or len(inner) != 2 or inner[0] != _BYTES_LE or inner[1].get("name") != "blosc"
                or not set(inner[1].get("configuration", {})) >= _BLOSC_KEYS
                or inner[1]["configuration"]["shuffle"] not in _SHUFFLES
                or grid is None or len(grid) != len(arr.shape) or len(grid) < 3
                or [grid[0], *grid[2:]] != [arr.shape[0], *arr.shape[2:]]
                or list(cfg.get("chunk_shape", ())) != [1, *grid[1:]]
                or meta.get("chunk_key_encoding", {}).get("name") != "default"):
            return None
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        return cls(directory, arr.metadata.encode_chunk_key, tuple(grid), dtype, arr.fill_value,
                   inner[1]["configuration"])

    def encode(self, block: np.ndarray) -> list[bytes]:
        """The bytes of one shard file holding ``block`` ``[layers, n <= T, *inner]``, in parts to be
        written one after the other (joining them would copy the shard once more)."""
        import google_crc32c

        layers, t, *inner = self.shard_shape
        if (block.ndim != len(self.shard_shape) or block.shape[0] != layers or list(block.shape[2:]) != inner
                or not 0 < block.shape[1] <= t):
            raise ValueError(f"a shard block is [{layers}, <= {t}, {', '.join(map(str, inner))}], "
                             f"got {list(block.shape)}")
        if block.dtype != self.dtype:  # never a silent cast: bf16 is stored as uint16 bit patterns
            raise ValueError(f"a shard block of this array is {self.dtype}, got {block.dtype}")
        if block.shape[1] < t:  # an edge shard: full chunks padded with the fill value, as zarr writes them
            full = np.full(self.shard_shape, self.fill_value, dtype=self.dtype)
            full[:, : block.shape[1]] = block
            block = full
        block = np.ascontiguousarray(block, dtype=self.dtype)
        chunks = [self._blosc.encode(block[layer]) for layer in range(layers)]
        index = np.empty((layers, 2), dtype="<u8")
        offset = 0
        for layer, chunk in enumerate(chunks):
            index[layer] = offset, len(chunk)
            offset += len(chunk)
        index_bytes = index.tobytes()
        return [*chunks, index_bytes, google_crc32c.value(index_bytes).to_bytes(4, "little")]

    def key(self, k: int) -> str:
        """The storage key of shard ``k`` (``c/0/k/0``), relative to the array's directory."""
        return self._key_of((0, k, *([0] * (len(self.shard_shape) - 2))))

    def write(self, k: int, block: np.ndarray) -> tuple[str, int]:
        """Write shard ``k`` along the token axis (tokens ``[k*T, k*T + n)``) from ``block`` ``[layers, n, *inner]``.

        Returns:
            ``(crc32c hex, size)`` of the bytes written, computed from them in memory (no re-read).

        Raises:
            ValueError: a block that is not ``[layers, 1..T, *inner]`` of the array's dtype.
            OSError: the file cannot be written (the caller reports it as a disk error).
        """
        data = self.encode(block)
        path = self.directory / self.key(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a plain write, as zarr's LocalStore does: the token part written after it marks the shard complete
        with open(path, "wb", buffering=0) as f:
            for part in data:
                f.write(part)
        return crc32c_of(data)
