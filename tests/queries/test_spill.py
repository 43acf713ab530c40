"""Bounded work of a query (``actsparse.queries.spill`` and the engine): spill has a ceiling and lives in a private
directory removed on every exit, Ctrl-C and SIGTERM stop a running query with one line, and the spill of a process
killed outright is removed by the next one.

The issue's examples: an ad-hoc query spilled to /tmp without bound (8.4 GB in 60 s) and ignored Ctrl-C, and a
killed query left its spill directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actsparse.core.errors import ActsparseError
from actsparse.queries import Store
from actsparse.queries.spill import PREFIX, SpillDir, sweep_stale
from tests.helpers import ROOT

# CPU-bound and streaming: runs for minutes without memory or spill, until it is interrupted
ENDLESS = "SELECT count(*) AS n FROM range(1000000000000) t(i) WHERE hash(i) % 7 = 3"
SORT = "SELECT count(*) FROM (SELECT i, md5(i::VARCHAR) AS h FROM range(3000000) t(i) ORDER BY h)"


@pytest.fixture
def store(two_model_store):
    return two_model_store[0]


def _spills(parent: Path) -> list[Path]:
    return sorted(parent.glob(f"{PREFIX}*"))


def test_spill_has_a_ceiling_and_is_removed(store, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    st = Store(store, memory_limit="64MiB", max_spill="20MB", threads=1)
    (spill,) = _spills(tmp_path)
    with pytest.raises(ActsparseError, match=r"needs more than --max-spill 20MB of disk to spill") as e:
        st.sql(SORT)
    assert "\n" not in str(e.value)
    used = sum(p.stat().st_size for p in spill.rglob("*") if p.is_file())
    assert used <= 21 * 10**6, used
    st.close()
    assert _spills(tmp_path) == []
    with Store(store, memory_limit="64MiB", max_spill="2GB", threads=1) as st:  # enough: it completes
        assert st.sql(SORT).item() == 3000000
    assert _spills(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_running_query_stops_at_ctrl_c_with_one_line(store, tmp_path, sig):
    exe = str(Path(sys.executable).with_name("actsparse"))
    proc = subprocess.Popen([exe, "sql", str(store), ENDLESS, "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.time() + 120
    while not _spills(tmp_path) and time.time() < deadline:  # the store is open: the query starts next
        time.sleep(0.05)
    time.sleep(1.5)
    assert proc.poll() is None, proc.stderr.read()
    t0 = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 30
    assert proc.returncode == 130 and err == "error: query interrupted; nothing was written\n", err
    assert out == "" and _spills(tmp_path) == []


def test_the_spill_of_a_killed_process_is_removed_by_the_next(tmp_path):
    code = ("import sys, time; from actsparse.queries.spill import SpillDir; d = SpillDir(sys.argv[1]); "
            "(d.path / 'spill').mkdir(); (d.path / 'spill' / 'block').write_bytes(b'x' * 1000); print(d.path, "
            "flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip())
    live = SpillDir(tmp_path)
    assert sweep_stale(tmp_path) == [] and left.exists()  # its owner lives: kept
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.exists()  # nothing could remove it
    assert sweep_stale(tmp_path) == [left] and not left.exists()
    assert live.path.exists()  # a live directory is never swept
    live.remove()
    assert _spills(tmp_path) == []
