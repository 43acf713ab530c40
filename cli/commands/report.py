"""CLI command ``report``: a static HTML report (figures and tables) of a store's runs.

See :mod:`actsparse.analyze.report` for what the page holds and how it bounds time and memory.
"""

from __future__ import annotations

from pathlib import Path

import typer

from actsparse.cli.options import QuietOption, RunsOption
from actsparse.cli.output import progress_bars, say


def report(
    store: str = typer.Argument(..., help="store path or URL"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="output directory for index.html and the figures"),
    run: RunsOption = None,
    quiet: QuietOption = False,
) -> None:
    """Write a static HTML report with figures (PNG and SVG): open-loop curves, closed-loop evaluations, provenance."""
    from actsparse.analyze.report import build_report

    with progress_bars(not quiet) as progress:
        path = build_report(store, out_dir, run, progress=progress, log=(lambda m: None) if quiet else say)
    say(f"report: {path}")


def register(app: typer.Typer) -> None:
    """Add ``report`` to the ``actsparse`` app."""
    app.command("report")(report)
