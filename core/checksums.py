"""Checksum lists: the ``checksums.json`` of every run and weights directory, and file digests.

A run directory and a weights directory (``models/<weights_id>/``) each hold a ``checksums.json`` listing
the sha256 and size of every file in them (:func:`write_checksums`), except ``checksums.json`` itself and
the run's ``manifest.json``, which is rewritten when the run completes and is checked by schema instead.
Lock files and temporary files are never listed. Writers of results added after collection
(``analysis/``, ``token_stats/``) add their files with :func:`update_checksums`. The same document format
lists the members of an archive (``archive.json``, written by ``actsparse pack``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.files import TMP_SUFFIX, NotRegularFile, atomic_write_json, blocking_lock, open_regular

CHECKSUMS_FORMAT = "actsparse-checksums"
ARCHIVE_FORMAT = "actsparse-archive"
FORMAT_VERSION = 1
BLOCK = 1 << 22
# One path component of a listed file: no leading dot (so no '..', no hidden files), no separators,
# nothing that would need quoting in a URL.
_SAFE_PART = re.compile(r"^[A-Za-z0-9_=+-][A-Za-z0-9._=+-]{0,254}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_ENTRIES = 10_000_000  # a checksum list longer than this is refused before it drives any loop

Digests = dict[str, tuple[str, int]]


def is_transient(rel: str) -> bool:
    """Lock files and temporary files: never listed, never packed or copied."""
    parts = rel.split("/")
    return parts[-1] in fmt.LOCKS or any(p.endswith(TMP_SUFFIX) for p in parts)


def is_safe_rel(rel: object) -> bool:
    """Whether ``rel`` is a plain relative path (no ``..``, no hidden or oddly named component)."""
    return isinstance(rel, str) and all(_SAFE_PART.match(p) for p in rel.split("/"))


def digest_file(f: IO[bytes], limit: int | None = None) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a file object read to its end, or of its first ``limit + 1`` bytes when a
    ``limit`` is given (a size above ``limit`` then says the file is larger than expected, whatever its
    real length: an endless source costs no more than ``limit`` bytes)."""
    h, n = hashlib.sha256(), 0
    while limit is None or n <= limit:
        chunk = f.read(BLOCK if limit is None else min(BLOCK, limit + 1 - n))
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def open_store_file(fs, url: str) -> IO[bytes]:
    """Open a store file for reading: local paths as regular files only (``fs`` None or a local filesystem),
    others through fsspec."""
    if fs is None or _is_local(fs):
        return open_regular(url)
    return fs.open(url, "rb", block_size=BLOCK)


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def digest(fs, url: str, limit: int | None = None) -> tuple[str, int]:
    """``(sha256 hex, size)`` of a store file (see :func:`open_store_file` and :func:`digest_file`)."""
    with open_store_file(fs, url) as f:
        return digest_file(f, limit)


def local_tree(base: Path) -> tuple[list[str], list[str]]:
    """``(files, others)`` under ``base`` as sorted relative posix paths, transient files left out; ``others``
    are entries a store never holds (symbolic links, FIFOs, sockets, devices)."""
    files, others = [], []
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [*filenames, *dirnames]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            if os.path.islink(path):
                others.append(rel)
            elif name in filenames and not is_transient(rel):
                (files if os.path.isfile(path) else others).append(rel)
        dirnames[:] = [d for d in dirnames
                       if not d.endswith(TMP_SUFFIX) and not os.path.islink(os.path.join(dirpath, d))]
    return sorted(files), sorted(others)


def checksums_doc(files: Digests) -> dict:
    """The JSON object of a ``checksums.json`` listing ``files``."""
    return dict(format=CHECKSUMS_FORMAT, format_version=FORMAT_VERSION, algorithm="sha256",
                files={rel: dict(sha256=sha, size=size) for rel, (sha, size) in sorted(files.items())})


