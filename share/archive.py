"""Store archives: ``pack`` writes runs, their weights, a dataset card and a member index into one plain tar;
``unpack`` restores them into a store, refusing unsafe members before anything is written and checking every
checksum before any run becomes visible."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from actsparse.core import format as fmt
from actsparse.core.checksums import (
    ARCHIVE_FORMAT,
    BLOCK,
    FORMAT_VERSION,
    MAX_ENTRIES,
    Digests,
    is_safe_rel,
    local_tree,
    open_store_file,
    parse_checksums,
)
from actsparse.core.errors import ActsparseError
from actsparse.core.files import NotRegularFile, open_regular, remove_tree
from actsparse.pipeline.reader import StoreReader
from actsparse.pipeline.store_root import create_store
from actsparse.share.card import dataset_card, size_text
from actsparse.share.staging import (
    ImportResult,
    fail_message,
    install,
    present,
    read_checksums,
    refuse_mismatched_runs,
    store_version,
)
from actsparse.share.verify import verify_runs

ARCHIVE_INDEX = "archive.json"
CARD = "README.md"


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


def _listed_members(st: StoreReader, base: str, log: Callable[[str], None]) -> list[_Member]:
    """The files of a run or weights dir as archive members, from its ``checksums.json``."""
    raw, listed = read_checksums(st, base, "actsparse verify STORE --add-checksums")
    members = [_Member(f"{base}/{fmt.CHECKSUMS}", hashlib.sha256(raw).hexdigest(), len(raw), data=raw)]
    members += [_Member(f"{base}/{rel}", sha, size, url=st.path(*base.split("/"), *rel.split("/")))
                for rel, (sha, size) in listed.items()]
    if st.is_local:
        files, _ = local_tree(Path(st.path(*base.split("/"))))
        left = [r for r in files if r not in listed and r not in fmt.UNLISTED]
        if left:
            log(f"{base}: {len(left)} file(s) not in {fmt.CHECKSUMS} left out "
                f"({left[0]}{', ...' if len(left) > 1 else ''})")
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
        ActsparseError: ``out`` exists or lies inside the store, no complete run, a run is incomplete or lacks
        checksums, or a file does not match its checksum.
    """
    st = StoreReader(str(store))
    out = Path(out)
    if os.path.lexists(out):
        raise ActsparseError(f"{out} already exists; choose another name or remove it")
    if st.is_local and _inside(out, st.root):
        # a store holds only what its format lists: `verify` would flag the archive and the next pack pack it
        raise ActsparseError(f"{out} is inside the store {store}; write the archive elsewhere")
    runs = [st.run(r) for r in run_ids] if run_ids else st.runs()
    runs = list({r.run_id: r for r in runs}.values())
    if not runs:
        raise ActsparseError(f"{store} holds no complete run to pack")
    members: list[_Member] = []
    manifests, run_bytes, weights_bytes = [], {}, {}
    for run in runs:
        base = fmt.run_path(run.run_id)
        raw = st.read(fmt.run_path(run.run_id, fmt.MANIFEST), fmt.MAX_METADATA_BYTES, "manifest")
        files = _listed_members(st, base, log)
        members.append(_Member(f"{base}/{fmt.MANIFEST}", hashlib.sha256(raw).hexdigest(), len(raw), data=raw))
        members += files
        manifests.append(run.manifest)
        run_bytes[run.run_id] = sum(m.size for m in files) + len(raw)
        wid = run.manifest.weights_id
        if wid not in weights_bytes:
            wfiles = _listed_members(st, fmt.weights_path(wid), log)
            members += wfiles
            weights_bytes[wid] = sum(m.size for m in wfiles)
    marker = (json.dumps({"format": fmt.FORMAT_NAME, "format_version": st.format_version}, indent=2) + "\n").encode()
    card = dataset_card(manifests, run_bytes, weights_bytes).encode()
    head = [_Member(CARD, hashlib.sha256(card).hexdigest(), len(card), data=card),
            _Member(fmt.STORE_FILE, hashlib.sha256(marker).hexdigest(), len(marker), data=marker)]
    members = head + sorted(members, key=lambda m: m.name)
    index = dict(format=ARCHIVE_FORMAT, format_version=FORMAT_VERSION, store_format_version=st.format_version,
                 runs=[r.run_id for r in runs], weights=list(weights_bytes),
                 members={m.name: dict(sha256=m.sha256, size=m.size) for m in members})
    index_raw = (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()
    members.insert(1, _Member(ARCHIVE_INDEX, "", len(index_raw), data=index_raw))
    mtime = max(_timestamp(m.completed) for m in manifests)
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
    log(f"packed {len(runs)} run(s) and {len(weights_bytes)} weights dir(s): {len(members)} files, "
        f"{size_text(total)} -> {out}")
    return PackResult(out, [r.run_id for r in runs], list(weights_bytes), len(members), total)


def _inside(path: Path, root: str) -> bool:
    """Whether ``path`` (which may not exist yet) lies in the directory ``root``, links resolved."""
    target, base = os.path.realpath(path), os.path.realpath(root)
    return target == base or target.startswith(base.rstrip(os.sep) + os.sep)


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
        with open_store_file(st.fs, m.url) as f:
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
    except NotRegularFile:
        raise ActsparseError(f"{m.name}: is a symbolic link; not packed") from None
    if r.h.hexdigest() != m.sha256:
        raise ActsparseError(f"{m.name}: altered (sha256 mismatch); not packed")


def _member_name(m: tarfile.TarInfo, archive: str, staging: str) -> str | None:
    """The checked store-relative name of a member (None for a directory entry).

    Our own checks name the problem; tarfile's ``data`` extraction filter (PEP 706) then checks the member
    once more against the staging directory, so that nothing it would refuse gets through either.

    Raises:
        ActsparseError: a link, a device or other special file, an absolute path, a path with ``..``,
            or a name outside the store layout.
    """
    name = m.name
    if m.issym() or m.islnk():
        raise ActsparseError(f"archive {archive}: member {name!r} is a {'symbolic' if m.issym() else 'hard'} link; "
                             "refusing to unpack")
    if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        raise ActsparseError(f"archive {archive}: member {name!r} is a device or other special file; "
                             "refusing to unpack")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\\" in name or "\0" in name:
        raise ActsparseError(f"archive {archive}: member {name!r} is an absolute path; refusing to unpack")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise ActsparseError(f"archive {archive}: member {name!r} escapes the destination; refusing to unpack")
    clean = "/".join(parts)
    if m.isdir():
        if clean and not is_safe_rel(clean):
            raise ActsparseError(f"archive {archive}: member {name!r} is not part of an actsparse store; "
                                 "refusing to unpack")
        return None
    if not (fmt.is_archive_member(clean) and is_safe_rel(clean)):
        raise ActsparseError(f"archive {archive}: member {name!r} is not part of an actsparse store; "
                             "refusing to unpack")
    try:
        tarfile.data_filter(m, staging)
    except tarfile.FilterError as e:
        raise ActsparseError(f"archive {archive}: member {name!r} refused ({e}); refusing to unpack") from None
    return clean


# The first bytes of the compressed formats tarfile would otherwise be asked to open.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
               b"PK\x03\x04": "zip"}


