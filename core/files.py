"""Files written safely: atomic replacement, regular-file reads, locks and one-line disk errors.

Every file actsparse writes goes through here, so a reader never sees half a file: content is written to a
temporary name in the same directory, flushed to disk, and renamed over the target (``os.replace`` is atomic
on POSIX filesystems). Directories are built the same way (:func:`atomic_directory`). Reads of untrusted
stores open regular files only (:func:`open_regular`): a FIFO, a device or a symbolic link planted in a store
is refused instead of blocking forever or leading outside the store (docs/pitfalls.md, "hostile stores").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from actsparse.core.errors import ActsparseError

TMP_SUFFIX = ".tmp"  # every temporary file or directory ends so: never listed, packed or copied


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import (one thread)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def umask_mode(directory: bool = False) -> int:
    """Mode of a new file (or directory) under the process umask; ``mkstemp``/``mkdtemp`` start at 0600/0700,
    and stores are shared between users."""
    return (0o777 if directory else 0o666) & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[str]:
    """A temporary file name beside ``path``; whatever the block writes there replaces ``path`` atomically
    when the block ends without an error.

    With ``fsync`` the data is forced to disk before the rename, so a crash leaves either the old file or
    the new one. On an error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """An open file whose content replaces ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys (stable bytes for equal content), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(path: str | Path, table, *, row_group_size: int = 256 * 1024,
                         use_dictionary: bool | list[str] = True, fsync: bool = False) -> None:
    """Write a pyarrow table as zstd-compressed Parquet atomically (a reader sees the old file or the new one).

    ``row_group_size`` counts rows (pyarrow's default of 1 Mi rows would make DuckDB scan huge groups,
    docs/pitfalls.md P9); ``use_dictionary`` as pyarrow's (a list names the columns that get one); ``fsync``
    forces the data to disk before the rename (off by default: collection writes several parts per shard on
    its hot path).
    """
    import pyarrow.parquet as pq

    with atomic_path(path, fsync=fsync) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size, use_dictionary=use_dictionary)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``target``, renamed to ``target`` when the block succeeds.

    Raises:
        FileExistsError: ``target`` appeared meanwhile (the caller decides whether that is an error).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, umask_mode(directory=True))
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: str | Path) -> None:
    """Remove a directory tree if it exists (temporary and staging directories)."""
    shutil.rmtree(path, ignore_errors=True)


class NotRegularFile(Exception):
    """A store path that is not a regular file (a symbolic link, FIFO, device or directory)."""

    def __init__(self, path: str, what: str):
        super().__init__(f"{path} is {what}")
        self.path, self.what = path, what


def open_regular(path: str | Path) -> IO[bytes]:
    """Open a local file for binary reading, refusing anything but a regular file.

    ``O_NOFOLLOW`` refuses a symbolic link; ``O_NONBLOCK`` makes opening a FIFO return at once instead of
    waiting for a writer, and the ``fstat`` that follows refuses it.

    Raises:
        NotRegularFile: a symbolic link, FIFO, socket, device or directory.
        FileNotFoundError: no such file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(str(path), "a symbolic link") from None
        if e.errno == errno.EISDIR:
            raise NotRegularFile(str(path), "a directory") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device or special file")
        raise NotRegularFile(str(path), kind)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a local regular file (see :func:`open_regular`) of at most ``limit`` bytes.

    At most ``limit + 1`` bytes are read, so a huge or endless file costs no more than a small one.

    Raises:
        NotRegularFile: a symbolic link, FIFO, socket, device or directory.
        FileNotFoundError: no such file.
        ActsparseError: the file holds more than ``limit`` bytes (``what`` names it in the message).
    """
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ActsparseError(f"{path}: larger than the {limit} bytes a {what} may hold")
    return data


def sync_data(paths) -> None:
    """Force the data of files already written to disk (``fdatasync``), so that a file written after them
    (a marker of completeness) can never reach the disk before them (docs/pitfalls.md P19)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` (released by the kernel even on SIGKILL).

    Raises:
        ActsparseError: another process holds the lock (naming its pid).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ActsparseError(f"{what} is being written by another process (pid {holder}); "
                                 "refusing a second writer") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def blocking_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock``, waiting for it (short critical sections: catalogue, weights, checksums)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def disk_error(e: OSError, doing: str) -> ActsparseError:
    """A one-line error for an OS error while ``doing`` something (disk full, read-only filesystem, ...)."""
    code = e.errno
    if code is None and (m := re.search(r"\(os error (\d+)\)", str(e))):  # Rust libraries (polars) say so
        code = int(m.group(1))
    reason = {errno.ENOSPC: "disk full", errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied",
              errno.EDQUOT: "disk quota exceeded"}.get(code, e.strerror or str(e))
    return ActsparseError(f"{reason} while {doing}" + (f" ({e.filename})" if e.filename else ""))
