"""CLI command ``report``: a static HTML report (figures and tables) of a store's runs.

See :mod:`analyze.report` for what the page holds and how it bounds time and memory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import typer


@contextlib.contextmanager
def rich_progress(console, enabled: bool = True) -> Iterator:
    """A rich progress display as an ``analyze.report.ProgressFactory`` (None when disabled).

    Each ``factory(description, total)`` call adds a bar and returns its ``advance(n)``.
    """
    if not enabled:
        yield None
        return
    from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bars = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)

    def factory(description: str, total: int):
        if not bars.tasks:
            bars.start()  # only now: an idle display would still print an empty line when stopped
        task = bars.add_task(description, total=total)
        return lambda n: bars.update(task, advance=n)

    try:
        yield factory
    finally:
        if bars.tasks:
            bars.stop()


def report(
    store: str = typer.Argument(..., help="store path or URL"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="output directory for index.html and the figures"),
    run: Optional[list[str]] = typer.Option(None, "--run", "-r",
                                            help="a run id or unique prefix (repeatable; default: every complete run)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or messages"),
) -> None:
    """Write a static HTML report with figures (PNG and SVG): open-loop curves, closed-loop evaluations, provenance."""
    from actsparse.cli import out
    from analyze.report import build_report

    with rich_progress(out, enabled=not quiet) as progress:
        path = build_report(store, out_dir, run, progress=progress,
                            log=(lambda m: None) if quiet else (lambda m: out.print(m, markup=False, highlight=False)))
    out.print(f"report: {path}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``report`` to the ``actsparse`` app."""
    app.command("report")(report)
