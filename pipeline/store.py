"""The activation store format: the one place that defines paths, schemas, dtypes and versions.

Layout (documented for users in ``docs/store-format.md``; every path below is relative)::

    STORE/
      actsparse-store.json                 {"format": "actsparse-store", "format_version": 1}
      catalogue.parquet                    one row per complete run (rewritten atomically)
      models/<weights_id>/ffn.zarr/        FFN weights of every layer, shared by the runs of a model
          gate [layers, d_ff, d_model]  up [layers, d_ff, d_model]  down [layers, d_model, d_ff]
          (+ gate_bias, up_bias [layers, d_ff], down_bias [layers, d_model] where the model has biases)
      runs/<run_id>/
        manifest.json                      provenance + status ("incomplete" until the last byte is written)
        documents.parquet                  document_id, key, split, n_chars
        activations.zarr/<site>            [layers, tokens, width], chunk (1, T, width), shard (layers, T, width)
        tokens/part-KKKKKK.parquet         token rows of shard K; written last, so it marks shard K complete
        token_stats/site=<site>/part-KKKKKK.parquet   per-token summaries (one row per token x layer)
        analysis/<kind>-<config_hash>.parquet         analysis results (curves, critical, evaluations)

Dense values are stored as ``uint16`` holding bfloat16 bit patterns (attribute ``logical_dtype``),
because neither numpy nor zarr has bfloat16 (pitfall P5); ``float16`` only after an overflow check
(pitfall P6); ``float32`` on request. Writers own whole shards (pitfall P7); zarr_format=3 is written
explicitly and consolidated metadata is not used (pitfall P8).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from actsparse.errors import ActsparseError

FORMAT_NAME = "actsparse-store"
FORMAT_VERSION = 1
STORE_FILE = "actsparse-store.json"
CATALOGUE = "catalogue.parquet"
MANIFEST = "manifest.json"
ACTIVATIONS = "activations.zarr"
WEIGHTS = "ffn.zarr"
STORED_DTYPES = ("bfloat16", "float16", "float32")
FLOAT16_MAX = 65504.0
RUN_ID_RE = re.compile(r"^[0-9a-f]{16}$")
WEIGHTS_ID_RE = re.compile(r"^[0-9a-f]{16}$")
TOKEN_COLUMNS = ("token_index", "sequence", "position", "token_id", "token_text", "document_id", "special")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) for hashing configs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def match_run(ref: str, run_ids, where: str = "") -> str:
    """The one run id of ``run_ids`` that ``ref`` (a full id or a prefix) names; ``where``
    (e.g. a store URL) goes into the message.

    Raises:
        ActsparseError: no id or several ids start with ``ref``, listing the run ids.
    """
    ids = list(run_ids)
    matches = [i for i in ids if ref and i.startswith(str(ref))]
    if len(matches) != 1:
        what = f"run prefix '{ref}' is ambiguous" if matches else f"unknown run '{ref}'"
        raise ActsparseError(f"{what}{f' in {where}' if where else ''} (runs: {', '.join(ids) or 'none'})")
    return matches[0]


def content_hash(obj: Any, n: int = 16) -> str:
    """First ``n`` hex digits of the sha256 of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


# ---------------------------------------------------------------- dtypes (pitfalls P5, P6)


def encode(t, dtype: str, *, where: str = "", out: np.ndarray | None = None) -> np.ndarray:
    """Convert a float tensor to the stored numpy representation.

    Args:
        t: torch tensor of any float dtype, any shape.
        dtype: ``bfloat16`` (returned as ``uint16`` bit patterns), ``float16`` or ``float32``.
        where: a label for the overflow error message (site and layer).
        out: optional C-contiguous numpy array of ``numpy_dtype(dtype)`` and t's shape to write into;
            conversion and copy are then one pass (torch rounds to nearest even, as ``Tensor.to``).

    Returns:
        ``out`` when given, else a new array.

    Raises:
        ActsparseError: ``float16`` requested and a finite value exceeds the float16 range.
    """
    import torch

    if dtype not in STORED_DTYPES:
        raise ActsparseError(f"unknown stored dtype '{dtype}' (choose {', '.join(STORED_DTYPES)})")
    if dtype == "float16":
        peak = float(t.detach().abs().max()) if t.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise ActsparseError(
                f"{where} has |x| up to {peak:.4g}, beyond float16's {FLOAT16_MAX:g}: "
                "store as --dtype bfloat16 (lossless for bf16 models) or float32"
            )
    if out is None:
        out = np.empty(tuple(t.shape), dtype=numpy_dtype(dtype))
    dst = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(out)
    dst.copy_(t)
    return out


def numpy_dtype(dtype: str) -> str:
    """The numpy dtype a logical stored dtype is written as."""
    return {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}[dtype]


def decode(arr: np.ndarray, dtype: str, *, to: str = "float32"):
    """Turn a stored numpy block back into a torch tensor (``float32`` by default, or ``native``).

    bfloat16 bit patterns are reinterpreted without copying, then widened exactly.
    """
    import torch

    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr))
    return t if to == "native" else t.to(getattr(torch, to))


