"""Everything the command line prints: tables in every format, messages, errors and progress bars.

Tables go out in one of ``FORMATS``: ``table`` is a rich table on a terminal and a complete Markdown table when
stdout is piped or redirected (never cut to a terminal width), ``csv`` and ``json`` are complete and parseable
everywhere, ``parquet`` needs ``--out``. Messages for people go to stdout, errors to stderr as one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_path, disk_error
from actsparse.core.progress import ProgressFactory

FORMATS = ("table", "csv", "json", "parquet")
LIST_FORMATS = FORMATS[:3]

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

FormatOption = Annotated[str, typer.Option("--format", "-f", help="output format: table | csv | json")]
ResultFormatOption = Annotated[str, typer.Option("--format", "-f", help="output format: table | csv | json | parquet "
                                                                         "(parquet needs --out)")]
OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="write the result to this file instead of "
                                                                        "stdout (never inside the store)")]
MaxRowsOption = Annotated[int, typer.Option(help="rows shown by --format table (csv, json and parquet hold every row)")]


def say(message: str) -> None:
    """A one-line message for people, printed as is (no rich markup or highlighting)."""
    out.print(message, markup=False, highlight=False)


def error_line(message: str) -> None:
    """``error: <message>`` on stderr: the one line a failed command prints."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return "" if v is None else str(v)


def _flat(df):
    """Nested columns (lists, structs) as text, for CSV and the tables."""
    import polars as pl

    exprs = []
    for name, dtype in df.schema.items():
        if isinstance(dtype, (pl.List, pl.Array)):
            exprs.append(pl.col(name).cast(pl.List(pl.String)).list.join(",").alias(name))
        elif isinstance(dtype, pl.Struct):
            exprs.append(pl.col(name).struct.json_encode().alias(name))
    return df.with_columns(exprs) if exprs else df


def _markdown(df, max_rows: int | None) -> str:
    import polars as pl

    shown = df.height if max_rows is None else max_rows
    with pl.Config(tbl_rows=shown, tbl_cols=-1, tbl_formatting="ASCII_MARKDOWN", tbl_hide_column_data_types=True,
                   tbl_hide_dataframe_shape=True, fmt_str_lengths=10_000, tbl_width_chars=65_535, float_precision=None):
        text = str(_flat(df))
    footer = f"({df.height} row{'s' if df.height != 1 else ''}"
    return f"{text}\n{footer}{f', {shown} shown' if df.height > shown else ''})"


def _rich_table(df, title: str | None, max_rows: int | None) -> Table:
    t = Table(title=title)
    for c in df.columns:
        # ids are what the next command needs: never folded or cut, however narrow the terminal
        t.add_column(c, no_wrap=c.endswith("_id"), min_width=16 if c.endswith("_id") else None)
    for row in df.head(max_rows).iter_rows() if max_rows is not None else df.iter_rows():
        t.add_row(*(_cell(v) for v in row))
    return t


def emit(df, fmt: str = "table", *, title: str | None = None, out_file: Path | None = None,
         max_rows: int | None = None, store_root: str | None = None) -> None:
    """Print (or write to ``out_file``) a table, given as a polars DataFrame or a list of row dicts.

    ``out_file`` is written atomically: on any failure (a full disk, an interruption) it is left as it was,
    never truncated.

    Raises:
        ActsparseError: an unknown format, parquet without ``out_file``, or ``out_file`` inside the store at
            ``store_root`` (a store holds only what its format lists).
    """
    import polars as pl

    if fmt not in FORMATS:
        raise ActsparseError(f"unknown --format '{fmt}' (choose {', '.join(FORMATS)})")
    if isinstance(df, list):
        df = pl.DataFrame(df) if df else pl.DataFrame()
    if out_file is not None and store_root is not None:
        root, target = os.path.realpath(store_root), os.path.realpath(out_file)
        if target == root or target.startswith(root + os.sep):
            raise ActsparseError(f"--out {out_file} is inside the store; the store is read-only, write elsewhere")
    if fmt == "parquet" and out_file is None:
        raise ActsparseError("--format parquet needs --out FILE")
    if out_file is None:
        _print(df, fmt, title, max_rows)
        return
    try:
        # a file that is complete or absent: written under a temporary name, flushed, then renamed
        with atomic_path(out_file) as tmp:
            _write_file(df, fmt, title, max_rows, Path(tmp))
    except OSError as e:
        raise disk_error(e, f"writing {out_file}") from None
    typer.echo(f"{df.height} rows -> {out_file}", err=True)


def _print(df, fmt: str, title: str | None, max_rows: int | None) -> None:
    if fmt == "csv":
        _flat(df).write_csv(sys.stdout)
    elif fmt == "json":
        typer.echo(json.dumps(df.to_dicts(), default=str))
    elif out.is_terminal:
        out.print(_rich_table(df, title, max_rows))
        if max_rows is not None and df.height > max_rows:
            say(f"({df.height} rows, {max_rows} shown)")
    else:
        typer.echo((f"{title}\n" if title else "") + _markdown(df, max_rows))


def _write_file(df, fmt: str, title: str | None, max_rows: int | None, path: Path) -> None:
    if fmt == "parquet":
        df.write_parquet(path)
    elif fmt == "csv":
        _flat(df).write_csv(path)
    elif fmt == "json":
        path.write_text(json.dumps(df.to_dicts(), default=str) + "\n")
    else:
        path.write_text((f"{title}\n" if title else "") + _markdown(df, max_rows) + "\n")


def check_format(fmt: str, choices=LIST_FORMATS) -> None:
    """Raise ActsparseError for a ``--format`` outside ``choices`` (before any work)."""
    if fmt not in choices:
        raise ActsparseError(f"unknown --format '{fmt}' (choose {', '.join(choices)})")


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressFactory | None]:
    """Rich progress bars on stdout as a :class:`actsparse.core.progress.ProgressFactory` (None when disabled).

    Each ``factory(description, total, completed)`` call adds a bar and returns its ``advance(n)``.
    """
    if not enabled:
        yield None
        return
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}/s"), TimeElapsedColumn(), TimeRemainingColumn(), console=out)

    def factory(description: str, total: int, completed: int = 0):
        if not bars.tasks:
            bars.start()  # only now: an idle display would still print an empty line when stopped
        task = bars.add_task(description, total=total, completed=completed, rate="-")
        t0, done = time.perf_counter(), 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bars.update(task, advance=n, rate=f"{done / max(time.perf_counter() - t0, 1e-9):,.0f}")

        return advance

    try:
        yield factory
    finally:
        if bars.tasks:
            bars.stop()


@contextlib.contextmanager
def live_table(enabled: bool = True) -> Iterator[Callable[[list[dict], str], None] | None]:
    """A table redrawn in place on the terminal (rich ``Live``), as ``show(rows, title)``: a batch's job matrix.

    None when disabled or when stdout is not a terminal (piped output gets the summary only). Messages printed
    with :func:`say` meanwhile appear above the table.
    """
    if not (enabled and out.is_terminal):
        yield None
        return
    from rich.live import Live

    with Live(Table(), console=out, refresh_per_second=2, transient=True) as live:

        def show(rows: list[dict], title: str) -> None:
            t = Table(title=title)
            for c in (rows[0] if rows else {}):
                t.add_column(c)
            for row in rows:
                t.add_row(*(_cell(v) for v in row.values()))
            live.update(t)

        yield show
