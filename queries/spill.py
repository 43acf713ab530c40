"""DuckDB's spill directories: one private directory per open store, outside the store, removed on every exit.

A query larger than its memory limit spills to disk (docs/pitfalls.md P10); DuckDB bounds the spill with
``max_temp_directory_size``. Each :class:`SpillDir` lives under the system's temporary directory and holds an
``owner.lock`` that its process keeps ``flock``-ed while it lives. It is removed when its store is closed, when
it is garbage-collected and at interpreter exit; a process killed outright (``kill -9``) cannot remove
anything, so every new one first removes the directories whose owner lock nobody holds any more
(:func:`sweep_stale`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import weakref
from pathlib import Path

PREFIX = "actsparse-duckdb-"
OWNER = "owner.lock"


def sweep_stale(parent: str | Path | None = None) -> list[Path]:
    """Remove the spill directories of processes that are gone (their owner lock is free); returns them.

    A directory whose owner lock is held (a live store, in any process) or that has no owner lock yet (one
    being created) is left alone.
    """
    removed = []
    for d in Path(parent or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            fd = os.open(d / OWNER, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        shutil.rmtree(d, ignore_errors=True)
        os.close(fd)
        removed.append(d)
    return removed


class SpillDir:
    """A fresh private directory for one DuckDB connection's spill files (``path``), owned by this process.

    The owner lock is created under another name and renamed into place once locked, so :func:`sweep_stale`
    in another process never sees it unlocked.
    """

    def __init__(self, parent: str | Path | None = None):
        sweep_stale(parent)
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        fd = os.open(self.path / f"{OWNER}.new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(self.path / f"{OWNER}.new", self.path / OWNER)
        self._finalizer = weakref.finalize(self, SpillDir._remove, str(self.path), fd)

    @property
    def spill(self) -> str:
        """The directory DuckDB writes into (created by DuckDB when it first spills)."""
        return str(self.path / "spill")

    @staticmethod
    def _remove(path: str, fd: int) -> None:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(fd)

    def remove(self) -> None:
        """Remove the directory and everything DuckDB spilled into it (idempotent)."""
        self._finalizer()
