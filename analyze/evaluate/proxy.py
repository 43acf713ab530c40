"""The proxy check: open-loop (offline) critical sparsity against the stored closed-loop evaluations of a run."""

from __future__ import annotations

import math

import numpy as np

from actsparse.analyze.evaluate.storage import stored_evaluations
from actsparse.core.errors import ActsparseError


def proxy_check(store, run_id: str | None = None, target: str | None = None, rule: str | None = None, *,
                eval_id: str | None = None, tolerance: float | None = None):
    """Open-loop (offline) against closed-loop critical sparsity for the evaluations stored with a run.

    For every stored evaluation of the run (filtered by ``target``, ``rule``, ``eval_id``), the
    offline curves of the same run, target, rule, power and grid values come from
    ``actsparse.analyze.curves.compute_curves`` (on the run's stored activations, i.e. its collection split;
    the closed loop runs on the held-out split) and their critical sparsity from
    ``actsparse.analyze.curves.critical_sparsity`` at ``tolerance`` (its default when None).

    Returns:
        polars DataFrame, one row per evaluation: run_id, eval_id, target, rule, power, n_values,
        closed_critical (interpolated, top-1 criterion) with closed_lo/closed_hi, closed_critical_nll
        (exp(-dNLL) criterion), open_critical (interpolated), open_critical_grid, tolerance,
        spearman_err_dnll and spearman_err_kl (rank correlation across the grid between the offline
        model-level mean relative FFN-output error and the closed-loop dNLL / KL), and
        sparsity_gap (mean over the grid of closed-loop minus open-loop model-level sparsity).

    Raises:
        ActsparseError: no stored evaluation matches; errors of ``compute_curves`` (e.g. a target
            whose sites the run did not collect).
    """
    import polars as pl

    from actsparse.analyze import curves
    from actsparse.pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_id)
    wants = {"target": target, "rule": rule, "eval_id": eval_id}
    evals = [ev for ev in stored_evaluations(st, run.run_id)
             if all(w is None or ev.summary[c][0] == w for c, w in wants.items())]
    if not evals:
        wanted = ", ".join(f"{k} {v}" for k, v in (("target", target), ("rule", rule), ("eval_id", eval_id)) if v)
        raise ActsparseError(f"run {run.run_id} has no stored closed-loop evaluation"
                             f"{' with ' + wanted if wanted else ''}; "
                             f"run `actsparse evaluate --store {st.url} --run {run.run_id} ...` first")
    tol = curves.DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    rows = []
    for ev in evals:
        eid, closed = ev.eval_id, ev.summary.sort("value", descending=True)
        t, r, q = closed["target"][0], closed["rule"][0], float(closed["power"][0])
        grid = closed["value"].to_list()
        open_df = curves.compute_curves(st, run.run_id, targets=(t,), rules=(r,), grids={r: grid}, power=q)
        model_level = open_df.filter((pl.col("layer") == -1) & (pl.col("target") == t) & (pl.col("rule") == r))
        open_crit = curves.critical_sparsity(model_level, tolerance=tol).row(0, named=True)
        crit = {} if ev.critical is None else {row["criterion"]: row for row in ev.critical.iter_rows(named=True)}
        joined = closed.join(model_level.select("value", open_sparsity="sparsity_mean", rel_err="rel_err_mean"),
                             on="value", how="inner")
        rows.append(dict(
            run_id=run.run_id, eval_id=eid, target=t, rule=r, power=q, n_values=joined.height,
            closed_critical=crit.get("top1_acc", {}).get("critical_sparsity_interp", math.nan),
            closed_lo=crit.get("top1_acc", {}).get("critical_lo", math.nan),
            closed_hi=crit.get("top1_acc", {}).get("critical_hi", math.nan),
            closed_critical_nll=crit.get("exp_neg_dnll", {}).get("critical_sparsity_interp", math.nan),
            open_critical=open_crit["critical_sparsity_interp"], open_critical_grid=open_crit["critical_sparsity_grid"],
            tolerance=tol, spearman_err_dnll=spearman(joined["rel_err"].to_numpy(), joined["dnll"].to_numpy()),
            spearman_err_kl=spearman(joined["rel_err"].to_numpy(), joined["kl"].to_numpy()),
            sparsity_gap=float((joined["sparsity"] - joined["open_sparsity"]).mean()) if joined.height else math.nan,
        ))
    return pl.DataFrame(rows)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of the finite pairs (scipy's, average ranks for ties); NaN with fewer than 3
    pairs or a constant side."""
    import warnings

    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(x[ok], y[ok]).statistic)
