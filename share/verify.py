"""Verifying a store: every file of its runs and weights re-read and compared with their checksum lists.

``verify`` reports, by store-relative path: missing, truncated and altered files (each read no further than
one byte past its listed size), unexpected extra files (unlisted files under ``analysis/`` and ``token_stats/``
are warnings), symbolic links, FIFOs and other non-regular entries, incomplete runs, runs without a manifest,
runs whose weights are missing, entries of the store root the format does not define (``describe_path``), and
a catalogue that is unreadable or disagrees with the complete runs' manifests. ``seal`` writes the checksum
lists of stores written before checksums existed; ``rebuild_catalogue`` rebuilds the catalogue.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from actsparse.core import format as fmt
from actsparse.core.checksums import Digests, digest, is_transient, local_tree, parse_checksums, write_checksums
from actsparse.core.errors import ActsparseError
from actsparse.core.files import NotRegularFile
from actsparse.pipeline.reader import StoreReader
from actsparse.pipeline.store_root import write_catalogue
from actsparse.share.card import size_text


def seal(store: str | Path, run_ids: Iterable[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    """Write ``checksums.json`` for complete runs and weights that have none (stores written before checksums).

    This records the files as they are now: run it only on a store you trust.

    Args:
        store: a local store directory.
        run_ids: restrict to these runs (ids or unique prefixes) and their weights.
        log: where one-line messages go.

    Returns:
        The number of directories sealed.

    Raises:
        ActsparseError: not a local store, unknown run, or a run is incomplete.
    """
    st = StoreReader(str(store))
    if not st.is_local:
        raise ActsparseError(f"--add-checksums writes into the store; {store} is not a local directory")
    root = Path(st.root)
    runs = [st.run(r) for r in run_ids] if run_ids else st.runs()
    dirs = []
    for run in runs:
        dirs.append(root / fmt.run_path(run.run_id))
        dirs.append(root / fmt.weights_path(run.manifest.weights_id))
    n = 0
    for d in dict.fromkeys(dirs):
        if d.is_dir() and not (d / fmt.CHECKSUMS).is_file():
            count = write_checksums(d)
            log(f"sealed {d.relative_to(root)}: {count} files")
            n += 1
    return n


@dataclass(frozen=True)
class Finding:
    """One problem or warning, named by its store-relative path."""

    path: str
    what: str

    def __str__(self) -> str:
        # A file name found on disk may hold a newline; keep each finding on one line.
        return f"{self.path if self.path.isprintable() else repr(self.path)}: {self.what}"


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` is True when there are no problems (warnings are allowed)."""

    store: str
    runs: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: what was checked, and how many problems and warnings."""
        checked = (f"{len(self.runs)} run(s), {len(self.weights)} weights dir(s), {self.files} files "
                   f"({size_text(self.bytes)}) in {self.store}")
        warn = f", {len(self.warnings)} warning(s)" if self.warnings else ""
        if self.ok:
            return f"ok: {checked}{warn}"
        return f"FAILED: {len(self.problems)} problem(s){warn}; checked {checked}"


class Verifier:
    """Checks runs and weights of one store; ``known`` digests (store-relative) spare re-reading files."""

    def __init__(self, st: StoreReader, known: Digests | None = None):
        self.st, self.known = st, known or {}
        self.local = st.is_local
        self.report = VerifyReport(store=st.url)

    def problem(self, path: str, what: str) -> None:
        self.report.problems.append(Finding(path, what))

    def warn(self, path: str, what: str) -> None:
        self.report.warnings.append(Finding(path, what))

    def url(self, rel: str) -> str:
        return self.st.path(*rel.split("/"))

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.url(rel)) if self.local else self.st.fs.exists(self.url(rel))

    def listing(self, base: str) -> tuple[list[str], list[str]] | None:
        """Files (and symbolic links) under ``base``, or None where the filesystem cannot list."""
        if self.local:
            return local_tree(Path(self.url(base)))
        try:
            found = self.st.fs.find(self.url(base))
        except Exception:  # noqa: BLE001 - a web server may refuse or not offer directory listings
            return None
        prefix = self.url(base).rstrip("/") + "/"
        rels = (unquote(f[len(prefix):]) for f in found if f.startswith(prefix))
        return sorted(r for r in rels if r and not is_transient(r)), []

    def tree(self, base: str, required: list[str]) -> None:
        """Check the files under ``base`` (a run or weights dir) against its ``checksums.json``."""
        try:
            rel = f"{base}/{fmt.CHECKSUMS}"
            listed = parse_checksums(self.st.read(rel, fmt.MAX_CHECKSUMS_BYTES, "checksum list"), rel)
        except (FileNotFoundError, NotADirectoryError):
            listed = None
            self.problem(f"{base}/{fmt.CHECKSUMS}", "missing (written before checksums existed? "
                                                "`actsparse verify --add-checksums` adds it)")
        except ActsparseError as e:
            listed = None
            self.problem(f"{base}/{fmt.CHECKSUMS}", str(e).removeprefix(f"{base}/{fmt.CHECKSUMS}: "))
        for rel, (sha, size) in (listed or {}).items():
            self.file(f"{base}/{rel}", sha, size)
        for rel in required:
            if rel not in (listed or {}) and not self.exists(f"{base}/{rel}"):
                self.problem(f"{base}/{rel}", "missing")
        found = self.listing(base)
        if found is None:
            self.warn(base, "cannot list files here; unexpected extra files not checked")
            return
        files, links = found
        for rel in links:
            self.problem(f"{base}/{rel}", f"{_kind(self.url(f'{base}/{rel}'))} (a store holds regular files only)")
        if listed is None:
            return
        for rel in files:
            if rel in listed or rel in fmt.UNLISTED:
                continue
            if rel.startswith(fmt.DERIVED_DIRS):
                self.warn(f"{base}/{rel}", "not in checksums.json (written without update_checksums)")
            else:
                self.problem(f"{base}/{rel}", "unexpected file (not in checksums.json)")

    def file(self, rel: str, sha: str, size: int) -> None:
        """Check one listed file, reading no more than one byte past its listed size."""
        try:
            got_sha, got_size = self.known[rel] if rel in self.known else digest(self.st.fs, self.url(rel), size)
        except (FileNotFoundError, NotADirectoryError):
            self.problem(rel, "missing")
            return
        except NotRegularFile as e:
            if not self.local:
                self.problem(rel, f"is {e.what}")
            return  # reported by the listing of its directory
        except OSError as e:
            self.problem(rel, f"unreadable ({e.strerror or e})")
            return
        self.report.files += 1
        self.report.bytes += min(got_size, size)
        if got_size < size:
            self.problem(rel, f"truncated ({got_size} of {size} bytes)")
        elif got_size > size:
            self.problem(rel, f"altered (larger than the {size} bytes listed)")
        elif got_sha != sha:
            self.problem(rel, "altered (sha256 mismatch)")

    def run(self, rid: str) -> str | None:
        """Check one run; returns its weights id (None when the manifest is unusable)."""
        base = fmt.run_path(rid)
        self.report.runs.append(rid)
        try:
            m = self.st.manifest(rid, missing_ok=True)
        except ActsparseError as e:
            self.problem(f"{base}/{fmt.MANIFEST}", f"invalid ({e})")
            return None
        if m is None:
            self.problem(f"{base}/{fmt.MANIFEST}", "missing (a run directory without a manifest)")
            return None
        if not m.complete:
            self.problem(base, f"incomplete run (status {m.status!r}); resume it with the same `actsparse collect`")
            return None
        required = [fmt.DOCUMENTS, f"{fmt.ACTIVATIONS}/{fmt.ZARR_META}",
                    *(f"{fmt.site_array(site)}/{fmt.ZARR_META}" for site in m.sites),
                    *(fmt.token_part(k) for k in range(m.n_parts))]
        self.tree(base, required)
        return m.weights_id

    def weights(self, wid: str, owners: list[str]) -> None:
        base = fmt.weights_path(wid)
        if not self.exists(f"{base}/{fmt.WEIGHTS}/{fmt.ZARR_META}"):
            self.problem(f"{base}/{fmt.WEIGHTS}", f"missing (weights of run {', '.join(owners)})")
            return
        self.report.weights.append(wid)
        self.tree(base, [f"{fmt.WEIGHTS}/{fmt.ZARR_META}"])

    def store_level(self) -> None:
        """The store root (local stores): every entry must be one the format defines (``describe_path``); leftovers
        of interrupted merges are warnings; entries of ``runs/`` and ``models/`` must be ids, and files of
        ``evaluations/`` results."""
        root = Path(self.st.root)
        for p in sorted(root.iterdir()):
            name = p.name
            if name.startswith(fmt.STAGING_PREFIXES):
                self.warn(name, "leftover of an interrupted merge/unpack (safe to delete)")
            elif name in fmt.LOCKS or is_transient(name):
                continue
            elif name in (fmt.RUNS, fmt.MODELS, fmt.EVALUATIONS):
                if p.is_symlink() or not p.is_dir():
                    self.problem(name, f"{_kind(str(p))}, not a directory")
            elif fmt.describe_path(name) is None:
                self.problem(name, "unexpected entry (not part of an actsparse store)")
            elif p.is_symlink() or not p.is_file():
                self.problem(name, f"{_kind(str(p))} (a store holds regular files only)")
        for top in (fmt.RUNS, fmt.MODELS):
            d = root / top
            if d.is_dir() and not d.is_symlink():
                for p in sorted(d.iterdir()):
                    if not fmt.ID_RE.match(p.name) and not is_transient(p.name) and p.name not in fmt.LOCKS:
                        what = "a run id" if top == fmt.RUNS else "a weights id"
                        self.problem(f"{top}/{p.name}", f"unexpected entry (not {what})")
                    elif fmt.ID_RE.match(p.name) and (p.is_symlink() or not p.is_dir()):
                        self.problem(f"{top}/{p.name}", f"{_kind(str(p))}, not a directory")
        evaluations = root / fmt.EVALUATIONS
        if evaluations.is_dir() and not evaluations.is_symlink():
            files, others = local_tree(evaluations)
            for rel in others:
                self.problem(f"{fmt.EVALUATIONS}/{rel}", f"{_kind(str(evaluations / rel))} "
                                                         "(a store holds regular files only)")
            for rel in files:
                if fmt.describe_path(f"{fmt.EVALUATIONS}/{rel}") is None:
                    self.problem(f"{fmt.EVALUATIONS}/{rel}", "unexpected file (not part of an actsparse store)")

    def catalogue(self, complete: dict[str, fmt.Manifest]) -> None:
        """``catalogue.parquet`` must be readable, have the documented columns and hold exactly one row per
        complete run, equal to what the run's manifest gives (``Manifest.catalogue_row``)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fix = "`actsparse verify --rebuild-catalogue` rebuilds it"
        try:
            raw = self.st.read(fmt.CATALOGUE, fmt.MAX_CATALOGUE_BYTES, "catalogue")
        except (FileNotFoundError, NotADirectoryError):
            if complete:
                self.problem(fmt.CATALOGUE, f"missing, though the store holds {len(complete)} complete run(s); {fix}")
            return
        except ActsparseError as e:
            self.problem(fmt.CATALOGUE, f"unreadable ({e}); {fix}")
            return
        try:
            table = pq.read_table(pa.BufferReader(raw))
        except (pa.ArrowException, ValueError, OSError) as e:
            self.problem(fmt.CATALOGUE, f"not a readable Parquet table ({str(e).splitlines()[0][:160]}); {fix}")
            return
        want = fmt.arrow_schema(fmt.CATALOGUE_COLUMNS)
        if not table.schema.equals(want, check_metadata=False):
            self.problem(fmt.CATALOGUE, f"its columns are not the catalogue's ({', '.join(table.schema.names)[:160]});"
                                        f" {fix}")
            return
        rows = {}
        for row in table.to_pylist():
            rid = row.get("run_id")
            if rid in rows:
                self.problem(fmt.CATALOGUE, f"lists run {rid!r} twice; {fix}")
                return
            rows[rid] = row
        for rid in sorted(set(rows) - set(complete), key=str):
            self.problem(fmt.CATALOGUE, f"lists run {rid!r}, which is not a complete run of the store; {fix}")
        for rid in sorted(set(complete) - set(rows)):
            self.problem(fmt.CATALOGUE, f"does not list complete run {rid}; {fix}")
        for rid in sorted(set(complete) & set(rows)):
            if rows[rid] != complete[rid].catalogue_row():
                self.problem(fmt.CATALOGUE, f"its row of run {rid} differs from the run's manifest; {fix}")


