"""Per-layer allocation: rule values per layer that reach a model-level sparsity with the least summed error.

TEAL (Liu et al. 2024, arXiv 2408.14690, §4.2) allocates sparsity across layers greedily, re-running the model
for every step; here the same greedy runs offline over the per-layer open-loop curves of one run (a curves
result: for every layer and grid value, the layer's sparsity and its mean relative FFN-output error,
docs/paper-notes.md §8). :func:`solve` is the pure solver; :func:`allocate` reads the curve rows;
:func:`write_allocation` / :func:`read_allocation` handle the allocation file that ``actsparse evaluate
--allocation`` applies in closed loop.

The problem: choose one grid value per layer l (sparsity s_l, error e_l) to minimise sum_l e_l subject to
sum_l w_l s_l / sum_l w_l >= S, w_l the layer's width x tokens (the model-level sparsity of docs/paper-notes.md
§1.4). The solver walks each layer's lower convex hull of (s, e) from its densest point, always taking the step
with the least error per unit of model-level sparsity (the greedy is optimal for the relaxation in which a
layer may mix two neighbouring grid points); the layer whose step crosses S then steps back to its least
sparse grid point still reaching S, so the result lands at most one grid step of one layer past S. The
baseline is uniform p at the same sparsity (the least sparse grid value whose uniform allocation reaches S):
when it has less summed error than the greedy's, it is returned instead, so an allocation never does worse
than uniform open-loop.

Allocation file (JSON, ``ALLOCATION_FORMAT``), documented in docs/store-format.md "Allocation files".
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_json

ALLOCATION_FORMAT = "actsparse-allocation"
ALLOCATION_VERSION = 1


@dataclass(frozen=True)
class Allocation:
    """One solution: per-layer rule values reaching ``sparsity`` (the request) at ``model_sparsity``.

    values, layer_sparsity, layer_error: one entry per layer (layer order of the input); summed_error: sum of
    layer_error; method: ``greedy`` or ``uniform`` (a uniform value beat the greedy); uniform_value,
    uniform_sparsity, uniform_error: the best uniform grid value reaching the request (None when none does).
    """

    sparsity: float
    values: list[float]
    layer_sparsity: list[float]
    layer_error: list[float]
    model_sparsity: float
    summed_error: float
    method: str
    uniform_value: float | None
    uniform_sparsity: float | None
    uniform_error: float | None


def _hull(s: np.ndarray, e: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points (s, e), from the smallest s (ties: smallest e) rightwards,
    keeping only points that lower the error per added sparsity less steeply than the next (monotone chain)."""
    order = sorted(range(len(s)), key=lambda j: (s[j], e[j]))
    hull: list[int] = []
    for j in order:
        if hull and s[j] == s[hull[-1]]:
            continue  # same sparsity, higher (or equal) error
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-j (or on it): drop it
            if (e[b] - e[a]) * (s[j] - s[a]) >= (e[j] - e[a]) * (s[b] - s[a]):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def solve(values: Sequence[float], sparsity, error, weight, target: float) -> Allocation:
    """Per-layer values reaching model-level sparsity ``target`` with the least summed error (module docstring).

    values: [P] grid values; sparsity, error: [L, P] per-layer sparsity (fraction zeroed) and error (any
    non-negative cost, e.g. mean relative FFN-output error) at each value; weight: [L] per-layer weights of
    the model-level sparsity (width x tokens); target: the model-level sparsity in [0, 1].

    Raises:
        ActsparseError: shapes that do not match, non-finite inputs, or a target above the sparsest
            allocation the grid allows.
    """
    v = np.asarray(values, dtype=np.float64)
    s = np.asarray(sparsity, dtype=np.float64)
    e = np.asarray(error, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if s.ndim != 2 or s.shape != e.shape or s.shape[1] != len(v) or w.shape != (s.shape[0],) or not len(v):
        raise ActsparseError(f"allocation needs sparsity and error [layers, values] and weights [layers]; got "
                             f"{s.shape}, {e.shape}, {w.shape} for {len(v)} values")
    if not (np.isfinite(s).all() and np.isfinite(e).all() and (w > 0).all()):
        raise ActsparseError("allocation needs finite sparsity and error at every layer and value "
                             "(curves computed with error), and positive layer weights")
    if not 0.0 <= target <= 1.0:
        raise ActsparseError(f"target sparsity must be in [0, 1], got {target}")
    total = w.sum()
    best = (s.max(axis=1) * w).sum() / total
    if target > best + 1e-12:
        raise ActsparseError(f"model-level sparsity {target:g} is out of reach: the sparsest grid value of every "
                             f"layer gives {best:.4f}")
    n_layers = s.shape[0]
    hulls = [_hull(s[l_], e[l_]) for l_ in range(n_layers)]
    pos = [0] * n_layers
    reached = sum(w[l_] * s[l_, hulls[l_][0]] for l_ in range(n_layers)) / total
    heap: list[tuple[float, int]] = []

    def push(l_: int) -> None:
        h = hulls[l_]
        if pos[l_] + 1 < len(h):
            a, b = h[pos[l_]], h[pos[l_] + 1]
            heapq.heappush(heap, ((e[l_, b] - e[l_, a]) / (w[l_] * (s[l_, b] - s[l_, a])), l_))

    for l_ in range(n_layers):
        push(l_)
    last = None  # the layer of the step that crossed the target, and where it stood before
    while reached < target - 1e-12 and heap:
        _, l_ = heapq.heappop(heap)
        a, b = hulls[l_][pos[l_]], hulls[l_][pos[l_] + 1]
        reached += w[l_] * (s[l_, b] - s[l_, a]) / total
        pos[l_] += 1
        last = (l_, a)
        push(l_)
    idx = [hulls[l_][pos[l_]] for l_ in range(n_layers)]
    if last is not None:
        # A hull step can jump over grid points: move the crossing layer back to its least sparse point that
        # still reaches the target, so the result overshoots by at most one grid step of that layer.
        l_, a = last
        rest = reached - w[l_] * s[l_, idx[l_]] / total
        ok_j = [j for j in range(len(v)) if s[l_, a] < s[l_, j] <= s[l_, idx[l_]]
                and rest + w[l_] * s[l_, j] / total >= target - 1e-12]
        idx[l_] = min(ok_j, key=lambda j: (s[l_, j], e[l_, j]))
    greedy_err = float(sum(e[l_, j] for l_, j in enumerate(idx)))

    # the baseline: uniform p at the same sparsity, the least sparse grid value reaching the target
    uni_model = (s * w[:, None]).sum(axis=0) / total
    ok = np.nonzero(uni_model >= target - 1e-12)[0]
    u = int(ok[np.argmin(uni_model[ok])]) if len(ok) else None
    method = "greedy"
    if u is not None and e[:, u].sum() < greedy_err:
        idx, method = [u] * n_layers, "uniform"
    uni_err = e.sum(axis=0)
    chosen_s = [float(s[l_, j]) for l_, j in enumerate(idx)]
    chosen_e = [float(e[l_, j]) for l_, j in enumerate(idx)]
    return Allocation(
        sparsity=float(target), values=[float(v[j]) for j in idx], layer_sparsity=chosen_s, layer_error=chosen_e,
        model_sparsity=float(np.dot(chosen_s, w) / total), summed_error=float(sum(chosen_e)), method=method,
        uniform_value=None if u is None else float(v[u]),
        uniform_sparsity=None if u is None else float(uni_model[u]),
        uniform_error=None if u is None else float(uni_err[u]))


def allocate(curves, target: str, rule: str, sparsities: Sequence[float], metric: str = "rel_err_mean"):
    """Allocations for each model-level sparsity in ``sparsities`` from one run's curves rows.

    curves: a curves result (polars DataFrame, ``actsparse.core.format.CURVES`` columns) holding the per-layer
    rows of ``target`` and ``rule`` with errors; metric: the error column summed over layers. Returns
    ``(layers, [Allocation])`` with ``layers`` the layer indices in the order of each allocation's lists.

    Raises:
        ActsparseError: no rows for the target and rule, rows without error, missing grid values in some
            layer, target ``all-inputs`` (its per-layer rows hold only the x hook), or a sparsity out of reach.
    """
    import polars as pl

    if target == "all-inputs":
        raise ActsparseError("allocation over all-inputs is not supported: its per-layer curve rows hold only the "
                             "input hook; allocate input and intermediate separately")
    rows = curves.filter((pl.col("target") == target) & (pl.col("rule") == rule) & (pl.col("layer") >= 0))
    if rows.is_empty():
        raise ActsparseError(f"the curves hold no per-layer rows for target {target} and rule {rule}; "
                             f"run `actsparse curves --target {target} --rule {rule}` first")
    grid = sorted(set(rows["value"].to_list()), reverse=True)
    layers = sorted(set(rows["layer"].to_list()))
    table = rows.sort(["layer", "value"], descending=[False, True])
    if table.height != len(grid) * len(layers):
        raise ActsparseError(f"the curves of {target}/{rule} do not cover every grid value in every layer")
    s = table["sparsity_mean"].to_numpy().reshape(len(layers), len(grid))
    err = table[metric].to_numpy().reshape(len(layers), len(grid))
    if np.isnan(err).any():
        raise ActsparseError(f"the curves of {target}/{rule} have no {metric} (computed without error?)")
    wt = (table["width"] * table["n_tokens"]).to_numpy().reshape(len(layers), len(grid))[:, 0]
    return layers, [solve(grid, s, err, wt, float(x)) for x in sparsities]


def write_allocation(path: str | Path, *, run_id: str, model: str, analysis_id: str, target: str, rule: str,
                     metric: str, layers: Sequence[int], allocations: Sequence[Allocation]) -> dict:
    """Write the allocation file (atomically) and return its JSON object (docs/store-format.md)."""
    doc = dict(format=ALLOCATION_FORMAT, version=ALLOCATION_VERSION, run_id=run_id, model=model,
               analysis_id=analysis_id, target=target, rule=rule, metric=metric, label="open-loop",
               allocations=[dict(asdict(a), layers=list(layers)) for a in allocations])
    atomic_write_json(Path(path), doc)
    return doc


def read_allocation(path: str | Path) -> dict:
    """Read and validate an allocation file: its JSON object, each allocation's ``values`` one per layer.

    Raises:
        ActsparseError: missing or unreadable file, wrong format or version, or inconsistent fields.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ActsparseError(f"allocation file {p} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ActsparseError(f"allocation file {p} is not readable JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(doc, dict) or doc.get("format") != ALLOCATION_FORMAT:
        raise ActsparseError(f"{p} is not an actsparse allocation file (format {ALLOCATION_FORMAT!r})")
    if doc.get("version") != ALLOCATION_VERSION:
        raise ActsparseError(f"{p}: allocation file version {doc.get('version')!r} is not {ALLOCATION_VERSION}")
    allocs = doc.get("allocations")
    if not isinstance(allocs, list) or not allocs:
        raise ActsparseError(f"{p}: the file lists no allocations")
    for key in ("target", "rule", "run_id"):
        if not isinstance(doc.get(key), str):
            raise ActsparseError(f"{p}: field {key!r} is missing")
    for a in allocs:
        if not isinstance(a, dict):
            raise ActsparseError(f"{p}: an allocation is not an object")
        vals, layers = a.get("values"), a.get("layers")
        if not (isinstance(vals, list) and isinstance(layers, list) and len(vals) == len(layers) and vals
                and all(isinstance(x, int | float) and math.isfinite(x) for x in vals)
                and isinstance(a.get("sparsity"), int | float)):
            raise ActsparseError(f"{p}: an allocation without one finite value per layer")
        if layers != list(range(len(layers))):
            raise ActsparseError(f"{p}: allocations must cover layers 0..n-1 in order (curves of every layer)")
    return doc
