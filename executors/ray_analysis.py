"""Analysis on a Ray cluster: ``actsparse curves ... --executor ray`` (one task per layer) and ``actsparse index
... --executor ray`` (one task per run and missing shard).

Both plug into the local code as its map (``compute_curves(map_layers=...)``, ``index_store(map_parts=...)``):
validation, caching, locks, checksums and the assembly of the result stay where they are, and the tasks run
the same per-layer and per-shard functions (``layer_rows``, ``index_part``), so the Parquet written is the one
the local executor writes. Ray Data's Zarr reader is Zarr v2 only; the tasks read through actsparse's own
reader.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from actsparse.analyze.curves.compute import Rows, layer_rows
from actsparse.analyze.curves.config import CurveConfig
from actsparse.analyze.token_stats import Part, index_part
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.executors.ray_session import RayOptions, n_workers, ray_session, reason


def traced(fn, *args) -> tuple[str, object]:
    """``fn(*args)`` in a Ray task, with the ``host:pid`` of the process that ran it."""
    return f"{platform.node()}:{os.getpid()}", fn(*args)


def index_task(store: str, run_id: str, k: int, sites: list[str]) -> list[str]:
    """One Ray task of ``index``: the statistics parts of shard ``k`` of a run (the driver holds its lock)."""
    from actsparse.pipeline.reader import StoreReader

    run = StoreReader(store).run(run_id)
    return index_part(run, Path(store) / fmt.run_path(run_id), k, sites)


class RayMaps(contextlib.AbstractContextManager):
    """The maps of ``compute_curves`` and ``index_store`` on Ray, for the duration of a ``with`` block.

    Ray is reached (or a local instance started) on the first call only, so a result served from the store's
    cache, or an index with nothing missing, never starts it; it is shut down when the block ends.
    """

    def __init__(self, opts: RayOptions):
        opts.check()
        self.opts = opts
        self._stack = contextlib.ExitStack()
        self._ray = None
        self._n = 0
        self.workers: set[str] = set()  # "host:pid" of the processes that ran tasks

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def layers(self, store: str, run_id: str, cfg: CurveConfig, layers: list[int],
               layer_done: Callable[[], None] | None) -> Rows:
        """``actsparse.analyze.curves.compute.LayerMap``: one task per layer."""
        rows: Rows = {}

        def done(_, result) -> None:
            rows.update(result)
            if layer_done is not None:
                layer_done()

        self._gather(layer_rows, [(store, run_id, cfg, layer) for layer in layers], done,
                     f"curves of run {run_id}")
        return rows

    def parts(self, store: str, parts: list[Part]) -> list[list[str]]:
        """``actsparse.analyze.token_stats.PartMap``: one task per run and missing shard."""
        written: list[list[str]] = [[] for _ in parts]

        def done(i, result) -> None:
            written[i] = result

        self._gather(index_task, [(store, *part) for part in parts], done, "index")
        return written

    def _session(self):
        if self._ray is None:
            self._ray = self._stack.enter_context(ray_session(self.opts))
            self._n = n_workers(self._ray, self.opts)
        return self._ray

    def _gather(self, fn, calls: Sequence[tuple], done: Callable[[int, object], None], what: str) -> None:
        """``fn(*call)`` for every call as Ray tasks, at most one per worker at a time; ``done(i, result)`` as
        each finishes (any order).

        Raises:
            ActsparseError: a task that failed (its one-line reason), or the deadline passed.
        """
        if not calls:
            return
        ray, opts = self._session(), self.opts
        task = ray.remote(num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker,
                          max_retries=opts.max_restarts)(traced)
        deadline = None if opts.deadline_s is None else time.monotonic() + opts.deadline_s
        queue = list(enumerate(calls))
        inflight: dict = {}
        while queue or inflight:
            while queue and len(inflight) < self._n:
                i, call = queue.pop(0)
                inflight[task.remote(fn, *call)] = i
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=opts.poll_s)
            for ref in ready:
                i = inflight.pop(ref)
                try:
                    worker, result = ray.get(ref, timeout=opts.call_timeout_s)
                except ray.exceptions.RayError as e:
                    for other in inflight:
                        ray.cancel(other, force=True)
                    raise ActsparseError(f"{what}: {reason(e)}") from None
                self.workers.add(worker)
                done(i, result)
            if deadline is not None and time.monotonic() > deadline:
                raise ActsparseError(f"{what}: not finished within the deadline of {opts.deadline_s:g} s")