def _kind(path: str) -> str:
    """What a non-regular store entry is, for a finding."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "missing"
    for test, what in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISREG, "regular file")):
        if test(mode):
            return what
    return "device or special file"


def rebuild_catalogue(store: str | Path, *, log: Callable[[str], None] = print) -> int:
    """Rebuild ``catalogue.parquet`` of a local store from its complete runs' manifests.

    Returns:
        The number of runs it lists.

    Raises:
        ActsparseError: not a local store.
    """
    st = StoreReader(str(store))
    if not st.is_local:
        raise ActsparseError(f"--rebuild-catalogue writes into the store; {store} is not a local directory")
    write_catalogue(fmt.StorePaths(Path(st.root)))
    n = len(StoreReader(str(store)).catalogue_run_ids())
    log(f"rebuilt {fmt.CATALOGUE}: {n} complete run(s)")
    return n


def verify_runs(st: StoreReader, run_ids: list[str] | None, known: Digests | None = None) -> VerifyReport:
    """Check the given runs (all runs, and the store root when local, when None) and their weights; ``known``
    digests (store-relative) spare re-reading files that were hashed while copied."""
    v = Verifier(st, known)
    if run_ids is None:
        ids = st.run_ids(include_incomplete=True)
        if v.local:
            v.store_level()
        v.catalogue(st.manifests())
    else:
        ids = run_ids
    owners: dict[str, list[str]] = {}
    for rid in ids:
        wid = v.run(rid)
        if wid is not None:
            owners.setdefault(wid, []).append(rid)
    for wid, runs in owners.items():
        v.weights(wid, runs)
    return v.report


def verify(store: str, run_ids: Iterable[str] | None = None) -> VerifyReport:
    """Re-read every file of a store's runs and weights and compare it with the checksum lists.

    Reports, by store-relative path: missing, truncated and altered files, unexpected extra files
    (unlisted files under ``analysis/`` and ``token_stats/`` are warnings), symbolic links and other
    non-regular entries, incomplete runs, runs without a manifest, and runs whose weights are missing; when
    every run is checked, also unexpected entries of the store root (local stores) and a catalogue that does
    not match the complete runs.

    Args:
        store: local path or fsspec URL (``http://``, ``file://``, ``s3://``); read-only access.
        run_ids: check only these runs (ids or unique prefixes) and their weights; default: all runs.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is False when anything is wrong.

    Raises:
        ActsparseError: not a store, a newer format, or an unknown/ambiguous run id.
    """
    st = StoreReader(str(store))
    ids = None
    if run_ids:
        known = st.run_ids(include_incomplete=True)
        ids = list(dict.fromkeys(fmt.match_run(ref, known, str(store)) for ref in run_ids))
    return verify_runs(st, ids)
