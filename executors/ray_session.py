"""Reaching Ray: options, the optional import, a fast reachability check, a session (a cluster or a local
instance pinned to 127.0.0.1), the number of workers that fit, and the check that workers see the store.

Traps of Ray 2.60 that this module guards against (docs/pitfalls.md P18):

* ``ray.init(address=HOST:PORT)`` with nothing listening retries for about 14 minutes (shortening its RPC
  settings ends the process instead of raising), so a ``HOST:PORT`` is first checked with a plain TCP connect
  that fails in milliseconds.
* A local instance asked for ``_node_ip_address="127.0.0.1"`` still binds another address and listens on every
  interface unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set before ``import ray``; a driver of a real
  multi-node cluster must not set it (it is only set here for a local instance this process starts).
* Unix socket paths are limited to 108 bytes: a local instance's session directory must be short.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.device import DEVICES

RAY_EXTRA = "pip install 'actsparse[ray]'"
# A local instance: no usage statistics, every service on 127.0.0.1 (read by Ray when it is imported)
LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RayOptions:
    """How to reach Ray and what the workers reserve.

    Attributes:
        address: None starts a local instance for the command (shut down at its end); ``auto`` joins the
            cluster this machine is part of (``ray start``), ``HOST:PORT`` the cluster of that head.
        workers: worker actors / concurrent tasks (default: as many as the cluster's CPUs and GPUs fit).
        cpus_per_worker: CPUs each worker reserves (Ray sets its ``OMP_NUM_THREADS`` to this).
        gpus_per_worker: GPUs each worker reserves (``--gpus-per-worker``).
        device: ``auto`` (cuda when workers reserve GPUs), ``cpu`` or ``cuda``.
        max_restarts: times Ray restarts a worker that died and retries its task.
        num_cpus: CPUs of a local instance (default: this machine's).
        object_store_mb: object store of a local instance (plans and results are small).
        temp_dir: session directory of a local instance (default Ray's, /tmp/ray).
        connect_timeout_s: how long a ``HOST:PORT`` may take to accept a connection.
        start_timeout_s: how long the workers may take to start (they import torch and transformers).
        call_timeout_s: the limit of every other blocking Ray call.
        deadline_s: give up on unfinished work after this long (None: no limit).
        poll_s: how often the driver collects results and progress.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    device: str = "auto"
    max_restarts: int = 2
    num_cpus: int | None = None
    object_store_mb: int = 200
    temp_dir: str | None = None
    connect_timeout_s: float = 5.0
    start_timeout_s: float = 300.0
    call_timeout_s: float = 120.0
    deadline_s: float | None = None
    poll_s: float = 0.5

    def check(self) -> None:
        """Raise ActsparseError on options that cannot work, before Ray is touched."""
        if self.address is not None and self.address != "auto":
            parse_address(self.address)
        if self.workers is not None and self.workers < 1:
            raise ActsparseError(f"--workers must be at least 1 (got {self.workers})")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ActsparseError(f"--gpus-per-worker must be >= 0 (got {self.gpus_per_worker:g})")
        if self.device not in DEVICES:
            raise ActsparseError(f"unknown --device '{self.device}' (choose {', '.join(DEVICES)})")
        if self.device == "cuda" and self.gpus_per_worker <= 0:
            raise ActsparseError("--device cuda on Ray needs --gpus-per-worker > 0 (Ray hides GPUs from workers "
                                 "that reserve none)")

    @property
    def worker_device(self) -> str:
        """The device of every worker (one for all, so that the shards of a run come from the same kernels)."""
        if self.device == "auto":
            return "cuda" if self.gpus_per_worker > 0 else "cpu"
        return self.device


def import_ray(local: bool = False):
    """The ``ray`` module, or a one-line ActsparseError naming the extra to install.

    ``local``: the caller starts a local instance, so Ray is imported with ``LOCAL_ENV`` (where it is not
    imported yet; the environment's own values win).
    """
    if local and "ray" not in sys.modules:
        for k, v in LOCAL_ENV.items():
            os.environ.setdefault(k, v)
    try:
        import ray
    except ImportError:
        raise ActsparseError(f"--executor ray needs Ray, an optional extra: {RAY_EXTRA}") from None
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (IPv6 hosts in brackets).

    Raises:
        ActsparseError: not ``auto`` nor ``HOST:PORT`` with a port in 1..65535.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ActsparseError(f"--address must be auto or HOST:PORT, got '{address}'")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast where nothing listens at ``HOST:PORT`` (``ray.init`` would retry for minutes).

    Raises:
        ActsparseError: a malformed address, a refused or timed-out connection, an unknown host.
    """
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except TimeoutError:
        raise ActsparseError(f"no Ray cluster at {address}: no answer within {timeout_s:g} s") from None
    except OSError as e:
        raise ActsparseError(f"no Ray cluster at {address}: {e.strerror or e}") from None


@contextlib.contextmanager
def ray_session(opts: RayOptions) -> Iterator[object]:
    """Ray, connected for the duration of the block: to ``opts.address``, or to a local instance started
    for it (127.0.0.1 only, no dashboard, no usage statistics; shut down on exit). A session this process
    already holds (``ray.init`` called by the caller) is used as it is and left running.

    Raises:
        ActsparseError: Ray is not installed, the address is unreachable, or Ray fails to start.
    """
    opts.check()
    local = opts.address is None
    ray = import_ray(local)
    if ray.is_initialized():
        yield ray
        return
    if not local and opts.address != "auto":
        check_reachable(opts.address, opts.connect_timeout_s)
    import logging

    # the workers' output and Ray's own notices stay in its session logs: a command prints what it did
    kw: dict = dict(log_to_driver=False, logging_level=logging.ERROR)
    if local:
        # "local": a new instance, whatever RAY_ADDRESS or a cluster started on this machine say
        kw.update(address="local", num_cpus=opts.num_cpus or os.cpu_count(), include_dashboard=False,
                  _node_ip_address="127.0.0.1", object_store_memory=opts.object_store_mb * 2**20)
        if opts.temp_dir:
            kw["_temp_dir"] = opts.temp_dir
    else:
        kw["address"] = opts.address
    try:
        ray.init(**kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "start a local Ray instance" if local else f"connect to Ray at {opts.address}"
        raise ActsparseError(f"cannot {where}: {first}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def n_workers(ray, opts: RayOptions) -> int:
    """``opts.workers``, or as many workers as the cluster's CPUs and GPUs fit.

    Raises:
        ActsparseError: the workers asked for do not fit the cluster.
    """
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    fit = int(cpus // opts.cpus_per_worker)
    if opts.gpus_per_worker:
        fit = min(fit, int(gpus // opts.gpus_per_worker))
    n = opts.workers or fit
    if n < 1 or n > fit:
        raise ActsparseError(f"{n} worker(s) of {opts.cpus_per_worker:g} CPU and {opts.gpus_per_worker:g} GPU do not "
                             f"fit the cluster ({cpus:g} CPUs, {gpus:g} GPUs)")
    return n


def reason(e: BaseException) -> str:
    """A one-line reason for a failed Ray task: the ActsparseError it raised, or the cause's first line."""
    ray = import_ray()
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = e.cause if e.cause is not None else e
        if isinstance(cause, ActsparseError):
            return str(cause)
        return f"{type(cause).__name__}: {_first_line(cause)}"
    if isinstance(e, ray.exceptions.RayActorError):
        return f"worker died and was not recovered ({_first_line(e)})"
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- the shared-store check


def probe_seen(probe: str, token: str) -> bool:
    """True when the file ``probe`` exists here and holds ``token`` (run on a worker)."""
    try:
        return Path(probe).read_text() == token
    except OSError:
        return False


@contextlib.contextmanager
def store_probe(store: str | Path) -> Iterator[tuple[str, str]]:
    """A file with a random token at the store's root for the duration of the block: ``(path, token)``."""
    token = uuid.uuid4().hex
    path = Path(store).expanduser().resolve() / fmt.visibility_probe(token)
    try:
        path.write_text(token)
    except OSError as e:
        from actsparse.core.files import disk_error

        raise disk_error(e, f"writing into the store {store}") from e
    try:
        yield str(path), token
    finally:
        path.unlink(missing_ok=True)


def check_shared_store(ray, store: str | Path, workers: dict, timeout_s: float) -> None:
    """Every worker must see the store the driver sees (one filesystem every node mounts). A node-local path
    fails here, before any work, with the workers that do not see it.

    Args:
        workers: ``{actor handle: "host:pid"}``; each actor has ``sees(probe, token)``.

    Raises:
        ActsparseError: naming the workers that do not see the store.
    """
    with store_probe(store) as (probe, token):
        seen = ray.get([a.sees.remote(probe, token) for a in workers], timeout=timeout_s)
    blind = [name for name, ok in zip(workers.values(), seen) if not ok]
    if blind:
        raise ActsparseError(f"store {store} is not visible from Ray worker(s) {', '.join(blind)}: --executor ray "
                             "needs a store on a filesystem every node mounts at the same path (see README, "
                             "Running on a cluster)")
