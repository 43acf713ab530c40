"""The demo (``make demo``, ``actsparse demo``): collect two real models, analyse them open- and closed-loop,
and write the HTML report.

    actsparse demo --store demo-store --out demo-report

Steps, each reusing finished work so that a second run only checks and rebuilds the page:

1. collect SmolLM2-135M and Gemma 3 270M over the ``wiki`` corpus's collect split (``TOKENS`` tokens each,
   the default sites); a complete run is a no-op, an interrupted one resumes;
2. open-loop curves of the report's targets (``actsparse.analyze.report.report_curves``: input, gate, up,
   intermediate; the paper's 26 top-p values, a coarser grid for input), cached in the store;
3. a small closed-loop evaluation per model of ``EVAL_TARGETS`` on the held-out split (``EVAL_TOKENS``
   tokens, ``EVAL_GRID``), stored with the run; stored evaluations are not rerun, interrupted ones resume;
4. the report (``actsparse.analyze.report.build_report``), whose path is printed last.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.progress import ProgressFactory

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

    Looks up the summary of the ``eval_id`` that ``actsparse.analyze.evaluate`` would compute (same identity,
    from the run's weight and corpus hashes) without loading the model or the corpus; anything unreadable
    answers False, and ``evaluate`` then decides (it resumes and skips finished values).
    """
    from actsparse.analyze.evaluate import eval_identity
    from actsparse.analyze.evaluate.storage import read_evaluation

    m = run.manifest
    eval_id = fmt.content_hash(eval_identity(cfg, m.model.weights_sha256, m.corpus.sha256))
    found = read_evaluation(st, run.run_id, eval_id)
    return found is not None and set(cfg.values()) <= set(found.summary["value"].to_list())


@dataclass
class DemoResult:
    """The report's ``index.html`` and the seconds each step took."""

    report: Path
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(store: Path, out: Path, *, models: Sequence[str] = MODELS, corpus: str = CORPUS, tokens: int = TOKENS,
             eval_tokens: int = EVAL_TOKENS, seq_len: int = SEQ_LEN, eval_seq_len: int = EVAL_SEQ_LEN,
             eval_targets: Sequence[str] = EVAL_TARGETS, eval_grid: Sequence[float] = EVAL_GRID,
             closed_loop: bool = True, progress: ProgressFactory | None = None,
             log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo's four steps (module docstring).

    Raises:
        ActsparseError: a model, corpus or store problem (from collection, analysis or evaluation).
    """
    from actsparse.analyze.evaluate import EvalConfig, evaluate
    from actsparse.analyze.report import build_report, check_out_dir, curve_groups, report_curves
    from actsparse.analyze.token_stats import TOKEN_STATS
    from actsparse.pipeline.collect import CollectConfig, collect
    from actsparse.pipeline.reader import StoreReader

    check_out_dir(out)  # before minutes of work, not after
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    log(f"── 1/4 collect {', '.join(models)} on {corpus} ({tokens:,} tokens each)")
    run_ids = []
    for model in models:
        cfg = CollectConfig(model=model, corpus=corpus, max_tokens=tokens, seq_len=seq_len)
        run_ids.append(collect(cfg, store, statistics=TOKEN_STATS, progress=progress, log=log).run_id)
    timings["collect"] = time.perf_counter() - t0

    t = time.perf_counter()
    log("── 2/4 open-loop curves (top-p; input on a coarser grid)")
    st = StoreReader(str(store))
    for rid in run_ids:
        curves = report_curves(st, rid, progress=progress)
        log(f"run {rid}: {curves.height} curve rows (cached in the store)")
    timings["open-loop curves"] = time.perf_counter() - t

    t = time.perf_counter()
    if closed_loop:
        log(f"── 3/4 closed-loop evaluation of {', '.join(eval_targets)} (held-out split, {eval_tokens:,} tokens, "
            f"top-p {', '.join(f'{v:g}' for v in eval_grid)})")
        reused = computed = 0
        for rid in run_ids:
            run = st.run(rid)
            usable = {t for targets, _ in curve_groups(run) for t in targets}
            for target in [t for t in eval_targets if t in usable]:
                cfg = EvalConfig(target=target, grid=tuple(eval_grid), max_tokens=eval_tokens, seq_len=eval_seq_len)
                if _evaluated(st, run, cfg):
                    reused += 1
                    continue
                log(f"run {rid} ({run.manifest.model.name}), target {target}:")
                evaluate(cfg, store, run=rid, log=log)
                computed += 1
        log("evaluations: all reused from the store" if not computed else
            f"evaluations: {computed} run, {reused} reused from the store")
    else:
        log("── 3/4 closed-loop evaluation skipped (--no-eval)")
    timings["closed-loop evaluation"] = time.perf_counter() - t

    t = time.perf_counter()
    log("── 4/4 report")
    path = build_report(st, out, run_ids, log=log)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return DemoResult(path, timings)
