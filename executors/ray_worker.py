"""The Ray actors of collection: a worker that prepares runs and writes their shards, keeping its model loaded
for the next run of the same model, and a board that gathers the workers' progress for the driver's view.

These classes are plain Python; the driver turns them into actors (``ray.remote(...)(CollectWorker)``), so this
module imports Ray only where a worker looks up the board.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.arrays import single_threaded_blosc
from actsparse.pipeline.collect import Plan, ShardStatistics, collect_shards, ensure_prepared
from actsparse.pipeline.device import resolve_device, to_device
from actsparse.pipeline.models import load_model, resolve_model
from actsparse.pipeline.resume import completed_shards


@dataclass(frozen=True)
class PieceDone:
    """What one piece of a run did on a worker: the shards it wrote (those of the piece not yet complete when it
    started), its tokens, its timings, and who wrote them (``host:pid``)."""

    worker: str
    shards: tuple[int, ...]
    tokens: int
    forward_s: float
    loop_s: float
    write_s: float


class CollectWorker:
    """Prepares runs and writes whole shards of them; one model stays loaded between tasks.

    Args:
        store: the store root, as every node mounts it.
        device: ``cpu`` or ``cuda`` (the driver decides one for every worker).
        statistics: the per-shard statistics collection writes (``actsparse.pipeline.collect.ShardStatistics``).
        board: the name of a :class:`ProgressBoard` actor to report tokens to (fire and forget), or None. A name,
            not a handle: Ray cannot restart an actor whose constructor took a handle once that is out of scope
            (ray-project/ray#53727).
    """

    def __init__(self, store: str, device: str, statistics: ShardStatistics | None, board: str | None = None):
        self.paths = fmt.StorePaths(Path(store))
        self.device = resolve_device(device)
        self.statistics, self.board = statistics, None
        if board is not None:
            import ray

            self.board = ray.get_actor(board)
        self.name = f"{platform.node()}:{os.getpid()}"
        self._key: tuple | None = None
        self._model = None
        self._plans: dict[str, Plan] = {}
        self._runs: dict[str, object] = {}
        # compile (or load from numba's cache) the statistics kernel while the first model loads
        self._warm = threading.Thread(target=statistics.warm_up, daemon=True) if statistics is not None else None
        if self._warm is not None:
            self._warm.start()

    def whoami(self) -> str:
        """``host:pid`` of this worker process."""
        return self.name

    def sees(self, probe: str, token: str) -> bool:
        """Whether the store file ``probe`` holds ``token`` here (the shared-store check)."""
        from actsparse.executors.ray_session import probe_seen

        return probe_seen(probe, token)

    def warm(self, p: Plan) -> str:
        """Load the plan's model (while another worker prepares its run)."""
        self._load(self._local(p))
        return self.name

    def prepare(self, p: Plan) -> str:
        """Prepare the run (weights, arrays, manifest ``incomplete``, documents); idempotent."""
        with single_threaded_blosc():
            self._prepared(p)
        return self.name

    def piece(self, p: Plan, shards: list[int], job: int) -> PieceDone:
        """Write those of ``shards`` that are not complete yet, reporting tokens as job ``job``.

        A retried piece (this worker died and Ray restarted it) skips the shards written before the crash, so
        the run resumes where it stopped, with the bytes of an uninterrupted run.

        Raises:
            ActsparseError: as ``actsparse.pipeline.collect.collect_shards``.
        """
        board, name = self.board, self.name

        def progress(description: str, total: int, completed: int = 0):
            return (lambda n: board.add.remote(job, name, n)) if board is not None else (lambda n: None)

        with single_threaded_blosc():
            run = self._prepared(p)
            wanted = set(shards) - completed_shards(run.run_dir, run.manifest.n_parts)
            if self._warm is not None:
                self._warm.join()
            t = collect_shards(run, wanted, statistics=self.statistics, progress=progress)
        T, n = p.cfg.chunk_tokens, p.n_tokens
        return PieceDone(self.name, tuple(sorted(wanted)), sum(min(T, n - k * T) for k in wanted),
                         t.forward_s, t.loop_s, t.write_s)

    # ---------------------------------------------------------------- state kept between tasks

    def _local(self, p: Plan) -> Plan:
        """The plan with the model resolved on this node (its own cache of converted checkpoints), checked to
        be the model and libraries the driver planned with: otherwise the run id would describe other bytes.

        Raises:
            ActsparseError: other weights, or other torch/transformers versions, than the driver's.
        """
        if p.run_id in self._plans:
            return self._plans[p.run_id]
        import torch
        import transformers

        resolved = resolve_model(p.cfg.model, trust_remote_code=p.cfg.trust_remote_code)
        if resolved.weights_sha256 != p.resolved.weights_sha256:
            raise ActsparseError(f"model {p.cfg.model} on {self.name} has other weights (sha256 "
                                 f"{resolved.weights_sha256[:12]}) than on the driver "
                                 f"({p.resolved.weights_sha256[:12]})")
        for lib, version in (("torch", torch.__version__), ("transformers", transformers.__version__)):
            if p.identity[lib] != version:
                raise ActsparseError(f"{lib} {version} on {self.name} differs from the driver's {p.identity[lib]}")
        local = self._plans[p.run_id] = dataclasses.replace(p, resolved=resolved)
        return local

    def _load(self, p: Plan):
        """The plan's model, loaded once and kept until a run of another model (or dtype, or device) comes."""
        key = (p.resolved.weights_sha256, p.cfg.compute_dtype, p.cfg.trust_remote_code, p.device)
        if key != self._key:
            # the runs of the previous model are not needed again (their plans hold every token window)
            self._key, self._model, self._runs = None, None, {}
            self._plans = {p.run_id: p}
            gc.collect()  # free the previous model before loading the next
            if self.device == "cuda":
                import torch

                torch.cuda.empty_cache()
            self._model = to_device(load_model(p.resolved, p.cfg.compute_dtype), p.device)
            self._key = key
        return self._model

    def _prepared(self, p: Plan):
        """The run prepared (by this worker or another) and opened here, once per run and process."""
        if p.device != self.device:
            raise ActsparseError(f"run {p.run_id} is planned for {p.device}; worker {self.name} runs on {self.device}")
        local = self._local(p)
        if p.run_id not in self._runs:
            model = self._load(local)
            self._runs[p.run_id] = ensure_prepared(local, self.paths, model=model)
        return self._runs[p.run_id]


class ProgressBoard:
    """Gathers ``(job, worker, tokens, time)`` events from the workers for the driver's live view."""

    def __init__(self):
        self.events: list[tuple[int, str, int, float]] = []

    def add(self, job: int, worker: str, tokens: int) -> None:
        self.events.append((job, worker, tokens, time.time()))

    def drain(self) -> list[tuple[int, str, int, float]]:
        events, self.events = self.events, []
        return events
