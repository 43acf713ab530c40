"""CLI command ``collect``: run models over a corpus and stream FFN activations into a store (one run, or a
jobs file of many)."""

from __future__ import annotations

from pathlib import Path

import typer

from actsparse.cli.options import (
    DECODING_OPTIONS,
    AddressOption,
    BlockLengthOption,
    CfgScaleOption,
    DeviceOption,
    DiffusionOption,
    ExecutorOption,
    GenerateOption,
    GenLengthOption,
    GpusPerWorkerOption,
    MaskTokenOption,
    QuietOption,
    RemaskingOption,
    SamplingOption,
    SeedOption,
    StepsOption,
    TemperatureOption,
    ThreadsOption,
    TopPOption,
    WorkersOption,
    decoding_spec,
    ray_options,
    set_threads,
)
from actsparse.cli.output import emit, live_table, progress_bars, say
from actsparse.core.errors import ActsparseError

_JOB_OPTIONS = ("model", "corpus", "sites", "max_tokens", "seq_len", "batch_size", "dtype", "compute_dtype",
                "chunk_tokens", "split", "text_field", "no_bos", "trust_remote_code", *DECODING_OPTIONS)


def collect(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m", help="alias (see `models list`), HF id or checkpoint dir"),
    corpus: str | None = typer.Option(None, "--corpus", "-c", help="wiki | shakespeare | path to .txt/.jsonl/.parquet"),
    store: Path | None = typer.Option(None, "--store", "-s", help="store directory (created if missing)"),
    sites: str | None = typer.Option(None, help="comma-separated FFN sites (default: input,gate,intermediate)"),
    max_tokens: int | None = typer.Option(None, help="stop after this many tokens (default: whole split)"),
    seq_len: int = typer.Option(256, help="window length in tokens, BOS included"),
    batch_size: int = typer.Option(8, help="windows per forward pass"),
    dtype: str = typer.Option("bfloat16", help="stored dtype: bfloat16 | float16 | float32"),
    compute_dtype: str = typer.Option("auto", help="forward-pass dtype: auto (float32 on the CPU, the model's half "
                                                   "dtype, bf16 by default, on CUDA) | bfloat16 | float16 | float32"),
    chunk_tokens: int = typer.Option(1024, help="tokens per chunk/shard"),
    split: str = typer.Option("collect", help="corpus split: collect | heldout"),
    text_field: str | None = typer.Option(None, help="jsonl field / parquet column with the text"),
    no_bos: bool = typer.Option(False, "--no-bos", help="do not start windows with BOS"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the checkpoint"),
    config: Path | None = typer.Option(None, "--config", help="TOML file with a list of jobs (see README)"),
    executor: ExecutorOption = "local",
    address: AddressOption = None,
    workers: WorkersOption = None,
    gpus_per_worker: GpusPerWorkerOption = None,
    device: DeviceOption = "auto",
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
    """Run models over a corpus and stream FFN activations into a store (resumable).

    With --generate N every window is a prompt followed by N generated tokens (KV cache), with --diffusion the
    input of every denoising step of a diffusion LM; every forward pass is stored (README "Generation and
    diffusion").
    """
    from actsparse.analyze.token_stats import TOKEN_STATS

    opts = ray_options(executor, address, workers, gpus_per_worker, device)
    if opts is not None and threads is not None:
        raise ActsparseError("--threads applies to --executor local; a Ray worker uses the CPUs it reserves")
    set_threads(threads)
    if config is not None:
        from actsparse.pipeline.jobs import jobs_store, load_jobs, run_jobs

        given = [p for p in _JOB_OPTIONS if getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"]
        if given:  # never silently ignored: a job's settings come from the file only
            raise ActsparseError(f"--config takes every job setting from the file; also given: "
                                 f"{', '.join('--' + p.replace('_', '-') for p in given)} (put them in its [defaults])")
        if opts is not None:
            file_store, configs = load_jobs(config)
            _on_ray(configs, jobs_store(config, file_store, store), opts, quiet, TOKEN_STATS)
            return
        with progress_bars(not quiet) as progress:
            failed = run_jobs(config, store=store, statistics=TOKEN_STATS, progress=progress, log=say, device=device)
        if failed:
            raise typer.Exit(1)
        return
    if not (model and corpus and store):
        raise ActsparseError("collect needs --model, --corpus and --store (or --config jobs.toml)")
    from actsparse.core.parsing import names
    from actsparse.pipeline.collect import DEFAULT_SITES, CollectConfig
    from actsparse.pipeline.collect import collect as run_collect

    decoding = decoding_spec(generate, diffusion, sampling=sampling, top_p=top_p, temperature=temperature, seed=seed,
                             steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale,
                             remasking=remasking, mask_token_id=mask_token_id)
    cfg = CollectConfig(model=model, corpus=corpus, sites=names(sites) or DEFAULT_SITES, max_tokens=max_tokens,
                        seq_len=seq_len, batch_size=batch_size, dtype=dtype, compute_dtype=compute_dtype,
                        chunk_tokens=chunk_tokens, split=split, text_field=text_field, add_bos=not no_bos,
                        trust_remote_code=trust_remote_code, decoding=decoding)
    if opts is not None:
        if decoding is not None:
            raise ActsparseError("generation and diffusion runs are collected by --executor local")
        _on_ray([cfg], store, opts, quiet, TOKEN_STATS)
        return
    if decoding is not None and device == "auto":
        device = "cpu"  # the decoding loops run on the CPU (pipeline.collect.plan)
    with progress_bars(not quiet) as progress:
        res = run_collect(cfg, store, statistics=TOKEN_STATS, progress=progress, log=say, device=device)
    say(f"run_id={res.run_id} tokens={res.n_tokens} status={res.status}")


def _on_ray(configs: list, store, opts, quiet: bool, statistics) -> None:
    """Collect ``configs`` on Ray: the live job matrix, then the summary table and the failures; exit 1 when
    a job failed."""
    from actsparse.executors.jobs import summary_rows
    from actsparse.executors.ray_collect import run_batch

    with live_table(not quiet) as view:
        reports = run_batch(configs, store, opts, statistics=statistics, view=view, log=say if not quiet else _silent)
    emit(summary_rows(reports), "table", title="collect --executor ray")
    count = {s: sum(r.status == s for r in reports) for s in ("done", "skipped", "failed")}
    say(f"{count['done']} done, {count['skipped']} skipped, {count['failed']} failed of {len(reports)} job(s)"
        + (":" if count["failed"] else ""))
    for r in reports:
        if r.status == "failed":
            say(f"  [{r.index}] {r.label}: {r.reason}")
    if count["failed"]:
        raise typer.Exit(1)


def _silent(message: str) -> None:
    """Messages of a ``--quiet`` batch (the summary is still printed)."""


def register(app: typer.Typer) -> None:
    """Add ``collect`` to the ``actsparse`` app."""
    app.command()(collect)