def parse_checksums(raw: bytes, where: str) -> Digests:
    """Parse and validate a ``checksums.json`` (or the member list of an ``archive.json``).

    Args:
        raw: the file's bytes.
        where: a label for error messages (store-relative path).

    Returns:
        ``{relative path: (sha256 hex, size)}``; every path has been checked to be a plain relative path.

    Raises:
        ActsparseError: not JSON, wrong format or version, too many entries, or an entry with an unsafe path
            or a bad digest or size.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ActsparseError(f"{where}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict) or doc.get("format") not in (CHECKSUMS_FORMAT, ARCHIVE_FORMAT):
        raise ActsparseError(f"{where}: not an actsparse checksum list")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ActsparseError(f"{where}: format version {version!r}; this actsparse reads 1 to {FORMAT_VERSION}")
    entries = doc.get("files") if doc["format"] == CHECKSUMS_FORMAT else doc.get("members")
    if not isinstance(entries, dict):
        raise ActsparseError(f"{where}: no file list")
    if len(entries) > MAX_ENTRIES:
        raise ActsparseError(f"{where}: {len(entries)} entries, more than the {MAX_ENTRIES} a store may list")
    out: Digests = {}
    for rel, e in entries.items():
        if not is_safe_rel(rel):
            raise ActsparseError(f"{where}: unsafe path {rel!r}")
        if not (isinstance(e, dict) and isinstance(e.get("sha256"), str) and _SHA_RE.match(e["sha256"])
                and isinstance(e.get("size"), int) and not isinstance(e["size"], bool) and 0 <= e["size"] < 1 << 50):
            raise ActsparseError(f"{where}: entry {rel!r} has no valid sha256 and size")
        out[rel] = (e["sha256"], e["size"])
    return out


def write_checksums(directory: str | Path) -> int:
    """Write ``checksums.json`` for a run directory or a weights directory (``models/<weights_id>``).

    Lists every file except ``checksums.json``, ``manifest.json``, lock files and temporary files.
    Collection calls it for a run just before marking the run complete, and for the weights right after they
    are renamed into place.

    Returns:
        The number of files listed.

    Raises:
        ActsparseError: the directory holds a symbolic link or another non-regular entry.
    """
    d = Path(directory)
    with blocking_lock(d / fmt.CHECKSUMS_LOCK):
        files, others = local_tree(d)
        if others:
            raise ActsparseError(f"{d / others[0]} is not a regular file; a store holds regular files only")
        digests = {rel: digest(None, str(d / rel)) for rel in files if rel not in fmt.UNLISTED}
        atomic_write_json(d / fmt.CHECKSUMS, checksums_doc(digests))
    return len(digests)


def update_checksums(run_dir: str | Path, paths: Iterable[str | Path]) -> bool:
    """Add or replace the entries of some files of a run in its ``checksums.json`` (under a lock).

    For writers of results added after collection (``analysis/``, ``token_stats/``). A given path that no
    longer exists is removed from the list.

    Args:
        run_dir: ``STORE/runs/<run_id>`` (any path form: it is resolved first).
        paths: files inside ``run_dir`` (absolute, or relative to ``run_dir``).

    Returns:
        False when the run has no ``checksums.json`` yet (a run still being collected gets its list when it
        completes; a run from before checksums existed gets one from ``actsparse verify --add-checksums``).

    Raises:
        ActsparseError: a path lies outside ``run_dir``, is a lock/temporary file, or is not a regular file.
    """
    d = Path(run_dir).resolve()
    with blocking_lock(d / fmt.CHECKSUMS_LOCK):
        target = d / fmt.CHECKSUMS
        if not target.is_file():
            return False
        digests = parse_checksums(target.read_bytes(), str(target))
        for p in paths:
            full = Path(os.path.abspath(d / p))  # an absolute p replaces d; a relative one may not climb out
            # Resolve the directories but not the file itself, so that a symbolic link is refused below.
            rel = os.path.relpath(os.path.join(os.path.realpath(full.parent), full.name), d).replace(os.sep, "/")
            if not is_safe_rel(rel) or is_transient(rel) or rel in fmt.UNLISTED:
                raise ActsparseError(f"{p} is not a data file of run {d.name}")
            try:
                digests[rel] = digest(None, str(d / rel))
            except FileNotFoundError:
                digests.pop(rel, None)
            except NotRegularFile as e:
                raise ActsparseError(f"{e.path} is {e.what}; a store holds regular files only") from None
        atomic_write_json(target, checksums_doc(digests))
    return True


# ---------------------------------------------------------------- shard records (crc32c, cheap on the hot path)

ShardDigests = dict[str, tuple[str, int]]  # run-relative path -> (crc32c as 8 hex digits, size)
_CRC_RE = re.compile(r"^[0-9a-f]{8}$")


def crc32c_of(parts: Iterable[bytes]) -> tuple[str, int]:
    """``(crc32c hex, size)`` of bytes given in parts (a file's content as it is written, no re-read)."""
    import google_crc32c

    crc, n = 0, 0
    for part in parts:
        crc = google_crc32c.extend(crc, part)
        n += len(part)
    return f"{crc:08x}", n


def crc32c_file(path: str | Path, limit: int | None = None) -> tuple[str, int]:
    """``(crc32c hex, size)`` of a local regular file, reading at most ``limit + 1`` bytes when given.

    Raises:
        NotRegularFile, FileNotFoundError: as ``open_regular``.
    """
    with open_regular(path) as f:
        def blocks():
            n = 0
            while limit is None or n <= limit:
                chunk = f.read(BLOCK if limit is None else min(BLOCK, limit + 1 - n))
                if not chunk:
                    return
                n += len(chunk)
                yield chunk

        return crc32c_of(blocks())


def shard_record_doc(k: int, files: ShardDigests) -> dict:
    """The JSON object of shard ``k``'s record (``actsparse.core.format.shard_record``)."""
    return dict(format=fmt.SHARD_RECORD_FORMAT, format_version=FORMAT_VERSION, shard=k, algorithm="crc32c",
                files={rel: dict(crc32c=crc, size=size) for rel, (crc, size) in sorted(files.items())})


def parse_shard_record(raw: bytes, k: int, where: str) -> ShardDigests:
    """Parse and validate shard ``k``'s record.

    Raises:
        ActsparseError: not JSON, another format, version or shard, or an entry without a safe path, a crc32c
            and a size.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ActsparseError(f"{where}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not (isinstance(doc, dict) and doc.get("format") == fmt.SHARD_RECORD_FORMAT
            and doc.get("format_version") == FORMAT_VERSION and doc.get("shard") == k
            and doc.get("algorithm") == "crc32c" and isinstance(doc.get("files"), dict)):
        raise ActsparseError(f"{where}: not the record of shard {k}")
    out: ShardDigests = {}
    for rel, e in doc["files"].items():
        if not (is_safe_rel(rel) and isinstance(e, dict) and isinstance(e.get("crc32c"), str)
                and _CRC_RE.match(e["crc32c"]) and isinstance(e.get("size"), int) and not isinstance(e["size"], bool)
                and 0 <= e["size"] < 1 << 50):
            raise ActsparseError(f"{where}: entry {rel!r} has no valid path, crc32c and size")
        out[rel] = (e["crc32c"], e["size"])
    return out