def _open_plain_tar(archive: str) -> tarfile.TarFile:
    """Open an archive as the plain tar ``pack`` writes, refusing compressed files by their magic bytes.

    Raises:
        ActsparseError: missing, not a regular file, compressed, or not a tar archive.
    """
    try:
        f = open_regular(archive)
    except FileNotFoundError:
        raise ActsparseError(f"{archive} does not exist") from None
    except NotRegularFile as e:
        raise ActsparseError(f"{archive} is {e.what}, not an archive file") from None
    head = f.read(8)
    f.seek(0)
    kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind is not None:
        f.close()
        raise ActsparseError(f"{archive} is {kind}-compressed; an actsparse archive is one plain tar, as "
                             "`actsparse pack` writes it (decompress it first)")
    try:
        return tarfile.TarFile(fileobj=f, mode="r")  # plain tar only: no decompression
    except tarfile.TarError:
        f.close()
        raise ActsparseError(f"{archive} is not a readable tar archive") from None


def _members(tf: tarfile.TarFile, archive: str, staging: str) -> dict[str, tarfile.TarInfo]:
    """The archive's file members by checked name, read header by header (at most MAX_ENTRIES + 3 of them)."""
    names: dict[str, tarfile.TarInfo] = {}
    seen = 0
    while True:
        try:
            m = tf.next()
        except (tarfile.TarError, EOFError, ValueError) as e:
            raise ActsparseError(f"{archive} is not a readable tar archive ({str(e).splitlines()[0]})") from None
        if m is None:
            return names
        seen += 1
        if seen > MAX_ENTRIES + 3:
            raise ActsparseError(f"archive {archive}: more than {MAX_ENTRIES} members; refusing to unpack")
        clean = _member_name(m, archive, staging)
        if clean is None:
            continue
        if clean in names:
            raise ActsparseError(f"archive {archive}: member {clean!r} appears twice; refusing to unpack")
        names[clean] = m


def _checked_index(tf: tarfile.TarFile, names: dict[str, tarfile.TarInfo], archive: str) -> Digests:
    """``archive.json`` read (bounded) and parsed, and every member's name and size checked against it,
    before a byte of any member is written.

    Raises:
        ActsparseError: no index or store marker, an index too large or invalid, a member it does not list or
            whose size differs, or a listed member that is absent.
    """
    if ARCHIVE_INDEX not in names or fmt.STORE_FILE not in names:
        raise ActsparseError(f"{archive} is not an actsparse archive (no {ARCHIVE_INDEX} or {fmt.STORE_FILE})")
    info = names[ARCHIVE_INDEX]
    if info.size > fmt.MAX_CHECKSUMS_BYTES:
        raise ActsparseError(f"archive {archive}: {ARCHIVE_INDEX} is {info.size} bytes, more than an index may be")
    index = parse_checksums(tf.extractfile(info).read(info.size), f"{archive}: {ARCHIVE_INDEX}")
    for name, m in names.items():
        if name == ARCHIVE_INDEX:
            continue
        if name not in index:
            raise ActsparseError(f"archive {archive}: member {name} is not listed in {ARCHIVE_INDEX}; refusing it")
        if m.size != index[name][1]:
            raise ActsparseError(f"archive {archive}: member {name} is {m.size} bytes, {ARCHIVE_INDEX} lists "
                                 f"{index[name][1]}; the archive is damaged or was altered")
    missing = sorted(set(index) - set(names))
    if missing:
        raise ActsparseError(f"archive {archive}: {missing[0]} is listed in {ARCHIVE_INDEX} "
                             "but missing from the archive")
    return index


