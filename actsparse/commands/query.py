"""CLI command ``query``: list and run the named queries of ``queries/*.sql``."""

from __future__ import annotations

from typing import Optional

import typer

from actsparse.commands.sql import (FormatOption, MaxRowsOption, MemoryOption, OutOption, ThreadsOption, emit,
                                    open_store)
from actsparse.errors import ActsparseError


def _params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ActsparseError(f"--param takes NAME=VALUE, got {item!r}")
        params[key.strip()] = value
    return params


def query(
    name: str = typer.Argument(..., help="a named query, or 'list' to show them all"),
    store: Optional[str] = typer.Argument(None, help="store path or URL"),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="NAME=VALUE (repeatable)"),
    format: FormatOption = "table",
    out: OutOption = None,
    memory_limit: MemoryOption = "2GB",
    threads: ThreadsOption = None,
    max_rows: MaxRowsOption = 50,
) -> None:
    """Run a named query (`actsparse query list` shows each one's purpose and parameters)."""
    from queries import get, load

    if name == "list":
        for q in load().values():
            typer.echo(f"{q.name}\n  {q.purpose}\n  params: {q.signature()}\n  columns: {q.columns}")
        return
    q = get(name)
    params = _params(param or [])
    if store is None:
        raise ActsparseError(f"query {q.name} needs a STORE: actsparse query {q.name} STORE --param NAME=VALUE")
    # parameter errors before the store is opened; a missing RUN parameter may still default to the
    # store's only run, which st.query decides
    q.bind(params, resolve_run=lambda ref: ref, only_run="")
    with open_store(store, memory_limit, threads) as st:
        df = st.query(q.name, **params)
        emit(df, st, format, out, max_rows)
        if df.height == 0:
            hint = _empty_hint(q, params, st)
            if hint:
                typer.echo(f"note: no rows; {hint}", err=True)


def _empty_hint(q, params: dict, st) -> str:
    """What the runs a query was given hold (sites, layers), so an empty result can be told from a wrong choice."""
    runs = [p.name for p in q.params if p.type == "RUN"]
    given = {p.name for p in q.params} & set(params)
    if not runs or not given & {"site", "target", "layer"}:
        return ""
    bound = q.bind(params, resolve_run=st.resolve_run, only_run=st.only_run)
    parts = []
    for name in runs:
        m = st.manifests[bound[name]]
        parts.append(f"run {m['run_id']} holds sites {', '.join(m['arrays'])} and layers 0-{m['model']['ffn']['n_layers'] - 1}")
    return "; ".join(parts)


def register(app: typer.Typer) -> None:
    """Add ``query`` to the ``actsparse`` app."""
    app.command("query")(query)
