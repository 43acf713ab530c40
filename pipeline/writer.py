"""Shard buffers and the writer thread of collection.

The forward pass runs on the main thread and fills shard buffers through its hooks; a writer thread
compresses and writes whole shards (``[layers, T, width]`` per site) while the next batches run, so writing
overlaps compute and memory is bounded by a fixed pool of buffers, whatever the token count.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actsparse.core import format as fmt
from actsparse.core.checksums import crc32c_file, shard_record_doc
from actsparse.core.files import atomic_write_json, atomic_write_parquet, sync_data
from actsparse.pipeline.arrays import ShardWrite


class ShardPool:
    """Shard buffers ``{array: [layers, chunk_tokens, width]}`` recycled between the main and writer threads.

    ``dtype`` is the numpy dtype of every buffer, or one per array. ``size`` sets are allocated up front and
    touched, so memory is bounded whatever the token count and the loop never page-faults on them: first-touch
    faults of fresh buffers cost ~1 s per 4,096 SmolLM2-135M tokens on a 2-core VM (BENCHMARKS.md).
    :meth:`take` blocks until the writer releases a set.
    """

    def __init__(self, shapes: dict[str, tuple[int, int, int]], dtype: str | Mapping[str, str], size: int):
        self._free: queue.Queue = queue.Queue()
        dtypes = dtype if isinstance(dtype, Mapping) else dict.fromkeys(shapes, dtype)
        for _ in range(size):
            bufs = {s: np.empty(shape, dtype=dtypes[s]) for s, shape in shapes.items()}
            for b in bufs.values():
                b.fill(0)  # touch every page now (np.zeros would map them lazily)
            self._free.put(bufs)

    def take(self, block: bool = True) -> dict[str, np.ndarray]:
        """A free set; raises ``queue.Empty`` when ``block`` is False and none is free."""
        return self._free.get(block=block)

    def release(self, bufs: dict[str, np.ndarray]) -> None:
        self._free.put(bufs)


@dataclass
class ShardJob:
    """One complete shard to write: ``blocks[site]`` ``[layers, n, width]`` (views into ``bufs``), its token
    rows (pyarrow arrays of ``TOKENS_COLUMNS``), the buffer set to release, and ``extra``: work to run after
    the arrays and before the token part (the shard's statistics) that returns the paths of the files it
    wrote inside the run (recorded and synced with the arrays), or None."""

    k: int
    blocks: dict[str, np.ndarray]
    token_rows: dict
    bufs: dict[str, np.ndarray]
    extra: Callable[[], object] | None


class Writer(threading.Thread):
    """Writes whole shards from a queue (bounded by the pool); the first exception is kept for the main thread.

    ``writes`` maps a site to ``write(k, block)`` (``actsparse.pipeline.arrays.shard_writes``); ``columns`` are the
    run's token columns (``Manifest.token_columns``). Shards are independent files and a shard counts as complete
    once its token part exists (written last), so two threads may write shards in any order.
    """

    def __init__(self, run_dir: Path, writes: dict[str, ShardWrite], pool: ShardPool,
                 columns: fmt.Columns = fmt.TOKENS_COLUMNS):
        super().__init__(daemon=True, name="actsparse-writer")
        self.q: queue.Queue = queue.Queue()
        self.run_dir, self.writes, self.pool, self.columns = run_dir, writes, pool, columns
        self.error: BaseException | None = None
        self.write_s = 0.0
        self._lock = threading.Lock()

    def run(self) -> None:
        while (job := self.q.get()) is not None:
            self._write(job)

    def _write(self, job: ShardJob) -> None:
        """Write one shard: its arrays, its extra files (statistics), then, once all of them are on disk
        (``fdatasync``), the record of their digests and last the token part that marks the shard complete.
        So a crash at any point leaves the shard either complete and durable or without its token part, and
        a shard damaged later is told by its record when the run resumes (``collect.verified_shards``)."""
        import pyarrow as pa

        t0 = time.perf_counter()
        try:
            if self.error is None:
                files = {f"{fmt.ACTIVATIONS}/{rel}": digest for site, block in job.blocks.items()
                         for rel, digest in self.writes[site](job.k, block).items()}
                for path in (job.extra() if job.extra is not None else None) or ():
                    files[Path(path).relative_to(self.run_dir).as_posix()] = crc32c_file(path)
                sync_data([self.run_dir / rel for rel in files])
                atomic_write_json(self.run_dir / fmt.shard_record(job.k), shard_record_doc(job.k, files))
                table = pa.table(job.token_rows, schema=fmt.arrow_schema(self.columns))
                atomic_write_parquet(self.run_dir / fmt.token_part(job.k), table, fsync=True)
        except BaseException as e:  # re-raised on the main thread
            self.error = e
        finally:
            self.pool.release(job.bufs)
        with self._lock:
            self.write_s += time.perf_counter() - t0

    def write_one(self) -> bool:
        """Write one queued shard on the calling thread (False when none is queued): a thread that would
        otherwise wait for the writer uses its core instead, e.g. once the forward passes are over."""
        try:
            job = self.q.get_nowait()
        except queue.Empty:  # the stop marker is only queued after the main thread's last call
            return False
        self._write(job)
        return True

    def put(self, job: ShardJob) -> None:
        self.raise_if_failed()
        self.q.put(job)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
