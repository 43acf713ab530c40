"""CLI command ``index``: compute per-token statistics for runs collected before they existed."""

from __future__ import annotations

import typer

from actsparse.cli.options import RunsOption
from actsparse.cli.output import say


def index(store: str = typer.Argument(..., help="local store directory"), run: RunsOption = None) -> None:
    """Write the token_stats parts that complete runs lack (idempotent; new runs get them while collecting)."""
    from actsparse.analyze.token_stats import index_store

    done = index_store(store, run, log=say)
    say(f"indexed {len(done)} run(s), {sum(done.values())} part(s) written")


def register(app: typer.Typer) -> None:
    """Add ``index`` to the ``actsparse`` app."""
    app.command("index")(index)
