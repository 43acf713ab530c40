"""Options shared by several commands (one definition each, so that their names and help agree)."""

from __future__ import annotations

from typing import Annotated

import typer

from actsparse.core.errors import ActsparseError

RunsOption = Annotated[list[str] | None, typer.Option(
    "--run", "-r", help="a run id or unique prefix (repeatable; default: every complete run)")]
RunOption = Annotated[str | None, typer.Option("--run", "-r", help="run id or prefix (default: the only run)")]
ThreadsOption = Annotated[int | None, typer.Option(help="torch threads (default: all cores)")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or messages")]


def set_threads(n: int | None) -> None:
    """Set torch's thread count from ``--threads``.

    Raises:
        ActsparseError: a count below 1.
    """
    if n is not None:
        if n < 1:
            raise ActsparseError(f"--threads must be positive (got {n})")
        import torch

        torch.set_num_threads(n)


ExecutorOption = Annotated[str, typer.Option(
    "--executor", help="local (this process, job after job) | ray (a Ray cluster; README: Running on a cluster)")]
AddressOption = Annotated[str | None, typer.Option(
    "--address", help="with --executor ray: auto (the cluster this machine joined) | HOST:PORT of its head "
                      "(default: a local Ray instance for this command)")]
WorkersOption = Annotated[int | None, typer.Option(
    "--workers", help="with --executor ray: worker processes (default: as many as the cluster's CPUs fit)")]
GpusPerWorkerOption = Annotated[float | None, typer.Option(
    "--gpus-per-worker", help="with --executor ray: GPUs each worker reserves (default 0)")]
DeviceOption = Annotated[str, typer.Option(
    "--device", help="auto | cpu | cuda: where the forward pass runs (auto: cuda where torch sees a GPU; with "
                     "--executor ray, where workers reserve GPUs)")]


def ray_options(executor: str, address: str | None = None, workers: int | None = None,
                gpus_per_worker: float | None = None, device: str = "auto"):
    """The ``actsparse.executors.ray_session.RayOptions`` of ``--executor ray``, or None for ``local``.

    Raises:
        ActsparseError: an unknown executor, or a Ray option given with ``--executor local`` (never ignored).
    """
    from actsparse.executors.ray_session import EXECUTORS, RayOptions

    if executor not in EXECUTORS:
        raise ActsparseError(f"unknown --executor '{executor}' (choose {' or '.join(EXECUTORS)})")
    if executor == "local":
        given = [name for name, v in (("--address", address), ("--workers", workers),
                                      ("--gpus-per-worker", gpus_per_worker)) if v is not None]
        if given:
            raise ActsparseError(f"{', '.join(given)} only apply to --executor ray")
        return None
    from actsparse.executors.ray_session import check_reachable, import_ray

    opts = RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker or 0, device=device)
    opts.check()
    import_ray(local=address is None)  # without the extra, or where nothing listens: one line, before any work
    if address not in (None, "auto"):
        check_reachable(address, opts.connect_timeout_s)
    return opts


def executor_maps(opts):
    """A context holding the Ray maps of the analysis (``actsparse.executors.ray_analysis.RayMaps``) for
    ``--executor ray``, or None for ``local``."""
    import contextlib

    if opts is None:
        return contextlib.nullcontext()
    from actsparse.executors.ray_analysis import RayMaps

    return RayMaps(opts)
