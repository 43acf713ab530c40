"""A task evaluation's files in a store: one Parquet part per (task, grid value) run, written when the run ends,
read back to resume, and the tables rebuilt from them.

Layout (``docs/store-format.md``), under the result base B (a run's ``analysis/`` or the store's
``evaluations/``, as ``actsparse.analyze.evaluate.storage.base_dir``)::

    B/tasks-<eval_id>/config.json                 identity, readable settings, hook list
    B/tasks-<eval_id>/dense-<t>.parquet           the dense run of task t (t = content_hash(task name))
    B/tasks-<eval_id>/value-<v>-<t>.parquet       the run at grid value v
    B/tasks-<eval_id>.parquet                     summary (view task_evaluations)
    B/tasks_examples-<eval_id>.parquet            per-example scores (view task_examples)
    B/tasks_critical-<eval_id>.parquet            critical sparsity (view task_critical)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from actsparse.analyze.tasks.counting import PHASES, PhaseCounts
from actsparse.analyze.tasks.harness import TaskResult
from actsparse.core import format as fmt
from actsparse.core.files import atomic_write_parquet, disk_error

_COLUMNS = [c for c, _ in fmt.TASK_PART_COLUMNS]


def parts_dir(base: Path, eval_id: str) -> Path:
    """The parts directory of a task evaluation under the result base, created if missing.

    Raises:
        ActsparseError: it cannot be created (``core.files.disk_error``).
    """
    path = base / fmt.task_parts(eval_id)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, f"creating {path}") from e
    return path


def part_table(result: TaskResult, fingerprint: str):
    """The pyarrow table of one run's part (``fmt.TASK_PART_COLUMNS``; one row per example)."""
    import pyarrow as pa

    n = len(result.doc_ids)
    run = dict(task=result.task, value=result.value, metric=result.metric, aggregate=result.score,
               n_shot=result.n_shot, seconds=result.seconds, fingerprint=fingerprint,
               generated_tokens=result.generated_tokens)
    for phase in PHASES:
        c = None if result.counts is None else result.counts[phase]
        run[f"zeroed_{phase}"] = None if c is None else c.zeroed.tolist()
        run[f"positions_{phase}"] = None if c is None else c.positions
    cols = {k: [v] * n for k, v in run.items()}
    cols.update(doc_id=result.doc_ids.tolist(), score=result.scores.tolist(), response=result.responses)
    return pa.table({c: cols[c] for c in _COLUMNS}, schema=fmt.arrow_schema(fmt.TASK_PART_COLUMNS))


def write_part(parts: Path, result: TaskResult, fingerprint: str) -> Path:
    """Write one run's part atomically into the parts directory; returns its path."""
    path = parts / fmt.task_part(result.task, result.value)
    atomic_write_parquet(path, part_table(result, fingerprint))
    return path


def read_part(path: Path, widths: np.ndarray) -> tuple[TaskResult, str] | None:
    """``(run, its task fingerprint)`` of one part, or None when it cannot be read (one being written, or of
    another layout: it is then recomputed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path).to_pydict()
    except (OSError, pa.ArrowException):
        return None
    if set(t) != set(_COLUMNS) or not t["task"]:
        return None
    counts = None
    if t["zeroed_prefill"][0] is not None:
        counts = {p: PhaseCounts(np.asarray(t[f"zeroed_{p}"][0], dtype=np.int64), int(t[f"positions_{p}"][0]))
                  for p in PHASES}
        if any(len(c.zeroed) != len(widths) for c in counts.values()):
            return None
    result = TaskResult(task=t["task"][0], value=t["value"][0], metric=t["metric"][0], score=t["aggregate"][0],
                        doc_ids=np.asarray(t["doc_id"], dtype=np.int64),
                        scores=np.asarray(t["score"], dtype=np.float64), responses=t["response"],
                        n_shot=t["n_shot"][0], seconds=t["seconds"][0], counts=counts,
                        widths=None if counts is None else widths, generated_tokens=int(t["generated_tokens"][0]))
    return result, t["fingerprint"][0]


def read_widths(parts: Path) -> np.ndarray | None:
    """The hook widths int64 [n_hooks] of the parts directory's ``config.json``; None before the first run is
    written, or when it cannot be read (the runs are then made again and the file rewritten)."""
    try:
        hooks = json.loads((parts / fmt.EVALUATION_CONFIG).read_text())["hooks"]
        widths = np.array([int(h["width"]) for h in hooks], dtype=np.int64)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return widths if widths.ndim == 1 and len(widths) and (widths > 0).all() else None


def stored_runs(parts: Path, widths: np.ndarray) -> dict[str, tuple[str, dict[float | None, TaskResult]]]:
    """``{task: (fingerprint, {value or None (dense): run})}`` of every readable part, keeping per task only the
    runs made from the same task definition as its dense run (its fingerprint); tasks without a dense run are
    left out."""
    found: dict[str, dict[float | None, tuple[TaskResult, str]]] = {}
    for path in sorted(parts.glob("*.parquet")):
        got = read_part(path, widths)
        if got is not None and fmt.task_part(got[0].task, got[0].value) == path.name:
            found.setdefault(got[0].task, {})[got[0].value] = got
    out = {}
    for task, runs in sorted(found.items()):
        if None in runs:
            fingerprint = runs[None][1]
            out[task] = fingerprint, {v: r for v, (r, f) in runs.items() if f == fingerprint}
    return out
