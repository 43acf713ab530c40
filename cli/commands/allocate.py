"""CLI command ``allocate``: per-layer rule values reaching a model-level sparsity with the least open-loop error."""

from __future__ import annotations

from pathlib import Path

import typer

from actsparse.cli.options import QuietOption, RunOption
from actsparse.cli.output import FormatOption, check_format, emit, progress_bars, say
from actsparse.core.errors import ActsparseError


def allocate(
    store: str = typer.Argument(..., help="store path or URL"),
    run: RunOption = None,
    target: str = typer.Option("intermediate", help="input | gate | up | intermediate"),
    rule: str = typer.Option("top-p", help="the rule whose per-layer values are allocated (its curves grid)"),
    sparsity: str = typer.Option(..., help="comma-separated model-level sparsities to reach, e.g. 0,0.4,0.5,0.6 "
                                           "(0 gives closed-loop critical sparsity its dense point)"),
    metric: str = typer.Option("rel_err_mean", help="per-layer error summed: rel_err_mean (||dy|| / ||y||) or "
                                                    "err_vs_input_mean (||dy|| / ||x||)"),
    grid: str | None = typer.Option(None, help="comma-separated rule values of the curves (default: the rule's)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="allocation file to write (JSON; for "
                                                              "`actsparse evaluate --allocation`)"),
    format: FormatOption = "table",
    quiet: QuietOption = False,
) -> None:
    """Per-layer values of a rule that reach model-level sparsity S with the least summed open-loop error.

    A greedy over each layer's (sparsity, error) curve of ``actsparse curves`` (computed here when not cached),
    never worse than the best uniform value reaching S. ``--format table`` prints one row per requested S;
    ``csv`` and ``json`` one row per S and layer.
    """
    import polars as pl

    from actsparse.analyze.allocate import allocate as solve_all
    from actsparse.analyze.allocate import write_allocation
    from actsparse.analyze.curves import compute_curves
    from actsparse.core.parsing import numbers
    from actsparse.core.progress import lazy_task
    from actsparse.pipeline.reader import StoreReader

    check_format(format)
    wanted = list(numbers(sparsity, "--sparsity"))
    if not wanted:
        raise ActsparseError("--sparsity is empty")
    if metric not in ("rel_err_mean", "err_vs_input_mean"):
        raise ActsparseError(f"--metric must be rel_err_mean or err_vs_input_mean, got {metric!r}")
    g = numbers(grid, "--grid")
    st = StoreReader(store)
    chosen = st.run(run)
    with progress_bars(not quiet and format == "table") as progress:
        step = lazy_task(progress, f"open-loop curves of run {chosen.run_id} (tokens x layers)",
                         chosen.n_tokens * chosen.n_layers)
        curves = compute_curves(st, chosen.run_id, targets=(target,), rules=(rule,),
                                grids={rule: g} if g else None, progress=step)
    layers, allocs = solve_all(curves, target, rule, wanted, metric)
    if out is not None:
        write_allocation(out, run_id=chosen.run_id, model=chosen.manifest.model_spec,
                         analysis_id=curves["analysis_id"][0], target=target, rule=rule, metric=metric,
                         layers=layers, allocations=allocs)
    if format != "table":
        emit(pl.DataFrame([dict(sparsity=a.sparsity, layer=layer, value=v, layer_sparsity=s, layer_error=e,
                                method=a.method)
                           for a in allocs for layer, v, s, e in zip(layers, a.values, a.layer_sparsity,
                                                                      a.layer_error)]), format)
    else:
        emit(pl.DataFrame([dict(requested=a.sparsity, reached=round(a.model_sparsity, 4),
                                summed_err=round(a.summed_error, 4), method=a.method,
                                values=f"{min(a.values):g}..{max(a.values):g}",
                                uniform_value=a.uniform_value,
                                uniform_reached=None if a.uniform_sparsity is None else round(a.uniform_sparsity, 4),
                                uniform_summed_err=None if a.uniform_error is None else round(a.uniform_error, 4))
                           for a in allocs]), "table",
             title=f"per-layer allocation of {target}/{rule}, run {chosen.run_id} (open-loop error summed over "
                   f"{len(layers)} layers)")
    if out is not None and format == "table":
        say(f"wrote {out}; apply it with: actsparse evaluate --store {store} --run {chosen.run_id} "
            f"--allocation {out}")


def register(app: typer.Typer) -> None:
    """Add ``allocate`` to the ``actsparse`` app."""
    app.command()(allocate)
