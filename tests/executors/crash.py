"""A worker that exits abruptly on its first attempt: per-shard statistics that end the process (``os._exit``)
after shard K's arrays and statistics are written and before its token part, the first time only.

A module of its own so that Ray workers import it by name (``PYTHONPATH`` is set by ``conftest.py``)."""

from __future__ import annotations

import os
from pathlib import Path

from actsparse.analyze.token_stats import TOKEN_STATS


class CrashOnce:
    """``TOKEN_STATS`` (``actsparse.pipeline.collect.ShardStatistics``), but the first writer of shard ``shard``
    records its pid in ``marker`` and exits at once, leaving the shard without its token part."""

    def __init__(self, marker: str, shard: int):
        self.marker, self.shard = marker, shard

    def warm_up(self) -> None:
        TOKEN_STATS.warm_up()

    def for_run(self, run_dir: Path, manifest):
        inner = TOKEN_STATS.for_run(run_dir, manifest)
        marker, shard = Path(self.marker), self.shard

        def on_shard(k: int, blocks: dict, token_rows: dict):
            write = inner(k, blocks, token_rows)

            def then():
                written = write()  # the statistics parts, which the shard's record lists
                if k == shard and not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os._exit(1)
                return written

            return then

        return on_shard
