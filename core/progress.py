"""How long-running work reports progress, without knowing who displays it.

Collection, analysis and the report take an optional :data:`ProgressFactory`; the command line passes one
that draws rich progress bars (``actsparse.cli.output.progress_bars``), the Python API passes none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class ProgressFactory(Protocol):
    """``factory(description, total, completed=0)`` starts one task and returns its ``advance(n)``."""

    def __call__(self, description: str, total: int, completed: int = 0) -> Callable[[int], None]: ...


def lazy_task(progress: ProgressFactory | None, description: str, total: int) -> Callable[[int], None] | None:
    """An ``advance(n)`` that starts its task on the first call, so that work served from a cache never shows
    an empty bar; None without a factory."""
    if progress is None:
        return None
    advance: Callable[[int], None] | None = None

    def step(n: int) -> None:
        nonlocal advance
        if advance is None:
            advance = progress(description, total)
        advance(n)

    return step
