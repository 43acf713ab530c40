"""CLI command ``rank``: the entropy effective rank of a run's stored activations per site and layer."""

from __future__ import annotations

import typer

from actsparse.cli.options import QuietOption, RunOption
from actsparse.cli.output import FormatOption, check_format, emit, progress_bars


def rank(
    store: str = typer.Argument(..., help="store path or URL"),
    run: RunOption = None,
    site: str | None = typer.Option(None, help="comma-separated sites (default: every stored site)"),
    tokens: str = typer.Option("256,1024,4096", help="comma-separated token counts (first counted tokens of the run; "
                                                     "runs compare only at equal counts)"),
    include_special: bool = typer.Option(False, help="count BOS/special tokens (excluded by default)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute even if the result is in the store"),
    format: FormatOption = "table",
    quiet: QuietOption = False,
) -> None:
    """Entropy effective rank (raw and / width) of each site and layer, at fixed token counts.

    ``--format table`` prints, per site and token count, the mean over layers and the range; ``csv`` and
    ``json`` print every row (the SQL view ``effective_rank``).
    """
    import polars as pl

    from actsparse.analyze.rank import compute_rank
    from actsparse.core.parsing import names, numbers
    from actsparse.core.progress import lazy_task
    from actsparse.pipeline.reader import StoreReader

    check_format(format)
    counts = [int(n) for n in numbers(tokens, "--tokens")]
    st = StoreReader(store)
    chosen = st.run(run)
    sites = names(site) or chosen.sites
    with progress_bars(not quiet and format == "table") as progress:
        step = lazy_task(progress, f"effective rank of run {chosen.run_id} (sites x layers)",
                         len(sites) * chosen.n_layers)
        df = compute_rank(st, chosen.run_id, sites=sites, token_counts=counts, include_special=include_special,
                          use_cache=not no_cache, progress=step)
    if format != "table":
        emit(df, format)
        return
    summary = df.group_by(["site", "n_tokens"], maintain_order=True).agg(
        width=pl.col("width").first(), max_rank=pl.col("max_rank").first(),
        erank_mean=pl.col("erank").mean().round(1), erank_min=pl.col("erank").min().round(1),
        erank_max=pl.col("erank").max().round(1), erank_norm_mean=pl.col("erank_norm").mean().round(4))
    emit(summary, "table", title=f"effective rank (pre-sparsification, not centred), run {chosen.run_id}: "
                                 "mean and range over layers")


def register(app: typer.Typer) -> None:
    """Add ``rank`` to the ``actsparse`` app."""
    app.command()(rank)
