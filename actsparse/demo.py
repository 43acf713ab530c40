"""``make demo``: collect two real models, analyse them open- and closed-loop, and write the HTML report.

    python -m actsparse.demo --store demo-store --out demo-report

Steps, each reusing finished work so that a second run only checks and rebuilds the page:

1. collect SmolLM2-135M and Gemma 3 270M over the ``wiki`` corpus's collect split (``TOKENS`` tokens each,
   the default sites); a complete run is a no-op, an interrupted one resumes;
2. open-loop curves of the report's targets (``analyze.report.report_curves``: input, gate, up,
   intermediate; the paper's 26 top-p values, a coarser grid for input), cached in the store;
3. a small closed-loop evaluation per model of ``EVAL_TARGETS`` on the held-out split (``EVAL_TOKENS``
   tokens, ``EVAL_GRID``), stored with the run; stored evaluations are not rerun, interrupted ones resume;
4. the report (``analyze.report.build_report``), whose path is printed last: ``report: /abs/index.html``.

Errors are one line (``error: ...``, exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from actsparse.errors import ActsparseError
from actsparse.parsing import names, numbers

MODELS = ("smollm2-135m", "gemma3-270m")
CORPUS = "wiki"
# Sized so that the whole first run stays well under 15 minutes on 2 CPU cores (README "Demo").
TOKENS = 2048
SEQ_LEN = 256
# Closed loop costs a forward pass per grid value (Gemma's 262k-token LM head dominates on CPU), so the
# demo evaluates the paper's two headline targets (input: the practical one, intermediate: the
# sparsest) at a few top-p values around small models' critical point, on 8 windows of 128 tokens
# (the bootstrap resamples whole windows).
EVAL_TARGETS = ("input", "intermediate")
EVAL_GRID = (1.0, 0.98, 0.95, 0.9)
EVAL_TOKENS = 1024
EVAL_SEQ_LEN = 128


def _evaluated(st, run, cfg) -> bool:
    """Whether an evaluation of ``cfg`` is already stored with ``run`` with every grid value done.

    Looks up the summary of the ``eval_id`` that ``analyze.evaluate`` would compute (same identity,
    from the run's weight and corpus hashes) without loading the model or the corpus; anything
    unreadable answers False, and ``evaluate`` then decides (it resumes and skips finished values).
    """
    import polars as pl

    from analyze.evaluate import eval_identity
    from pipeline.store import content_hash

    m = run.manifest
    eval_id = content_hash(eval_identity(cfg, m["model"].get("weights_sha256"), m["corpus"].get("sha256")))
    try:
        summary = pl.read_parquet(Path(st.root) / "runs" / run.run_id / "analysis" / f"evaluate-{eval_id}.parquet",
                                  columns=["value"])
    except (OSError, pl.exceptions.PolarsError):
        return False
    return set(cfg.values()) <= set(summary["value"].to_list())


def run_demo(store: Path, out: Path, *, models: Sequence[str] = MODELS, corpus: str = CORPUS, tokens: int = TOKENS,
             eval_tokens: int = EVAL_TOKENS, seq_len: int = SEQ_LEN, eval_seq_len: int = EVAL_SEQ_LEN,
             eval_targets: Sequence[str] = EVAL_TARGETS, eval_grid: Sequence[float] = EVAL_GRID,
             closed_loop: bool = True, console=None) -> Path:
    """Run the demo's four steps (module docstring) and return the path of the report's ``index.html``.

    Raises:
        ActsparseError: a model, corpus or store problem (from collection, analysis or evaluation).
    """
    from rich.console import Console
    from rich.table import Table

    from actsparse.commands.report import rich_progress
    from analyze.evaluate import EvalConfig, evaluate
    from analyze.report import build_report, curve_groups, report_curves
    from pipeline.collect import CollectConfig, collect
    from pipeline.reader import StoreReader

    console = console or Console()

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    console.rule(f"1/4 collect {', '.join(models)} on {corpus} ({tokens:,} tokens each)")
    run_ids = []
    for model in models:
        cfg = CollectConfig(model=model, corpus=corpus, max_tokens=tokens, seq_len=seq_len)
        run_ids.append(collect(cfg, store, progress=True, log=say).run_id)
    timings["collect"] = time.perf_counter() - t0

    t = time.perf_counter()
    console.rule("2/4 open-loop curves (top-p; input on a coarser grid)")
    st = StoreReader(str(store))
    with rich_progress(console) as progress:
        for rid in run_ids:
            curves = report_curves(st, rid, progress=progress)
            say(f"run {rid}: {curves.height} curve rows (cached in the store)")
    timings["open-loop curves"] = time.perf_counter() - t

    t = time.perf_counter()
    if closed_loop:
        console.rule(f"3/4 closed-loop evaluation of {', '.join(eval_targets)} (held-out split, {eval_tokens:,} "
                     f"tokens, top-p {', '.join(f'{v:g}' for v in eval_grid)})")
        reused = computed = 0
        for rid in run_ids:
            run = st.run(rid)
            usable = {t for targets, _ in curve_groups(run) for t in targets}
            for target in [t for t in eval_targets if t in usable]:
                cfg = EvalConfig(target=target, grid=tuple(eval_grid), max_tokens=eval_tokens, seq_len=eval_seq_len)
                if _evaluated(st, run, cfg):
                    reused += 1
                    continue
                say(f"run {rid} ({run.manifest['model'].get('name')}), target {target}:")
                evaluate(cfg, store, run=rid, log=say)
                computed += 1
        say("evaluations: all reused from the store" if not computed else
            f"evaluations: {computed} run, {reused} reused from the store")
    else:
        console.rule("3/4 closed-loop evaluation skipped (--no-eval)")
    timings["closed-loop evaluation"] = time.perf_counter() - t

    t = time.perf_counter()
    console.rule("4/4 report")
    path = build_report(st, out, run_ids, log=say)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    table = Table(title="demo timings")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step, seconds in timings.items():
        table.add_row(step, f"{seconds:.1f}")
    console.print(table)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m actsparse.demo``); returns the exit status."""
    from rich.console import Console
    from rich.markup import escape

    p = argparse.ArgumentParser(prog="python -m actsparse.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="store directory (created if missing; work is reused)")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models [%(default)s]")
    p.add_argument("--corpus", default=CORPUS, help="corpus [%(default)s]")
    p.add_argument("--tokens", type=int, default=TOKENS, help="tokens collected per model [%(default)s]")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="held-out tokens per evaluation [%(default)s]")
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, help="window length of the collection [%(default)s]")
    p.add_argument("--eval-seq-len", type=int, default=EVAL_SEQ_LEN,
                   help="window length of the evaluation [%(default)s]")
    p.add_argument("--eval-targets", default=",".join(EVAL_TARGETS),
                   help="comma-separated targets evaluated closed-loop [%(default)s]")
    p.add_argument("--eval-grid", default=",".join(f"{v:g}" for v in EVAL_GRID),
                   help="comma-separated top-p values of the closed-loop evaluation [%(default)s]")
    p.add_argument("--no-eval", action="store_true", help="skip the closed-loop evaluation")
    args = p.parse_args(argv)
    console, err = Console(), Console(stderr=True, soft_wrap=True)
    try:
        path = run_demo(args.store, args.out, models=list(names(args.models)),
                        corpus=args.corpus, tokens=args.tokens, eval_tokens=args.eval_tokens, seq_len=args.seq_len,
                        eval_seq_len=args.eval_seq_len, eval_targets=names(args.eval_targets),
                        eval_grid=numbers(args.eval_grid, "--eval-grid"), closed_loop=not args.no_eval, console=console)
    except ActsparseError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return 2
    except OSError as e:
        err.print(f"[red]error:[/red] {escape(e.strerror or str(e))}: {escape(str(e.filename or ''))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]; run the same command again to resume")
        return 130
    console.print(f"report: {path}", markup=False, highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