# ---------------------------------------------------------------- files


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import (one thread)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _umask_mode() -> int:
    """Mode of a new file under the process umask (files written via mkstemp start 0600)."""
    return 0o666 & ~_UMASK


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; stores are shared between users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_parquet(path: Path, table) -> None:
    """Write a pyarrow table as zstd Parquet atomically (temporary name, then rename)."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=256 * 1024)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` (released by the kernel even on SIGKILL).

    Raises:
        ActsparseError: another process holds the lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ActsparseError(f"{what} is being written by another process (pid {holder}); refusing a second writer") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def blocking_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock``, waiting for it (short critical sections: catalogue, weights)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def disk_error(e: OSError, doing: str) -> ActsparseError:
    """A one-line error for an OS error while writing (disk full, read-only filesystem, permission)."""
    reason = {errno.ENOSPC: "disk full", errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied",
              errno.EDQUOT: "disk quota exceeded"}.get(e.errno, e.strerror or str(e))
    return ActsparseError(f"{reason} while {doing}" + (f" ({e.filename})" if e.filename else ""))


# ---------------------------------------------------------------- store


def _check_version(meta: dict, where: str) -> None:
    if meta.get("format") not in (FORMAT_NAME, "actsparse-run"):
        raise ActsparseError(f"{where} is not an actsparse store file (format={meta.get('format')!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ActsparseError(
            f"{where} has format version {version}, newer than this actsparse reads ({FORMAT_VERSION}); upgrade actsparse"
        )


@dataclass(frozen=True)
class StorePaths:
    """Path arithmetic for a local store; run and weight ids are validated before use as paths."""

    root: Path

    def run_dir(self, run_id: str) -> Path:
        if not RUN_ID_RE.match(run_id):
            raise ActsparseError(f"invalid run id {run_id!r}")
        return self.root / "runs" / run_id

    def weights_dir(self, weights_id: str) -> Path:
        if not WEIGHTS_ID_RE.match(weights_id):
            raise ActsparseError(f"invalid weights id {weights_id!r}")
        return self.root / "models" / weights_id / WEIGHTS


def create_store(path: str | Path) -> StorePaths:
    """Open a local store for writing, creating it if needed.

    Raises:
        ActsparseError: the path is a file, not writable, or holds a store of a newer format.
    """
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise ActsparseError(f"store path {root} is a file, not a directory")
    marker = root / STORE_FILE
    try:
        if marker.is_file():
            _check_version(json.loads(marker.read_text()), str(root))
        elif root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")):
            raise ActsparseError(f"store path {root} is a non-empty directory that is not an actsparse store")
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise ActsparseError(f"store path {root} is not writable")
        if not marker.is_file():
            atomic_write_json(marker, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION})
    except OSError as e:
        raise disk_error(e, f"creating the store at {root}") from e
    return StorePaths(root)


def write_catalogue(paths: StorePaths) -> None:
    """Rebuild ``catalogue.parquet`` from the complete runs' manifests (under a store lock)."""
    import pyarrow as pa

    rows = []
    for d in sorted((paths.root / "runs").glob("*/" + MANIFEST)):
        m = json.loads(d.read_text())
        if m.get("status") == "complete":
            rows.append(catalogue_row(m))
    with blocking_lock(paths.root / ".catalogue.lock"):
        atomic_write_parquet(paths.root / CATALOGUE, pa.Table.from_pylist(rows, schema=CATALOGUE_SCHEMA()))


def CATALOGUE_SCHEMA():
    """The schema of ``catalogue.parquet`` (and of the SQL view ``runs``)."""
    import pyarrow as pa

    return pa.schema([
        ("run_id", pa.string()), ("model", pa.string()), ("model_name", pa.string()),
        ("architecture", pa.string()), ("weights_sha256", pa.string()), ("corpus", pa.string()),
        ("corpus_sha256", pa.string()), ("split", pa.string()), ("sites", pa.list_(pa.string())),
        ("n_layers", pa.int32()), ("d_model", pa.int32()), ("d_ff", pa.int32()), ("activation", pa.string()),
        ("n_tokens", pa.int64()), ("n_sequences", pa.int64()), ("seq_len", pa.int32()),
        ("stored_dtype", pa.string()), ("compute_dtype", pa.string()), ("created", pa.string()),
        ("completed", pa.string()), ("bytes", pa.int64()),
    ])


def catalogue_row(m: dict) -> dict:
    """One catalogue row from a run manifest."""
    model, ffn, cfg = m["model"], m["model"]["ffn"], m["config"]
    return dict(
        run_id=m["run_id"], model=cfg["model"], model_name=model["name"], architecture=model["architecture"],
        weights_sha256=model["weights_sha256"], corpus=m["corpus"]["spec"], corpus_sha256=m["corpus"]["sha256"],
        split=cfg["split"], sites=list(cfg["sites"]), n_layers=ffn["n_layers"], d_model=ffn["d_model"],
        d_ff=ffn["d_ff"], activation=ffn["activation"], n_tokens=m["n_tokens"], n_sequences=m["n_sequences"],
        seq_len=cfg["seq_len"], stored_dtype=cfg["dtype"], compute_dtype=cfg["compute_dtype"],
        created=m["created"], completed=m.get("completed"), bytes=m.get("stats", {}).get("bytes_on_disk"),
    )


def part_name(k: int) -> str:
    """File name of shard ``k``'s Parquet part."""
    return f"part-{k:06d}.parquet"


def completed_parts(run_dir: Path) -> int:
    """Number of shards whose token part exists, counted as a contiguous prefix 0..K-1."""
    k = 0
    while (run_dir / "tokens" / part_name(k)).is_file():
        k += 1
    return k


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
