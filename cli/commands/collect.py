"""CLI command ``collect``: run models over a corpus and stream FFN activations into a store (one run, or a
jobs file of many)."""

from __future__ import annotations

from pathlib import Path

import typer

from actsparse.cli.options import (
    DECODING_OPTIONS,
    BlockLengthOption,
    CfgScaleOption,
    DiffusionOption,
    GenerateOption,
    GenLengthOption,
    MaskTokenOption,
    QuietOption,
    RemaskingOption,
    SamplingOption,
    SeedOption,
    StepsOption,
    TemperatureOption,
    ThreadsOption,
    TopPOption,
    decoding_spec,
    set_threads,
)
from actsparse.cli.output import progress_bars, say
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
    compute_dtype: str = typer.Option("float32", help="forward-pass dtype"),
    chunk_tokens: int = typer.Option(1024, help="tokens per chunk/shard"),
    split: str = typer.Option("collect", help="corpus split: collect | heldout"),
    text_field: str | None = typer.Option(None, help="jsonl field / parquet column with the text"),
    no_bos: bool = typer.Option(False, "--no-bos", help="do not start windows with BOS"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the checkpoint"),
    config: Path | None = typer.Option(None, "--config", help="TOML file with a list of jobs (see README)"),
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

    set_threads(threads)
    if config is not None:
        from actsparse.pipeline.jobs import run_jobs

        given = [p for p in _JOB_OPTIONS if getattr(ctx.get_parameter_source(p), "name", "") == "COMMANDLINE"]
        if given:  # never silently ignored: a job's settings come from the file only
            raise ActsparseError(f"--config takes every job setting from the file; also given: "
                                 f"{', '.join('--' + p.replace('_', '-') for p in given)} (put them in its [defaults])")
        with progress_bars(not quiet) as progress:
            failed = run_jobs(config, store=store, statistics=TOKEN_STATS, progress=progress, log=say)
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
    with progress_bars(not quiet) as progress:
        res = run_collect(cfg, store, statistics=TOKEN_STATS, progress=progress, log=say)
    say(f"run_id={res.run_id} tokens={res.n_tokens} status={res.status}")


def register(app: typer.Typer) -> None:
    """Add ``collect`` to the ``actsparse`` app."""
    app.command()(collect)