def unpack(archive: str | Path, dest: str | Path, *, log: Callable[[str], None] = print) -> ImportResult:
    """Restore the runs of an archive written by :func:`pack` into a new or existing store.

    The archive must be one plain tar (a compressed file is refused by its first bytes). Every member is
    checked before anything is written: its name against the store layout, its type (regular files only:
    no links, devices or FIFOs), and its size against ``archive.json``, which must list every member and
    nothing else; the total must fit on the destination's disk. Members are then extracted (each read no
    further than its listed size) into a temporary directory inside ``dest``, checked against
    ``archive.json`` and each directory's ``checksums.json``, and only then renamed into place; runs whose
    id is already in ``dest`` are skipped.

    Args:
        archive: the tar file.
        dest: the store directory (created if missing).
        log: where one-line messages go.

    Returns:
        An :class:`ImportResult` (runs added and skipped, weights added).

    Raises:
        ActsparseError: not a plain tar file, an unsafe or unlisted member, a size or checksum mismatch, not
        enough disk space, a format-version mismatch, or ``dest`` is not a store.
    """
    archive = str(archive)
    with _open_plain_tar(archive) as tf:
        names = _members(tf, archive, os.path.join(os.path.abspath(dest), ".unpack-check"))
        index = _checked_index(tf, names, archive)
        dest_existed = Path(dest).expanduser().exists()
        paths = create_store(dest)
        need = sum(size for _, size in index.values())
        free = shutil.disk_usage(paths.root).free
        if need > free:
            if not dest_existed:
                remove_tree(paths.root)
            raise ActsparseError(f"archive {archive} holds {size_text(need)}; {paths.root} has {size_text(free)} "
                                 "free; nothing was written")
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=paths.root))
        try:
            result = _unpack_staged(tf, names, index, archive, staging, paths, log)
        except BaseException as e:
            remove_tree(staging)
            if not dest_existed and not any((paths.root / d).exists() for d in (fmt.RUNS, fmt.MODELS)):
                remove_tree(paths.root)  # the store was created for this archive and holds nothing
            if isinstance(e, (tarfile.TarError, EOFError)):
                raise ActsparseError(f"{archive} is not a readable tar archive ({str(e).splitlines()[0]})") from None
            raise
        remove_tree(staging)
    return result


def _unpack_staged(tf: tarfile.TarFile, names: dict[str, tarfile.TarInfo], index: Digests, archive: str,
                   staging: Path, paths: fmt.StorePaths, log: Callable[[str], None]) -> ImportResult:
    got: Digests = {}
    for clean, m in names.items():
        target = staging.joinpath(*clean.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tf.extractfile(m)  # reads no further than the member's size, which the index lists
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            h, n = hashlib.sha256(), 0
            while n < m.size and (chunk := src.read(min(BLOCK, m.size - n))):
                h.update(chunk)
                n += len(chunk)
                f.write(chunk)
        got[clean] = (h.hexdigest(), n)
    for name in sorted(set(got) - {ARCHIVE_INDEX}):
        if got[name] != index[name]:
            raise ActsparseError(f"archive {archive}: member {name} does not match its checksum in {ARCHIVE_INDEX}; "
                                 "the archive is damaged or was altered")
    try:
        version = json.loads((staging / fmt.STORE_FILE).read_bytes()).get("format_version")
    except (ValueError, AttributeError, RecursionError):
        version = None
    if version != store_version(paths.root):
        raise ActsparseError(f"archive {archive} holds store format version {version!r}; {paths.root} has "
                             f"version {store_version(paths.root)}; refusing to mix formats")
    run_ids = sorted({n.split("/")[1] for n in got if n.startswith(f"{fmt.RUNS}/")})
    report = verify_runs(StoreReader(str(staging)), run_ids, known=got)
    if not report.ok:
        raise ActsparseError(fail_message(f"archive {archive}", report))
    refuse_mismatched_runs(StoreReader(str(staging)), run_ids, paths, f"archive {archive}")
    result = ImportResult()
    todo = []
    for rid in run_ids:
        why = present(paths, rid)
        if why:
            result.skipped.append(rid)
            log(f"run {rid}: {why}; skipped")
        else:
            todo.append(rid)
    install(staging, paths, todo, report.weights, result, log)  # only weights that some run refers to
    return result
