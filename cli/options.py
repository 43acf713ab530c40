"""Options shared by several commands (one definition each, so that their names and help agree)."""

from __future__ import annotations

from typing import Annotated

import typer

from actsparse.core.errors import ActsparseError

RunsOption = Annotated[list[str] | None, typer.Option(
    "--run", "-r", help="a run id or unique prefix (repeatable; default: every complete run)")]
RunOption = Annotated[str | None, typer.Option("--run", "-r", help="run id or prefix (default: the only run)")]
ThreadsOption = Annotated[int | None, typer.Option(help="torch threads (default: all cores)")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or messages")]


def set_threads(n: int | None) -> None:
    """Set torch's thread count from ``--threads``.

    Raises:
        ActsparseError: a count below 1.
    """
    if n is not None:
        if n < 1:
            raise ActsparseError(f"--threads must be positive (got {n})")
        import torch

        torch.set_num_threads(n)
