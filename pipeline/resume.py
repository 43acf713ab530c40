"""Resuming a run: which of its shards are complete, and whether each still holds what was written.

A shard is complete once its token part exists (written last). Before that part, the writer records the
crc32c and size of every other file of the shard (``actsparse.core.format.shard_record``) and forces them to
disk (``actsparse.pipeline.writer``). A resumed collection keeps a complete shard only when its files still
match that record, so a shard damaged between two runs (or written by an older actsparse, without a record)
is written again instead of being sealed into a "complete" run (docs/pitfalls.md P19).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.checksums import crc32c_file, parse_shard_record
from actsparse.core.errors import ActsparseError
from actsparse.core.files import TMP_SUFFIX, NotRegularFile, read_regular


def completed_shards(run_dir: Path, n: int) -> set[int]:
    """The shards of a run (of ``n``) whose token part exists, i.e. that are completely written."""
    return {k for k in range(n) if (run_dir / fmt.token_part(k)).is_file()}


def shard_damage(run_dir: Path, manifest: fmt.Manifest, k: int, *, with_stats: bool) -> str | None:
    """Why shard ``k`` of a run, marked complete by its token part, cannot be trusted, or None when its record
    (``fmt.shard_record``) lists exactly the files the shard must have (every array's shard, and the
    statistics parts when collection writes them) and each still has its recorded size and crc32c, and the
    token part holds the shard's rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = fmt.shard_record(k)
    try:
        record = parse_shard_record(read_regular(run_dir / rel, fmt.MAX_METADATA_BYTES, "shard record"), k, rel)
    except FileNotFoundError:
        return f"{rel} is missing (written by an older actsparse, or lost)"
    except (NotRegularFile, ActsparseError, OSError) as e:
        return f"{rel} is unreadable ({e})"
    want = {fmt.site_shard(a, k, len(manifest.array_spec(a).shape)) for a in manifest.array_names}
    if with_stats:
        want |= {fmt.stats_part(s, k) for s in manifest.sites}
    if set(record) != want:
        return f"{rel} does not list the shard's files"
    for name, (crc, size) in sorted(record.items()):
        try:
            got = crc32c_file(run_dir / name, size)
        except (FileNotFoundError, NotRegularFile, OSError):
            return f"{name} is missing or not a regular file"
        if got != (crc, size):
            return f"{name} does not match its record (crc32c or size)"
    start, stop = fmt.shard_tokens(k, manifest.chunk_tokens, manifest.n_tokens)
    try:
        rows = pq.read_metadata(run_dir / fmt.token_part(k)).num_rows
    except (pa.ArrowException, OSError) as e:
        return f"{fmt.token_part(k)} is unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    if rows != stop - start:
        return f"{fmt.token_part(k)} holds {rows} rows, not {stop - start}"
    return None


def verified_shards(run_dir: Path, manifest: fmt.Manifest, *, with_stats: bool,
                    log: Callable[[str], None] = print) -> set[int]:
    """The shards a resumed run may keep: those marked complete (:func:`completed_shards`) whose files match
    their record (:func:`shard_damage`). A damaged shard loses its token part, so it is written again."""
    kept = set()
    for k in sorted(completed_shards(run_dir, manifest.n_parts)):
        why = shard_damage(run_dir, manifest, k, with_stats=with_stats)
        if why is None:
            kept.add(k)
        else:
            log(f"run {manifest.run_id}: shard {k} cannot be trusted ({why}); writing it again")
            (run_dir / fmt.token_part(k)).unlink()
    return kept


def sweep_temporaries(run_dir: Path, shards: Iterable[int]) -> None:
    """Remove what a killed writer left behind of the files of ``shards`` (temporary files,
    ``actsparse.core.files.TMP_SUFFIX``): only of the shards about to be written again, which no other writer of
    the run holds (a cluster's workers write other shards of the same run at the same time)."""
    for k in shards:
        for rel in (fmt.token_part(k), fmt.shard_record(k), fmt.stats_part("*", k)):
            for p in run_dir.glob(f"{rel}.*{TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
