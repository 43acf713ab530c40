"""CLI command ``sql``: one read-only SELECT over a whole store (see :mod:`actsparse.store`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from actsparse.errors import ActsparseError

FORMATS = ("table", "csv", "json", "parquet")
# The output and DuckDB options ``sql`` and ``query`` share (defaults stay in each signature).
FormatOption = Annotated[str, typer.Option("--format", "-f", help="output format: table | csv | json | parquet "
                                                                  "(parquet needs --out)")]
OutOption = Annotated[Optional[Path], typer.Option("--out", "-o", help="write the result to this file instead of "
                                                                        "stdout (never inside the store)")]
MemoryOption = Annotated[str, typer.Option(help="DuckDB memory limit; larger intermediate results spill to a "
                                                "temporary directory outside the store")]
ThreadsOption = Annotated[Optional[int], typer.Option(help="DuckDB threads (default: CPUs, at most 4)")]
MaxRowsOption = Annotated[int, typer.Option(help="rows shown by --format table (csv, json and parquet hold every row)")]


def open_store(store: str, memory_limit: str, threads: Optional[int]):
    """The :class:`actsparse.store.Store` of a command, with its DuckDB limits."""
    from actsparse.store import Store

    if threads is not None and threads < 1:
        raise ActsparseError(f"--threads must be positive (got {threads})")
    return Store(store, memory_limit=memory_limit, threads=threads)


def _flat(df):
    """Nested columns (lists, structs) as text, for CSV and the table view."""
    import polars as pl

    exprs = []
    for name, dtype in df.schema.items():
        if isinstance(dtype, (pl.List, pl.Array)):
            exprs.append(pl.col(name).cast(pl.List(pl.String)).list.join(",").alias(name))
        elif isinstance(dtype, pl.Struct):
            exprs.append(pl.col(name).struct.json_encode().alias(name))
    return df.with_columns(exprs) if exprs else df


def _check_out(out: Path, st) -> None:
    if st.local:
        root = os.path.realpath(st.reader.root)
        target = os.path.realpath(out)
        if target == root or target.startswith(root + os.sep):
            raise ActsparseError(f"--out {out} is inside the store; the store is read-only, write elsewhere")


def emit(df, st, fmt: str, out: Optional[Path], max_rows: int) -> None:
    """Print or write a result DataFrame in one of ``FORMATS``.

    Raises:
        ActsparseError: unknown format, parquet without --out, or --out inside the store.
    """
    import polars as pl

    if fmt not in FORMATS:
        raise ActsparseError(f"unknown --format '{fmt}' (choose {', '.join(FORMATS)})")
    if out is not None:
        _check_out(out, st)
    if fmt == "parquet":
        if out is None:
            raise ActsparseError("--format parquet needs --out FILE")
        df.write_parquet(out)
    elif fmt == "csv":
        _flat(df).write_csv(out if out is not None else sys.stdout)
    elif fmt == "json":
        text = df.write_json()
        if out is None:
            typer.echo(text)
        else:
            out.write_text(text + "\n")
    else:
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, tbl_formatting="ASCII_MARKDOWN", tbl_hide_column_data_types=True,
                       tbl_hide_dataframe_shape=True, fmt_str_lengths=120, tbl_width_chars=10_000, float_precision=None):
            text = f"{_flat(df)}\n({df.height} row{'s' if df.height != 1 else ''}"
            text += f", {max_rows} shown)" if df.height > max_rows else ")"
        if out is None:
            typer.echo(text)
        else:
            out.write_text(text + "\n")
    if out is not None:
        typer.echo(f"{df.height} rows -> {out}", err=True)


def sql(
    store: str = typer.Argument(..., help="store path or URL (file://, http(s)://, s3://)"),
    query: str = typer.Argument(..., help="one SELECT over the tables runs, layers, tokens, token_stats, curves, "
                                          "critical_sparsity, evaluations"),
    format: FormatOption = "table",
    out: OutOption = None,
    memory_limit: MemoryOption = "2GB",
    threads: ThreadsOption = None,
    max_rows: MaxRowsOption = 50,
) -> None:
    """Run one read-only SQL query (DuckDB) over every complete run of a store."""
    with open_store(store, memory_limit, threads) as st:
        emit(st.sql(query), st, format, out, max_rows)


def register(app: typer.Typer) -> None:
    """Add ``sql`` to the ``actsparse`` app."""
    app.command("sql")(sql)
