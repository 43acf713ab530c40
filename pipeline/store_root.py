"""A store's root files: creating a store (its ``actsparse-store.json`` marker) and rebuilding its catalogue."""

from __future__ import annotations

import json
import os
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_json, atomic_write_parquet, blocking_lock, disk_error


def create_store(path: str | Path) -> fmt.StorePaths:
    """Open a local store for writing, creating it if needed.

    Raises:
        ActsparseError: the path is a file, not writable, a non-empty directory that is not a store, or holds a
            store of another format version.
    """
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise ActsparseError(f"store path {root} is a file, not a directory")
    marker = root / fmt.STORE_FILE
    try:
        if marker.is_file():
            try:
                meta = json.loads(marker.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ActsparseError(f"{marker} is not valid JSON ({e})") from None
            fmt.check_store_marker(meta, str(root))
        elif root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")):
            raise ActsparseError(f"store path {root} is a non-empty directory that is not an actsparse store")
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise ActsparseError(f"store path {root} is not writable")
        if not marker.is_file():
            atomic_write_json(marker, fmt.store_marker())
    except OSError as e:
        raise disk_error(e, f"creating the store at {root}") from e
    return fmt.StorePaths(root)


def write_catalogue(paths: fmt.StorePaths) -> None:
    """Rebuild ``catalogue.parquet`` from the complete runs' manifests (under the store's catalogue lock).

    A run whose manifest does not validate is left out: the catalogue lists complete runs only.
    """
    import pyarrow as pa

    rows = []
    for path in sorted((paths.root / fmt.RUNS).glob(f"*/{fmt.MANIFEST}")):
        try:
            m = fmt.Manifest.from_json(path.read_bytes(), f"run {path.parent.name}")
        except (ActsparseError, OSError):
            continue
        if m.complete:
            rows.append(m.catalogue_row())
    with blocking_lock(paths.root / fmt.CATALOGUE_LOCK):
        table = pa.Table.from_pylist(rows, schema=fmt.arrow_schema(fmt.CATALOGUE_COLUMNS))
        atomic_write_parquet(paths.root / fmt.CATALOGUE, table)
