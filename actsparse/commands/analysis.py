"""CLI commands for offline analysis: ``curves`` (sparsity/error sweeps and open-loop critical sparsity)."""

from __future__ import annotations

import math
from typing import Optional

import typer

from actsparse.errors import ActsparseError
from actsparse.parsing import names, numbers


def curves(
    store: str = typer.Argument(..., help="store path or URL"),
    run: Optional[str] = typer.Option(None, "--run", "-r", help="run id or prefix (default: the only run)"),
    target: str = typer.Option("intermediate", help="comma-separated: input, gate, up, intermediate, all-inputs"),
    rule: str = typer.Option("top-p", help="comma-separated: top-p, top-k, max-p, threshold"),
    grid: Optional[str] = typer.Option(None, help="comma-separated values (default: the paper's 26 top-p values)"),
    power: float = typer.Option(1.0, help="top-p power q >= 1 (rule applied to |a|^q)"),
    include_special: bool = typer.Option(False, help="count BOS/special tokens (excluded by default)"),
    tolerance: float = typer.Option(None, help="relative FFN-output error bound for offline critical sparsity (default: 0.1)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute even if the result is in the store"),
    all_rows: bool = typer.Option(False, "--all", help="print every grid value, not a subset"),
) -> None:
    """Open-loop sparsity curves, simulated error and critical sparsity from the stored activations."""
    import polars as pl
    from rich.console import Console
    from rich.table import Table

    from analyze.curves import DEFAULT_TOLERANCE, CurveConfig, check_tolerance, compute_curves, critical_sparsity

    targets, rules = names(target), names(rule)
    g = numbers(grid, "--grid")
    CurveConfig(targets=targets, rules=rules).validate()  # an unknown name first, whatever else is wrong
    if g and len(rules) != 1:
        raise ActsparseError("--grid needs exactly one --rule")
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    check_tolerance(tol)  # before the sweep
    df = compute_curves(store, run, targets=targets, rules=rules, grids={rules[0]: g} if g else None,
                        power=power, include_special=include_special, use_cache=not no_cache)
    model = df.filter(pl.col("layer") == -1)
    con = Console()
    order = [(t, r) for t in dict.fromkeys(targets) for r in dict.fromkeys(rules)]  # as the user listed them
    for t, r in order:
        part = model.filter(target=t, rule=r).sort("value", descending=True)
        if not all_rows and part.height > 12:
            idx = sorted(set(range(0, part.height, max(1, part.height // 10))) | {part.height - 1})
            part = part[idx]
        tab = Table(title=f"{t} / {r}  (model level, open-loop, run {df['run_id'][0]})")
        for c in ("value", "sparsity", "p10–p90", "kept L1", "rel err", "p90 err", "cos"):
            tab.add_column(c, justify="right")
        for row in part.iter_rows(named=True):
            tab.add_row(f"{row['value']:g}", f"{row['sparsity_mean']:.3f}",
                        f"{row['sparsity_p10']:.2f}–{row['sparsity_p90']:.2f}", f"{row['kept_l1_mean']:.3f}",
                        f"{row['rel_err_mean']:.4f}", f"{row['rel_err_p90']:.4f}", f"{row['cos_mean']:.4f}")
        con.print(tab)
    crit = critical_sparsity(df, tol)
    rank = {key: i for i, key in enumerate(order)}
    for row in sorted(crit.iter_rows(named=True), key=lambda row: rank[(row["target"], row["rule"])]):
        head = f"open-loop critical sparsity {row['target']}/{row['rule']} (rel err <= {tol:g}): "
        if math.isnan(row["critical_sparsity_grid"]):
            con.print(head + "no grid value keeps the error within the tolerance")
        else:
            con.print(head + f"grid {row['critical_sparsity_grid']:.3f} at {row['critical_value_grid']:g}, "
                      f"interpolated {row['critical_sparsity_interp']:.3f}")


def register(app: typer.Typer) -> None:
    app.command()(curves)
