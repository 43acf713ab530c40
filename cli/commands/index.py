"""CLI command ``index``: compute per-token statistics for runs collected before they existed."""

from __future__ import annotations

import typer

from actsparse.cli.options import (
    AddressOption,
    ExecutorOption,
    RunsOption,
    WorkersOption,
    executor_maps,
    ray_options,
)
from actsparse.cli.output import say


def index(store: str = typer.Argument(..., help="local store directory"), run: RunsOption = None,
          executor: ExecutorOption = "local", address: AddressOption = None, workers: WorkersOption = None) -> None:
    """Write the token_stats parts that complete runs lack (idempotent; new runs get them while collecting).

    ``--executor ray`` writes them in Ray tasks, one per run and missing shard (the same parts).
    """
    from actsparse.analyze.token_stats import index_store

    opts = ray_options(executor, address, workers)
    with executor_maps(opts) as maps:
        done = index_store(store, run, log=say, map_parts=maps.parts if maps is not None else None)
    say(f"indexed {len(done)} run(s), {sum(done.values())} part(s) written")


def register(app: typer.Typer) -> None:
    """Add ``index`` to the ``actsparse`` app."""
    app.command("index")(index)
