"""Options shared by several commands (one definition each, so that their names and help agree)."""

from __future__ import annotations

from typing import Annotated

import typer

from actsparse.core.errors import ActsparseError

RunsOption = Annotated[list[str] | None, typer.Option(
    "--run", "-r", help="a run id or unique prefix (repeatable; default: every complete run)")]
RunOption = Annotated[str | None, typer.Option("--run", "-r", help="run id or prefix (default: the only run)")]
ThreadsOption = Annotated[int | None, typer.Option(help="torch threads (default: all cores)")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or messages")]


def set_threads(n: int | None) -> None:
    """Set torch's thread count from ``--threads``.

    Raises:
        ActsparseError: a count below 1.
    """
    if n is not None:
        if n < 1:
            raise ActsparseError(f"--threads must be positive (got {n})")
        import torch

        torch.set_num_threads(n)


ExecutorOption = Annotated[str, typer.Option(
    "--executor", help="local (this process, job after job) | ray (a Ray cluster; README: Running on a cluster)")]
AddressOption = Annotated[str | None, typer.Option(
    "--address", help="with --executor ray: auto (the cluster this machine joined) | HOST:PORT of its head "
                      "(default: a local Ray instance for this command)")]
WorkersOption = Annotated[int | None, typer.Option(
    "--workers", help="with --executor ray: worker processes (default: as many as the cluster's CPUs fit)")]
GpusPerWorkerOption = Annotated[float | None, typer.Option(
    "--gpus-per-worker", help="with --executor ray: GPUs each worker reserves (default 0)")]
DeviceOption = Annotated[str, typer.Option(
    "--device", help="auto | cpu | cuda: where the forward pass runs (auto: cuda where torch sees a GPU; with "
                     "--executor ray, where workers reserve GPUs)")]


def ray_options(executor: str, address: str | None = None, workers: int | None = None,
                gpus_per_worker: float | None = None, device: str = "auto"):
    """The ``actsparse.executors.ray_session.RayOptions`` of ``--executor ray``, or None for ``local``.

    Raises:
        ActsparseError: an unknown executor, or a Ray option given with ``--executor local`` (never ignored).
    """
    from actsparse.executors.ray_session import EXECUTORS, RayOptions

    if executor not in EXECUTORS:
        raise ActsparseError(f"unknown --executor '{executor}' (choose {' or '.join(EXECUTORS)})")
    if executor == "local":
        given = [name for name, v in (("--address", address), ("--workers", workers),
                                      ("--gpus-per-worker", gpus_per_worker)) if v is not None]
        if given:
            raise ActsparseError(f"{', '.join(given)} only apply to --executor ray")
        return None
    from actsparse.executors.ray_session import check_reachable, import_ray

    opts = RayOptions(address=address, workers=workers, gpus_per_worker=gpus_per_worker or 0, device=device)
    opts.check()
    import_ray(local=address is None)  # without the extra, or where nothing listens: one line, before any work
    if address not in (None, "auto"):
        check_reachable(address, opts.connect_timeout_s)
    return opts


def executor_maps(opts):
    """A context holding the Ray maps of the analysis (``actsparse.executors.ray_analysis.RayMaps``) for
    ``--executor ray``, or None for ``local``."""
    import contextlib

    if opts is None:
        return contextlib.nullcontext()
    from actsparse.executors.ray_analysis import RayMaps

    return RayMaps(opts)


# Generation and diffusion (collect and evaluate): which decoding, and its settings.
GenerateOption = Annotated[int | None, typer.Option(
    "--generate", help="generate N tokens after each prompt with a KV cache; every forward pass counts")]
SamplingOption = Annotated[str | None, typer.Option(help="with --generate: greedy (default) | top-p")]
TopPOption = Annotated[float | None, typer.Option(
    "--top-p", help="with --sampling top-p: the nucleus mass (default 1)")]
TemperatureOption = Annotated[float | None, typer.Option(
    help="--sampling top-p: logits divided by it (default 1); masked diffusion: Gumbel noise (default 0 = argmax)")]
SeedOption = Annotated[int | None, typer.Option(help="seed of the sampling or denoising noise (default 0)")]
DiffusionOption = Annotated[bool, typer.Option(
    "--diffusion", help="run a diffusion LM's denoising loop on each prompt; every step counts")]
StepsOption = Annotated[int | None, typer.Option("--steps", help="with --diffusion: denoising steps in all")]
GenLengthOption = Annotated[int | None, typer.Option(help="with --diffusion: answer tokens")]
BlockLengthOption = Annotated[int | None, typer.Option(
    help="with --diffusion: block length (divides --gen-length; diffusion_gemma: its canvas)")]
CfgScaleOption = Annotated[float | None, typer.Option(
    help="masked diffusion: classifier-free guidance scale (default 0 = off)")]
RemaskingOption = Annotated[str | None, typer.Option(help="masked diffusion: low_confidence (default) | random")]
MaskTokenOption = Annotated[int | None, typer.Option(help="masked diffusion: the [MASK] id (default: the model's)")]
DECODING_OPTIONS = ("generate", "sampling", "top_p", "temperature", "seed", "diffusion", "steps", "gen_length",
                    "block_length", "cfg_scale", "remasking", "mask_token_id")


def decoding_spec(generate: int | None, diffusion: bool, *, sampling: str | None = None, top_p: float | None = None,
                  temperature: float | None = None, seed: int | None = None, steps: int | None = None,
                  gen_length: int | None = None, block_length: int | None = None, cfg_scale: float | None = None,
                  remasking: str | None = None, mask_token_id: int | None = None):
    """The ``pipeline.decoding`` spec the generation and diffusion options give (None: teacher-forced text).

    Raises:
        ActsparseError: both --generate and --diffusion, --diffusion without its lengths, or an option of one
            mode given with the other or with neither.
    """
    given = dict(sampling=sampling, top_p=top_p, steps=steps, gen_length=gen_length, block_length=block_length,
                 cfg_scale=cfg_scale, remasking=remasking, mask_token_id=mask_token_id, temperature=temperature,
                 seed=seed)
    if generate is not None and diffusion:
        raise ActsparseError("--generate and --diffusion exclude each other")
    mode = "--generate" if generate is not None else "--diffusion" if diffusion else None
    own = {"--generate": ("sampling", "top_p", "temperature", "seed"),
           "--diffusion": ("steps", "gen_length", "block_length", "cfg_scale", "remasking", "mask_token_id",
                           "temperature", "seed")}.get(mode, ())
    stray = [k for k, v in given.items() if v is not None and k not in own]
    if stray:
        names = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ActsparseError(f"{names} appl{'ies' if len(stray) == 1 else 'y'} to "
                             + ("--generate or --diffusion" if mode is None else f"the other mode, not {mode}"))
    if generate is not None:
        from actsparse.pipeline.decoding import GenerationSpec
        from actsparse.pipeline.generate import Sampling

        return GenerationSpec(generate, Sampling(sampling or "greedy", 1.0 if top_p is None else top_p,
                                                 1.0 if temperature is None else temperature, seed or 0))
    if not diffusion:
        return None
    missing = [f"--{k.replace('_', '-')}" for k in ("steps", "gen_length", "block_length") if given[k] is None]
    if missing:
        raise ActsparseError(f"--diffusion needs {', '.join(missing)}")
    from actsparse.pipeline.decoding import DiffusionSpec
    from actsparse.pipeline.diffusion.masked import MaskedDiffusionConfig

    return DiffusionSpec(MaskedDiffusionConfig(
        steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature or 0.0,
        cfg_scale=cfg_scale or 0.0, remasking=remasking or "low_confidence", mask_token_id=mask_token_id,
        seed=seed or 0))
