"""Installing verified runs into a store, shared by ``unpack`` and ``merge``: runs and weights are staged in a
temporary directory inside the destination, verified there, and only then renamed into place."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.checksums import Digests, parse_checksums
from actsparse.core.errors import ActsparseError
from actsparse.core.files import NotRegularFile, blocking_lock, read_regular
from actsparse.pipeline.reader import StoreReader
from actsparse.pipeline.store_root import write_catalogue
from actsparse.share.verify import VerifyReport


@dataclass
class ImportResult:
    """What :func:`unpack` or :func:`merge` did."""

    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    weights_added: list[str] = field(default_factory=list)


def read_checksums(st: StoreReader, base: str, fix: str) -> tuple[bytes, Digests]:
    """The raw ``checksums.json`` of a run or weights dir (``base``, store-relative) and its parsed entries.

    Raises:
        ActsparseError: it has none (a store written before checksums existed; ``fix`` says what to run), or
            it does not parse.
    """
    try:
        raw = st.read(f"{base}/{fmt.CHECKSUMS}", fmt.MAX_CHECKSUMS_BYTES, "checksum list")
    except FileNotFoundError:
        raise ActsparseError(f"{base} in {st.url} has no {fmt.CHECKSUMS} (written before checksums existed); "
                             f"run `{fix}` first") from None
    return raw, parse_checksums(raw, f"{base}/{fmt.CHECKSUMS}")


def store_version(root: Path) -> int:
    return json.loads((root / fmt.STORE_FILE).read_text())["format_version"]


def present(paths: fmt.StorePaths, rid: str) -> str | None:
    """None when the run is absent from the destination, else a phrase for the 'skipped' message."""
    d = paths.run_dir(rid)
    if not os.path.lexists(d):
        return None
    try:
        status = json.loads(read_regular(d / fmt.MANIFEST, fmt.MAX_METADATA_BYTES, "manifest")).get("status", "?")
    except (OSError, ValueError, AttributeError, RecursionError, NotRegularFile, ActsparseError):
        status = "no readable manifest"
    if status == "complete":
        return "already present"
    return f"already present there ({status}; delete {d} to replace it)"


def install(staging: Path, paths: fmt.StorePaths, run_ids: list[str], weights_ids: list[str],
             result: ImportResult, log: Callable[[str], None]) -> None:
    """Rename verified weights, then runs, from ``staging`` (inside the store) into place."""
    for wid in weights_ids:
        target = paths.weights_dir(wid)
        with blocking_lock(target.parent / ".lock"):
            if (target / fmt.ZARR_META).is_file():
                continue
            os.replace(staging / fmt.weights_path(wid, fmt.CHECKSUMS), target.parent / fmt.CHECKSUMS)
            os.rename(staging / fmt.weights_path(wid, fmt.WEIGHTS), target)
            result.weights_added.append(wid)
    (paths.root / fmt.RUNS).mkdir(exist_ok=True)
    for rid in run_ids:
        try:
            os.rename(staging / fmt.run_path(rid), paths.run_dir(rid))
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another writer created this run between our check and the rename.
            result.skipped.append(rid)
            log(f"run {rid}: {present(paths, rid)}; skipped")
            continue
        result.added.append(rid)
        log(f"run {rid}: added")
    if result.added:
        write_catalogue(paths)


def fail_message(what: str, report: VerifyReport) -> str:
    first = report.problems[0]
    more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
    return f"{what} fails verification: {first}{more}; nothing was added"


def refuse_mismatched_runs(st: StoreReader, run_ids: list[str], paths: fmt.StorePaths, what: str) -> None:
    """Refuse runs whose manifest format version differs from the destination store's."""
    want = store_version(paths.root)
    for rid in run_ids:
        version = st.manifest(rid).format_version
        if version != want:
            raise ActsparseError(f"{what}: run {rid} has format version {version}, {paths.root} has {want}; "
                                 "refusing to mix formats")
