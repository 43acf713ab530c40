"""CLI commands for closed-loop evaluation: ``evaluate`` (sparsified re-runs) and ``proxy`` (open vs closed loop).

See :mod:`actsparse.analyze.evaluate` for the protocol, the metrics and where results are stored, and
:mod:`actsparse.analyze.tasks` for ``evaluate --tasks`` (lm-eval task accuracy).
"""

from __future__ import annotations

from pathlib import Path

import typer

from actsparse.cli.options import (
    BlockLengthOption,
    CfgScaleOption,
    DiffusionOption,
    GenerateOption,
    GenLengthOption,
    MaskTokenOption,
    QuietOption,
    RemaskingOption,
    RunOption,
    SamplingOption,
    SeedOption,
    StepsOption,
    TemperatureOption,
    ThreadsOption,
    TopPOption,
    decoding_spec,
    set_threads,
)
from actsparse.cli.output import emit, err, say
from actsparse.core.errors import ActsparseError
from actsparse.core.parsing import names, numbers

SUMMARY_COLUMNS = ["value", "sparsity", "nll", "ppl", "top1_acc", "kl", "acc_ratio", "acc_ratio_lo", "acc_ratio_hi",
                   "dnll", "dnll_lo", "dnll_hi"]
CRITICAL_COLUMNS = ["target", "criterion", "critical_sparsity_grid", "critical_value_grid", "critical_sparsity_interp",
                    "critical_lo", "critical_hi"]
TASK_COLUMNS = ["task", "value", "n_examples", "acc", "dense_acc", "acc_ratio", "acc_ratio_lo", "acc_ratio_hi",
                "sparsity", "sparsity_prefill", "sparsity_generation"]
TASK_CRITICAL_COLUMNS = ["target", "task", "metric", "critical_sparsity_grid", "critical_value_grid",
                         "critical_sparsity_interp", "critical_lo", "critical_hi", "dense_acc", "n_examples"]
GENERATION_COLUMNS = ["target", "value", "sparsity_prefill", "sparsity_generation", "sparsity_total",
                      "sparsity_total_lo", "sparsity_total_hi", "token_agreement", "token_agreement_lo",
                      "token_agreement_hi", "exact_match", "exact_match_lo", "exact_match_hi"]
DIFFUSION_COLUMNS = ["target", "value", "step", "block", "sparsity", "sparsity_lo", "sparsity_hi", "token_agreement",
                     "token_agreement_lo", "token_agreement_hi", "exact_match", "exact_match_lo", "exact_match_hi"]
PROXY_COLUMNS = ["target", "rule", "eval_id", "n_values", "closed_critical", "closed_lo", "closed_hi",
                 "closed_critical_nll", "open_critical", "tolerance", "spearman_err_dnll", "spearman_err_kl",
                 "sparsity_gap"]


def _print(df, columns: list[str], title: str) -> None:
    emit(df.select([c for c in columns if c in df.columns]), "table", title=title)


