"""CLI commands ``sql`` (one read-only SELECT over a whole store) and ``query`` (the named queries of
``actsparse.queries``); see :mod:`actsparse.queries.engine`."""

from __future__ import annotations

from typing import Annotated

import typer

from actsparse.cli.output import FORMATS, MaxRowsOption, OutOption, ResultFormatOption, check_format, emit
from actsparse.core.errors import ActsparseError

MemoryOption = Annotated[str, typer.Option(help="DuckDB memory limit; larger intermediate results spill to a "
                                                "temporary directory outside the store")]
DuckThreadsOption = Annotated[int | None, typer.Option("--threads", help="DuckDB threads (default: CPUs, at most 4)")]
SpillOption = Annotated[str, typer.Option(help="the most a query may spill to disk (a private temporary directory "
                                               "outside the store, removed on exit); beyond it the query fails")]


def open_store(store: str, memory_limit: str, threads: int | None, max_spill: str):
    """The :class:`actsparse.queries.Store` of a command, with its DuckDB limits; the runs it leaves out
    (a missing part) are noted on stderr, one line each."""
    import warnings

    from actsparse.queries import Store

    if threads is not None and threads < 1:
        raise ActsparseError(f"--threads must be positive (got {threads})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said below, one line each
        st = Store(store, memory_limit=memory_limit, threads=threads, max_spill=max_spill)
    for rid, why in st.left_out.items():
        typer.echo(f"note: run {rid} left out: {why}", err=True)
    for note in st.notes:
        typer.echo(f"note: {note}", err=True)
    return st


def sql(
    store: str = typer.Argument(..., help="store path or URL (file://, http(s)://, s3://)"),
    query: str = typer.Argument(..., help="one SELECT over the views runs, layers, tokens, token_stats, curves, "
                                          "critical_sparsity, evaluations, evaluation_layers, evaluation_critical"),
    format: ResultFormatOption = "table",
    out: OutOption = None,
    memory_limit: MemoryOption = "2GB",
    threads: DuckThreadsOption = None,
    max_spill: SpillOption = "20GB",
    max_rows: MaxRowsOption = 50,
) -> None:
    """Run one read-only SQL query (DuckDB) over every complete run of a store."""
    check_format(format, FORMATS)
    with open_store(store, memory_limit, threads, max_spill) as st:
        emit(st.sql(query), format, out_file=out, max_rows=max_rows, store_root=st.reader.root if st.local else None)


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
    store: str | None = typer.Argument(None, help="store path or URL"),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="NAME=VALUE (repeatable)"),
    format: ResultFormatOption = "table",
    out: OutOption = None,
    memory_limit: MemoryOption = "2GB",
    threads: DuckThreadsOption = None,
    max_spill: SpillOption = "20GB",
    max_rows: MaxRowsOption = 50,
) -> None:
    """Run a named query (`actsparse query list` shows each one's purpose and parameters)."""
    from actsparse.queries import get, load

    check_format(format, FORMATS)
    if name == "list":
        rows = [dict(name=q.name, purpose=q.purpose, params=q.signature(), columns=q.columns) for q in load().values()]
        if format == "table":
            for r in rows:
                typer.echo(f"{r['name']}\n  {r['purpose']}\n  params: {r['params']}\n  columns: {r['columns']}")
        else:
            emit(rows, format, out_file=out)
        return
    q = get(name)
    params = _params(param or [])
    if store is None:
        raise ActsparseError(f"query {q.name} needs a STORE: actsparse query {q.name} STORE --param NAME=VALUE")
    # parameter errors before the store is opened; a missing RUN parameter may still default to the
    # store's only run, which st.query decides
    q.bind(params, resolve_run=lambda ref: ref, only_run="")
    with open_store(store, memory_limit, threads, max_spill) as st:
        df = st.query(q.name, **params)
        emit(df, format, out_file=out, max_rows=max_rows, store_root=st.reader.root if st.local else None)
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
        parts.append(f"run {m.run_id} holds sites {', '.join(m.sites)} and layers 0-{m.n_layers - 1}")
    return "; ".join(parts)


def register(app: typer.Typer) -> None:
    """Add ``sql`` and ``query`` to the ``actsparse`` app."""
    app.command("sql")(sql)
    app.command("query")(query)
