"""Per-layer allocation: the solver's guarantees on random and adversarial curves, the file, and the closed loop."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from actsparse.analyze.allocate import allocate, read_allocation, solve, write_allocation
from actsparse.core.errors import ActsparseError
from tests.helpers import run_cli


def random_curves(rng, n_layers: int = 30, n_values: int = 26, adversarial: bool = False):
    """Per-layer (sparsity, error) curves over a descending grid: sparsity rises and error rises with it, at
    per-layer rates; adversarial curves are non-convex, with plateaus, ties and error dips."""
    values = np.linspace(1.0, 0.0, n_values)
    base = np.sort(rng.random((n_layers, n_values)), axis=1) * rng.uniform(0.3, 1.0, (n_layers, 1))
    err = base ** rng.uniform(0.5, 4.0, (n_layers, 1)) * rng.uniform(0.01, 2.0, (n_layers, 1))
    if adversarial:
        base[:, 5:9] = base[:, 5:6]  # equal sparsity at several values
        err += rng.normal(0, 0.05, err.shape).clip(-0.02, None)  # non-monotone error
        err[rng.random(err.shape) < 0.1] = 0.0
    return values, base, err.clip(0, None)


@pytest.mark.parametrize("adversarial", [False, True])
def test_reaches_the_target_within_one_step_and_never_beats_uniform_error(adversarial):
    rng = np.random.default_rng(0)
    for trial in range(200):
        values, s, e = random_curves(rng, n_layers=int(rng.integers(1, 31)), adversarial=adversarial)
        w = rng.integers(1, 4, s.shape[0]).astype(float)
        top = float((s.max(1) * w).sum() / w.sum())
        target = float(rng.uniform(0, top))
        a = solve(values, s, e, w, target)
        assert a.model_sparsity >= target - 1e-12
        # within one grid step of one layer past the target (or past the least sparse allocation possible)
        steps = np.diff(np.sort(s, axis=1), axis=1).max(initial=0) * w.max() / w.sum()
        floor = float((s.min(1) * w).sum() / w.sum())
        assert a.model_sparsity <= max(target, floor) + steps + 1e-12
        # never more error than uniform p at the same sparsity (the least sparse uniform value reaching it)
        uni = (s * w[:, None]).sum(0) / w.sum()
        ok = np.nonzero(uni >= target - 1e-12)[0]
        if len(ok):
            u = ok[np.argmin(uni[ok])]
            assert a.summed_error <= e[:, u].sum() + 1e-12, trial
            assert a.uniform_error == pytest.approx(e[:, u].sum())
        assert a.summed_error == pytest.approx(sum(a.layer_error))
        idx = [list(values).index(v) for v in a.values]
        assert a.layer_sparsity == [s[i, j] for i, j in enumerate(idx)]


def test_greedy_prefers_cheap_layers():
    values = [1.0, 0.5, 0.0]
    s = np.array([[0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])
    e = np.array([[0.0, 0.01, 0.02], [0.0, 1.0, 2.0]])  # layer 0 is cheap to sparsify
    a = solve(values, s, e, [1.0, 1.0], 0.5)
    assert a.values == [0.0, 1.0] and a.model_sparsity == 0.5 and a.method == "greedy"
    assert a.uniform_value == 0.5 and a.uniform_error == pytest.approx(1.01)
    with pytest.raises(ActsparseError, match="out of reach"):
        solve(values, s * 0.5, e, [1.0, 1.0], 0.9)
    with pytest.raises(ActsparseError, match="finite"):
        solve(values, s, e * np.nan, [1.0, 1.0], 0.5)


def test_thirty_layers_by_26_values_is_fast():
    import time

    values, s, e = random_curves(np.random.default_rng(1))
    t0 = time.perf_counter()
    for target in np.linspace(0.05, 0.25, 10):
        solve(values, s, e, np.ones(30), float(target))
    assert time.perf_counter() - t0 < 1.0  # 10 solves; the benchmark times one (make bench-allocate)


@pytest.fixture
def store(analysis_store):
    return analysis_store


def test_allocation_from_curves_and_its_file(store, tmp_path):
    from actsparse.analyze.curves import compute_curves

    path, run_id = store
    curves = compute_curves(path, run_id, targets=("intermediate",))
    layers, allocs = allocate(curves, "intermediate", "top-p", [0.3, 0.5])
    assert layers == [0, 1, 2, 3] or layers == list(range(len(layers)))
    for a in allocs:
        assert a.model_sparsity >= a.sparsity - 1e-12 and len(a.values) == len(layers)
        if a.uniform_error is not None:
            assert a.summed_error <= a.uniform_error + 1e-12
    f = tmp_path / "alloc.json"
    write_allocation(f, run_id=run_id, model="m", analysis_id=curves["analysis_id"][0], target="intermediate",
                     rule="top-p", metric="rel_err_mean", layers=layers, allocations=allocs)
    doc = read_allocation(f)
    assert [a["sparsity"] for a in doc["allocations"]] == [0.3, 0.5]
    bad = json.loads(f.read_text())
    bad["allocations"][0]["values"] = bad["allocations"][0]["values"][:-1]
    f.write_text(json.dumps(bad))
    with pytest.raises(ActsparseError, match="one finite value per layer"):
        read_allocation(f)
    f.write_text("{")
    with pytest.raises(ActsparseError, match="not readable JSON"):
        read_allocation(f)
    with pytest.raises(ActsparseError, match="all-inputs"):
        allocate(curves, "all-inputs", "top-p", [0.3])
    with pytest.raises(ActsparseError, match="no per-layer rows"):
        allocate(curves, "intermediate", "top-k", [0.3])


@pytest.mark.slow
def test_cli_allocate_then_evaluate_applies_per_layer_values(store, tmp_path):
    path, run_id = store
    f = tmp_path / "a.json"
    r = run_cli("allocate", str(path), "--sparsity", "0.4,0.6", "--out", str(f), "-q")
    assert r.returncode == 0, r.stderr
    assert "0.4" in r.stdout and f.is_file()
    doc = read_allocation(f)
    r = run_cli("evaluate", "--store", str(path), "--run", run_id, "--allocation", str(f), "--max-tokens", "256",
                "--seq-len", "64", "--batch-size", "4", "--boot", "10", "-q")
    assert r.returncode == 0, r.stderr
    from actsparse.queries.engine import Store

    ev = Store(str(path)).sql("SELECT rule, value, sparsity FROM evaluations ORDER BY value")
    assert ev["rule"].to_list() == ["top-p/allocated"] * 2 and ev["value"].to_list() == [0.4, 0.6]
    layers = Store(str(path)).sql("SELECT value, layer, sparsity FROM evaluation_layers WHERE layer >= 0 "
                                  "ORDER BY value, layer")
    # closed loop realises the allocation's per-layer values: sparser layers where the allocation put them
    for a in doc["allocations"]:
        got = layers.filter(pl.col("value") == a["sparsity"])["sparsity"].to_numpy()
        assert np.corrcoef(got, a["layer_sparsity"])[0, 1] > 0.8 or np.ptp(a["values"]) == 0
    r = run_cli("evaluate", "--store", str(path), "--run", run_id, "--allocation", str(f), "--grid", "0.5")
    assert r.returncode == 2 and "--allocation sets the grid" in r.stderr
