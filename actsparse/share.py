"""Sharing activation corpora between teams: checksums, verification, single-file archives, merges.

Integrity. Every run directory and every weights directory (``models/<weights_id>/``) holds a
``checksums.json`` listing the sha256 and size of each of its files, written by ``collect`` just before
the run is marked complete (:func:`write_checksums`). Two files are not listed: ``checksums.json`` itself
and the run's ``manifest.json``, which is rewritten when the run completes and is checked by schema
instead. Lock files and ``*.tmp`` files are never listed. Later writers of derived results
(``analysis/``, ``token_stats/``) add their files with :func:`update_checksums`; :func:`verify` reports
files there that are not listed as warnings, anywhere else as problems.

Archives. :func:`pack` writes one plain tar (activation chunks are already compressed) holding
``README.md`` (a dataset card), ``archive.json`` (sha256 and size of every other member),
``actsparse-store.json`` and the chosen runs with their weights, laid out as in a store.
:func:`unpack` refuses unsafe members (absolute, ``..``, links, devices, names outside the store
layout), extracts into a temporary directory inside the destination, verifies everything, and only
then renames runs into place. :func:`merge` copies runs between stores the same way. Nothing here
loads pickle, and no name read from a manifest, a checksum list or an archive is used as a path before
it has been matched against the store layout.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable
from urllib.parse import unquote

from actsparse.errors import ActsparseError
from pipeline import store as fmt
from pipeline.reader import Run, StoreReader, _is_local

CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "actsparse-checksums"
ARCHIVE_INDEX = "archive.json"
ARCHIVE_FORMAT = "actsparse-archive"
CARD = "README.md"
SHARE_FORMAT_VERSION = 1
DERIVED_DIRS = ("analysis/", "token_stats/")
_LOCKS = frozenset({".lock", ".checksums.lock"})
_UNLISTED = frozenset({CHECKSUMS, fmt.MANIFEST})  # top-level files of a run that checksums.json never lists
_TMP_PREFIXES = (".incoming-", ".unpack-")  # temporary directories of merge/unpack at a store's root
_BLOCK = 1 << 22
# One path component of a listed file: no leading dot (so no '..', no hidden files), no separators,
# nothing that would need quoting in a URL.
_SAFE_PART = re.compile(r"^[A-Za-z0-9_=+-][A-Za-z0-9._=+-]{0,254}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MEMBER_RE = re.compile(
    r"^(README\.md|archive\.json|actsparse-store\.json|runs/[0-9a-f]{16}/.+|models/[0-9a-f]{16}/(checksums\.json|ffn\.zarr/.+))$"
)

Digests = dict[str, tuple[str, int]]


# ---------------------------------------------------------------- checksums


def _is_transient(rel: str) -> bool:
    """Lock files and temporary files: never listed, never packed or copied."""
    parts = rel.split("/")
    return parts[-1] in _LOCKS or any(p.endswith(".tmp") for p in parts)


def _safe_rel(rel: object) -> bool:
    return isinstance(rel, str) and all(_SAFE_PART.match(p) for p in rel.split("/"))


def _open_local(path: str):
    # O_NOFOLLOW: a symbolic link planted in a store must not make us read (and pack) a file outside it.
    try:
        return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _SymlinkError(path) from None
        raise


class _SymlinkError(Exception):
    """A store file is a symbolic link (stores hold regular files only)."""


def _open(fs, url: str):
    """Open a store file for reading; ``fs`` None means a local path."""
    return _open_local(url) if fs is None or _is_local(fs) else fs.open(url, "rb", block_size=_BLOCK)


def _digest_file(f) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while chunk := f.read(_BLOCK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _digest(fs, url: str) -> tuple[str, int]:
    with _open(fs, url) as f:
        return _digest_file(f)


def _local_tree(base: Path) -> tuple[list[str], list[str]]:
    """``(files, links)`` under ``base`` as sorted relative posix paths, transient files left out."""
    files, links = [], []
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [*filenames, *dirnames]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            if os.path.islink(path):
                links.append(rel)
            elif name in filenames and not _is_transient(rel):
                files.append(rel)
        dirnames[:] = [d for d in dirnames if not d.endswith(".tmp") and not os.path.islink(os.path.join(dirpath, d))]
    return sorted(files), sorted(links)


def _checksums_doc(files: Digests) -> dict:
    return dict(format=CHECKSUMS_FORMAT, format_version=SHARE_FORMAT_VERSION, algorithm="sha256",
                files={rel: dict(sha256=sha, size=size) for rel, (sha, size) in sorted(files.items())})


def parse_checksums(raw: bytes, where: str) -> Digests:
    """Parse and validate a ``checksums.json`` (or the member list of an ``archive.json``).

    Args:
        raw: the file's bytes.
        where: a label for error messages (store-relative path).

    Returns:
        ``{relative path: (sha256 hex, size)}``; every path has been checked to be a plain relative path.

    Raises:
        ActsparseError: not JSON, wrong format or version, or an entry with an unsafe path or bad digest.
    """
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ActsparseError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") not in (CHECKSUMS_FORMAT, ARCHIVE_FORMAT):
        raise ActsparseError(f"{where}: not an actsparse checksum list")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > SHARE_FORMAT_VERSION:
        raise ActsparseError(f"{where}: format version {version!r}, newer than this actsparse reads "
                             f"({SHARE_FORMAT_VERSION}); upgrade actsparse")
    entries = doc.get("files") if doc["format"] == CHECKSUMS_FORMAT else doc.get("members")
    if not isinstance(entries, dict):
        raise ActsparseError(f"{where}: no file list")
    out: Digests = {}
    for rel, e in entries.items():
        if not _safe_rel(rel):
            raise ActsparseError(f"{where}: unsafe path {rel!r}")
        if not (isinstance(e, dict) and isinstance(e.get("sha256"), str) and _SHA_RE.match(e["sha256"])
                and isinstance(e.get("size"), int) and e["size"] >= 0):
            raise ActsparseError(f"{where}: entry {rel!r} has no valid sha256 and size")
        out[rel] = (e["sha256"], e["size"])
    return out


def write_checksums(directory: str | Path) -> int:
    """Write ``checksums.json`` for a run directory or a weights directory (``models/<weights_id>``).

    Lists every file except ``checksums.json``, ``manifest.json``, lock files and ``*.tmp`` files.
    ``collect`` calls it for a run just before marking the run complete, and for the weights right after
    they are renamed into place.

    Args:
        directory: ``STORE/runs/<run_id>`` or ``STORE/models/<weights_id>``.

    Returns:
        The number of files listed.

    Raises:
        ActsparseError: the directory holds a symbolic link.
    """
    d = Path(directory)
    with fmt.blocking_lock(d / ".checksums.lock"):
        files, links = _local_tree(d)
        if links:
            raise ActsparseError(f"{d / links[0]} is a symbolic link; a store holds regular files only")
        digests = {rel: _digest(None, str(d / rel)) for rel in files if rel not in _UNLISTED}
        fmt.atomic_write_json(d / CHECKSUMS, _checksums_doc(digests))
    return len(digests)


def update_checksums(run_dir: str | Path, paths: Iterable[str | Path]) -> bool:
    """Add or replace the entries of some files of a run in its ``checksums.json`` (under a lock).

    For writers of results added after collection (``analysis/*.parquet``, ``token_stats/``). A given
    path that no longer exists is removed from the list.

    Args:
        run_dir: ``STORE/runs/<run_id>``.
        paths: files inside ``run_dir`` (absolute, or relative to ``run_dir``).

    Returns:
        False when the run has no ``checksums.json`` yet (a run still being collected gets its list when it
        completes; a run from before checksums existed gets one from ``actsparse verify --add-checksums``).

    Raises:
        ActsparseError: a path lies outside ``run_dir``, is a lock/temporary file, or is a symbolic link.
    """
    d = Path(run_dir).resolve()
    with fmt.blocking_lock(d / ".checksums.lock"):
        target = d / CHECKSUMS
        if not target.is_file():
            return False
        digests = parse_checksums(target.read_bytes(), str(target))
        for p in paths:
            full = d / p  # an absolute p replaces d
            # Resolve the directories but not the file itself, so that a symbolic link is refused below.
            rel = os.path.relpath(os.path.join(os.path.realpath(full.parent), full.name), d).replace(os.sep, "/")
            if not _safe_rel(rel) or _is_transient(rel) or rel in _UNLISTED:
                raise ActsparseError(f"{p} is not a data file of run {d.name}")
            try:
                digests[rel] = _digest(None, str(d / rel))
            except FileNotFoundError:
                digests.pop(rel, None)
            except _SymlinkError:
                raise ActsparseError(f"{d / rel} is a symbolic link; a store holds regular files only") from None
        fmt.atomic_write_json(target, _checksums_doc(digests))
    return True


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
        dirs.append(root / "runs" / run.run_id)
        dirs.append(root / "models" / run.manifest["model"]["weights_id"])
    n = 0
    for d in dict.fromkeys(dirs):
        if d.is_dir() and not (d / CHECKSUMS).is_file():
            count = write_checksums(d)
            log(f"sealed {d.relative_to(root)}: {count} files")
            n += 1
    return n


# ---------------------------------------------------------------- verify


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
                   f"({_size(self.bytes)}) in {self.store}")
        warn = f", {len(self.warnings)} warning(s)" if self.warnings else ""
        if self.ok:
            return f"ok: {checked}{warn}"
        return f"FAILED: {len(self.problems)} problem(s){warn}; checked {checked}"


class _Verifier:
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
            return _local_tree(Path(self.url(base)))
        try:
            found = self.st.fs.find(self.url(base))
        except Exception:  # noqa: BLE001 - a web server may refuse or not offer directory listings
            return None
        prefix = self.url(base).rstrip("/") + "/"
        rels = (unquote(f[len(prefix):]) for f in found if f.startswith(prefix))
        return sorted(r for r in rels if r and not _is_transient(r)), []

    def tree(self, base: str, required: list[str]) -> None:
        """Check the files under ``base`` (a run or weights dir) against its ``checksums.json``."""
        try:
            listed = parse_checksums(self.st.fs.cat_file(self.url(f"{base}/{CHECKSUMS}")), f"{base}/{CHECKSUMS}")
        except FileNotFoundError:
            listed = None
            self.problem(f"{base}/{CHECKSUMS}", "missing (written before checksums existed? "
                                                "`actsparse verify --add-checksums` adds it)")
        except ActsparseError as e:
            listed = None
            self.problem(f"{base}/{CHECKSUMS}", str(e).removeprefix(f"{base}/{CHECKSUMS}: "))
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
            self.problem(f"{base}/{rel}", "symbolic link (a store holds regular files only)")
        if listed is None:
            return
        for rel in files:
            if rel in listed or rel in _UNLISTED:
                continue
            if rel.startswith(DERIVED_DIRS):
                self.warn(f"{base}/{rel}", "not in checksums.json (written without update_checksums)")
            else:
                self.problem(f"{base}/{rel}", "unexpected file (not in checksums.json)")

    def file(self, rel: str, sha: str, size: int) -> None:
        try:
            got_sha, got_size = self.known[rel] if rel in self.known else _digest(self.st.fs, self.url(rel))
        except FileNotFoundError:
            self.problem(rel, "missing")
            return
        except _SymlinkError:
            return  # reported by the listing of its directory
        self.report.files += 1
        self.report.bytes += got_size
        if got_size < size:
            self.problem(rel, f"truncated ({got_size} of {size} bytes)")
        elif got_size > size:
            self.problem(rel, f"altered ({got_size} bytes, expected {size})")
        elif got_sha != sha:
            self.problem(rel, "altered (sha256 mismatch)")

    def run(self, rid: str) -> str | None:
        """Check one run; returns its weights id (None when the manifest is unusable)."""
        base = f"runs/{rid}"
        self.report.runs.append(rid)
        try:
            m = self.st.manifest(rid, missing_ok=True)
        except ActsparseError as e:
            self.problem(f"{base}/{fmt.MANIFEST}", f"invalid ({e})")
            return None
        if not m:
            self.problem(f"{base}/{fmt.MANIFEST}", "missing (a run directory without a manifest)")
            return None
        if m["status"] != "complete":
            self.problem(base, f"incomplete run (status {m['status']!r}); resume it with the same `actsparse collect`")
            return None
        n_parts = -(-m["n_tokens"] // m["chunk_tokens"])
        required = ["documents.parquet", f"{fmt.ACTIVATIONS}/zarr.json",
                    *(f"{fmt.ACTIVATIONS}/{site}/zarr.json" for site in m["arrays"]),
                    *(f"tokens/{fmt.part_name(k)}" for k in range(n_parts))]
        self.tree(base, required)
        return m["model"]["weights_id"]

    def weights(self, wid: str, owners: list[str]) -> None:
        base = f"models/{wid}"
        if not self.exists(f"{base}/{fmt.WEIGHTS}/zarr.json"):
            self.problem(f"{base}/{fmt.WEIGHTS}", f"missing (weights of run {', '.join(owners)})")
            return
        self.report.weights.append(wid)
        self.tree(base, [f"{fmt.WEIGHTS}/zarr.json"])

    def store_level(self) -> None:
        """Entries of ``runs/`` that are not runs, and leftovers of interrupted merges (local stores only)."""
        root = Path(self.st.root)
        for p in sorted(root.iterdir()):
            if p.name.startswith(_TMP_PREFIXES):
                self.warn(p.name, "leftover of an interrupted merge/unpack (safe to delete)")
        if (root / "runs").is_dir():
            for p in sorted((root / "runs").iterdir()):
                if not fmt.RUN_ID_RE.match(p.name):
                    self.problem(f"runs/{p.name}", "unexpected entry (not a run id)")


def _verify(st: StoreReader, run_ids: list[str] | None, known: Digests | None = None) -> VerifyReport:
    v = _Verifier(st, known)
    if run_ids is None:
        ids = st.run_ids(include_incomplete=True)
        if v.local:
            v.store_level()
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
    (unlisted files under ``analysis/`` and ``token_stats/`` are warnings), symbolic links, incomplete
    runs, runs without a manifest, and runs whose weights are missing.

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
    return _verify(st, ids)


# ---------------------------------------------------------------- pack


@dataclass
class PackResult:
    """What :func:`pack` wrote."""

    path: Path
    runs: list[str]
    weights: list[str]
    members: int
    bytes: int


@dataclass
class _Member:
    name: str                     # archive path = store-relative path
    sha256: str
    size: int
    url: str | None = None        # read from the store ...
    data: bytes | None = None     # ... or generated


def _cell(v) -> str:
    """A Markdown table cell from untrusted manifest text."""
    if isinstance(v, (list, tuple)):
        v = ", ".join(map(str, v))
    return " ".join(str("—" if v in (None, "") else v).split()).replace("|", "\\|")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def dataset_card(manifests: list[dict], run_bytes: dict[str, int], weights_bytes: dict[str, int]) -> str:
    """The ``README.md`` of an archive: runs, models, corpora, licences, sizes, provenance.

    Args:
        manifests: the manifests of the packed runs.
        run_bytes: bytes of each run (sum of its listed files).
        weights_bytes: bytes of each weights directory.
    """
    from actsparse import __version__

    total = sum(run_bytes.values()) + sum(weights_bytes.values())
    tokens = sum(m["n_tokens"] for m in manifests)
    lines = [
        "# Activation dataset (actsparse)", "",
        f"FFN activations of {len(manifests)} run(s), {tokens:,} tokens in all, {_size(total)}. Packed by "
        f"actsparse {__version__} (store format {fmt.FORMAT_VERSION}); `archive.json` lists the sha256 of every file.", "",
        "```", "actsparse unpack ARCHIVE.tar STORE    # checks every checksum before any run becomes visible",
        "actsparse verify STORE", "actsparse runs STORE", "```", "",
        "## Runs", "",
        "| run | model | corpus | split | sites | layers | tokens | sequences | seq_len | stored dtype | compute dtype | size |",
        "|---|---|---|---|---|---|---:|---:|---:|---|---|---:|",
    ]
    for m in manifests:
        c, ffn = m["config"], m["model"].get("ffn", {})
        lines.append("| " + " | ".join(_cell(v) for v in (
            m["run_id"], m["model"].get("name"), m["corpus"].get("name"), c.get("split"), list(m["arrays"]),
            ffn.get("n_layers"), f"{m['n_tokens']:,}", m.get("n_sequences"), c.get("seq_len"), c.get("dtype"),
            c.get("compute_dtype"), _size(run_bytes[m["run_id"]]))) + " |")
    models = {m["model"]["weights_id"]: m["model"] for m in manifests}
    lines += ["", "## Models", "", "| model | source | licence | architecture | FFN | weights sha256 | FFN weights |",
              "|---|---|---|---|---|---|---:|"]
    for wid, mo in models.items():
        ffn = mo.get("ffn", {})
        shape = f"{ffn.get('activation')}, {ffn.get('n_layers')} layers, d_model {ffn.get('d_model')}, d_ff {ffn.get('d_ff')}"
        lines.append("| " + " | ".join(_cell(v) for v in (
            mo.get("name"), mo.get("source") or mo.get("spec"), mo.get("license") or "unknown", mo.get("architecture"),
            shape, mo.get("weights_sha256"), _size(weights_bytes.get(wid, 0)))) + " |")
    corpora = {(m["corpus"].get("sha256"), m["corpus"].get("name")): m["corpus"] for m in manifests}
    lines += ["", "## Texts", "", "| corpus | licence | description | documents | sha256 |", "|---|---|---|---:|---|"]
    for co in corpora.values():
        lines.append("| " + " | ".join(_cell(v) for v in (
            co.get("name"), co.get("license") or "unknown", co.get("description"), co.get("n_documents"),
            co.get("sha256"))) + " |")
    lines += [
        "", "## Licences", "",
        "The activations, token texts and FFN weights here are derived from the models and the texts above. "
        "Whoever uses or redistributes them must respect the licence of each model **and** of each text, as "
        "listed in the tables (taken from the run manifests; `unknown` means the licence was not recorded: find "
        "it before sharing further).", "",
        "## Layout", "",
        "- `runs/<run_id>/manifest.json`: full provenance (config, model, tokenizer, corpus, library versions).",
        "- `runs/<run_id>/activations.zarr/<site>`: zarr v3 arrays `[layers, tokens, width]`; `uint16` holds "
        "bfloat16 bit patterns (attribute `logical_dtype`).",
        "- `runs/<run_id>/tokens/part-*.parquet`: one row per token (`token_id`, `token_text`, `document_id`, "
        "`special`, ...), aligned with the token axis.",
        "- `models/<weights_id>/ffn.zarr`: FFN weights of every layer (nn.Linear `[out, in]` layout).",
        "- `checksums.json` in each run and weights directory: sha256 of every file.", "",
        "## Provenance", "",
        "| run | created | completed | torch | transformers | actsparse |", "|---|---|---|---|---|---|",
    ]
    for m in manifests:
        ver = m.get("versions", {})
        lines.append("| " + " | ".join(_cell(v) for v in (
            m["run_id"], m.get("created"), m.get("completed"), ver.get("torch"), ver.get("transformers"),
            ver.get("actsparse"))) + " |")
    return "\n".join(lines) + "\n"


def _listed_members(st: StoreReader, base: str, log: Callable[[str], None]) -> list[_Member]:
    """The files of a run or weights dir as archive members, from its ``checksums.json``."""
    try:
        raw = st.fs.cat_file(st.path(*base.split("/"), CHECKSUMS))
    except FileNotFoundError:
        raise ActsparseError(f"{base} has no {CHECKSUMS} (written before checksums existed); "
                             f"run `actsparse verify STORE --add-checksums` first") from None
    listed = parse_checksums(raw, f"{base}/{CHECKSUMS}")
    members = [_Member(f"{base}/{CHECKSUMS}", hashlib.sha256(raw).hexdigest(), len(raw), data=raw)]
    members += [_Member(f"{base}/{rel}", sha, size, url=st.path(*base.split("/"), *rel.split("/")))
                for rel, (sha, size) in listed.items()]
    if st.is_local:
        files, _ = _local_tree(Path(st.path(*base.split("/"))))
        left = [r for r in files if r not in listed and r not in _UNLISTED]
        if left:
            log(f"{base}: {len(left)} file(s) not in {CHECKSUMS} left out ({left[0]}{', ...' if len(left) > 1 else ''})")
    return members


def pack(store: str, out: str | Path, run_ids: Iterable[str] | None = None, *,
         log: Callable[[str], None] = print) -> PackResult:
    """Write runs, their weights, a dataset card and a member index into one tar file.

    Every file is hashed while it is written and compared with its ``checksums.json`` entry, so a damaged
    store is never packed. The archive is written under a temporary name and renamed when complete.

    Args:
        store: local path or fsspec URL of the store.
        out: the archive to write (must not exist).
        run_ids: runs to pack (ids or unique prefixes); default: every complete run.
        log: where one-line messages go.

    Returns:
        A :class:`PackResult`.

    Raises:
        ActsparseError: ``out`` exists, no complete run, a run is incomplete or lacks checksums, or a file
        does not match its checksum.
    """
    st = StoreReader(str(store))
    out = Path(out)
    if out.exists():
        raise ActsparseError(f"{out} already exists; choose another name or remove it")
    runs = [st.run(r) for r in run_ids] if run_ids else st.runs()
    runs = list({r.run_id: r for r in runs}.values())
    if not runs:
        raise ActsparseError(f"{store} holds no complete run to pack")
    members: list[_Member] = []
    manifests, run_bytes, weights_bytes = [], {}, {}
    for run in runs:
        base = f"runs/{run.run_id}"
        raw = st.fs.cat_file(st.path("runs", run.run_id, fmt.MANIFEST))
        files = _listed_members(st, base, log)
        members.append(_Member(f"{base}/{fmt.MANIFEST}", hashlib.sha256(raw).hexdigest(), len(raw), data=raw))
        members += files
        manifests.append(run.manifest)
        run_bytes[run.run_id] = sum(m.size for m in files) + len(raw)
        wid = run.manifest["model"]["weights_id"]
        if wid not in weights_bytes:
            wfiles = _listed_members(st, f"models/{wid}", log)
            members += wfiles
            weights_bytes[wid] = sum(m.size for m in wfiles)
    marker = (json.dumps({"format": fmt.FORMAT_NAME, "format_version": st.format_version}, indent=2) + "\n").encode()
    card = dataset_card(manifests, run_bytes, weights_bytes).encode()
    head = [_Member(CARD, hashlib.sha256(card).hexdigest(), len(card), data=card),
            _Member(fmt.STORE_FILE, hashlib.sha256(marker).hexdigest(), len(marker), data=marker)]
    members = head + sorted(members, key=lambda m: m.name)
    index = dict(format=ARCHIVE_FORMAT, format_version=SHARE_FORMAT_VERSION, store_format_version=st.format_version,
                 runs=[r.run_id for r in runs], weights=list(weights_bytes),
                 members={m.name: dict(sha256=m.sha256, size=m.size) for m in members})
    index_raw = (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()
    members.insert(1, _Member(ARCHIVE_INDEX, "", len(index_raw), data=index_raw))
    mtime = max(_timestamp(m.get("completed")) for m in manifests)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    # os.open with 0o666 (not mkstemp's 0o600): the archive is meant to be shared, so the umask decides.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for m in members:
                _add_member(tf, st, m, mtime)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    total = sum(m.size for m in members)
    log(f"packed {len(runs)} run(s) and {len(weights_bytes)} weights dir(s): {len(members)} files, {_size(total)} -> {out}")
    return PackResult(out, [r.run_id for r in runs], list(weights_bytes), len(members), total)


def _timestamp(iso: object) -> int:
    """Member time of an archive: the last completion of its runs, so that packing is deterministic."""
    try:
        return int(dt.datetime.fromisoformat(str(iso)).timestamp())
    except ValueError:
        return 0


class _HashingReader:
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        self.n += len(b)
        return b


def _add_member(tf: tarfile.TarFile, st: StoreReader, m: _Member, mtime: int) -> None:
    info = tarfile.TarInfo(m.name)
    info.size, info.mode, info.mtime = m.size, 0o644, mtime
    if m.data is not None:
        tf.addfile(info, io.BytesIO(m.data))
        return
    try:
        with _open(st.fs, m.url) as f:
            r = _HashingReader(f)
            try:
                tf.addfile(info, r)
            except OSError as e:
                if "unexpected end of data" in str(e):
                    raise ActsparseError(f"{m.name}: truncated ({r.n} of {m.size} bytes); not packed") from None
                raise
            if f.read(1):
                raise ActsparseError(f"{m.name}: altered (larger than the {m.size} bytes listed); not packed")
    except FileNotFoundError:
        raise ActsparseError(f"{m.name}: missing; not packed (check the store with `actsparse verify`)") from None
    except _SymlinkError:
        raise ActsparseError(f"{m.name}: is a symbolic link; not packed") from None
    if r.h.hexdigest() != m.sha256:
        raise ActsparseError(f"{m.name}: altered (sha256 mismatch); not packed")


# ---------------------------------------------------------------- install (shared by unpack and merge)


@dataclass
class ImportResult:
    """What :func:`unpack` or :func:`merge` did."""

    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    weights_added: list[str] = field(default_factory=list)


def _store_version(root: Path) -> int:
    return json.loads((root / fmt.STORE_FILE).read_text())["format_version"]


def _present(paths: fmt.StorePaths, rid: str) -> str | None:
    """None when the run is absent from the destination, else a phrase for the 'skipped' message."""
    d = paths.run_dir(rid)
    if not os.path.lexists(d):
        return None
    try:
        status = json.loads((d / fmt.MANIFEST).read_text()).get("status", "?")
    except (OSError, ValueError):
        status = "no manifest"
    if status == "complete":
        return "already present"
    return f"already present there ({status}; delete {d} to replace it)"


def _install(staging: Path, paths: fmt.StorePaths, run_ids: list[str], weights_ids: list[str],
             result: ImportResult, log: Callable[[str], None]) -> None:
    """Rename verified weights, then runs, from ``staging`` (inside the store) into place."""
    for wid in weights_ids:
        target = paths.weights_dir(wid)
        with fmt.blocking_lock(target.parent / ".lock"):
            if (target / "zarr.json").is_file():
                continue
            os.replace(staging / "models" / wid / CHECKSUMS, target.parent / CHECKSUMS)
            os.rename(staging / "models" / wid / fmt.WEIGHTS, target)
            result.weights_added.append(wid)
    (paths.root / "runs").mkdir(exist_ok=True)
    for rid in run_ids:
        try:
            os.rename(staging / "runs" / rid, paths.run_dir(rid))
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another writer created this run between our check and the rename.
            result.skipped.append(rid)
            log(f"run {rid}: {_present(paths, rid)}; skipped")
            continue
        result.added.append(rid)
        log(f"run {rid}: added")
    if result.added:
        fmt.write_catalogue(paths)


def _fail_message(what: str, report: VerifyReport) -> str:
    first = report.problems[0]
    more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
    return f"{what} fails verification: {first}{more}; nothing was added"


# ---------------------------------------------------------------- unpack


def _member_name(m: tarfile.TarInfo, archive: str) -> str | None:
    """The checked store-relative name of a member (None for a directory entry).

    Raises:
        ActsparseError: a link, a device or other special file, an absolute path, a path with ``..``,
            or a name outside the store layout.
    """
    name = m.name
    if m.issym() or m.islnk():
        raise ActsparseError(f"archive {archive}: member {name!r} is a {'symbolic' if m.issym() else 'hard'} link; "
                             "refusing to unpack")
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        raise ActsparseError(f"archive {archive}: member {name!r} is a device or other special file; refusing to unpack")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\\" in name or "\0" in name:
        raise ActsparseError(f"archive {archive}: member {name!r} is an absolute path; refusing to unpack")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise ActsparseError(f"archive {archive}: member {name!r} escapes the destination; refusing to unpack")
    clean = "/".join(parts)
    if m.isdir():
        if clean and not _safe_rel(clean):
            raise ActsparseError(f"archive {archive}: member {name!r} is not part of an actsparse store; refusing to unpack")
        return None
    if not (_MEMBER_RE.match(clean) and _safe_rel(clean)):
        raise ActsparseError(f"archive {archive}: member {name!r} is not part of an actsparse store; refusing to unpack")
    return clean


def unpack(archive: str | Path, dest: str | Path, *, log: Callable[[str], None] = print) -> ImportResult:
    """Restore the runs of an archive written by :func:`pack` into a new or existing store.

    Unsafe members are refused before anything is written. Members are extracted into a temporary
    directory inside ``dest``, checked against ``archive.json`` and each directory's ``checksums.json``,
    and only then renamed into place; runs whose id is already in ``dest`` are skipped.

    Args:
        archive: the tar file.
        dest: the store directory (created if missing).
        log: where one-line messages go.

    Returns:
        An :class:`ImportResult` (runs added and skipped, weights added).

    Raises:
        ActsparseError: not a tar file, an unsafe member, a checksum mismatch, a format-version mismatch,
        or ``dest`` is not a store.
    """
    archive = str(archive)
    try:
        tf = tarfile.open(archive, mode="r:*")
    except FileNotFoundError:
        raise ActsparseError(f"{archive} does not exist") from None
    except tarfile.TarError:
        raise ActsparseError(f"{archive} is not a readable tar archive") from None
    with tf:
        try:
            entries = tf.getmembers()
        except (tarfile.TarError, EOFError) as e:
            raise ActsparseError(f"{archive} is not a readable tar archive ({str(e).splitlines()[0]})") from None
        names: dict[str, tarfile.TarInfo] = {}
        for m in entries:
            clean = _member_name(m, archive)
            if clean is None:
                continue
            if clean in names:
                raise ActsparseError(f"archive {archive}: member {clean!r} appears twice; refusing to unpack")
            names[clean] = m
        if ARCHIVE_INDEX not in names or fmt.STORE_FILE not in names:
            raise ActsparseError(f"{archive} is not an actsparse archive (no {ARCHIVE_INDEX} or {fmt.STORE_FILE})")
        dest_existed = Path(dest).expanduser().exists()
        paths = fmt.create_store(dest)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=paths.root))
        try:
            result = _unpack_staged(tf, names, archive, staging, paths, log)
        except BaseException as e:
            fmt.remove_tree(staging)
            if not dest_existed and not any((paths.root / d).exists() for d in ("runs", "models")):
                fmt.remove_tree(paths.root)  # the store was created for this archive and holds nothing
            if isinstance(e, (tarfile.TarError, EOFError)):
                raise ActsparseError(f"{archive} is not a readable tar archive ({str(e).splitlines()[0]})") from None
            raise
        fmt.remove_tree(staging)
    return result


def _unpack_staged(tf: tarfile.TarFile, names: dict[str, tarfile.TarInfo], archive: str, staging: Path,
                   paths: fmt.StorePaths, log: Callable[[str], None]) -> ImportResult:
    got: Digests = {}
    for clean, m in names.items():
        target = staging.joinpath(*clean.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tf.extractfile(m)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            h, n = hashlib.sha256(), 0
            while chunk := src.read(_BLOCK):
                h.update(chunk)
                n += len(chunk)
                f.write(chunk)
        got[clean] = (h.hexdigest(), n)
    index = parse_checksums((staging / ARCHIVE_INDEX).read_bytes(), f"{archive}: {ARCHIVE_INDEX}")
    for name in sorted(set(got) - {ARCHIVE_INDEX}):
        if name not in index:
            raise ActsparseError(f"archive {archive}: member {name} is not listed in {ARCHIVE_INDEX}; refusing it")
        if got[name] != index[name]:
            raise ActsparseError(f"archive {archive}: member {name} does not match its checksum in {ARCHIVE_INDEX}; "
                                 "the archive is damaged or was altered")
    missing = sorted(set(index) - set(got))
    if missing:
        raise ActsparseError(f"archive {archive}: {missing[0]} is listed in {ARCHIVE_INDEX} but missing from the archive")
    version = json.loads((staging / fmt.STORE_FILE).read_text()).get("format_version")
    if version != _store_version(paths.root):
        raise ActsparseError(f"archive {archive} holds store format version {version!r}; {paths.root} has "
                             f"version {_store_version(paths.root)}; refusing to mix formats")
    run_ids = sorted({n.split("/")[1] for n in got if n.startswith("runs/")})
    report = _verify(StoreReader(str(staging)), run_ids, known=got)
    if not report.ok:
        raise ActsparseError(_fail_message(f"archive {archive}", report))
    _refuse_mismatched_runs(StoreReader(str(staging)), run_ids, paths, f"archive {archive}")
    result = ImportResult()
    todo = []
    for rid in run_ids:
        why = _present(paths, rid)
        if why:
            result.skipped.append(rid)
            log(f"run {rid}: {why}; skipped")
        else:
            todo.append(rid)
    _install(staging, paths, todo, report.weights, result, log)  # only weights that some run refers to
    return result


def _refuse_mismatched_runs(st: StoreReader, run_ids: list[str], paths: fmt.StorePaths, what: str) -> None:
    """Refuse runs whose manifest format version differs from the destination store's."""
    want = _store_version(paths.root)
    for rid in run_ids:
        version = st.manifest(rid).get("format_version")
        if version != want:
            raise ActsparseError(f"{what}: run {rid} has format version {version}, {paths.root} has {want}; "
                                 "refusing to mix formats")


# ---------------------------------------------------------------- merge


def _copy_verified(st: StoreReader, rel: str, target: Path, sha: str, size: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _open(st.fs, st.path(*rel.split("/"))) as src, open(target, "xb") as dst:
            h, n = hashlib.sha256(), 0
            while chunk := src.read(_BLOCK):
                h.update(chunk)
                n += len(chunk)
                dst.write(chunk)
    except FileNotFoundError:
        raise ActsparseError(f"{rel} is missing in {st.url}; nothing of its run was added") from None
    except _SymlinkError:
        raise ActsparseError(f"{rel} is a symbolic link in {st.url}; nothing of its run was added") from None
    if n != size:
        what = f"truncated ({n} of {size} bytes)" if n < size else f"altered ({n} bytes, expected {size})"
        raise ActsparseError(f"{rel} in {st.url}: {what}; nothing of its run was added")
    if h.hexdigest() != sha:
        raise ActsparseError(f"{rel} in {st.url}: altered (sha256 mismatch); nothing of its run was added")


def _stage_dir(st: StoreReader, base: str, staging: Path) -> Digests:
    """Copy a run or weights dir into ``staging`` (checksums first, then every listed file, verified)."""
    try:
        raw = st.fs.cat_file(st.path(*base.split("/"), CHECKSUMS))
    except FileNotFoundError:
        raise ActsparseError(f"{base} in {st.url} has no {CHECKSUMS} (written before checksums existed); "
                             f"run `actsparse verify SRC --add-checksums` on the source first") from None
    listed = parse_checksums(raw, f"{base}/{CHECKSUMS}")
    out = staging.joinpath(*base.split("/"))
    out.mkdir(parents=True)
    (out / CHECKSUMS).write_bytes(raw)
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
    paths = fmt.create_store(dst)
    if st.is_local and Path(st.root).resolve() == paths.root.resolve():
        raise ActsparseError(f"{src} and {dst} are the same store")
    if st.format_version != _store_version(paths.root):
        raise ActsparseError(f"{src} has store format version {st.format_version}, {dst} has "
                             f"{_store_version(paths.root)}; refusing to mix formats")
    runs = [st.run(r) for r in run_ids] if run_ids else st.runs()
    runs = list({r.run_id: r for r in runs}.values())
    _refuse_mismatched_runs(st, [r.run_id for r in runs], paths, str(src))
    result = ImportResult()
    for run in runs:
        why = _present(paths, run.run_id)
        if why:
            result.skipped.append(run.run_id)
            log(f"run {run.run_id}: {why}; skipped")
            continue
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=paths.root))
        try:
            _merge_run(st, run, staging, paths, result, log)
        finally:
            fmt.remove_tree(staging)
    return result


def _merge_run(st: StoreReader, run: Run, staging: Path, paths: fmt.StorePaths, result: ImportResult,
               log: Callable[[str], None]) -> None:
    base = f"runs/{run.run_id}"
    known = _stage_dir(st, base, staging)
    (staging / base / fmt.MANIFEST).write_bytes(st.fs.cat_file(st.path("runs", run.run_id, fmt.MANIFEST)))
    wid = run.manifest["model"]["weights_id"]
    weights = []
    if not (paths.weights_dir(wid) / "zarr.json").is_file():
        known |= _stage_dir(st, f"models/{wid}", staging)
        weights.append(wid)
    (staging / fmt.STORE_FILE).write_text(json.dumps({"format": fmt.FORMAT_NAME, "format_version": st.format_version}))
    v = _Verifier(StoreReader(str(staging)), known)
    if v.run(run.run_id) is not None and weights:
        v.weights(wid, [run.run_id])
    if not v.report.ok:
        raise ActsparseError(_fail_message(f"run {run.run_id} of {st.url}", v.report))
    _install(staging, paths, [run.run_id], weights, result, log)
