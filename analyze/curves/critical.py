"""Offline critical sparsity from model-level curve rows (the open-loop counterpart of the paper's)."""

from __future__ import annotations

from actsparse.analyze.critical import critical_point
from actsparse.analyze.curves.config import DEFAULT_TOLERANCE, check_tolerance


def critical_sparsity(curves, tolerance: float = DEFAULT_TOLERANCE, metric: str = "rel_err_mean"):
    """Offline critical sparsity per run x target x rule from model-level curve rows (layer -1).

    The largest model-level sparsity whose error ``metric`` stays <= ``tolerance``, (a) at the best grid
    point and (b) linearly interpolated between the last grid point meeting the tolerance and the
    first failing it, points ordered by sparsity (``actsparse.analyze.critical.critical_point``).

    Returns:
        polars DataFrame: run_id, target, rule, tolerance, metric, critical_sparsity_grid,
        critical_value_grid, critical_sparsity_interp, label ("open-loop").

    Raises:
        ActsparseError: a tolerance that is negative or not a finite number.
    """
    import polars as pl

    check_tolerance(tolerance)
    rows = []
    model = curves.filter(pl.col("layer") == -1)
    for (run_id, target, rule), g in model.group_by(["run_id", "target", "rule"], maintain_order=True):
        g = g.sort("sparsity_mean")
        s, e, v = g["sparsity_mean"].to_list(), g[metric].to_list(), g["value"].to_list()
        grid_s, grid_v, interp = critical_point(s, e, v, tolerance, higher_is_better=False)
        rows.append(dict(run_id=run_id, target=target, rule=rule, tolerance=tolerance, metric=metric,
                         critical_sparsity_grid=grid_s, critical_value_grid=grid_v, critical_sparsity_interp=interp,
                         label="open-loop"))
    return pl.DataFrame(rows)
