"""Collection of generation and diffusion runs: the rows of successive forward passes streamed into shards.

A text run knows its token count before the first forward pass (its windows); a generation or diffusion run
only once its decoder (``pipeline.decoding``) has run every batch: a prompt's generation ends at its first stop
token, diffusion_gemma's canvases at its adaptive stop. So collection lays the token axis out as the passes
come (batch by batch, forward by forward, the rows each forward stores; docs/store-format.md "Generation and
diffusion runs"), on a run prepared for an upper bound of rows:

* :func:`reset_arrays` (``prepare_run``) gives the arrays of a resumed run back the shape of that bound;
* :func:`collect_step_shards` streams the rows at a cursor into shard buffers and hands every full shard to the
  writer thread (``pipeline.writer``); once the last batch has run, :func:`_finalize` gives arrays and
  manifest the true token count and the last, partial shard is written. A shard's chunks are
  ``min(chunk_tokens, tokens)`` long (``core.format.ArraySpec.for_site``): a full shard is only written when
  the run has at least ``chunk_tokens`` tokens, so only the last shard needs the final layout;
* resume: a shard still counts as complete when its token part exists. The batch whose rows end the complete
  prefix of shards is found from those token parts (:func:`resume_point`) and run again; its rows before the
  first missing shard are dropped, so a resumed run writes the bytes of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import gc
import queue
import time
from pathlib import Path

import numpy as np

from actsparse.core import format as fmt
from actsparse.core.codec import encode
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_json
from actsparse.core.progress import ProgressFactory
from actsparse.pipeline.arrays import create_arrays, shard_writes
from actsparse.pipeline.recorder import SiteRecorder
from actsparse.pipeline.resume import completed_shards
from actsparse.pipeline.windows import batches
from actsparse.pipeline.writer import ShardJob, ShardPool, Writer


def reset_arrays(act_dir: Path, sites) -> None:
    """Drop the metadata (``zarr.json``) of a resumed run's site arrays, which :func:`_finalize` may have given
    the final token count, so that ``prepare_run`` creates them for the planned bound again; shard files stay."""
    for site in sites:
        (Path(act_dir) / site / fmt.ZARR_META).unlink(missing_ok=True)


def resume_point(run_dir: Path, first_missing: int, chunk_tokens: int, batch_size: int) -> tuple[int, int, int | None]:
    """Where a run whose shards ``[0, first_missing)`` are complete resumes: ``(batch, its first token, None)``,
    or ``(-1, -1, n_tokens)`` when those shards already hold every row (the last of them is partial).

    The batch is the one holding the last row of shard ``first_missing - 1`` (sequences are windows, batches
    ``batch_size`` consecutive windows); its first row is found in the token parts before it.
    """
    import pyarrow.parquet as pq

    if first_missing == 0:
        return 0, 0, None
    last = pq.read_table(run_dir / fmt.token_part(first_missing - 1), columns=["token_index", "sequence"])
    if last.num_rows < chunk_tokens:
        return -1, -1, (first_missing - 1) * chunk_tokens + last.num_rows
    batch = int(last.column("sequence")[-1].as_py()) // batch_size
    first = None
    for k in range(first_missing - 1, -1, -1):
        t = last if k == first_missing - 1 else pq.read_table(run_dir / fmt.token_part(k),
                                                              columns=["token_index", "sequence"])
        ours = (t.column("sequence").to_numpy() // batch_size) == batch
        if ours.any():
            first = int(t.column("token_index").to_numpy()[ours.argmax()])
        if not ours[0]:
            break
    return batch, first, None


class StepStream:
    """The rows of successive forward passes, appended at a cursor into shard buffers (``pipeline.decoding.RowSink``).

    ``begin(keep, rows, shape)`` before a forward pass (the flat row indices of its hooked tensors to store, their
    token columns and the tensors' ``(rows, positions)``), the recorder's hooks call :meth:`sink`, ``end()`` after
    the pass. Rows that fall into shards
    not ``wanted`` (complete ones) are dropped; a shard is shipped as soon as the cursor has passed its end.
    """

    def __init__(self, run, wanted: set[int], cursor: int, *, statistics=None, progress: ProgressFactory | None = None):
        cfg = run.plan.cfg
        self.run, self.wanted, self.cursor, self.T = run, wanted, cursor, cfg.chunk_tokens
        self.sites, self.dtype = cfg.sites, cfg.dtype
        self.columns = run.manifest.token_columns
        self.on_shard = statistics.for_run(run.run_dir, run.manifest) if statistics is not None else None
        n_layers = len(run.arch.layers)
        most = max(run.plan.decoder.forward_rows(b) for b in batches(run.plan.windows, cfg.batch_size))
        # a forward pass fills at most ceil(most / T) + 1 shards at once (one carried over), as in collect_shards
        self.pool = ShardPool({s: (n_layers, self.T, run.manifest.arrays[s].width) for s in self.sites},
                              fmt.numpy_dtype(cfg.dtype), size=-(-most // self.T) + 1)
        self.writer = Writer(run.run_dir, shard_writes(run.arrays, run.run_dir / fmt.ACTIVATIONS, self.T), self.pool,
                             columns=self.columns)
        self.filling: dict[int, dict[str, np.ndarray]] = {}
        self.rows: dict[int, dict[str, list]] = {}
        self.segments: list[tuple[dict, int, int, int]] = []
        self.keep = None
        self.n_rows = 0
        self.pending: dict[str, np.ndarray] | None = None
        self.advance = progress(f"{run.plan.resolved.name} × {run.plan.corpus.name}", run.manifest.n_tokens,
                                cursor) if progress else None

    def _free_set(self) -> dict[str, np.ndarray]:
        """A free set of shard buffers; while none is, write queued shards here rather than wait."""
        while True:
            try:
                return self.pool.take(block=False)
            except queue.Empty:
                if not self.writer.write_one():
                    return self.pool.take()

    def begin(self, keep, rows: dict[str, np.ndarray], shape: tuple[int, int]) -> None:
        lo, n = self.cursor, len(keep)
        self.keep, self.n_rows, self.pending = keep, n, rows
        self.segments = []
        for k in range(lo // self.T, (lo + n - 1) // self.T + 1) if n else ():
            if k not in self.wanted:
                continue
            if k not in self.filling:
                self.filling[k], self.rows[k] = self._free_set(), {c: [] for c, _ in self.columns}
            first, last = max(lo, k * self.T), min(lo + n, (k + 1) * self.T)
            self.segments.append((k, first - lo, first - k * self.T, last - first))

    def sink(self, site: str, layer: int, t) -> None:
        flat = t.reshape(-1, t.shape[-1])
        if self.segments and self.n_rows != flat.shape[0]:
            flat = flat.index_select(0, self.keep)
        for k, src, dst, n in self.segments:
            encode(flat[src:src + n], self.dtype, where=f"site {site} layer {layer}",
                   out=self.filling[k][site][layer, dst:dst + n])

    def end(self) -> None:
        index = np.arange(self.cursor, self.cursor + self.n_rows, dtype=np.int64)
        for k, src, _, n in self.segments:
            r = self.rows[k]
            r["token_index"].append(index[src:src + n])
            for c, _ in self.columns[1:]:
                r[c].append(self.pending[c][src:src + n])
        self.cursor += self.n_rows
        if self.advance is not None:
            self.advance(sum(seg[3] for seg in self.segments))
        for k in sorted(self.filling):
            if (k + 1) * self.T <= self.cursor:
                self._ship(k, self.T)

    def _ship(self, k: int, n: int) -> None:
        bufs = self.filling.pop(k)
        blocks = {s: bufs[s][:, :n] for s in self.sites}
        typed = token_arrays(self.rows.pop(k), self.columns)
        extra = self.on_shard(k, blocks, typed) if self.on_shard is not None else None
        self.writer.put(ShardJob(k, blocks, typed, bufs, extra))

    def close(self) -> int:
        """Write every queued shard, give arrays and manifest the final token count, write the last shard;
        returns the run's token count."""
        while self.writer.write_one():
            pass
        self.writer.raise_if_failed()
        n_tokens = self.cursor
        _finalize(self.run, n_tokens)
        last = [k for k in self.filling if k * self.T < n_tokens]
        if last:
            (k,) = last
            self.writer.writes = shard_writes(self.run.arrays, self.run.run_dir / fmt.ACTIVATIONS, self.T)
            self._ship(k, n_tokens - k * self.T)
            self.writer.write_one()
        return n_tokens

    def stop(self) -> None:
        self.writer.q.put(None)
        self.writer.join()
        self.writer.raise_if_failed()


def token_arrays(rows: dict[str, list[np.ndarray]], columns: fmt.Columns) -> dict:
    """Accumulated token columns (lists of numpy pieces) as pyarrow arrays of ``columns``' types."""
    import pyarrow as pa

    schema = fmt.arrow_schema(columns)
    return {c: pa.array(np.concatenate(rows[c]) if rows[c] else [], schema.field(c).type) for c, _ in columns}


def _finalize(run, n_tokens: int) -> None:
    """Give the run's arrays and manifest (still ``incomplete``) ``n_tokens`` tokens."""
    m = run.manifest
    specs = {s: fmt.ArraySpec.for_site(m.n_layers, n_tokens, m.chunk_tokens, a.width, a.logical_dtype)
             for s, a in m.arrays.items()}
    act_dir = run.run_dir / fmt.ACTIVATIONS
    if specs != m.arrays:
        reset_arrays(act_dir, specs)
        run.arrays = create_arrays(act_dir, specs)
    run.manifest = dataclasses.replace(m, n_tokens=n_tokens, arrays=specs)
    atomic_write_json(run.run_dir / fmt.MANIFEST, run.manifest.to_dict())


def collect_step_shards(run, wanted: set[int], *, statistics=None, progress: ProgressFactory | None = None):
    """Run the decoder of a generation or diffusion run (``run.plan.decoder``) from where the run resumes and
    write the ``wanted`` shards; ``run.manifest`` gets the run's token count.

    Returns:
        ``pipeline.collect.LoopTimings``.

    Raises:
        ActsparseError: a hook that did not fire once per forward pass, a float16 overflow, a shard not written.
    """
    from actsparse.pipeline.collect import LoopTimings

    p, cfg = run.plan, run.plan.cfg
    timings = LoopTimings()
    first_missing = min(wanted) if wanted else run.manifest.n_parts
    start_batch, cursor, done_tokens = resume_point(run.run_dir, first_missing, cfg.chunk_tokens, cfg.batch_size)
    t_loop = time.perf_counter()
    if done_tokens is not None:
        _finalize(run, done_tokens)
        return timings
    stream = StepStream(run, wanted, cursor, statistics=statistics, progress=progress)
    stream.writer.start()
    gc.freeze()  # as collect_shards: the model's long-lived objects stay out of the cyclic GC's scans
    try:
        with SiteRecorder(run.arch, cfg.sites, stream.sink) as rec:
            sink = _CheckedSink(stream, rec)
            for b, batch in enumerate(batches(p.windows, cfg.batch_size)):
                if b < start_batch:
                    continue
                t0 = time.perf_counter()
                p.decoder.run_batch(run.model, batch, b, sink)
                timings.forward_s += time.perf_counter() - t0
        stream.close()
    finally:
        stream.stop()
        gc.unfreeze()
    timings.loop_s, timings.write_s = time.perf_counter() - t_loop, stream.writer.write_s
    n_parts = run.manifest.n_parts
    missing = sorted((wanted & set(range(n_parts))) - completed_shards(run.run_dir, n_parts))
    if missing:
        raise ActsparseError(f"run {p.run_id}: shard(s) {', '.join(map(str, missing[:5]))} not written; "
                             "run left incomplete")
    return timings


class _CheckedSink:
    """The stream as the decoder sees it, checking that every hook fired once per forward pass
    (docs/pitfalls.md P11)."""

    def __init__(self, stream: StepStream, rec: SiteRecorder):
        self.stream, self.rec = stream, rec

    def begin(self, keep, rows, shape) -> None:
        self.rec.reset_counts()
        self.stream.begin(keep, rows, shape)

    def end(self) -> None:
        self.rec.check_fired(1)
        self.stream.end()