def evaluate(
    model: str | None = typer.Option(None, "--model", "-m", help="alias, HF id or checkpoint dir (default: the run's)"),
    corpus: str | None = typer.Option(None, "--corpus", "-c",
                                      help="corpus whose held-out split is used (default: the run's)"),
    target: str = typer.Option("intermediate", help="comma-separated: input, gate, up, intermediate, all-inputs"),
    rule: str = typer.Option("top-p", help="top-p | top-k | max-p | wina-top-k | wina-top-p | threshold | cett "
                                           "(threshold and cett calibrate a tau per layer on --run; --diffusion: "
                                           "top-p, top-k, max-p, top-p-flat)"),
    grid: str | None = typer.Option(None, help="comma-separated rule values "
                                               "(default: 1.0,0.99,0.98,0.97,0.95,0.92,0.9,0.85,0.8,0.7,0.6,0.5)"),
    store: Path | None = typer.Option(None, "--store", "-s",
                                      help="store to write results into (resumable); none: print only"),
    run: str | None = typer.Option(None, "--run", "-r",
                                   help="attach results to this run (same model and corpus) and print the proxy check"),
    max_tokens: int | None = typer.Option(None, help="held-out tokens to use, BOS included (default 4096; "
                                                     "--generate/--diffusion: 512 prompt tokens)"),
    seq_len: int | None = typer.Option(None, help="window length in tokens, BOS included (default 256; "
                                                  "--generate/--diffusion: prompts of 64)"),
    batch_size: int = typer.Option(8, help="windows per forward pass"),
    power: float = typer.Option(1.0, help="top-p power q >= 1 (rule applied to |a|^q)"),
    compute_dtype: str = typer.Option("float32", help="model dtype: float32 | bfloat16 | float16"),
    text_field: str | None = typer.Option(None, help="jsonl field / parquet column with the text"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the checkpoint"),
    boot: int = typer.Option(200, help="bootstrap resamples of windows for the intervals"),
    tolerance: float | None = typer.Option(None,
                                           help="offline error bound for the proxy check (default: 0.1, as curves)"),
    allocation: Path | None = typer.Option(None, help="per-layer allocation file (actsparse allocate): its "
                                                      "target, rule and per-layer values; one grid value per "
                                                      "allocation (its model-level sparsity)"),
    include_special: bool = typer.Option(False, help="count BOS/special tokens' sparsity, as the paper's harness "
                                                     "does (excluded by default)"),
    # lm-eval tasks instead of next-token metrics on the held-out split (actsparse.analyze.tasks)
    tasks: str | None = typer.Option(None, "--tasks", help="lm-eval task or tag names, task YAML files or directories "
                                                          "(comma-separated): task accuracy instead of next-token "
                                                          "metrics; shipped: actsparse_wiki"),
    include_path: list[Path] | None = typer.Option(None, "--include-path", metavar="DIR",
                                                   help="--tasks: a directory of task YAMLs (repeatable)"),
    limit: float | None = typer.Option(None, help="--tasks: examples per task (or a fraction < 1)"),
    num_fewshot: int | None = typer.Option(None, help="--tasks: few-shot examples per prompt (default: the task's)"),
    count_mode: str = typer.Option("real", help="--tasks: positions counted for sparsity: real (not padding, not "
                                                "special) | authors (the authors' harness)"),
    metric: str | None = typer.Option(None, help="--tasks: accuracy metric (default: acc, else the task's first)"),
    generate: GenerateOption = None,
    sampling: SamplingOption = None,
    top_p: TopPOption = None,
    temperature: TemperatureOption = None,
    seed: SeedOption = None,
    diffusion: DiffusionOption = False,
    steps: StepsOption = None,
    gen_length: GenLengthOption = None,
    block_length: BlockLengthOption = None,
    cfg_scale: CfgScaleOption = None,
    remasking: RemaskingOption = None,
    mask_token_id: MaskTokenOption = None,
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
) -> None:
    """Re-run a model with a sparsification rule in every FFN layer; closed-loop metrics and critical sparsity.

    With --generate N or --diffusion the rule acts at every forward pass of generation or of every denoising
    step: sparsity per phase or per step, and agreement with the dense model's output (README "Generation and
    diffusion").
    """
    import polars as pl

    from actsparse.analyze.evaluate import DEFAULT_GRID, EvalConfig, proxy_check
    from actsparse.analyze.evaluate import evaluate as run_evaluate
    from actsparse.analyze.evaluate.config import MIN_WINDOWS

    set_threads(threads)
    if boot < 1:
        raise ActsparseError(f"--boot must be positive (got {boot})")
    targets = names(target)
    decoding = decoding_spec(generate, diffusion, sampling=sampling, top_p=top_p, temperature=temperature, seed=seed,
                             steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale,
                             remasking=remasking, mask_token_id=mask_token_id)
    if decoding is not None:
        if not targets:
            raise ActsparseError("--target is empty")
        _evaluate_decoded(decoding, targets, dict(
            model=model, corpus=corpus, rule=rule, power=power, batch_size=batch_size, compute_dtype=compute_dtype,
            text_field=text_field, trust_remote_code=trust_remote_code, **({} if grid is None else dict(
                grid=numbers(grid, "--grid"))), **({} if max_tokens is None else dict(max_tokens=max_tokens)),
            **({} if seq_len is None else dict(seq_len=seq_len))), store, run, boot, quiet)
        return
    max_tokens = 4096 if max_tokens is None else max_tokens
    seq_len = 256 if seq_len is None else seq_len
    values = numbers(grid, "--grid") or DEFAULT_GRID
    alloc = None
    if allocation is not None:
        from actsparse.analyze.allocate import read_allocation

        alloc = read_allocation(allocation)
        if grid:
            raise ActsparseError("--allocation sets the grid (one value per allocation); drop --grid")
        targets, rule = [alloc["target"]], alloc["rule"]
    if tasks is not None:
        if corpus is not None or text_field is not None:
            raise ActsparseError("--tasks brings its own data: leave out --corpus and --text-field")
        if allocation is not None:
            raise ActsparseError("--allocation applies to next-token evaluation, not to --tasks")
        _evaluate_tasks(tasks, include_path or [], model, store, run, targets, rule, values, power, count_mode, limit,
                        num_fewshot, batch_size, metric, compute_dtype, trust_remote_code, boot, quiet)
        return
    configs = [EvalConfig(model=model, corpus=corpus, target=t, rule=rule, grid=values, power=power,
                          max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, compute_dtype=compute_dtype,
                          text_field=text_field, trust_remote_code=trust_remote_code, include_special=include_special,
                          allocation=alloc) for t in targets]
    if not configs:
        raise ActsparseError("--target is empty")
    for cfg in configs:  # every bad target, rule or value fails before the first model load
        cfg.validate()
    results = []
    for cfg in configs:
        res = run_evaluate(cfg, store, run, n_boot=boot,
                           log=(lambda m: None) if quiet else say)
        _print(res.summary, SUMMARY_COLUMNS, f"closed loop: {cfg.target}, {cfg.rule} (eval {res.eval_id}, "
                                             f"{res.summary['n_tokens'][0]} tokens)")
        if res.summary["n_windows"][0] < MIN_WINDOWS:
            say(f"note: {res.summary['n_windows'][0]} held-out window(s), fewer than the {MIN_WINDOWS} a bootstrap "
                "interval needs: no intervals (NaN); raise --max-tokens or lower --seq-len")
        results.append(res)
    _print(pl.concat([r.critical for r in results], how="diagonal_relaxed"), CRITICAL_COLUMNS,
           "closed-loop critical sparsity (ratio >= 0.99; 95% bootstrap interval over windows)")
    if run is not None and alloc is None:  # the open-loop curves have no rows of an allocation to compare with
        try:
            rows = [proxy_check(store, run, eval_id=r.eval_id, tolerance=tolerance) for r in results]
        except ActsparseError as e:
            err.print(f"proxy check skipped: {e}", highlight=False, markup=False)
            return
        _print(pl.concat(rows, how="diagonal_relaxed"), PROXY_COLUMNS, "open-loop (offline) vs closed-loop")


def _evaluate_tasks(tasks: str, include_paths: list[Path], model, store, run, targets, rule: str, values, power: float,
                    count_mode: str, limit: float | None, num_fewshot: int | None, batch_size: int, metric: str | None,
                    compute_dtype: str, trust_remote_code: bool, boot: int, quiet: bool) -> None:
    """``evaluate --tasks``: lm-eval tasks dense and per grid value, per target; task critical sparsity."""
    import polars as pl

    from actsparse.analyze.tasks import TaskEvalConfig, evaluate_tasks

    configs = [TaskEvalConfig(model=model, target=t, rule=rule, grid=values, power=power, count_mode=count_mode,
                              limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, metric=metric,
                              compute_dtype=compute_dtype, trust_remote_code=trust_remote_code) for t in targets]
    if not configs:
        raise ActsparseError("--target is empty")
    for cfg in configs:  # every bad setting fails before lm-eval or the model is loaded
        cfg.validate()
    results = []
    for cfg in configs:
        results.append(evaluate_tasks(cfg, tasks, store, run, include_paths=include_paths, n_boot=boot,
                                      log=(lambda m: None) if quiet else say))
        _print(results[-1].summary, TASK_COLUMNS, f"lm-eval tasks: {cfg.target}, {cfg.rule} (eval "
                                                  f"{results[-1].eval_id}, count mode {cfg.count_mode})")
    _print(pl.concat([r.critical for r in results], how="diagonal_relaxed"), TASK_CRITICAL_COLUMNS,
           "task critical sparsity (accuracy ratio >= 0.99; 95% bootstrap interval over examples)")


def _evaluate_decoded(decoding, targets: tuple[str, ...], settings: dict, store, run, boot: int, quiet: bool) -> None:
    """``evaluate --generate`` / ``--diffusion``: one closed loop per target, printed as one table."""
    import polars as pl

    from actsparse.analyze.evaluate.decoded import DecodedEvalConfig, evaluate_decoded

    configs = [DecodedEvalConfig(decoding, target=t, **settings) for t in targets]
    for cfg in configs:  # every bad target, rule or value fails before the first model load
        cfg.validate()
    results = [evaluate_decoded(cfg, store, run, n_boot=boot, log=(lambda m: None) if quiet else say)
               for cfg in configs]
    generation = decoding.kind == "generation"
    title = ("closed loop on generation: sparsity per phase, agreement with the dense continuation" if generation
             else "closed loop on diffusion: sparsity per denoising step (step -1: all), agreement with the dense "
                  "answer")
    _print(pl.concat([r.table for r in results], how="diagonal_relaxed"),
           GENERATION_COLUMNS if generation else DIFFUSION_COLUMNS, f"{title} (95% bootstrap interval over prompts)")


def proxy(
    store: str = typer.Argument(..., help="store path or URL"),
    run: RunOption = None,
    target: str | None = typer.Option(None, help="only evaluations of this target"),
    rule: str | None = typer.Option(None, help="only evaluations of this rule"),
    tolerance: float | None = typer.Option(None, help="offline error bound (default: 0.1, as curves)"),
) -> None:
    """Compare offline (open-loop) critical sparsity with the stored closed-loop evaluations of a run."""
    from actsparse.analyze.evaluate import proxy_check

    _print(proxy_check(store, run, target, rule, tolerance=tolerance), PROXY_COLUMNS,
           "open-loop (offline) vs closed-loop")


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` and ``proxy`` to the ``actsparse`` app."""
    app.command("evaluate")(evaluate)
    app.command("proxy")(proxy)
