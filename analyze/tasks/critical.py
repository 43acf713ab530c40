"""Task critical sparsity: per lm-eval task and averaged over tasks, with bootstrap intervals over examples.

Definition (docs/paper-notes.md §1.5): the largest realized sparsity at which the model keeps >= 99% of its
dense accuracy. For one task, at each grid value v: acc(v) = the mean of the per-example metric, ratio(v) =
acc(v) / acc(dense), s(v) = the run's model-level sparsity (``total``: prefill and generation together, as the
authors' ``sparsity_stats``). The task average is the authors' construction (docs/paper-notes.md §1.5, their
``plotting/harness_parsing.py``): per grid value the mean accuracy over tasks and the mean sparsity over tasks
give one curve, whose ratio is taken against the mean dense accuracy over tasks. Each curve's crossing is
``actsparse.analyze.critical.critical_point`` (the best grid point and the linear interpolation). The dense
reference is not a point of the curve: put 1.0 in a top-p grid for a dense anchor.

Intervals: percentile bootstrap (2.5, 97.5) over the examples of each task. A replicate draws n_t examples
with replacement in every task, independently per task from a generator seeded by the seed and the task name
(a task's draws do not depend on the other tasks), and the dense run and every grid value use the same draw
(paired). Each run's sparsity is kept at its measured value in every replicate (it comes from all tokens of
the task; its resampling variation is not modelled).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from actsparse.analyze.critical import critical_point
from actsparse.analyze.tasks.config import ACC_RATIO, N_BOOT
from actsparse.analyze.tasks.selection import AVERAGE
from actsparse.core.errors import ActsparseError


@dataclass(frozen=True)
class TaskCurve:
    """One task's runs on a common set of examples.

    Attributes:
        task, metric: the task and its metric key (``name,filter``).
        values: grid values float64 [V].
        sparsity: model-level sparsity per value float64 [V].
        scores: per-example metric float64 [V, n], examples in ``doc_ids`` order.
        dense: the dense run's per-example metric float64 [n].
        doc_ids: int64 [n].
    """

    task: str
    metric: str
    values: np.ndarray
    sparsity: np.ndarray
    scores: np.ndarray
    dense: np.ndarray
    doc_ids: np.ndarray


def task_curve(dense, sparse: Sequence, phase: str = "total") -> TaskCurve:
    """A :class:`TaskCurve` from ``harness.TaskResult`` objects: the dense run and one run per grid value.

    Raises:
        ActsparseError: no grid value, runs of different tasks or metrics, runs over different examples
            (e.g. another ``--limit``), or a grid value twice.
    """
    if not sparse:
        raise ActsparseError(f"task {dense.task}: no sparsified run to compare with the dense one")
    values = [r.value for r in sparse]
    if len(set(values)) != len(values):
        raise ActsparseError(f"task {dense.task}: a grid value appears twice")
    for r in sparse:
        if r.task != dense.task or r.metric != dense.metric:
            raise ActsparseError(f"runs of {r.task}/{r.metric} and {dense.task}/{dense.metric} cannot form one curve")
        if not np.array_equal(r.doc_ids, dense.doc_ids):
            raise ActsparseError(f"task {dense.task}: the run at {r.value:g} covers other examples than the dense "
                                 "run; rerun with the same --limit")
    return TaskCurve(dense.task, dense.metric, np.array(values, dtype=np.float64),
                     np.array([r.model_sparsity(phase) for r in sparse], dtype=np.float64),
                     np.stack([r.scores for r in sparse]), dense.scores.astype(np.float64), dense.doc_ids)


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """float64 [n_boot, n]: how often each of n examples is drawn in each bootstrap replicate."""
    draws = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), draws.ravel()), 1.0)
    return counts


def _task_rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, int(hashlib.sha256(task.encode()).hexdigest()[:15], 16)])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    ok = samples[~np.isnan(samples)]
    if not len(ok):
        return math.nan, math.nan
    lo, hi = np.percentile(ok, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class _Scope:
    """One curve (a task or the average) with its bootstrap replicates: acc float64 [V], boot_acc [n_boot, V],
    boot_dense [n_boot]."""

    name: str
    metric: str | None
    values: np.ndarray
    sparsity: np.ndarray
    acc: np.ndarray
    dense_acc: float
    boot_acc: np.ndarray
    boot_dense: np.ndarray
    n_examples: int


def _curve_rows(sc: _Scope) -> list[dict]:
    ratio = _ratio(sc.acc, np.full_like(sc.acc, sc.dense_acc))
    boot_ratio = _ratio(sc.boot_acc, sc.boot_dense[:, None])
    rows = []
    for j, v in enumerate(sc.values):
        lo, hi = _percentiles(boot_ratio[:, j])
        rows.append(dict(task=sc.name, metric=sc.metric, value=float(v), n_examples=sc.n_examples,
                         acc=float(sc.acc[j]), dense_acc=sc.dense_acc, acc_ratio=float(ratio[j]), acc_ratio_lo=lo,
                         acc_ratio_hi=hi, sparsity=float(sc.sparsity[j])))
    return rows


def _critical_row(sc: _Scope, threshold: float, phase: str) -> dict:
    ratio = _ratio(sc.acc, np.full_like(sc.acc, sc.dense_acc))
    grid_s, grid_v, interp = critical_point(sc.sparsity, ratio, sc.values, threshold, higher_is_better=True)
    boot_ratio = _ratio(sc.boot_acc, sc.boot_dense[:, None])
    boot = np.array([critical_point(sc.sparsity, r, sc.values, threshold, higher_is_better=True)[2]
                     for r in boot_ratio])
    lo, hi = _percentiles(boot)
    return dict(task=sc.name, metric=sc.metric, phase=phase, threshold=threshold, critical_sparsity_grid=grid_s,
                critical_value_grid=grid_v, critical_sparsity_interp=interp, critical_lo=lo, critical_hi=hi,
                boot_undefined=float(np.isnan(boot).mean()), dense_acc=sc.dense_acc, n_values=len(sc.values),
                n_examples=sc.n_examples, n_boot=len(boot))


def critical_tables(curves: Sequence[TaskCurve], *, threshold: float = ACC_RATIO, n_boot: int = N_BOOT,
                    seed: int = 0, phase: str = "total") -> tuple[list[dict], list[dict]]:
    """Accuracy-ratio curves and critical sparsity, per task and averaged over tasks.

    Args:
        curves: one :class:`TaskCurve` per task. The average is over every task at the grid values all of them
            have (no average with fewer than two tasks or no common value).
        threshold: the kept fraction of dense accuracy (0.99 in the paper).
        n_boot, seed: bootstrap replicates over examples and their seed (module docstring).
        phase: the sparsity the curves are drawn against (recorded in the critical rows).

    Returns:
        ``(curve rows, critical rows)`` as dicts. Curve rows, one per (task, value), task = ``average`` for the
        average: task, metric, value, n_examples, acc, dense_acc, acc_ratio, acc_ratio_lo, acc_ratio_hi,
        sparsity. Critical rows, one per task and the average: task, metric, phase, threshold,
        critical_sparsity_grid, critical_value_grid, critical_sparsity_interp, critical_lo, critical_hi (the
        interval of the interpolated value), boot_undefined (replicates without a crossing), dense_acc,
        n_values, n_examples, n_boot.

    Raises:
        ActsparseError: no curves, fewer than one replicate, a threshold outside (0, 1], a task twice.
    """
    if not curves:
        raise ActsparseError("no task results to compute critical sparsity from")
    if n_boot < 1:
        raise ActsparseError(f"n_boot must be positive (got {n_boot})")
    if not 0 < threshold <= 1:
        raise ActsparseError(f"the accuracy-ratio threshold must be in (0, 1] (got {threshold})")
    names = [c.task for c in curves]
    if len(set(names)) != len(names):
        raise ActsparseError("a task appears twice")
    scopes = []
    for c in curves:
        counts = resample_counts(len(c.dense), n_boot, _task_rng(seed, c.task))  # [boot, n]
        n = len(c.dense)
        scopes.append(_Scope(c.task, c.metric, c.values, c.sparsity, c.scores.mean(axis=1), float(c.dense.mean()),
                             counts @ c.scores.T / n, counts @ c.dense / n, n))
    common = [v for v in curves[0].values if all(v in c.values for c in curves[1:])]
    if len(curves) > 1 and common:
        cols = [[list(s.values).index(v) for v in common] for s in scopes]
        scopes.append(_Scope(
            AVERAGE, None, np.array(common), np.mean([s.sparsity[i] for s, i in zip(scopes, cols)], axis=0),
            np.mean([s.acc[i] for s, i in zip(scopes, cols)], axis=0), float(np.mean([s.dense_acc for s in scopes])),
            np.mean([s.boot_acc[:, i] for s, i in zip(scopes, cols)], axis=0),
            np.mean([s.boot_dense for s in scopes], axis=0), sum(s.n_examples for s in scopes)))
    return ([r for s in scopes for r in _curve_rows(s)], [_critical_row(s, threshold, phase) for s in scopes])
