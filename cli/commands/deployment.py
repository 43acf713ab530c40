"""CLI command ``deployment``: batch-union, N:M and per-neuron sparsity of a run's stored activations."""

from __future__ import annotations

import typer

from actsparse.cli.options import QuietOption, RunOption
from actsparse.cli.output import FormatOption, check_format, emit, progress_bars


def deployment(
    store: str = typer.Argument(..., help="store path or URL"),
    run: RunOption = None,
    site: str = typer.Option("intermediate", help="stored FFN site"),
    rule: str = typer.Option("top-p", help="top-p | top-k | max-p | wina-top-k | wina-top-p"),
    value: float = typer.Option(0.9, help="rule value"),
    tokens: int = typer.Option(4096, help="first counted tokens of the run used"),
    batch_sizes: str = typer.Option("1,2,4,8,16,32,64", help="comma-separated batch sizes"),
    patterns: str = typer.Option("2:4,8:16", help="comma-separated N:M patterns"),
    include_special: bool = typer.Option(False, help="count BOS/special tokens (excluded by default)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute even if the result is in the store"),
    format: FormatOption = "table",
    quiet: QuietOption = False,
) -> None:
    """What a batched or structured kernel can skip: batch-union sparsity, N:M against unstructured, per neuron.

    ``--format table`` prints the means over layers; ``csv`` and ``json`` the batch-union rows (the N:M and
    per-neuron tables are in the SQL views ``nm_sparsity`` and ``neurons``).
    """
    import polars as pl

    from actsparse.analyze.deploy import compute_deployment
    from actsparse.core.errors import ActsparseError
    from actsparse.core.parsing import names, numbers
    from actsparse.core.progress import lazy_task
    from actsparse.pipeline.reader import StoreReader

    check_format(format)
    sizes = [int(b) for b in numbers(batch_sizes, "--batch-sizes")]
    try:
        pats = [tuple(int(x) for x in p.split(":")) for p in names(patterns)]
    except ValueError:
        raise ActsparseError(f"--patterns must be N:M pairs like 2:4, got {patterns!r}") from None
    if any(len(p) != 2 for p in pats):
        raise ActsparseError(f"--patterns must be N:M pairs like 2:4, got {patterns!r}")
    st = StoreReader(store)
    chosen = st.run(run)
    with progress_bars(not quiet and format == "table") as progress:
        step = lazy_task(progress, f"deployment sparsity of run {chosen.run_id} (layers)", chosen.n_layers)
        batch, nm, _ = compute_deployment(st, chosen.run_id, site=site, rule=rule, value=value, n_tokens=tokens,
                                          batch_sizes=sizes, patterns=pats, include_special=include_special,
                                          use_cache=not no_cache, progress=step)
    if format != "table":
        emit(batch, format)
        return
    title = f"{site}, {rule} {value:g}, run {chosen.run_id}: mean over layers"
    emit(batch.group_by(["batching", "batch_size"], maintain_order=True).agg(
        token_sparsity=pl.col("token_sparsity").mean().round(4),
        union_sparsity=pl.col("union_sparsity").mean().round(4)),
        "table", title=f"batch-union sparsity ({title})")
    if nm.height:
        emit(nm.group_by("pattern", maintain_order=True).agg(
            sparsity=pl.col("sparsity").first(), rel_err_nm=pl.col("rel_err_nm").mean().round(4),
            rel_err_unstructured=pl.col("rel_err_unstructured").mean().round(4),
            out_err_nm=pl.col("out_err_nm").mean().round(4),
            out_err_unstructured=pl.col("out_err_unstructured").mean().round(4)),
            "table", title=f"N:M against unstructured top-k at equal sparsity ({site}, run {chosen.run_id})")


def register(app: typer.Typer) -> None:
    """Add ``deployment`` to the ``actsparse`` app."""
    app.command()(deployment)
