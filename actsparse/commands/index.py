"""CLI command ``index``: compute per-token statistics for runs collected before they existed."""

from __future__ import annotations

from typing import Optional

import typer


def index(
    store: str = typer.Argument(..., help="local store directory"),
    run: Optional[list[str]] = typer.Option(None, "--run", "-r",
                                            help="a run id or unique prefix (repeatable; default: every complete run)"),
) -> None:
    """Write the token_stats parts that complete runs lack (idempotent; new runs get them while collecting)."""
    from analyze.token_stats import index_store

    done = index_store(store, run, log=typer.echo)
    typer.echo(f"indexed {len(done)} run(s), {sum(done.values())} part(s) written")


def register(app: typer.Typer) -> None:
    """Add ``index`` to the ``actsparse`` app."""
    app.command("index")(index)
