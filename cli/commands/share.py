"""CLI commands for sharing stores: ``verify``, ``pack``, ``unpack``, ``merge`` (see :mod:`actsparse.share`)."""

from __future__ import annotations

from pathlib import Path

import typer

from actsparse.cli.options import RunsOption
from actsparse.cli.output import say


def verify(
    store: str = typer.Argument(..., help="store path or URL (file://, http(s)://, s3://)"),
    run: list[str] | None = typer.Option(None, "--run", "-r", help="check only this run and its weights (repeatable)"),
    add_checksums: bool = typer.Option(False, "--add-checksums",
                                       help="first write checksums.json where a complete run or weights dir has none "
                                            "(stores written before checksums existed; records the files as they are)"),
    rebuild: bool = typer.Option(False, "--rebuild-catalogue",
                                 help="first rebuild catalogue.parquet from the complete runs' manifests"),
) -> None:
    """Re-read every file and report missing, truncated, altered or unexpected files by name (exit 1 if any)."""
    from actsparse.share import rebuild_catalogue, seal
    from actsparse.share import verify as run_verify

    if add_checksums:
        seal(store, run, log=say)
    if rebuild:
        rebuild_catalogue(store, log=say)
    report = run_verify(store, run)
    for w in report.warnings:
        say(f"warning: {w}")
    for p in report.problems:
        say(str(p))
    say(report.summary())
    if not report.ok:
        raise typer.Exit(1)


def pack(
    store: str = typer.Argument(..., help="store path or URL"),
    out: Path = typer.Argument(..., help="archive file to write (.tar)"),
    run: RunsOption = None,
) -> None:
    """Write runs, their FFN weights, a dataset card (README.md) and checksums into one tar file."""
    from actsparse.share import pack as run_pack

    run_pack(store, out, run, log=say)


def unpack(
    archive: Path = typer.Argument(..., help="archive written by `actsparse pack`"),
    dest: Path = typer.Argument(..., help="store directory (created if missing)"),
) -> None:
    """Restore an archive into a store, checking every checksum before any run becomes visible."""
    from actsparse.share import unpack as run_unpack

    res = run_unpack(archive, dest, log=say)
    say(f"unpacked {len(res.added)} run(s), skipped {len(res.skipped)}, "
               f"added {len(res.weights_added)} weights dir(s) -> {dest}")


def merge(
    src: str = typer.Argument(..., help="source store path or URL (read-only)"),
    dst: Path = typer.Argument(..., help="destination store directory (created if missing)"),
    run: RunsOption = None,
) -> None:
    """Copy runs and their weights from SRC into DST (skipping runs DST holds), then rebuild its catalogue."""
    from actsparse.share import merge as run_merge

    res = run_merge(src, dst, run, log=say)
    say(f"merged {len(res.added)} run(s), skipped {len(res.skipped)}, "
               f"added {len(res.weights_added)} weights dir(s) -> {dst}")


def register(app: typer.Typer) -> None:
    """Add the sharing commands to the ``actsparse`` app."""
    app.command("verify")(verify)
    app.command("pack")(pack)
    app.command("unpack")(unpack)
    app.command("merge")(merge)
