"""CLI command ``steps``: sparsity per step and mask stability of a stored generation or diffusion run."""

from __future__ import annotations

import typer

from actsparse.cli.options import QuietOption, RunOption
from actsparse.cli.output import FormatOption, check_format, emit, progress_bars


def steps(
    store: str = typer.Argument(..., help="store path or URL"),
    run: RunOption = None,
    target: str = typer.Option("intermediate", help="input | gate | up | intermediate | all-inputs"),
    rule: str = typer.Option("top-p-flat", help="top-p-flat (the authors' diffusion top-p) | top-p | top-k | max-p "
                                                "| threshold (an absolute |a|)"),
    value: float = typer.Option(0.9, help="rule value (top-p-flat: the kept mass fraction, the authors' percent "
                                          "/ 100)"),
    power: float = typer.Option(1.0, help="top-p power q >= 1"),
    deltas: str = typer.Option("4,8,16,32", help="step intervals of the interval Jaccard"),
    empty_jaccard: float = typer.Option(0.0, help="token-aware Jaccard of a token whose kept sets are both empty "
                                                  "(0: the authors' in-loop hook; 1: their offline script)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute even if the result is in the store"),
    format: FormatOption = "table",
    quiet: QuietOption = False,
) -> None:
    """Sparsity per generation or denoising step and, for diffusion runs, the Jaccard of the kept masks across steps
    (consecutive, drift from the first step, intervals; global and token-aware), from the stored activations.

    ``--format table`` prints the model level; ``csv`` and ``json`` print every row of both results (every layer
    and hook site, layer -1 for the model level), sparsity rows first, each row with its ``table``.
    """
    import polars as pl

    from actsparse.analyze.steps import StepConfig, analyze_steps
    from actsparse.core.parsing import numbers
    from actsparse.core.progress import lazy_task
    from actsparse.pipeline.reader import StoreReader

    check_format(format)
    cfg = StepConfig(target=target, rule=rule, value=value, power=power,
                     deltas=tuple(int(d) for d in numbers(deltas, "--deltas")), empty=empty_jaccard)
    cfg.validate()
    st = StoreReader(store)
    chosen = st.run(run)
    with progress_bars(not quiet and format == "table") as progress:
        task = lazy_task(progress, f"per-step analysis of run {chosen.run_id} (layers)", chosen.n_layers)
        res = analyze_steps(st, chosen.run_id, cfg, use_cache=not no_cache, progress=task)
    if format != "table":
        emit(pl.concat([res.sparsity.with_columns(table=pl.lit("step_sparsity")),
                        res.stability.with_columns(table=pl.lit("step_stability"))], how="diagonal_relaxed"), format)
        return
    model = res.sparsity.filter(pl.col("layer") == -1).sort("step", "block")
    emit(model.select("step", "block", "n_tokens", sparsity=pl.col("sparsity").round(4), n_noised="n_noised",
                      sparsity_noised=pl.col("sparsity_noised").round(4)), "table",
         title=f"sparsity per step, {cfg.target} / {cfg.rule} {cfg.value:g} (model level, open-loop, run "
               f"{chosen.run_id}, analysis {res.analysis_id})")
    stab = res.stability.filter(pl.col("layer") == -1)
    if stab.height:
        pooled = (stab.with_columns(delta=pl.when(pl.col("kind") == "drift").then(0).otherwise(pl.col("delta")))
                  .group_by("kind", "delta", maintain_order=True)
                  .agg(n_pairs=pl.len(), global_jaccard=pl.col("n_intersection").sum() / pl.col("n_union").sum(),
                       token_jaccard=pl.col("token_jaccard_sum").sum() / pl.col("n_tokens").sum())
                  .sort("kind", "delta"))
        emit(pooled, "table", title="mask stability across steps (model level, pooled over steps; drift: delta 0)")


def register(app: typer.Typer) -> None:
    """Add ``steps`` to the ``actsparse`` app."""
    app.command()(steps)
