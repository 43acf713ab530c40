"""Collection on a Ray cluster: ``actsparse collect --config jobs.toml --executor ray``.

The driver (this process) plans every job (``actsparse.pipeline.collect.plan``: run ids and windows, no model),
skips complete runs, holds the writer lock of every run it collects, and hands work to ``N`` worker actors
(``actsparse.executors.ray_worker.CollectWorker``):

* a *prepare* task per run (weights, arrays, manifest ``incomplete``, documents), then
* *piece* tasks: whole-shard ranges of the run's missing shards, each written by exactly one worker
  (docs/pitfalls.md P7). A run is cut into ``ceil(N / runs)`` pieces (at most one per shard), so one large run
  keeps every worker busy while many runs are not cut at all. Every worker forms the batches of the whole run
  as one process would, so a split run has the bytes of an uninterrupted one
  (``actsparse.pipeline.collect.collect_shards``).
* Once a run's last piece is back the driver finishes it, once: checksums, manifest ``complete``, catalogue.

An idle worker gets work of the model it holds first, then of a model no worker holds, so each worker loads as
few models as it can. A worker that dies (killed, out of memory) is restarted by Ray and its task retried; the
retried piece skips the shards whose token part exists. A job whose task raises fails alone, with its one-line
reason; the others go on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.files import disk_error, exclusive_lock
from actsparse.executors.jobs import JobReport, matrix_rows, matrix_title
from actsparse.executors.ray_session import (
    RayOptions,
    check_reachable,
    check_shared_store,
    import_ray,
    n_workers,
    ray_session,
    reason,
)
from actsparse.executors.ray_worker import CollectWorker, PieceDone, ProgressBoard
from actsparse.pipeline.collect import (
    CollectConfig,
    Plan,
    ShardStatistics,
    finish_run,
    opened_for_finish,
    plan,
    read_manifest,
)
from actsparse.pipeline.resume import completed_shards, verified_shards
from actsparse.pipeline.store_root import create_store

# show(rows, title): a live view of the job matrix (``actsparse.cli.output.live_table``)
View = Callable[[list[dict], str], None]
RATE_WINDOW_S = 10.0  # tokens per second are averaged over this many seconds


@dataclass
class _Run:
    job: JobReport
    plan: Plan
    ref: object  # the plan in Ray's object store, shipped once to every task of the run
    key: tuple  # what a worker must have loaded to run it
    lock: contextlib.ExitStack
    missing: list[int]
    pieces: list[list[int]] = field(default_factory=list)
    state: str = "new"  # new | preparing | ready
    running: int = 0  # its prepare and piece tasks in flight: its lock is held until none is
    done: list[PieceDone] = field(default_factory=list)
    t0: float = 0.0


def split_shards(shards: Sequence[int], n_pieces: int) -> list[list[int]]:
    """``shards`` cut into ``min(n_pieces, len(shards))`` contiguous, near-equal pieces (none when empty)."""
    n = min(n_pieces, len(shards))
    bounds = [round(i * len(shards) / n) for i in range(n + 1)] if n else []
    return [list(shards[bounds[i]:bounds[i + 1]]) for i in range(n)]


def run_batch(configs: Sequence[CollectConfig], store: str | Path, opts: RayOptions = RayOptions(), *,
              statistics: ShardStatistics | None = None, view: View | None = None,
              log: Callable[[str], None] = print) -> list[JobReport]:
    """Collect every config into ``store`` on Ray workers; complete runs are skipped.

    Args:
        configs: the jobs (``actsparse.pipeline.jobs.load_jobs``).
        store: a store path every node of the cluster mounts.
        opts: how to reach Ray and what the workers reserve.
        statistics: the per-shard statistics the workers write (as ``collect``'s).
        view: called about twice a second with the job matrix (rows and a title line).
        log: where one-line messages go.

    Returns:
        One :class:`JobReport` per config, in order: ``done``, ``skipped`` or ``failed`` (with ``reason``).

    Raises:
        ActsparseError: Ray missing or unreachable, workers that do not fit, do not start or do not see the store.
    """
    t_batch = time.perf_counter()
    opts.check()
    import_ray(local=opts.address is None)  # without the extra, or with a dead address: before the store exists
    if opts.address not in (None, "auto"):
        check_reachable(opts.address, opts.connect_timeout_s)
    device = opts.worker_device
    try:
        paths = create_store(store)
    except OSError as e:
        raise disk_error(e, f"creating the store {store}") from e
    jobs = [JobReport(i, cfg) for i, cfg in enumerate(configs, 1)]
    # plan (tokenize, hash, lock) on a thread while Ray and the workers start: both take seconds
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="actsparse-plan") as pool:
        planned = pool.submit(_plan_jobs, jobs, paths, device, statistics is not None, log)
        try:
            with ray_session(opts) as ray:
                n = n_workers(ray, opts)
                board_name = f"actsparse-progress-{uuid.uuid4().hex}"
                board = ray.remote(num_cpus=0)(ProgressBoard).options(name=board_name).remote()
                actor = ray.remote(num_cpus=opts.cpus_per_worker, num_gpus=opts.gpus_per_worker,
                                   max_restarts=opts.max_restarts, max_task_retries=opts.max_restarts)(CollectWorker)
                actors = [actor.remote(str(paths.root.resolve()), device, statistics, board_name) for _ in range(n)]
                try:
                    runs = planned.result()
                    if runs:
                        names = _start(ray, actors, opts.start_timeout_s)
                        log(f"{n} Ray worker(s) ready: {', '.join(names)}")
                        workers = dict(zip(actors, names))
                        check_shared_store(ray, paths.root, workers, opts.call_timeout_s)
                        for r in runs:
                            r.ref = ray.put(r.plan)
                            r.pieces = split_shards(r.missing, math.ceil(n / len(runs)))
                        _Scheduler(ray, paths, runs, workers, board, opts, view, log, t_batch).loop()
                finally:
                    for a in (*actors, board):
                        ray.kill(a, no_restart=True)
        finally:
            concurrent.futures.wait([planned])
            if planned.exception() is None:
                for r in planned.result():
                    r.lock.close()
    return jobs


def _plan_jobs(jobs: list[JobReport], paths: fmt.StorePaths, device: str, with_stats: bool,
               log: Callable[[str], None]) -> list[_Run]:
    """Plan every job and take the writer lock of each run to collect; a job that cannot be planned fails
    alone, a complete run (or a second job of the same run) is skipped. A resumed run keeps only the shards
    that match their records (``pipeline.resume.verified_shards``, as a local collection does)."""
    runs: list[_Run] = []
    for job in jobs:
        try:
            p = plan(job.cfg, device=device)
            if p.decoder is not None:
                raise ActsparseError("generation and diffusion runs are collected by --executor local")
            job.run_id, job.n_tokens = p.run_id, p.n_tokens
            twin = next((r.job.index for r in runs if r.plan.run_id == p.run_id), None)
            if twin is not None:
                job.status, job.reason = "skipped", f"the same run as job {twin}"
                continue
            run_dir = paths.run_dir(p.run_id)
            if _complete(run_dir):
                job.status, job.reason, job.tokens_done = "skipped", "already complete", p.n_tokens
                continue
            lock = contextlib.ExitStack()
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                lock.enter_context(exclusive_lock(run_dir / fmt.LOCK, f"run {p.run_id}"))
            except OSError as e:
                raise disk_error(e, f"creating run {p.run_id}") from e
            n_parts = fmt.n_parts(p.n_tokens, p.cfg.chunk_tokens)
            existing = _manifest(run_dir)
            done = (completed_shards(run_dir, n_parts) if existing is None or existing.n_parts != n_parts
                    else verified_shards(run_dir, existing, with_stats=with_stats, log=log))
            missing = sorted(set(range(n_parts)) - done)
            job.tokens_done = p.n_tokens - sum(min(p.cfg.chunk_tokens, p.n_tokens - k * p.cfg.chunk_tokens)
                                               for k in missing)
            key = (p.resolved.weights_sha256, p.cfg.compute_dtype, p.cfg.trust_remote_code, p.device)
            runs.append(_Run(job, p, None, key, lock, missing))
        except ActsparseError as e:
            job.status, job.reason = "failed", str(e)
    return runs


def _manifest(run_dir: Path) -> fmt.Manifest | None:
    """The run's manifest, or None when there is none or it is damaged (its preparation rewrites it)."""
    try:
        return read_manifest(run_dir)
    except ActsparseError:
        return None


def _complete(run_dir: Path) -> bool:
    m = _manifest(run_dir)
    return m is not None and m.complete


def _start(ray, actors: list, timeout_s: float) -> list[str]:
    """``host:pid`` of every worker once started (they import torch and transformers).

    Raises:
        ActsparseError: a worker failed to start, or not all started within ``timeout_s``.
    """
    refs = [a.whoami.remote() for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        raise ActsparseError(f"only {len(ready)} of {len(refs)} Ray worker(s) started within {timeout_s:g} s")
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.RayError as e:
        raise ActsparseError(f"a Ray worker failed to start: {reason(e)}") from None


class _Scheduler:
    """The driver's loop: hand out tasks, collect results and progress, finish each run once."""

    def __init__(self, ray, paths: fmt.StorePaths, runs: list[_Run], workers: dict, board, opts: RayOptions,
                 view: View | None, log: Callable[[str], None], t_batch: float):
        self.ray, self.paths, self.runs, self.board, self.opts = ray, paths, runs, board, opts
        self.view, self.log = view, log
        self.names = workers  # actor -> "host:pid" at start (a restarted worker has another pid)
        self.idle = list(workers)
        self.holds: dict = {}  # actor -> model key loaded (or loading)
        self.inflight: dict = {}  # ref -> (actor, run, kind)
        self.t_batch = t_batch
        self.by_index = {r.job.index: r.job for r in runs}
        self.events: list[tuple[str, int, float]] = []  # (worker, tokens, time) of the last RATE_WINDOW_S

    def loop(self) -> None:
        while self._dispatch() or self.inflight:
            if not self.inflight and not self.idle:
                self._give_up("no Ray worker left (every worker died)")
                break
            if self.opts.deadline_s is not None and time.perf_counter() - self.t_batch > self.opts.deadline_s:
                self._give_up(f"not finished within the deadline of {self.opts.deadline_s:g} s")
                break
            done, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=self.opts.poll_s)
            for ref in done:
                self._collect(ref)
            self._progress()
        self._progress()

    def _pick(self, actor):
        """The next task of an idle ``actor``: ``(run, kind)`` or None."""
        held = set(self.holds.values())
        best, best_score = None, None
        for r in self.runs:
            if r.job.status != "running" and r.job.status != "pending":
                continue
            if r.state == "new":
                item = (r, "prepare")
            elif r.state == "ready" and r.pieces:
                item = (r, "piece")
            else:
                continue
            score = 0 if self.holds.get(actor) == r.key else (1 if r.key not in held else 2)
            if best_score is None or score < best_score:
                best, best_score = item, score
        if best is None:  # nothing runnable now: load the model of a run being prepared
            for r in self.runs:
                if r.state == "preparing" and r.pieces and self.holds.get(actor) != r.key:
                    return r, "warm"
        return best

    def _dispatch(self) -> bool:
        """Give every idle worker a task; True while any job is unfinished."""
        for actor in list(self.idle):
            item = self._pick(actor)
            if item is None:
                continue
            r, kind = item
            if kind == "prepare":
                ref, r.state = actor.prepare.remote(r.ref), "preparing"
                r.t0 = r.t0 or time.perf_counter()
                r.job.status = "running"
            elif kind == "piece":
                ref = actor.piece.remote(r.ref, r.pieces.pop(0), r.job.index)
            else:
                ref = actor.warm.remote(r.ref)
            r.running += kind != "warm"
            self.holds[actor] = r.key
            if kind != "warm":
                r.job.running_on.add(self.names[actor])
            self.idle.remove(actor)
            self.inflight[ref] = (actor, r, kind)
        return any(r.job.status in ("pending", "running") for r in self.runs)

    def _collect(self, ref) -> None:
        actor, r, kind = self.inflight.pop(ref)
        r.job.running_on.discard(self.names[actor])
        r.running -= kind != "warm"
        try:
            result = self.ray.get(ref, timeout=self.opts.call_timeout_s)
        except self.ray.exceptions.RayError as e:
            if isinstance(e, self.ray.exceptions.RayActorError):
                self.holds.pop(actor, None)  # dead for good (its restarts are spent): not used again
            else:
                self.idle.append(actor)
            if kind != "warm":
                self._fail(r, reason(e))
            return
        finally:
            if r.job.status == "failed" and not r.running:
                r.lock.close()  # the failed run's last task is back: nothing writes it any more
        self.idle.append(actor)
        if kind == "prepare":
            r.state = "ready"
            if not r.missing:  # every shard was written before: only the finish is left
                self._finish(r)
        elif kind == "piece":
            r.done.append(result)
            r.job.workers.add(result.worker)
            r.job.pieces.append((result.worker, list(result.shards)))
            if not r.pieces and not r.running and r.job.status == "running":
                self._finish(r)

    def _finish(self, r: _Run) -> None:
        elapsed = time.perf_counter() - r.t0
        done = r.done
        stats = dict(elapsed_s=round(elapsed, 3), forward_s=round(sum(d.forward_s for d in done), 3),
                     loop_s=round(sum(d.loop_s for d in done), 3), write_s=round(sum(d.write_s for d in done), 3),
                     tokens_per_s=round(sum(d.tokens for d in done) / max(elapsed, 1e-9), 1),
                     workers=sorted({d.worker for d in done if d.shards}))
        try:
            finish_run(opened_for_finish(r.plan, self.paths), stats)
        except ActsparseError as e:
            self._fail(r, str(e))
            return
        except OSError as e:
            self._fail(r, str(disk_error(e, f"finishing run {r.plan.run_id}")))
            return
        r.job.status, r.job.elapsed_s, r.job.tokens_done = "done", elapsed, r.job.n_tokens
        r.lock.close()
        self.log(f"[{r.job.index}] {r.job.label}: run {r.plan.run_id} complete ({r.job.n_tokens} tokens in "
                 f"{elapsed:.1f} s; workers {', '.join(sorted(r.job.workers)) or '-'})")

    def _fail(self, r: _Run, why: str) -> None:
        if r.job.status == "failed":
            return
        r.job.status, r.job.reason = "failed", why
        r.job.elapsed_s = time.perf_counter() - r.t0 if r.t0 else 0.0
        r.pieces = []
        if not r.running:
            r.lock.close()
        self.log(f"[{r.job.index}] {r.job.label}: failed: {why}")

    def _give_up(self, why: str) -> None:
        for r in self.runs:
            if r.job.status in ("pending", "running"):
                self._fail(r, why)

    def _progress(self) -> None:
        try:
            events = self.ray.get(self.board.drain.remote(), timeout=self.opts.call_timeout_s)
        except self.ray.exceptions.RayError:
            events = []
        for job, worker, tokens, t in events:
            rep = self.by_index[job]
            rep.tokens_done = min(rep.n_tokens, rep.tokens_done + tokens)
            self.events.append((worker, tokens, t))
        now = time.time()
        self.events = [e for e in self.events if now - e[2] < RATE_WINDOW_S]
        if self.view is not None:
            rates: dict[str, float] = {}
            for worker, tokens, _ in self.events:
                rates[worker] = rates.get(worker, 0.0) + tokens / RATE_WINDOW_S
            jobs = [r.job for r in self.runs]
            self.view(matrix_rows(jobs, rates), matrix_title(jobs, rates, time.perf_counter() - self.t_batch))
