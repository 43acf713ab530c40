"""CLI command ``curves``: open-loop sparsity/error sweeps and offline critical sparsity of a run."""

from __future__ import annotations

import math

import typer

from actsparse.cli.options import (
    AddressOption,
    ExecutorOption,
    QuietOption,
    RunOption,
    WorkersOption,
    executor_maps,
    ray_options,
)
from actsparse.cli.output import FormatOption, check_format, emit, progress_bars, say
from actsparse.core.errors import ActsparseError
from actsparse.core.parsing import names, numbers


def curves(
    store: str = typer.Argument(..., help="store path or URL"),
    run: RunOption = None,
    target: str = typer.Option("intermediate", help="comma-separated: input, gate, up, intermediate, all-inputs"),
    rule: str = typer.Option("top-p", help="comma-separated: top-p, top-k, max-p, threshold, wina-top-k, wina-top-p, "
                                           "cett (threshold: value = target sparsity; cett: target relative error)"),
    grid: str | None = typer.Option(None, help="comma-separated values (default: the paper's 26 top-p values)"),
    power: float = typer.Option(1.0, help="top-p power q >= 1 (rule applied to |a|^q)"),
    include_special: bool = typer.Option(False, help="count BOS/special tokens (excluded by default)"),
    tolerance: float = typer.Option(None, help="relative FFN-output error bound for offline critical sparsity "
                                               "(default: 0.1)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute even if the result is in the store"),
    all_rows: bool = typer.Option(False, "--all", help="print every grid value, not a subset"),
    format: FormatOption = "table",
    executor: ExecutorOption = "local",
    address: AddressOption = None,
    workers: WorkersOption = None,
    quiet: QuietOption = False,
) -> None:
    """Open-loop sparsity curves, simulated error and critical sparsity from the stored activations.

    ``--format table`` prints the model-level curve of each target and rule and its critical sparsity;
    ``csv`` and ``json`` print every row of the result (every layer, and layer -1 for the model level). For a
    mixture-of-experts run the per-expert rows are stored beside them (query ``expert_profile``).
    ``--executor ray`` computes the layers in Ray tasks (the same result; a mixture-of-experts run is swept
    here).
    """
    import polars as pl

    from actsparse.analyze.curves import (
        DEFAULT_TOLERANCE,
        CurveConfig,
        check_tolerance,
        compute_curves,
        critical_sparsity,
    )
    from actsparse.core.progress import lazy_task

    check_format(format)
    opts = ray_options(executor, address, workers)
    targets, rules = names(target), names(rule)
    g = numbers(grid, "--grid")
    CurveConfig(targets=targets, rules=rules).validate()  # an unknown name first, whatever else is wrong
    if g and len(rules) != 1:
        raise ActsparseError("--grid needs exactly one --rule")
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    check_tolerance(tol)  # before the sweep
    from actsparse.pipeline.reader import StoreReader

    st = StoreReader(store)
    chosen = st.run(run)
    with executor_maps(opts) as maps, progress_bars(not quiet and format == "table") as progress:
        step = lazy_task(progress, f"open-loop curves of run {chosen.run_id} (tokens x layers)",
                         chosen.n_tokens * chosen.n_layers)
        df = compute_curves(st, chosen.run_id, targets=targets, rules=rules, grids={rules[0]: g} if g else None,
                            power=power, include_special=include_special, use_cache=not no_cache, progress=step,
                            map_layers=maps.layers if maps is not None else None)
    if format != "table":
        emit(df, format)
        return
    model = df.filter(pl.col("layer") == -1)
    order = [(t, r) for t in dict.fromkeys(targets) for r in dict.fromkeys(rules)]  # as the user listed them
    for t, r in order:
        part = model.filter(target=t, rule=r).sort("value", descending=True)
        if not all_rows and part.height > 12:
            idx = sorted(set(range(0, part.height, max(1, part.height // 10))) | {part.height - 1})
            part = part[idx]
        shown = part.select(
            "value", sparsity=pl.col("sparsity_mean").round(3),
            p10_p90=pl.format("{}–{}", pl.col("sparsity_p10").round(2), pl.col("sparsity_p90").round(2)),
            kept_l1=pl.col("kept_l1_mean").round(3), rel_err=pl.col("rel_err_mean").round(4),
            p90_err=pl.col("rel_err_p90").round(4), cos=pl.col("cos_mean").round(4))
        emit(shown, "table", title=f"{t} / {r}  (model level, open-loop, run {df['run_id'][0]})")
    crit = critical_sparsity(df, tol)
    rank = {key: i for i, key in enumerate(order)}
    for row in sorted(crit.iter_rows(named=True), key=lambda row: rank[(row["target"], row["rule"])]):
        head = f"open-loop critical sparsity {row['target']}/{row['rule']} (rel err <= {tol:g}): "
        if math.isnan(row["critical_sparsity_grid"]):
            say(head + "no grid value keeps the error within the tolerance")
        else:
            say(head + f"grid {row['critical_sparsity_grid']:.3f} at {row['critical_value_grid']:g}, "
                f"interpolated {row['critical_sparsity_interp']:.3f}")
    if chosen.moe is not None:
        say(f"per expert (load, sparsity, error): actsparse query expert_profile {store} --param run={chosen.run_id} "
            f"--param target={order[0][0]} --param value=<a grid value>")


def register(app: typer.Typer) -> None:
    """Add ``curves`` to the ``actsparse`` app."""
    app.command()(curves)
