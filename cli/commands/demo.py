"""CLI command ``demo`` (what ``make demo`` runs): the main job on the two packaged real models."""

from __future__ import annotations

from pathlib import Path

import typer

from actsparse.cli.output import emit, progress_bars, say
from actsparse.core.parsing import names, numbers
from actsparse.demo import CORPUS, EVAL_GRID, EVAL_SEQ_LEN, EVAL_TARGETS, EVAL_TOKENS, MODELS, SEQ_LEN, TOKENS, run_demo


def demo(
    store: Path = typer.Option(..., "--store", help="store directory (created if missing; finished work is reused)"),
    out: Path = typer.Option(..., "--out", help="report directory"),
    models: str = typer.Option(",".join(MODELS), help="comma-separated models"),
    corpus: str = typer.Option(CORPUS, help="corpus"),
    tokens: int = typer.Option(TOKENS, help="tokens collected per model"),
    eval_tokens: int = typer.Option(EVAL_TOKENS, help="held-out tokens per evaluation"),
    seq_len: int = typer.Option(SEQ_LEN, help="window length of the collection"),
    eval_seq_len: int = typer.Option(EVAL_SEQ_LEN, help="window length of the evaluation"),
    eval_targets: str = typer.Option(",".join(EVAL_TARGETS), help="comma-separated targets evaluated closed-loop"),
    eval_grid: str = typer.Option(",".join(f"{v:g}" for v in EVAL_GRID),
                                  help="comma-separated top-p values of the closed-loop evaluation"),
    no_eval: bool = typer.Option(False, "--no-eval", help="skip the closed-loop evaluation"),
) -> None:
    """Collect SmolLM2-135M and Gemma 3 270M on Wikipedia, analyse them open- and closed-loop, write the report."""
    grid = numbers(eval_grid, "--eval-grid")  # bad values fail before anything is created
    with progress_bars() as progress:
        res = run_demo(store, out, models=names(models), corpus=corpus, tokens=tokens, eval_tokens=eval_tokens,
                       seq_len=seq_len, eval_seq_len=eval_seq_len, eval_targets=names(eval_targets), eval_grid=grid,
                       closed_loop=not no_eval, progress=progress, log=say)
    emit([dict(step=k, seconds=round(v, 1)) for k, v in res.timings.items()], "table", title="demo timings")
    say(f"report: {res.report}")


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``actsparse`` app."""
    app.command()(demo)
