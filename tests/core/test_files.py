"""Safe files (``actsparse.core.files``): atomic replacement, regular-file reads, locks."""

from __future__ import annotations

import os
import stat

import pytest

from actsparse.core.errors import ActsparseError
from actsparse.core.files import (
    NotRegularFile,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    exclusive_lock,
    open_regular,
)


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1})
    before = target.read_bytes()

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_json(target, {"a": Boom()})
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "d"
    with pytest.raises(ValueError), atomic_directory(target) as tmp:
        (tmp / "x").write_text("half")
        raise ValueError
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "x").write_text("whole")
    assert (target / "x").read_text() == "whole"


def test_open_regular_refuses_links_fifos_and_directories(tmp_path):
    real = tmp_path / "real"
    atomic_write_bytes(real, b"data")
    with open_regular(real) as f:
        assert f.read() == b"data"
    (tmp_path / "link").symlink_to(real)
    os.mkfifo(tmp_path / "fifo")
    for name, what in (("link", "a symbolic link"), ("fifo", "a FIFO"), (".", "a directory")):
        with pytest.raises(NotRegularFile, match=what):
            open_regular(tmp_path / name)  # returns at once: a FIFO without a writer does not block


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    with exclusive_lock(tmp_path / ".lock", "run x"):
        with pytest.raises(ActsparseError, match=rf"run x is being written by another process \(pid {os.getpid()}\)"):
            with exclusive_lock(tmp_path / ".lock", "run x"):
                pass
