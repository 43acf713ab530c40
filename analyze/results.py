"""Reading and writing one analysis result file of a run (``analysis/<prefix>-<id>.parquet``, a ``ResultKind``)."""

from __future__ import annotations

from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.checksums import update_checksums
from actsparse.core.files import atomic_write_parquet


def load_result(st, run_id: str, kind: fmt.ResultKind, ident: str):
    """The stored result ``kind``/``ident`` of a run as a polars DataFrame, or None when absent."""
    import polars as pl

    path = st.path(fmt.result_base(run_id), fmt.result_file(kind, ident))
    if not st.fs.exists(path):
        return None
    with st.fs.open(path, "rb") as f:
        return pl.read_parquet(f)


def save_result(st, run_id: str, kind: fmt.ResultKind, ident: str, df) -> Path | None:
    """Write a result into the run's ``analysis/`` (atomically, recorded in its checksums) when the store is
    local and writable; returns the path, or None (remote or read-only store: the result is only returned)."""
    if not st.is_local:
        return None
    run_dir = Path(st.root).resolve() / fmt.run_path(run_id)
    path = run_dir / fmt.ANALYSIS / fmt.result_file(kind, ident)
    try:
        atomic_write_parquet(path, df.to_arrow())
    except OSError:
        return None
    update_checksums(run_dir, [path])
    return path
