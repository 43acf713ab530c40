"""The jobs of a batch as a person follows them: one report per job, the rows and title of the live view of the
job matrix, and the summary table (printed by ``actsparse.cli.output``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from actsparse.pipeline.collect import CollectConfig


@dataclass
class JobReport:
    """One job of a batch, as the live view and the summary show it.

    ``status``: pending | running | done | skipped | failed (with ``reason``). ``workers``: ``host:pid`` of the
    workers that wrote its shards; ``pieces``: ``(host:pid, shards)`` per piece, in completion order.
    """

    index: int
    cfg: CollectConfig
    status: str = "pending"
    run_id: str | None = None
    n_tokens: int = 0
    tokens_done: int = 0
    elapsed_s: float = 0.0
    workers: set = field(default_factory=set)
    pieces: list = field(default_factory=list)
    running_on: set = field(default_factory=set)
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{Path(self.cfg.model).name} × {Path(self.cfg.corpus).name}"


def matrix_rows(jobs: Sequence[JobReport], rates: dict[str, float]) -> list[dict]:
    """The live view's rows: one per job, with its workers (and their tokens/s while it runs)."""
    rows = []
    for j in jobs:
        shown = j.running_on if j.status == "running" else j.workers
        rows.append({"#": j.index, "job": j.label, "status": j.status, "tokens": f"{j.tokens_done:,}/{j.n_tokens:,}",
                     "workers": ", ".join(f"{w} {rates.get(w, 0):,.0f} tok/s" if j.status == "running" else w
                                          for w in sorted(shown))})
    return rows


def matrix_title(jobs: Sequence[JobReport], rates: dict[str, float], elapsed_s: float) -> str:
    """The live view's title: jobs per status and the cluster's tokens/s."""
    n = {s: sum(j.status == s for j in jobs) for s in ("done", "running", "failed", "pending")}
    return (f"jobs: {n['done']} done, {n['running']} running, {n['failed']} failed, {n['pending']} pending; "
            f"{sum(rates.values()):,.0f} tok/s; {elapsed_s:,.0f} s")


def summary_rows(jobs: Sequence[JobReport]) -> list[dict]:
    """The summary table of a batch: one row per job."""
    return [{"#": j.index, "job": j.label, "status": j.status, "run_id": j.run_id or "-", "tokens": j.n_tokens,
             "seconds": round(j.elapsed_s, 1),
             "tok/s": round(j.n_tokens / j.elapsed_s) if j.status == "done" and j.elapsed_s else None,
             "workers": ", ".join(sorted(j.workers))} for j in jobs]
