"""Resuming a run (``actsparse.pipeline.resume``): every shard a resumed collection keeps is checked against the
record of its files written before its token part, so a shard damaged between two runs is written again instead
of being sealed into a "complete" run that ``verify`` would pass."""

from __future__ import annotations

import json
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from actsparse import CollectConfig, collect, share
from actsparse.analyze.token_stats import TOKEN_STATS
from actsparse.core import format as fmt
from actsparse.core.checksums import parse_shard_record
from actsparse.pipeline.collect import collect_shards, plan, prepare_run
from actsparse.pipeline.reader import StoreReader
from actsparse.pipeline.resume import shard_damage
from actsparse.pipeline.store_root import create_store


def _cfg(model: Path, corpus: Path) -> CollectConfig:
    return CollectConfig(model=str(model), corpus=str(corpus), max_tokens=500, seq_len=64, batch_size=2,
                         chunk_tokens=128)


def _partial(cfg: CollectConfig, store: Path, shards: set[int]) -> Path:
    """A run killed after writing ``shards``: prepared, those shards written, never finished."""
    p = plan(cfg)
    run = prepare_run(p, create_store(store))
    collect_shards(run, shards, statistics=TOKEN_STATS)
    return run.run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama, text_corpus):
    """The same run collected without interruption."""
    store = tmp_path_factory.mktemp("ref") / "S"
    res = collect(_cfg(tiny_llama, text_corpus), store, statistics=TOKEN_STATS, progress=None, log=lambda m: None)
    return StoreReader(str(store)).run(res.run_id)


def test_each_shard_records_its_files_before_its_token_part(reference):
    run_dir = Path(reference.store.root) / fmt.run_path(reference.run_id)
    for k in range(reference.n_parts):
        record = parse_shard_record((run_dir / fmt.shard_record(k)).read_bytes(), k, "r")
        want = {fmt.site_shard(s, k) for s in reference.sites} | {fmt.stats_part(s, k) for s in reference.sites}
        assert set(record) == want
        for rel, (crc, size) in record.items():
            data = (run_dir / rel).read_bytes()
            assert (crc, size) == (f"{google_crc32c.value(data):08x}", len(data)), rel
        # written before the token part that marks the shard complete
        assert (run_dir / fmt.shard_record(k)).stat().st_mtime_ns <= (run_dir / fmt.token_part(k)).stat().st_mtime_ns
    assert fmt.describe_path(fmt.run_path(reference.run_id, fmt.shard_record(0))) == ("shard digests", None)


@pytest.mark.parametrize("damage", ["flip", "truncate", "record", "no-record", "stats"])
def test_a_damaged_shard_is_written_again_on_resume(damage, reference, tiny_llama, text_corpus, tmp_path):
    """The issue's example: a resumed `collect` trusted earlier shards without a check and sealed a damaged one
    into a complete run that `verify` passed."""
    store = tmp_path / "S"
    cfg = _cfg(tiny_llama, text_corpus)
    run_dir = _partial(cfg, store, {0, 1})
    gate = run_dir / fmt.site_shard("gate", 1)
    if damage == "flip":
        data = bytearray(gate.read_bytes())
        data[len(data) // 2] ^= 0x40
        gate.write_bytes(bytes(data))
    elif damage == "truncate":
        gate.write_bytes(gate.read_bytes()[:100])
    elif damage == "record":
        doc = json.loads((run_dir / fmt.shard_record(1)).read_text())
        doc["files"].pop(fmt.site_shard("gate", 1))
        (run_dir / fmt.shard_record(1)).write_text(json.dumps(doc))
    elif damage == "no-record":  # written by an older actsparse, or lost
        (run_dir / fmt.shard_record(1)).unlink()
    else:
        (run_dir / fmt.stats_part("input", 1)).write_bytes(b"PAR1 not really")
    manifest = StoreReader(str(store)).manifest(run_dir.name)
    assert shard_damage(run_dir, manifest, 0, with_stats=True) is None
    assert shard_damage(run_dir, manifest, 1, with_stats=True) is not None
    said = []
    res = collect(cfg, store, statistics=TOKEN_STATS, progress=None, log=said.append)
    assert res.status == "complete"
    assert any("shard 1 cannot be trusted" in m for m in said), said
    assert any("resuming run" in m and "1 of 4 shards" in m for m in said), said
    assert share.verify(str(store)).ok
    got = StoreReader(str(store)).run(res.run_id)
    assert got.run_id == reference.run_id and got.tokens().equals(reference.tokens())
    for site in reference.sites:
        np.testing.assert_array_equal(got.array(site)[:], reference.array(site)[:])
    for k in range(reference.n_parts):
        for site in reference.sites:
            rel = fmt.stats_part(site, k)
            assert (run_dir / rel).read_bytes() == (Path(reference.store.root) / fmt.run_path(res.run_id, rel)
                                                    ).read_bytes()


def test_an_intact_partial_run_keeps_its_shards(reference, tiny_llama, text_corpus, tmp_path):
    store = tmp_path / "S"
    cfg = _cfg(tiny_llama, text_corpus)
    run_dir = _partial(cfg, store, {0, 2})
    before = {k: (run_dir / fmt.token_part(k)).stat().st_mtime_ns for k in (0, 2)}
    said = []
    collect(cfg, store, statistics=TOKEN_STATS, progress=None, log=said.append)
    assert not any("cannot be trusted" in m for m in said) and any("2 of 4 shards" in m for m in said), said
    assert {k: (run_dir / fmt.token_part(k)).stat().st_mtime_ns for k in (0, 2)} == before  # not rewritten
    assert StoreReader(str(store)).run().tokens().equals(reference.tokens())
