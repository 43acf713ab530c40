"""Merging stores: complete runs (and their weights) copied from one store into another, each checked against
the source's checksums while it is copied and renamed into place only when complete."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.checksums import BLOCK, Digests, open_store_file
from actsparse.core.errors import ActsparseError
from actsparse.core.files import NotRegularFile, remove_tree
from actsparse.pipeline.reader import Run, StoreReader
from actsparse.pipeline.store_root import create_store
from actsparse.share.staging import (
    ImportResult,
    fail_message,
    install,
    present,
    read_checksums,
    refuse_mismatched_runs,
    store_version,
)
from actsparse.share.verify import Verifier


def _copy_verified(st: StoreReader, rel: str, target: Path, sha: str, size: int) -> None:
    """Copy one file of the source, hashing it as it goes, and stop one byte past its listed ``size``: a file
    larger than listed (or an endless HTTP source) costs no more than the listed size to refuse."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open_store_file(st.fs, st.path(*rel.split("/"))) as src, open(target, "xb") as dst:
            h, n = hashlib.sha256(), 0
            while n <= size and (chunk := src.read(min(BLOCK, size + 1 - n))):
                h.update(chunk)
                n += len(chunk)
                dst.write(chunk)
    except FileNotFoundError:
        raise ActsparseError(f"{rel} is missing in {st.url}; nothing of its run was added") from None
    except NotRegularFile as e:
        raise ActsparseError(f"{rel} is {e.what} in {st.url}; nothing of its run was added") from None
    if n != size:
        what = f"truncated ({n} of {size} bytes)" if n < size else f"altered (larger than the {size} bytes listed)"
        raise ActsparseError(f"{rel} in {st.url}: {what}; nothing of its run was added")
    if h.hexdigest() != sha:
        raise ActsparseError(f"{rel} in {st.url}: altered (sha256 mismatch); nothing of its run was added")


def _stage_dir(st: StoreReader, base: str, staging: Path) -> Digests:
    """Copy a run or weights dir into ``staging`` (checksums first, then every listed file, verified)."""
    raw, listed = read_checksums(st, base, f"actsparse verify {st.url} --add-checksums")
    out = staging.joinpath(*base.split("/"))
    out.mkdir(parents=True)
    (out / fmt.CHECKSUMS).write_bytes(raw)
    for rel, (sha, size) in listed.items():
        _copy_verified(st, f"{base}/{rel}", out.joinpath(*rel.split("/")), sha, size)
    return {f"{base}/{rel}": d for rel, d in listed.items()}


def merge(src: str, dst: str | Path, run_ids: Iterable[str] | None = None, *,
          log: Callable[[str], None] = print) -> ImportResult:
    """Copy complete runs (and their weights) from one store into another, then rebuild its catalogue.

    Runs already in ``dst`` are skipped. Each run is copied into a temporary directory inside ``dst``,
    every file checked against the source's ``checksums.json`` while it is copied, and the run renamed
    into place only when complete, so a half-copied run is never visible.

    Args:
        src: local path or fsspec URL of the source store (read-only access).
        dst: local destination store (created if missing).
        run_ids: runs to copy (ids or unique prefixes); default: every complete run of ``src``.
        log: where one-line messages go.

    Returns:
        An :class:`ImportResult`.

    Raises:
        ActsparseError: a format-version mismatch, source and destination are the same store, a run lacks
        checksums or a file does not match them.
    """
    st = StoreReader(str(src))
    if st.format_version != fmt.FORMAT_VERSION:
        raise ActsparseError(f"{src} has store format version {st.format_version}, this actsparse writes "
                             f"{fmt.FORMAT_VERSION}; refusing to mix formats")
    paths = create_store(dst)
    if st.is_local and Path(st.root).resolve() == paths.root.resolve():
        raise ActsparseError(f"{src} and {dst} are the same store")
    if st.format_version != store_version(paths.root):
        raise ActsparseError(f"{src} has store format version {st.format_version}, {dst} has "
                             f"{store_version(paths.root)}; refusing to mix formats")
    runs = [st.run(r) for r in run_ids] if run_ids else st.runs()
    runs = list({r.run_id: r for r in runs}.values())
    refuse_mismatched_runs(st, [r.run_id for r in runs], paths, str(src))
    result = ImportResult()
    for run in runs:
        why = present(paths, run.run_id)
        if why:
            result.skipped.append(run.run_id)
            log(f"run {run.run_id}: {why}; skipped")
            continue
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=paths.root))
        try:
            _merge_run(st, run, staging, paths, result, log)
        finally:
            remove_tree(staging)
    return result


def _merge_run(st: StoreReader, run: Run, staging: Path, paths: fmt.StorePaths, result: ImportResult,
               log: Callable[[str], None]) -> None:
    base = fmt.run_path(run.run_id)
    known = _stage_dir(st, base, staging)
    (staging / base / fmt.MANIFEST).write_bytes(st.read(fmt.run_path(run.run_id, fmt.MANIFEST), fmt.MAX_METADATA_BYTES,
                                                        "manifest"))
    wid = run.manifest.weights_id
    weights = []
    if not (paths.weights_dir(wid) / fmt.ZARR_META).is_file():
        known |= _stage_dir(st, fmt.weights_path(wid), staging)
        weights.append(wid)
    (staging / fmt.STORE_FILE).write_text(json.dumps(fmt.store_marker() | {"format_version": st.format_version}))
    v = Verifier(StoreReader(str(staging)), known)
    if v.run(run.run_id) is not None and weights:
        v.weights(wid, [run.run_id])
    if not v.report.ok:
        raise ActsparseError(fail_message(f"run {run.run_id} of {st.url}", v.report))
    install(staging, paths, [run.run_id], weights, result, log)
