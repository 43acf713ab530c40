"""Task critical sparsity: per task, the authors' task average, bootstrap over examples, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from actsparse.analyze.tasks.counting import PhaseCounts
from actsparse.analyze.tasks.critical import critical_tables, task_curve
from actsparse.analyze.tasks.harness import TaskResult
from actsparse.analyze.tasks.selection import AVERAGE
from actsparse.core.errors import ActsparseError

WIDTH = 100  # one hook: a sparsity s is s * WIDTH zeroed entries over one position


def _run(task: str, value, hits: int, n: int, sparsity=None, doc_ids=None) -> TaskResult:
    scores = np.array([1.0] * hits + [0.0] * (n - hits))
    counts = None if sparsity is None else {"prefill": PhaseCounts(np.array([round(sparsity * WIDTH)]), 1),
                                            "generation": PhaseCounts(np.array([0]), 0)}
    return TaskResult(task=task, value=value, metric="acc,none", score=float(scores.mean()),
                      doc_ids=np.arange(n) if doc_ids is None else np.asarray(doc_ids), scores=scores, responses=[],
                      n_shot=0, seconds=0.0, counts=counts, widths=np.array([WIDTH]))


def _curves(runs: dict) -> list:
    return [task_curve(r[None], [r[v] for v in sorted((v for v in r if v is not None), reverse=True)])
            for r in runs.values()]


# Task a: 100 examples, dense 80 right; task b: 50 examples, dense 40 right.
A = {None: _run("a", None, 80, 100), 1.0: _run("a", 1.0, 80, 100, 0.0), 0.9: _run("a", 0.9, 80, 100, 0.40),
     0.7: _run("a", 0.7, 76, 100, 0.60), 0.5: _run("a", 0.5, 60, 100, 0.80)}
B = {None: _run("b", None, 40, 50), 1.0: _run("b", 1.0, 40, 50, 0.0), 0.9: _run("b", 0.9, 40, 50, 0.50),
     0.7: _run("b", 0.7, 40, 50, 0.70), 0.5: _run("b", 0.5, 30, 50, 0.90)}


def _row(rows: list[dict], task: str) -> dict:
    return next(r for r in rows if r["task"] == task)


def test_per_task_and_average_crossings_by_hand():
    curve, crit = critical_tables(_curves({"a": A, "b": B}), n_boot=200)
    a, b, avg = _row(crit, "a"), _row(crit, "b"), _row(crit, AVERAGE)
    # a: ratios 1, 1, 0.95, 0.75 at sparsities 0, .4, .6, .8: passes up to .4, crosses 0.99 between .4 and .6
    assert (a["critical_sparsity_grid"], a["critical_value_grid"]) == (0.40, 0.9)
    assert a["critical_sparsity_interp"] == pytest.approx(0.40 + (0.99 - 1.0) / (0.95 - 1.0) * 0.20)
    # b: ratios 1, 1, 1, 0.75 at 0, .5, .7, .9
    assert (b["critical_sparsity_grid"], b["critical_value_grid"]) == (0.70, 0.7)
    assert b["critical_sparsity_interp"] == pytest.approx(0.70 + 0.01 / 0.25 * 0.20)
    # average (the authors'): mean accuracy and mean sparsity over tasks per value, ratio to the mean dense accuracy
    acc = {0.9: 0.80, 0.7: (0.76 + 0.80) / 2, 0.5: (0.60 + 0.60) / 2}
    sparsity = {0.9: 0.45, 0.7: 0.65, 0.5: 0.85}
    rows = {r["value"]: r for r in curve if r["task"] == AVERAGE}
    for v in acc:
        assert rows[v]["acc"] == pytest.approx(acc[v]) and rows[v]["sparsity"] == pytest.approx(sparsity[v])
        assert rows[v]["acc_ratio"] == pytest.approx(acc[v] / 0.80)
    r07 = acc[0.7] / 0.80
    assert (avg["critical_sparsity_grid"], avg["critical_value_grid"]) == (0.45, 0.9)
    assert avg["critical_sparsity_interp"] == pytest.approx(0.45 + (0.99 - 1.0) / (r07 - 1.0) * 0.20)
    assert avg["n_examples"] == 150 and avg["dense_acc"] == pytest.approx(0.80) and avg["metric"] is None


def test_bootstrap_intervals_cover_the_estimate_and_are_paired():
    curve, crit = critical_tables(_curves({"a": A, "b": B}), n_boot=500, seed=3)
    for r in crit:
        assert r["critical_lo"] <= r["critical_sparsity_interp"] <= r["critical_hi"]
        assert r["critical_lo"] < r["critical_hi"]
    # identical per-example scores give ratio exactly 1 in every replicate (dense and sparse share the draws)
    same = [r for r in curve if r["value"] == 1.0]
    assert [(r["acc_ratio_lo"], r["acc_ratio_hi"]) for r in same] == [(1.0, 1.0)] * 3
    assert critical_tables(_curves({"a": A, "b": B}), n_boot=500, seed=3)[1] == crit  # seeded
    # a task's draws do not depend on the other tasks
    alone = critical_tables(_curves({"a": A}), n_boot=500, seed=3)[1]
    assert alone == [_row(crit, "a")]


def test_the_average_is_over_the_grid_values_every_task_has():
    fewer = {k: v for k, v in B.items() if k != 0.5}
    curve, crit = critical_tables(_curves({"a": A, "b": fewer}), n_boot=20)
    assert sorted(r["value"] for r in curve if r["task"] == AVERAGE) == [0.7, 0.9, 1.0]
    assert _row(crit, AVERAGE)["n_values"] == 3 and _row(crit, "a")["n_values"] == 4


def test_densest_point_failing_gives_nan():
    runs = {None: _run("c", None, 10, 10), 0.9: _run("c", 0.9, 5, 10, 0.5), 0.5: _run("c", 0.5, 2, 10, 0.8)}
    (r,) = critical_tables(_curves({"c": runs}), n_boot=50)[1]
    assert math.isnan(r["critical_sparsity_grid"]) and math.isnan(r["critical_sparsity_interp"])
    assert r["boot_undefined"] == 1.0


def test_bad_input_is_refused():
    with pytest.raises(ActsparseError, match="covers other examples"):
        _curves({"a": {**A, 0.5: _run("a", 0.5, 60, 100, 0.8, doc_ids=np.arange(1, 101))}})
    with pytest.raises(ActsparseError, match="no sparsified run"):
        task_curve(A[None], [])
    with pytest.raises(ActsparseError, match="no task results"):
        critical_tables([])
    with pytest.raises(ActsparseError, match="n_boot must be positive"):
        critical_tables(_curves({"a": A}), n_boot=0)
    with pytest.raises(ActsparseError, match="threshold must be in"):
        critical_tables(_curves({"a": A}), threshold=1.5)
