"""Checksum lists (``actsparse.core.checksums``): written, parsed strictly, updated for later results."""

from __future__ import annotations

import pytest

from actsparse.core import format as fmt
from actsparse.core.checksums import parse_checksums, update_checksums, write_checksums
from actsparse.core.errors import ActsparseError


def test_written_updated_and_parsed(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "tokens").mkdir(parents=True)
    (run / "tokens" / "part-000000.parquet").write_bytes(b"abc")
    (run / fmt.MANIFEST).write_text("{}")  # never listed: checked by schema
    (run / ".lock").write_text("1")  # never listed: not content
    assert write_checksums(run) == 1
    listed = parse_checksums((run / fmt.CHECKSUMS).read_bytes(), "x")
    assert listed == {"tokens/part-000000.parquet": ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                                                     3)}
    (run / "analysis").mkdir()
    (run / "analysis" / "curves-0123456789abcdef.parquet").write_bytes(b"")
    assert update_checksums(run, [run / "analysis" / "curves-0123456789abcdef.parquet"])
    assert len(parse_checksums((run / fmt.CHECKSUMS).read_bytes(), "x")) == 2
    monkeypatch.chdir(tmp_path)  # a relative run directory, as `--store S` gives it, is recorded all the same
    (run / "analysis" / "critical-0123456789abcdef.parquet").write_bytes(b"x")
    assert update_checksums("run", ["analysis/critical-0123456789abcdef.parquet"])
    assert "analysis/critical-0123456789abcdef.parquet" in parse_checksums((run / fmt.CHECKSUMS).read_bytes(), "x")
    with pytest.raises(ActsparseError, match="is not a data file"):
        update_checksums(run, ["../outside"])


@pytest.mark.parametrize("doc, words", [
    ('{"format": "x"}', "not an actsparse checksum list"),
    ('{"format": "actsparse-checksums", "format_version": 9, "files": {}}', "format version 9"),
    ('{"format": "actsparse-checksums", "format_version": 1, "files": {"../x": {"sha256": "' + "0" * 64 + '", "size": 1}}}',
     "unsafe path"),
    ('{"format": "actsparse-checksums", "format_version": 1, "files": {"x": {"sha256": "00", "size": 1}}}',
     "no valid sha256 and size"),
    ('{"format": "actsparse-checksums", "format_version": 1, "files": {"x": {"sha256": "' + "0" * 64 + '", "size": -1}}}',
     "no valid sha256 and size"),
    ("[" * 50_000, "not valid JSON"),
])
def test_bad_lists_are_refused(doc, words):
    with pytest.raises(ActsparseError, match=words):
        parse_checksums(doc.encode(), "x")


def test_symbolic_links_are_never_listed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "real").write_text("x")
    (run / "link").symlink_to(run / "real")
    with pytest.raises(ActsparseError, match="not a regular file"):
        write_checksums(run)
